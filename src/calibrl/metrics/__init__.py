"""Calibration metrics: pure functions on confidences and correctness (no models, no torch).

All functions take ``confidence``: float array ``[N]`` in [0, 1] and ``correct``: array ``[N]``
of 0/1 (bools accepted), and raise ``ValueError`` on empty input, mismatched shapes, confidences
that are non-finite or outside [0, 1], or correctness values other than 0/1. They never clip.

- :mod:`calibrl.metrics.calibration`: the metrics (binned calibration errors, Brier and its
  decomposition, log loss, AUROC, risk-coverage / selective prediction).
- :mod:`calibrl.metrics.abstention`: abstention rate, selective accuracy, over/under-abstention.
- :mod:`calibrl.metrics.summary`: the named set of scalar metrics evaluation reports, with
  bootstrap intervals, overall and per slice.
"""

from calibrl.metrics.abstention import ABSTENTION_KEYS, abstention_metrics
from calibrl.metrics.calibration import (
    ReliabilityBins,
    accuracy_at_coverage,
    aurc,
    auroc,
    brier_decomposition,
    brier_score,
    calibration_summary,
    confident_error_rate,
    expected_calibration_error,
    log_loss,
    reliability_bins,
    risk_coverage_curve,
)
from calibrl.metrics.summary import SCALAR_METRICS, bootstrap_ci, metric_report, scalar_metrics, slice_report

__all__ = [
    "ABSTENTION_KEYS",
    "abstention_metrics",
    "SCALAR_METRICS",
    "ReliabilityBins",
    "accuracy_at_coverage",
    "aurc",
    "auroc",
    "bootstrap_ci",
    "brier_decomposition",
    "brier_score",
    "calibration_summary",
    "confident_error_rate",
    "expected_calibration_error",
    "log_loss",
    "metric_report",
    "reliability_bins",
    "risk_coverage_curve",
    "scalar_metrics",
    "slice_report",
]
