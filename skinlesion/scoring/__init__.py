"""Scoring predictions: per-split artifacts and metrics, lesion-bootstrap intervals, calibration."""
