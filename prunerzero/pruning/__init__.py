"""Models, calibration data, statistics, masks, pruning methods, perplexity, saving."""
