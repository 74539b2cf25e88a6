"""Where results live: runs on disk, background jobs, loaded models and the statistics cache."""
