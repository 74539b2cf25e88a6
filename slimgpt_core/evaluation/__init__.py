"""Measuring a model: perplexity, zero-shot tasks, speed, generations and comparisons."""
