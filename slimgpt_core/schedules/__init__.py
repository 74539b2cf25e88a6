"""Per-layer pruning ratios: the presets, predicted error curves and the `auto` allocation."""
