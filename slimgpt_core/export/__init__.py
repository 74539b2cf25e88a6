"""Checkpoints that `transformers` loads, mixed per-layer shapes included."""
