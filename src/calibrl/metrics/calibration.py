"""Calibration and selective-prediction metrics of stated confidences.

Every public function takes ``confidence``: float ``[N]`` in [0, 1] (the stated probability that
the answer is right) and ``correct``: ``[N]`` of 0/1 or bool, validated by :func:`_validate`.

Sources:
- ECE, MCE: Naeini, Cooper & Hauskrecht, "Obtaining Well Calibrated Probabilities Using Bayesian
  Binning" (AAAI 2015); Guo et al., "On Calibration of Modern Neural Networks", arXiv:1706.04599.
  RMS calibration error (``norm="l2"``): Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection
  with Outlier Exposure", arXiv:1812.04606; Kumar, Liang & Ma, "Verified Uncertainty Calibration",
  arXiv:1909.10155 (the unbiased variant is not used).
- Brier score: Brier, "Verification of forecasts expressed in terms of probability" (1950); its
  decomposition: Murphy, "A New Vector Partition of the Probability Score", J. Appl. Meteor. 12
  (1973); within-bin terms: Stephenson, Coelho & Jolliffe, "Two Extra Components in the Brier
  Score Decomposition", Weather and Forecasting 23 (2008).
- AUROC as the Mann-Whitney U statistic: Hanley & McNeil, Radiology 143 (1982).
- Selective prediction: Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks",
  arXiv:1705.08500 (risk-coverage curve); Geifman, Uziel & El-Yaniv, "Bias-Reduced Uncertainty
  Estimation for Deep Neural Classifiers", arXiv:1805.08206 (AURC).

Ties in selective prediction: predictions with equal confidence cannot be ranked, so every
quantity that keeps "the k most confident" is the expected value over a uniformly random order
within each tie group. A tie group cut at the coverage boundary then contributes its mean error
pro rata: keeping j of a group of m tied predictions with e errors adds j * e / m expected errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

STRATEGIES = ("quantile", "uniform")
NORMS = ("l1", "l2", "max")

__all__ = [
    "ReliabilityBins",
    "accuracy_at_coverage",
    "aurc",
    "auroc",
    "brier_decomposition",
    "brier_score",
    "calibration_summary",
    "confident_error_rate",
    "expected_calibration_error",
    "log_loss",
    "reliability_bins",
    "risk_coverage_curve",
]


def _validate(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(confidence, dtype=np.float64)
    c_raw = np.asarray(correct)
    if q.ndim != 1 or c_raw.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D, got shapes {q.shape} and {c_raw.shape}")
    if q.shape != c_raw.shape:
        raise ValueError(f"confidence has {q.shape[0]} items but correct has {c_raw.shape[0]}")
    if q.size == 0:
        raise ValueError("empty input: calibration metrics need at least one prediction")
    if not np.isfinite(q).all():
        raise ValueError("confidence holds a non-finite value")
    if q.min() < 0.0 or q.max() > 1.0:
        bad = q[(q < 0.0) | (q > 1.0)][0]
        raise ValueError(f"confidence must lie in [0, 1], got {bad!r}")
    c = c_raw.astype(np.float64)
    if not ((c == 0.0) | (c == 1.0)).all():
        raise ValueError("correct must hold only 0/1 (or bool) values")
    return q, c


def _bins(q: np.ndarray, n_bins: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges ``[B + 1]`` (from 0.0 to 1.0) and the bin of every confidence, int ``[N]`` in [0, B).

    Bins are right-closed, ``(edges[b], edges[b + 1]]``, and the first also holds 0.0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "uniform":
        edges = np.arange(n_bins + 1) / n_bins  # k / n exactly as the literal would round
    elif strategy == "quantile":
        # Equal-mass bins from the empirical quantiles. Coinciding quantiles merge into one edge, so
        # the bin is a function of the value alone: identical confidences always share a bin (bins
        # may then hold unequal counts, and there may be fewer than n_bins of them).
        inner = np.unique(np.quantile(q, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
        edges = np.concatenate(([0.0], inner, [1.0]))
    else:
        raise ValueError(f"unknown binning strategy {strategy!r}; valid choices: {', '.join(STRATEGIES)}")
    # The number of inner edges below q: (lo, hi] bins, 0.0 in the first, 1.0 in the last.
    return edges, np.searchsorted(edges[1:-1], q, side="left")


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics behind a reliability diagram and the binned calibration metrics.

    ``B`` bins in increasing confidence order, each right-closed ``(lower, upper]`` (the first
    also holds 0.0).

    Attributes:
        lower: float ``[B]``, lower bin edges; ``lower[0] == 0.0``.
        upper: float ``[B]``, upper bin edges; ``upper[-1] == 1.0``.
        count: int ``[B]``, predictions per bin (may be 0).
        confidence_mean: float ``[B]``, mean confidence in the bin; NaN for an empty bin.
        accuracy: float ``[B]``, fraction correct in the bin; NaN for an empty bin.
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence_mean: np.ndarray
    accuracy: np.ndarray

    def calibration_error(self, norm: str = "l1") -> float:
        """Binned calibration error of these bins; gaps ``g_b = accuracy_b - confidence_mean_b``.

        ``"l1"``: ``sum_b (n_b / N) |g_b|`` (ECE, Naeini et al. 2015; Guo et al. arXiv:1706.04599).
        ``"l2"``: ``sqrt(sum_b (n_b / N) g_b^2)`` (RMS calibration error, arXiv:1812.04606; the
        convention of torchmetrics ``norm="l2"``, without debiasing).
        ``"max"``: ``max_b |g_b|`` over non-empty bins (MCE, Naeini et al. 2015).

        Returns:
            The error in [0, 1] (probability units).

        Raises:
            ValueError: ``norm`` is not one of ``l1, l2, max``.
        """
        full = self.count > 0
        gaps = np.abs(self.accuracy[full] - self.confidence_mean[full])
        weights = self.count[full] / self.count.sum()
        if norm == "l1":
            return float(np.sum(weights * gaps))
        if norm == "l2":
            return float(np.sqrt(np.sum(weights * gaps**2)))
        if norm == "max":
            return float(np.max(gaps))
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")


def _reliability_bins(q: np.ndarray, c: np.ndarray, n_bins: int, strategy: str) -> ReliabilityBins:
    edges, idx = _bins(q, n_bins, strategy)
    n_b = edges.size - 1
    count = np.bincount(idx, minlength=n_b)
    full = count > 0

    def bin_mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(idx, weights=values, minlength=n_b)
        return np.divide(sums, count, out=np.full(n_b, np.nan), where=full)

    return ReliabilityBins(edges[:-1], edges[1:], count, bin_mean(q), bin_mean(c))


def reliability_bins(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10, strategy: str = "uniform"
) -> ReliabilityBins:
    """Bin the predictions by confidence; the single binning path of every binned metric and plot.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        n_bins: number of bins (>= 1).
        strategy: ``"uniform"``: ``B = n_bins`` equal-width bins ``(k/n, (k+1)/n]``, 0.0 in the
            first. ``"quantile"``: equal-mass bins whose inner edges are the empirical quantiles
            ``k / n_bins`` of ``confidence`` (linear interpolation, numpy's default); coinciding
            quantiles merge, so ``B <= n_bins`` and identical confidences never land in different
            bins. The outer edges are 0.0 and 1.0. A value on an edge belongs to the lower bin.

    Returns:
        :class:`ReliabilityBins` with ``B`` bins.

    Raises:
        ValueError: invalid inputs (see :mod:`calibrl.metrics`), ``n_bins < 1`` or an unknown
            strategy.
    """
    q, c = _validate(confidence, correct)
    return _reliability_bins(q, c, n_bins, strategy)


def expected_calibration_error(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10, strategy: str = "uniform", norm: str = "l1"
) -> float:
    """Binned calibration error: ECE (``"l1"``), RMS calibration error (``"l2"``) or MCE (``"max"``).

    With ``g_b = acc_b - conf_b`` the gap between accuracy and mean confidence of bin ``b``:
    ``l1 = sum_b (n_b / N) |g_b|``; ``l2 = sqrt(sum_b (n_b / N) g_b^2)``; ``max = max_b |g_b|``
    over non-empty bins. Sources: Naeini et al. (AAAI 2015) for ECE and MCE, Guo et al.
    arXiv:1706.04599; RMS as in Hendrycks et al. arXiv:1812.04606 and torchmetrics ``norm="l2"``.

    Difference from ``torchmetrics.functional.classification.binary_calibration_error`` (1.9),
    which bins the positive-class probability (our ``confidence``) against the label (our
    ``correct``): its bins are left-closed ``[lo, hi)`` on ``torch.linspace(0, 1, n_bins + 1)``
    edges, with 1.0 alone in an extra bin; ours are right-closed ``(lo, hi]`` on ``k / n_bins``
    edges, with 0.0 in the first bin and 1.0 in the last. The two agree unless a confidence lies
    on an edge (e.g. 0.2 with 10 bins: our ``(0.1, 0.2]``, its ``[0.2, 0.3)``) or equals 1.0.
    (Its linspace edges may also miss ``k / n`` by an ulp: in float64 its fourth 10-bin edge is
    0.30000000000000004, so there 0.3 lands in the lower bin, as in ours.)

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        n_bins: number of bins (>= 1).
        strategy: ``"uniform"`` or ``"quantile"``, as in :func:`reliability_bins`.
        norm: ``"l1"``, ``"l2"`` or ``"max"``.

    Returns:
        The error in [0, 1] (probability units).

    Raises:
        ValueError: invalid inputs, ``n_bins < 1``, an unknown strategy or an unknown norm.
    """
    return reliability_bins(confidence, correct, n_bins, strategy).calibration_error(norm)


def brier_score(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Brier score ``mean((q - c)^2)``; lower is better.

    Source: Brier, Monthly Weather Review 78 (1950).

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.

    Returns:
        Brier score in [0, 1] (squared probability units).

    Raises:
        ValueError: invalid inputs.
    """
    q, c = _validate(confidence, correct)
    return float(np.mean((q - c) ** 2))


def brier_decomposition(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10, strategy: str = "uniform"
) -> dict[str, float]:
    """Murphy (1973) decomposition of the Brier score over the bins of :func:`reliability_bins`.

    With ``acc`` the overall accuracy and ``n_b, conf_b, acc_b`` the count, mean confidence and
    accuracy of bin ``b``:

    - ``reliability = sum_b (n_b / N) (conf_b - acc_b)^2`` (lower is better),
    - ``resolution = sum_b (n_b / N) (acc_b - acc)^2`` (higher is better),
    - ``uncertainty = acc (1 - acc)`` (of the outcomes alone),
    - ``within_bin = brier - (reliability - resolution + uncertainty)``: the within-bin variance
      minus twice the within-bin covariance of Stephenson, Coelho & Jolliffe (2008),
      ``(1/N) sum_b sum_{i in b} [(q_i - conf_b)^2 - 2 (q_i - conf_b)(c_i - acc_b)]``; exactly 0
      when the forecasts are constant within every bin.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        n_bins: number of bins (>= 1).
        strategy: ``"uniform"`` or ``"quantile"``, as in :func:`reliability_bins`.

    Returns:
        ``{"brier", "reliability", "resolution", "uncertainty", "within_bin"}``, squared
        probability units; all in [0, 1] except ``within_bin``, which may be negative.

    Raises:
        ValueError: invalid inputs, ``n_bins < 1`` or an unknown strategy.
    """
    q, c = _validate(confidence, correct)
    bins = _reliability_bins(q, c, n_bins, strategy)
    full = bins.count > 0
    weights = bins.count[full] / q.size
    acc_b = bins.accuracy[full]
    acc = c.mean()
    brier = float(np.mean((q - c) ** 2))
    rel = float(np.sum(weights * (bins.confidence_mean[full] - acc_b) ** 2))
    res = float(np.sum(weights * (acc_b - acc) ** 2))
    unc = float(acc * (1.0 - acc))
    return {
        "brier": brier,
        "reliability": rel,
        "resolution": res,
        "uncertainty": unc,
        "within_bin": brier - (rel - res + unc),
    }


def log_loss(confidence: ArrayLike, correct: ArrayLike, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-mean(c log q + (1 - c) log(1 - q))``, in nats; lower is better.

    Inputs are validated first (confidence in [0, 1], never clipped); ``q`` is then clipped to
    ``[eps, 1 - eps]`` inside the logarithm only, a numerical guard so that a confident miss
    (``q = 0`` with ``c = 1``) costs ``-log(eps)`` (27.6 nats at the default) instead of infinity.
    Source: Good, "Rational Decisions", J. R. Stat. Soc. B 14 (1952); matches
    ``sklearn.metrics.log_loss`` away from the clip.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        eps: the guard, in (0, 0.5).

    Returns:
        Log loss in [0, -log(eps)].

    Raises:
        ValueError: invalid inputs or ``eps`` outside (0, 0.5).
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    q, c = _validate(confidence, correct)
    guarded = np.clip(q, eps, 1.0 - eps)
    return float(-np.mean(np.log(np.where(c == 1.0, guarded, 1.0 - guarded))))


def _tie_groups(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start positions and sizes of the runs of equal values in a sorted array ``[N]``."""
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    return starts, np.diff(starts, append=sorted_values.size)


def auroc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the ROC curve of confidence as a score for "correct".

    Equals P(q_correct > q_wrong) + 0.5 * P(tie) (Mann-Whitney U / (n1 * n0), Hanley & McNeil
    1982), ties handled by average ranks.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1] (the score).
        correct: correctness ``[N]``, 0/1 or bool (the positive class is 1).

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
    order = np.argsort(q)  # any order within ties: they share their average rank
    # Average 1-based ranks over runs of tied values.
    starts, counts = _tie_groups(q[order])
    ranks = np.empty(q.size, dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    u = ranks[c == 1.0].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _expected_errors(q: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected errors among the k most confident predictions, float ``[N]`` for k = 1..N, and
    the k at which each tie group ends (int ``[K]``, increasing, last N).

    Sorted by confidence descending, each prediction's error is replaced by its tie group's mean
    error, so a partial group adds its errors pro rata (the mean under random tie-breaking).
    """
    order = np.argsort(-q)  # any order within ties: a group's errors are averaged
    starts, counts = _tie_groups(q[order])
    group_error = np.add.reduceat(1.0 - c[order], starts) / counts
    return np.cumsum(np.repeat(group_error, counts)), starts + counts


def risk_coverage_curve(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk against coverage, one point per distinct confidence threshold.

    For each distinct confidence ``t`` (descending), keep the predictions with ``q >= t`` (a tie
    group enters whole): ``coverage = kept / N`` and ``risk = errors among kept / kept``.
    Source: Geifman & El-Yaniv, arXiv:1705.08500.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.

    Returns:
        ``(coverage, risk)``, float ``[K]`` each, K = number of distinct confidences; coverage
        increases strictly to 1.0, risk in [0, 1].

    Raises:
        ValueError: invalid inputs.
    """
    q, c = _validate(confidence, correct)
    expected_errors, kept = _expected_errors(q, c)
    return kept / q.size, expected_errors[kept - 1] / kept


def aurc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve (AURC), tie-aware; lower is better.

    ``AURC = (1/N) sum_{k=1..N} E[risk of the k most confident]``: the selective risk at each of
    the N coverages ``k / N`` (a right Riemann sum of the risk-coverage step curve), as in
    Geifman, Uziel & El-Yaniv, arXiv:1805.08206. Within a tie group the order is taken as
    uniformly random and the expectation is exact: keeping ``j`` of a group of ``m`` tied
    predictions with ``e`` errors counts ``j * e / m`` errors. So all-tied confidences give the
    overall error rate, and the value does not depend on the input order.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.

    Returns:
        AURC in [0, 1].

    Raises:
        ValueError: invalid inputs.
    """
    q, c = _validate(confidence, correct)
    expected_errors, _ = _expected_errors(q, c)
    return float(np.mean(expected_errors / np.arange(1, q.size + 1)))


def accuracy_at_coverage(confidence: ArrayLike, correct: ArrayLike, coverage: float) -> float:
    """Accuracy of the ``k = ceil(coverage * N)`` most confident predictions.

    When the cut falls inside a group of tied confidences, that group contributes its mean
    accuracy pro rata (the expected accuracy under random tie-breaking). ``coverage * N`` within
    1e-9 of an integer counts as that integer, so float noise (``0.07 * 100 = 7.000000000000001``)
    never adds a prediction. Source: Geifman & El-Yaniv, arXiv:1705.08500.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        coverage: fraction of predictions kept, in (0, 1].

    Returns:
        Selective accuracy in [0, 1].

    Raises:
        ValueError: invalid inputs or ``coverage`` outside (0, 1].
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}")
    q, c = _validate(confidence, correct)
    k = max(1, math.ceil(coverage * q.size - 1e-9))
    expected_errors, _ = _expected_errors(q, c)
    return float(1.0 - expected_errors[k - 1] / k)


def confident_error_rate(confidence: ArrayLike, correct: ArrayLike, threshold: float = 0.9) -> float:
    """Fraction of all N predictions that are wrong with ``confidence >= threshold``.

    The denominator is N, not the number of confident predictions: this is the rate of confident
    mistakes per question asked.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        threshold: confidence at and above which a prediction counts as confident, in [0, 1].

    Returns:
        Rate in [0, 1].

    Raises:
        ValueError: invalid inputs or ``threshold`` outside [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    q, c = _validate(confidence, correct)
    return float(np.mean((c == 0.0) & (q >= threshold)))


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

    Raises:
        ValueError: empty input, mismatched shapes, or invalid well-formed rows.
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
