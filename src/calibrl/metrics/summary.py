"""The scalar calibration metrics evaluation reports, with percentile-bootstrap intervals, overall
and per slice.

Every metric is a function ``(confidence float [N] in [0, 1], correct [N] of 0/1) -> float``;
:func:`scalar_metrics` names the set evaluation reports, :func:`bootstrap_ci` attaches intervals to
any such set.

Source of the interval: Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13
(percentile interval).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np

from calibrl.metrics.calibration import (
    ArrayLike,
    _validate,
    accuracy_at_coverage,
    aurc,
    auroc,
    brier_decomposition,
    brier_score,
    confident_error_rate,
    expected_calibration_error,
    log_loss,
)

Metric = Callable[[np.ndarray, np.ndarray], float]

__all__ = ["SCALAR_METRICS", "bootstrap_ci", "metric_report", "scalar_metrics", "slice_report"]


def _accuracy(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Fraction correct, ``mean(correct)``, in [0, 1]. Raises ValueError on invalid inputs."""
    return float(_validate(confidence, correct)[1].mean())


def _confidence_mean(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Mean stated confidence, in [0, 1]. Raises ValueError on invalid inputs."""
    return float(_validate(confidence, correct)[0].mean())


def _brier_term(term: str, n_bins: int) -> Metric:
    """One term of :func:`brier_decomposition` (uniform bins) as a scalar metric."""

    def metric(confidence: ArrayLike, correct: ArrayLike) -> float:
        return brier_decomposition(confidence, correct, n_bins)[term]

    return metric


def scalar_metrics(n_bins: int = 10, threshold: float = 0.9) -> dict[str, Metric]:
    """The scalar calibration metrics evaluation reports, by name.

    ``accuracy`` (mean correct), ``confidence_mean``, ``ece`` (uniform bins, l1), ``ece_quantile``
    (quantile bins, l1), ``rmsce`` (uniform, l2), ``mce`` (uniform, max), ``brier``, ``log_loss``
    (nats), ``auroc`` (NaN with one class), ``aurc``, ``acc_at_cov_50`` and ``acc_at_cov_80``
    (:func:`~calibrl.metrics.accuracy_at_coverage` at 0.5 and 0.8), ``confident_error_rate`` (at
    ``threshold``), ``brier_reliability``, ``brier_resolution``, ``brier_uncertainty`` (Murphy
    terms over uniform bins). Formulas and sources: :mod:`calibrl.metrics.calibration`.

    Args:
        n_bins: bins of every binned metric (>= 1; checked when a metric is called).
        threshold: confidence threshold of ``confident_error_rate``, in [0, 1] (checked when called).

    Returns:
        ``{name: metric}``; each ``metric(confidence [N], correct [N]) -> float`` raises ValueError
        on invalid inputs.
    """
    ece = partial(expected_calibration_error, n_bins=n_bins)
    return {
        "accuracy": _accuracy,
        "confidence_mean": _confidence_mean,
        "ece": ece,
        "ece_quantile": partial(ece, strategy="quantile"),
        "rmsce": partial(ece, norm="l2"),
        "mce": partial(ece, norm="max"),
        "brier": brier_score,
        "log_loss": log_loss,
        "auroc": auroc,
        "aurc": aurc,
        "acc_at_cov_50": partial(accuracy_at_coverage, coverage=0.5),
        "acc_at_cov_80": partial(accuracy_at_coverage, coverage=0.8),
        "confident_error_rate": partial(confident_error_rate, threshold=threshold),
        "brier_reliability": _brier_term("reliability", n_bins),
        "brier_resolution": _brier_term("resolution", n_bins),
        "brier_uncertainty": _brier_term("uncertainty", n_bins),
    }


SCALAR_METRICS: dict[str, Metric] = scalar_metrics()


def bootstrap_ci(
    confidence: ArrayLike,
    correct: ArrayLike,
    metrics: Mapping[str, Metric],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Point estimates and percentile-bootstrap intervals (Efron & Tibshirani 1993, ch. 13).

    Draws ``n_resamples`` index vectors of length N with replacement from
    ``numpy.random.default_rng(seed)``; every metric sees the same resamples, so the output is a
    function of the inputs and ``seed`` alone. A metric's interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of its finite resample values;
    non-finite ones (e.g. AUROC of a one-class resample) are dropped, and with fewer than 2 finite
    values the interval is NaN.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        metrics: ``{name: metric(confidence [N], correct [N]) -> float}``.
        n_resamples: resamples (>= 0); 0 gives point estimates only.
        level: interval coverage, in (0, 1).
        seed: seed of the resampling generator.

    Returns:
        ``{name: {"value": metric on all N rows, "ci_low", "ci_high", "n_valid": finite
        resamples (int)}}`` in the order of ``metrics``.

    Raises:
        ValueError: invalid inputs, ``n_resamples < 0``, ``level`` outside (0, 1), or whatever a
            metric raises.
    """
    q, c = _validate(confidence, correct)
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    fns = list(metrics.values())
    point = [float(fn(q, c)) for fn in fns]  # first, so a bad metric argument fails before resampling
    resampled = np.empty((len(fns), n_resamples))  # [metric, resample]
    rng = np.random.default_rng(seed)
    for r in range(n_resamples):
        rows = rng.integers(0, q.size, size=q.size)
        q_r, c_r = q[rows], c[rows]
        resampled[:, r] = [fn(q_r, c_r) for fn in fns]
    tail = (1.0 - level) / 2.0
    out: dict[str, dict[str, float]] = {}
    for name, value, values in zip(metrics, point, resampled, strict=True):
        finite = values[np.isfinite(values)]
        low, high = np.quantile(finite, [tail, 1.0 - tail]) if finite.size >= 2 else (np.nan, np.nan)
        out[name] = {"value": value, "ci_low": float(low), "ci_high": float(high), "n_valid": int(finite.size)}
    return out


def metric_report(
    confidence: ArrayLike,
    correct: ArrayLike,
    *,
    n_bins: int = 10,
    threshold: float = 0.9,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """:func:`bootstrap_ci` of :func:`scalar_metrics` ``(n_bins, threshold)``.

    Args and errors as in :func:`bootstrap_ci` and :func:`scalar_metrics`.

    Returns:
        ``{metric name: {"value", "ci_low", "ci_high", "n_valid"}}`` for every scalar metric.
    """
    return bootstrap_ci(
        confidence, correct, scalar_metrics(n_bins, threshold), n_resamples=n_resamples, level=level, seed=seed
    )


def slice_report(
    confidence: ArrayLike,
    correct: ArrayLike,
    labels: Sequence[str],
    *,
    n_bins: int = 10,
    threshold: float = 0.9,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`metric_report` of every slice, the rows sharing a label.

    Each slice is resampled on its own, with the same ``seed`` (so a slice's report does not
    depend on the other slices).

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        labels: slice label of every row, ``[N]``.
        n_bins, threshold, n_resamples, seed, level: as in :func:`metric_report`.

    Returns:
        ``{label: {"count": {"value": rows, "ci_low": nan, "ci_high": nan, "n_valid": 0},
        **metric_report(rows of the slice)}}``, labels in sorted order.

    Raises:
        ValueError: invalid inputs, ``labels`` not of length N, or as :func:`metric_report`.
    """
    q, c = _validate(confidence, correct)
    lab = np.asarray(labels, dtype=object)
    if lab.shape != q.shape:
        raise ValueError(f"labels must be 1-D with one label per row: got shape {lab.shape}, {q.size} rows")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label in sorted(set(lab.tolist())):
        rows = lab == label
        count = {"value": int(rows.sum()), "ci_low": np.nan, "ci_high": np.nan, "n_valid": 0}
        out[label] = {"count": count} | metric_report(
            q[rows], c[rows], n_bins=n_bins, threshold=threshold, n_resamples=n_resamples, seed=seed, level=level
        )
    return out
