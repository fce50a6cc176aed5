"""workers: model and data loading, calibration, evaluation (perplexity, KL), checkpoint conversion."""
