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

# Each module's ``__all__`` is its public API; the package re-exports exactly those names, so a
# new metric is listed once, in its module.
from calibrl.metrics import abstention, calibration, summary
from calibrl.metrics.abstention import *  # noqa: F403
from calibrl.metrics.calibration import *  # noqa: F403
from calibrl.metrics.summary import *  # noqa: F403

# `__all__ += module.__all__` is the form static checkers (pyright, mypy) follow through.
__all__: list[str] = []
__all__ += abstention.__all__
__all__ += calibration.__all__
__all__ += summary.__all__
