"""Pruning methods: SlimGPT's OBS math and its layer-by-layer driver, the baselines, LLM Surgeon, Minitron and Sheared-LLaMA."""
