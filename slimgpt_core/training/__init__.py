"""Training after pruning: the shared loop, LoRA/full recovery and its data."""
