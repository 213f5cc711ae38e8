"""Measuring pruned models: held-out perplexity cells (resumable, one JSON record per cell)."""
