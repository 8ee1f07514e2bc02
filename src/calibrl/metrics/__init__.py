"""Calibration metrics: pure functions on confidences and correctness (no models, no torch).

All functions take ``confidence``: float array ``[N]`` in [0, 1] and ``correct``: array ``[N]``
of 0/1 (bools accepted), and raise ``ValueError`` on empty input, mismatched shapes, confidences
that are non-finite or outside [0, 1], or correctness values other than 0/1. They never clip.
"""

from calibrl.metrics.calibration import (
    auroc,
    brier_score,
    calibration_summary,
    expected_calibration_error,
)

__all__ = ["auroc", "brier_score", "calibration_summary", "expected_calibration_error"]
