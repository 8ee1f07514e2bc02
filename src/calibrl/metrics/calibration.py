"""Expected calibration error, Brier score and AUROC of stated confidences.

Sources:
- ECE: Naeini, Cooper & Hauskrecht, "Obtaining Well Calibrated Probabilities Using Bayesian
  Binning" (AAAI 2015); Guo et al., "On Calibration of Modern Neural Networks", arXiv:1706.04599.
- Brier score: Brier, "Verification of forecasts expressed in terms of probability" (1950).
- AUROC as the Mann-Whitney U statistic: Hanley & McNeil, Radiology 143 (1982).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

__all__ = ["expected_calibration_error", "brier_score", "auroc", "calibration_summary"]


def _validate(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(confidence, dtype=np.float64)
    c_raw = np.asarray(correct)
    if q.ndim != 1 or c_raw.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D, got shapes {q.shape} and {c_raw.shape}")
    if q.shape != c_raw.shape:
        raise ValueError(f"confidence has {q.shape[0]} items but correct has {c_raw.shape[0]}")
    if q.size == 0:
        raise ValueError("empty input: calibration metrics need at least one prediction")
    if not np.all(np.isfinite(q)):
        raise ValueError("confidence holds a non-finite value")
    if np.any((q < 0.0) | (q > 1.0)):
        bad = q[(q < 0.0) | (q > 1.0)][0]
        raise ValueError(f"confidence must lie in [0, 1], got {bad!r}")
    c = c_raw.astype(np.float64)
    if not np.all((c == 0.0) | (c == 1.0)):
        raise ValueError("correct must hold only 0/1 (or bool) values")
    return q, c


def _bin_index(q: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "uniform":
        # Equal-width bins (lo, hi], with 0.0 in the first bin and 1.0 in the last.
        edges = np.arange(n_bins + 1) / n_bins  # k / n exactly as the literal would round
        return np.clip(np.searchsorted(edges, q, side="left") - 1, 0, n_bins - 1)
    if strategy == "quantile":
        # Equal-mass bins from the empirical quantiles. The bin is a function of the value alone,
        # so identical confidences always share a bin (bins may then hold unequal counts).
        inner = np.unique(np.quantile(q, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
        return np.searchsorted(inner, q, side="left")
    raise ValueError(f"unknown binning strategy {strategy!r}; valid choices: quantile, uniform")


def expected_calibration_error(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10, strategy: str = "uniform"
) -> float:
    """Expected calibration error: ``sum_b (n_b / N) * |mean(q in b) - mean(c in b)|``.

    Args:
        confidence: stated confidences, shape ``[N]``, in [0, 1].
        correct: correctness, shape ``[N]``, 0/1.
        n_bins: number of bins (>= 1).
        strategy: ``"uniform"`` (equal width, right-closed, 0.0 in the first bin) or
            ``"quantile"`` (equal mass; identical confidences never split).

    Returns:
        ECE in [0, 1] (same units as a probability).

    Raises:
        ValueError: invalid inputs (see module docstring of :mod:`calibrl.metrics`), ``n_bins < 1``
            or an unknown strategy.
    """
    q, c = _validate(confidence, correct)
    idx = _bin_index(q, n_bins, strategy)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_q = np.bincount(idx, weights=q, minlength=n_bins)
    sum_c = np.bincount(idx, weights=c, minlength=n_bins)
    nz = counts > 0
    gaps = np.abs(sum_q[nz] / counts[nz] - sum_c[nz] / counts[nz])
    return float(np.sum(counts[nz] / q.size * gaps))


def brier_score(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Brier score ``mean((q - c)^2)``, in [0, 1]; lower is better.

    Raises:
        ValueError: invalid inputs.
    """
    q, c = _validate(confidence, correct)
    return float(np.mean((q - c) ** 2))


def auroc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the ROC curve of confidence as a score for "correct".

    Equals P(q_correct > q_wrong) + 0.5 * P(tie) (Mann-Whitney U / (n1 * n0)), ties handled by
    average ranks.

    Returns:
        AUROC in [0, 1]; NaN (no warning, no exception) when only one class is present.

    Raises:
        ValueError: invalid inputs.
    """
    q, c = _validate(confidence, correct)
    n_pos = int(c.sum())
    n_neg = c.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(q, kind="mergesort")
    sorted_q = q[order]
    ranks = np.empty(q.size, dtype=np.float64)
    # Average 1-based ranks over runs of tied values.
    _, first, counts = np.unique(sorted_q, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[c == 1.0].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def calibration_summary(
    correct: ArrayLike, confidence: ArrayLike, format_ok: ArrayLike, n_bins: int = 10
) -> dict[str, float]:
    """Accuracy and calibration figures of a batch of completions, as logged every step.

    Accuracy and format rate are over all N completions (a format failure counts as wrong).
    Confidence statistics, ECE (``n_bins`` uniform bins), Brier and AUROC are over the
    well-formed completions only, since only they state a confidence; they are NaN when no
    completion is well-formed.

    Args:
        correct: 0/1, shape ``[N]``.
        confidence: float ``[N]``, NaN where the format failed.
        format_ok: bool ``[N]``.

    Returns:
        ``accuracy, format_rate, confidence_mean, confidence_std, overconfidence`` (mean
        confidence minus accuracy, both over well-formed completions; > 0 means overconfident),
        ``ece, brier, auroc``.
    """
    c = np.asarray(correct, dtype=np.float64)
    ok = np.asarray(format_ok, dtype=bool)
    q = np.asarray(confidence, dtype=np.float64)
    if c.size == 0:
        raise ValueError("empty input: no completions to summarise")
    if not (c.ndim == ok.ndim == q.ndim == 1 and c.shape == ok.shape == q.shape):
        raise ValueError(f"correct, confidence and format_ok must be 1-D of one length, got {c.shape}, {q.shape}, {ok.shape}")
    out = {"accuracy": float(c.mean()), "format_rate": float(ok.mean())}
    nan = float("nan")
    if ok.any():
        qo, co = q[ok], c[ok]
        out |= {
            "confidence_mean": float(qo.mean()),
            "confidence_std": float(qo.std()),
            "overconfidence": float(qo.mean() - co.mean()),
            "ece": expected_calibration_error(qo, co, n_bins=n_bins),
            "brier": brier_score(qo, co),
            "auroc": auroc(qo, co),
        }
    else:
        out |= dict.fromkeys(("confidence_mean", "confidence_std", "overconfidence", "ece", "brier", "auroc"), nan)
    return out
