"""Analysis of detection results and training runs: metrics, plots, statistics."""
