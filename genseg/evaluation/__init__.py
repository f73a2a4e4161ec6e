"""Measuring: segmentation metrics (metrics.py), scoring a trained segmenter on prepared data and drawing a run's
figures (evaluate.py), and the quality of a synthetic set (synthetic_quality.py)."""
