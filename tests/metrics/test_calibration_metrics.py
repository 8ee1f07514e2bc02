"""Calibration metrics: shared cases, hand-computed values, and cross-checks against
torchmetrics (ECE, RMSCE, MCE) and scikit-learn (AUROC, log loss)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from functools import partial

import numpy as np
import pytest
import torch
from helpers import case_id, load_cases
from sklearn.metrics import log_loss as sklearn_log_loss
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

from calibrl.metrics import (
    SCALAR_METRICS,
    accuracy_at_coverage,
    aurc,
    auroc,
    bootstrap_ci,
    brier_decomposition,
    brier_score,
    calibration_summary,
    confident_error_rate,
    expected_calibration_error,
    log_loss,
    metric_report,
    reliability_bins,
    risk_coverage_curve,
    scalar_metrics,
    slice_report,
)
from calibrl.metrics.calibration import _bins

METRIC_CASES = load_cases("calibration_metrics.jsonl")
CALLS = {"ece": expected_calibration_error, "brier": brier_score, "auroc": auroc}


# --------------------------------------------------------------------------- shared cases


@pytest.mark.parametrize("case", METRIC_CASES, ids=case_id)
def test_shared_case(case):
    fn = CALLS[case["call"]]  # an unknown call name is a KeyError: the case file and test disagree
    expect = case["expect"]
    args = (case["confidence"], case["correct"])
    if expect == "ValueError":
        with pytest.raises(ValueError):
            fn(*args, **case["kwargs"])
    elif expect == "nan":
        assert math.isnan(fn(*args, **case["kwargs"]))
    else:
        value = fn(*args, **case["kwargs"])
        assert isinstance(value, float)
        assert abs(value - float(expect)) <= 1e-9


# --------------------------------------------------------------------------- ECE by hand


def test_ece_uniform_hand_computed():
    # n_bins=10: 0.9 -> (0.8,0.9] gap |0.9-1| = 0.1; 0.2 -> (0.1,0.2] gap 0.2; 0.6 -> (0.5,0.6] gap 0.6
    # ECE = (0.1 + 0.2 + 0.6) / 3 = 0.3
    assert expected_calibration_error([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx(0.3, abs=1e-12)


def test_ece_quantile_hand_computed():
    # n_bins=2: the median of [0.1,0.2,0.3,0.4] is 0.25 -> bins {0.1,0.2} and {0.3,0.4}
    # bin 0: |0.15 - 0| = 0.15; bin 1: |0.35 - 1| = 0.65; ECE = 0.5*0.15 + 0.5*0.65 = 0.4
    value = expected_calibration_error([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], n_bins=2, strategy="quantile")
    assert value == pytest.approx(0.4, abs=1e-12)


def test_ece_single_bin_is_global_gap():
    # n_bins=1: |mean q - accuracy| = |(0.1+0.5+0.9)/3 - 2/3| = |0.5 - 0.6667| = 1/6
    assert expected_calibration_error([0.1, 0.5, 0.9], [1, 0, 1], n_bins=1) == pytest.approx(1 / 6, abs=1e-12)


def test_rmsce_and_mce_hand_computed():
    # Same data as test_ece_uniform_hand_computed: one prediction per bin, gaps 0.1, 0.2, 0.6.
    # l2 = sqrt((0.1^2 + 0.2^2 + 0.6^2) / 3) = sqrt(0.41 / 3); max = 0.6
    q, c = [0.9, 0.2, 0.6], [1, 0, 0]
    assert expected_calibration_error(q, c, norm="l2") == pytest.approx(math.sqrt(0.41 / 3), abs=1e-12)
    assert expected_calibration_error(q, c, norm="max") == pytest.approx(0.6, abs=1e-12)


def test_mce_ignores_bin_weight():
    # Bin (0.8,0.9]: nine 0.9s, all right -> gap 0.1; bin (0.1,0.2]: one 0.2, right -> gap 0.8.
    # l1 = 0.9*0.1 + 0.1*0.8 = 0.17; max = 0.8 although that bin holds a tenth of the data.
    q, c = [0.9] * 9 + [0.2], [1] * 10
    assert expected_calibration_error(q, c, norm="l1") == pytest.approx(0.17, abs=1e-12)
    assert expected_calibration_error(q, c, norm="max") == pytest.approx(0.8, abs=1e-12)


def test_unknown_norm_lists_choices():
    with pytest.raises(ValueError, match="l1, l2, max"):
        expected_calibration_error([0.5], [1], norm="l3")


# --------------------------------------------------------------------------- reliability bins


def test_reliability_bins_uniform_hand_computed():
    # 4 bins (0,.25], (.25,.5], (.5,.75], (.75,1]: {0.1, 0.25} | {0.3} | {} | {0.9}
    b = reliability_bins([0.1, 0.25, 0.3, 0.9], [1, 0, 1, 1], n_bins=4)
    np.testing.assert_array_equal(b.lower, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(b.upper, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(b.count, [2, 1, 0, 1])
    assert b.count.dtype.kind == "i"
    # mean q: (0.1+0.25)/2 = 0.175, 0.3, -, 0.9; accuracy: 1/2, 1, -, 1
    np.testing.assert_allclose(b.confidence_mean, [0.175, 0.3, np.nan, 0.9], atol=1e-12)
    np.testing.assert_allclose(b.accuracy, [0.5, 1.0, np.nan, 1.0], atol=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.count = np.zeros(4)  # type: ignore[misc]


def test_reliability_bins_quantile_edges():
    # n_bins=2: the median of [0.1, 0.2, 0.2, 0.3] is 0.2 -> edges 0, 0.2, 1; bins {0.1, 0.2, 0.2}, {0.3}
    b = reliability_bins([0.1, 0.2, 0.2, 0.3], [0, 1, 0, 1], n_bins=2, strategy="quantile")
    np.testing.assert_array_equal(b.lower, [0.0, 0.2])
    np.testing.assert_array_equal(b.upper, [0.2, 1.0])
    np.testing.assert_array_equal(b.count, [3, 1])
    np.testing.assert_allclose(b.confidence_mean, [0.5 / 3, 0.3], atol=1e-12)
    np.testing.assert_allclose(b.accuracy, [1 / 3, 1.0], atol=1e-12)
    # All four equal: every quantile is 0.5, the inner edges merge into one -> 2 bins, not 4.
    b = reliability_bins([0.5] * 4, [1, 0, 1, 1], n_bins=4, strategy="quantile")
    np.testing.assert_array_equal(b.lower, [0.0, 0.5])
    np.testing.assert_array_equal(b.upper, [0.5, 1.0])
    np.testing.assert_array_equal(b.count, [4, 0])


# --------------------------------------------------------------------------- bin edges


def test_zero_goes_to_first_bin():
    # 0.0 with 0.05 in [0, 0.1]: |0.025 - 0.5| = 0.475.
    # (0.0 in a bin of its own would give 0.5*|0-1| + 0.5*|0.05-0| = 0.525.)
    assert expected_calibration_error([0.0, 0.05], [1, 0]) == pytest.approx(0.475, abs=1e-12)


def test_one_goes_to_last_bin():
    # 1.0 with 0.95 in (0.9, 1]: |0.975 - 0.5| = 0.475.
    # (1.0 in a bin of its own would give 0.5*|1-0| + 0.5*|0.95-1| = 0.525.)
    assert expected_calibration_error([1.0, 0.95], [0, 1]) == pytest.approx(0.475, abs=1e-12)


def test_edge_value_goes_to_lower_bin():
    # 0.3 is in (0.2, 0.3] with 0.25: 2/3 * |0.275 - 0.5| + 1/3 * |0.35 - 0| = (0.45 + 0.35)/3 = 0.8/3
    # (with 0.35 in [0.3, 0.4) instead: 1/3 * 0.25 + 2/3 * |0.325 - 0.5| = (0.25 + 0.35)/3 = 0.2)
    value = expected_calibration_error([0.3, 0.25, 0.35], [1, 0, 0])
    assert value == pytest.approx(0.8 / 3, abs=1e-12)


@pytest.mark.parametrize("n_bins", [2, 4, 5, 10, 20])
def test_decimal_edges_right_closed(n_bins):
    # Every edge k/n_bins (a short decimal for these n) lies in bin k-1, i.e. bins are (lo, hi];
    # 0.0 is in bin 0 and 1.0 in bin n_bins-1.
    k = np.arange(n_bins + 1)
    _, idx = _bins(k / n_bins, n_bins, "uniform")
    np.testing.assert_array_equal(idx, np.maximum(k - 1, 0))
    # Midpoints (k + 0.5)/n lie strictly inside bin k.
    mids = (np.arange(n_bins) + 0.5) / n_bins
    np.testing.assert_array_equal(_bins(mids, n_bins, "uniform")[1], np.arange(n_bins))


def test_quantile_bins_never_split_identical_confidences():
    # Four identical confidences, half right: one shared bin gives |0.5 - 0.5| = 0. A split by rank
    # into {1,1} and {0,0} would give 0.5*|0.5-1| + 0.5*|0.5-0| = 0.5.
    assert expected_calibration_error([0.5] * 4, [1, 1, 0, 0], n_bins=2, strategy="quantile") == 0.0
    # Property on data with many ties: every distinct value maps to exactly one bin.
    rng = np.random.default_rng(1)
    q = rng.choice([0.1, 0.2, 0.5, 0.7, 0.9, 1.0], size=200, p=[0.05, 0.05, 0.6, 0.1, 0.1, 0.1])
    for n_bins in (2, 3, 5, 10, 20):
        _, idx = _bins(q, n_bins, "quantile")
        assert idx.min() >= 0 and idx.max() < n_bins
        for v in np.unique(q):
            assert len(np.unique(idx[q == v])) == 1, (n_bins, v)
        # Bins are monotone in the value.
        order = np.argsort(q, kind="mergesort")
        assert np.all(np.diff(idx[order]) >= 0)


def test_quantile_value_on_an_inner_edge_goes_to_the_lower_bin():
    # n_bins=2: median of [0.1, 0.2, 0.2, 0.3] is 0.2, an inner edge; bins are right-closed like the
    # uniform ones, so both 0.2s join 0.1: bins {0.1, 0.2, 0.2} and {0.3}.
    # bin 0: mean q 0.5/3, acc 1/3 -> gap 1/6, weight 3/4 -> 1/8; bin 1: |0.3 - 1| = 0.7, weight 1/4
    # ECE = 0.125 + 0.175 = 0.3   (left-closed {0.1}, {0.2, 0.2, 0.3} would give 0.025 + 0.325 = 0.35)
    value = expected_calibration_error([0.1, 0.2, 0.2, 0.3], [0, 1, 0, 1], n_bins=2, strategy="quantile")
    assert value == pytest.approx(0.3, abs=1e-12)


def test_quantile_equal_mass_without_ties():
    q = np.linspace(0.05, 0.95, 10)  # 10 distinct values
    _, idx = _bins(q, 5, "quantile")
    np.testing.assert_array_equal(np.bincount(idx, minlength=5), [2, 2, 2, 2, 2])


@pytest.mark.parametrize(("kwargs", "match"), [({"n_bins": 0}, "n_bins"), ({"strategy": "equal"}, "uniform")])
def test_bad_binning_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error([0.5], [1], **kwargs)


# --------------------------------------------------------------------------- vs torchmetrics


def _torchmetrics_ce(q, c, n_bins, norm="l1"):
    # float64 avoids torchmetrics' default float32 rounding.
    q = torch.tensor(q, dtype=torch.float64)
    return binary_calibration_error(q, torch.tensor(c), n_bins=n_bins, norm=norm).item()


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_torchmetrics_off_the_edges(seed, n_bins, norm):
    # torchmetrics (1.9) binary_calibration_error uses `preds` directly as the confidence of the
    # positive class and `target` as the outcome, i.e. exactly our (q, c), and its norms are ours:
    # l1 sum w|g|, l2 sqrt(sum w g^2) (debias off in the functional API), max over bins of |g|
    # (its empty bins count as gap 0, which never wins). Its bins are [lo, hi) on
    # torch.linspace(0, 1, n+1) edges with 1.0 alone in an extra bin; ours are (lo, hi] on k/n
    # edges. Continuous draws in (0.001, 0.999) never sit on an edge, so the two must agree.
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.001, 0.999, 400)
    c = (rng.uniform(size=400) < q**1.5).astype(np.int64)  # miscalibrated on purpose
    ours = expected_calibration_error(q, c, n_bins=n_bins, norm=norm)
    assert ours > 0.01  # not a vacuous comparison
    assert abs(ours - _torchmetrics_ce(q, c, n_bins, norm)) <= 1e-6


def test_torchmetrics_uses_prob_not_top1_confidence():
    # Documents the reference's definition: with q=[0.2, 0.8], c=[1, 1], n_bins=10:
    #   ours / torchmetrics: 0.5*|0.2-1| + 0.5*|0.8-1| = 0.4 + 0.1 = 0.5
    #   a top-1 definition (conf max(p,1-p)=0.8 for both, acc [0,1]) would give |0.8-0.5| = 0.3
    q, c = [0.2, 0.8], [1, 1]
    assert _torchmetrics_ce(q, c, 10) == pytest.approx(0.5, abs=1e-12)
    assert expected_calibration_error(q, c) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(
    ("norm", "ours", "theirs"),
    [
        # ours: 0.2 in (0.1,0.2] with gap |0.2-1| = 0.8; 0.25 in (0.2,0.3] with gap |0.25-0| = 0.25
        # torchmetrics: 0.2 and 0.25 share [0.2,0.3): mean q 0.225, acc 0.5 -> one gap 0.275
        ("l1", 0.5 * 0.8 + 0.5 * 0.25, 0.275),  # 0.525 vs 0.275
        ("l2", math.sqrt(0.5 * 0.64 + 0.5 * 0.0625), 0.275),  # sqrt(0.35125) vs sqrt(1 * 0.275^2)
        ("max", 0.8, 0.275),
    ],
)
def test_torchmetrics_differs_on_an_inner_edge(norm, ours, theirs):
    # 10 bins, 0.2 exactly on the edge (torch.linspace(0, 1, 11)[2] == 0.2 in float64 too).
    q, c = [0.2, 0.25], [1, 0]
    assert expected_calibration_error(q, c, n_bins=10, norm=norm) == pytest.approx(ours, abs=1e-12)
    assert _torchmetrics_ce(q, c, 10, norm) == pytest.approx(theirs, abs=1e-12)


def test_torchmetrics_differs_on_bin_edges():
    # n_bins=4 (edges 0, .25, .5, .75, 1 exact in binary).
    # ours: 0.5 in (0.25,0.5], 0.6 in (0.5,0.75]: 0.5*|0.5-1| + 0.5*|0.6-0| = 0.55
    # torchmetrics: 0.5 and 0.6 both in [0.5,0.75): |0.55 - 0.5| = 0.05
    q, c = [0.5, 0.6], [1, 0]
    assert expected_calibration_error(q, c, n_bins=4) == pytest.approx(0.55, abs=1e-12)
    assert _torchmetrics_ce(q, c, 4) == pytest.approx(0.05, abs=1e-12)
    # And 1.0: ours shares (0.9,1] with 0.95: |0.975 - 0.5| = 0.475; torchmetrics gives 1.0 its own
    # bin: 0.5*|0.95-1| + 0.5*|1-0| = 0.525.
    q, c = [0.95, 1.0], [1, 0]
    assert expected_calibration_error(q, c) == pytest.approx(0.475, abs=1e-12)
    assert _torchmetrics_ce(q, c, 10) == pytest.approx(0.525, abs=1e-12)


# --------------------------------------------------------------------------- AUROC


def test_auroc_hand_computed():
    # positives {0.35, 0.8}, negatives {0.1, 0.4}: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_auroc_ties_count_half():
    # positives {0.5, 0.9}, negatives {0.5, 0.5}: 0.5 vs 0.5 twice -> 2 * 0.5; 0.9 beats both -> 2
    # (1 + 2) / (2 * 2) = 0.75
    assert auroc([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1]) == 0.75


def test_auroc_inverted_ranking_is_zero():
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_auroc_single_class_is_nan_without_warning(recwarn):
    assert math.isnan(auroc([0.1, 0.9], [1, 1]))
    assert math.isnan(auroc([0.1, 0.9], [0, 0]))
    assert len(recwarn) == 0


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    q = np.round(rng.uniform(0, 1, 300), 1)  # 11 distinct values -> many ties
    c = (rng.uniform(size=300) < q).astype(int)
    assert auroc(q, c) == pytest.approx(roc_auc_score(c, q), abs=1e-12)
    # Bool labels work the same.
    assert auroc(q, c.astype(bool)) == pytest.approx(roc_auc_score(c, q), abs=1e-12)


# --------------------------------------------------------------------------- Brier


def test_brier_hand_computed():
    # ((0.9-1)^2 + (0.2-0)^2 + (0.6-0)^2) / 3 = (0.01 + 0.04 + 0.36) / 3 = 0.41 / 3
    assert brier_score([0.9, 0.2, 0.6], [1, 0, 0]) == pytest.approx(0.41 / 3, abs=1e-12)
    assert brier_score([1.0, 0.0], [1, 0]) == 0.0
    assert brier_score([0.0, 1.0], [True, False]) == 1.0


# --------------------------------------------------------------------------- Brier decomposition


def test_brier_decomposition_hand_computed_constant_within_bins():
    # q=[0.2, 0.2, 0.8, 0.8], c=[0, 1, 1, 1]; 10 bins: {0.2, 0.2} acc 1/2, {0.8, 0.8} acc 1; acc = 3/4
    # REL = 0.5*(0.2-0.5)^2 + 0.5*(0.8-1)^2 = 0.045 + 0.02 = 0.065
    # RES = 0.5*(0.5-0.75)^2 + 0.5*(1-0.75)^2 = 0.0625;  UNC = 0.75*0.25 = 0.1875
    # Brier = (0.04 + 0.64 + 0.04 + 0.04)/4 = 0.19 = 0.065 - 0.0625 + 0.1875
    d = brier_decomposition([0.2, 0.2, 0.8, 0.8], [0, 1, 1, 1])
    assert set(d) == {"brier", "reliability", "resolution", "uncertainty", "within_bin"}
    assert d["brier"] == pytest.approx(0.19, abs=1e-12)
    assert d["reliability"] == pytest.approx(0.065, abs=1e-12)
    assert d["resolution"] == pytest.approx(0.0625, abs=1e-12)
    assert d["uncertainty"] == pytest.approx(0.1875, abs=1e-12)
    assert abs(d["within_bin"]) <= 1e-12


def test_brier_decomposition_hand_computed_within_bin():
    # One bin holding q=[0.1, 0.3], c=[0, 1]: conf_b 0.2, acc_b = acc = 0.5.
    # Brier = (0.01 + 0.49)/2 = 0.25; REL = (0.2-0.5)^2 = 0.09; RES = 0; UNC = 0.25
    # within = 0.25 - (0.09 - 0 + 0.25) = -0.09; Stephenson et al.: WBV = (0.1^2 + 0.1^2)/2 = 0.01,
    # WBC = ((-0.1)(-0.5) + (0.1)(0.5))/2 = 0.05, WBV - 2 WBC = -0.09.
    d = brier_decomposition([0.1, 0.3], [0, 1], n_bins=1)
    assert d["brier"] == pytest.approx(0.25, abs=1e-12)
    assert d["reliability"] == pytest.approx(0.09, abs=1e-12)
    assert d["resolution"] == pytest.approx(0.0, abs=1e-12)
    assert d["uncertainty"] == pytest.approx(0.25, abs=1e-12)
    assert d["within_bin"] == pytest.approx(-0.09, abs=1e-12)


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_brier_decomposition_exact_when_one_forecast_value_per_bin(strategy):
    # Forecasts restricted to bin centres: every bin holds a single value, so brier = REL - RES + UNC.
    rng = np.random.default_rng(3)
    q = rng.choice([0.05, 0.35, 0.55, 0.95], size=300)
    c = (rng.uniform(size=300) < q).astype(int)
    d = brier_decomposition(q, c, n_bins=10, strategy=strategy)
    assert d["brier"] == pytest.approx(brier_score(q, c), abs=1e-15)
    assert abs(d["brier"] - (d["reliability"] - d["resolution"] + d["uncertainty"])) <= 1e-12
    assert d["resolution"] > 0.01 and d["reliability"] > 0.0  # the identity is not vacuous


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_brier_within_bin_is_stephenson_terms(strategy):
    # within_bin == (1/N) sum_b sum_{i in b} [(q_i - conf_b)^2 - 2 (q_i - conf_b)(c_i - acc_b)]
    rng = np.random.default_rng(4)
    q = rng.uniform(size=200)
    c = (rng.uniform(size=200) < q**2).astype(float)
    _, idx = _bins(q, 5, strategy)
    b = reliability_bins(q, c, 5, strategy)
    dq, dc = q - b.confidence_mean[idx], c - b.accuracy[idx]
    expected = np.mean(dq**2 - 2 * dq * dc)
    assert abs(expected) > 1e-4
    assert brier_decomposition(q, c, 5, strategy)["within_bin"] == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- log loss


def test_log_loss_hand_computed():
    # -(ln 0.8 + ln(1 - 0.4)) / 2
    assert log_loss([0.8, 0.4], [1, 0]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, abs=1e-12)


def test_log_loss_guard_is_inside_the_log_only():
    # q=0 with c=1 costs -ln(1e-12) = 27.631... nats, not infinity; q=1 with c=1 costs -ln(1 - 1e-12).
    assert log_loss([0.0], [1]) == pytest.approx(-math.log(1e-12), rel=1e-12)
    assert log_loss([1.0], [1]) == pytest.approx(-math.log1p(-1e-12), rel=1e-6)
    assert log_loss([0.0], [1], eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([1.5], [1])  # validated inputs are never clipped


@pytest.mark.parametrize("seed", range(3))
def test_log_loss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.01, 0.99, 300)
    c = (rng.uniform(size=300) < q).astype(int)
    assert log_loss(q, c) == pytest.approx(sklearn_log_loss(c, y_proba=q, labels=[0, 1]), abs=1e-12)


@pytest.mark.parametrize("eps", [0.0, -1e-3, 0.5, float("nan")])
def test_log_loss_bad_eps_raises(eps):
    with pytest.raises(ValueError, match="eps"):
        log_loss([0.5], [1], eps=eps)


# --------------------------------------------------------------------------- selective prediction

# Six predictions in three tie groups (descending): {0.9: right, wrong}, {0.7: right},
# {0.5: right, wrong, wrong}.
TIED_Q = [0.5, 0.9, 0.7, 0.5, 0.9, 0.5]
TIED_C = [1, 1, 1, 0, 0, 0]


def _tie_orders(q):
    """Every ranking by descending confidence, with ties broken in every possible way."""
    q = np.asarray(q)
    groups = [np.flatnonzero(q == v) for v in sorted(set(q.tolist()), reverse=True)]
    for parts in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield np.concatenate(parts)


def test_risk_coverage_curve_hand_computed_with_ties():
    # Groups enter whole: keep {0.9} -> 2/6, risk 1/2; + {0.7} -> 3/6, risk 1/3; + {0.5} -> 6/6, risk 3/6
    coverage, risk = risk_coverage_curve(TIED_Q, TIED_C)
    np.testing.assert_allclose(coverage, [2 / 6, 3 / 6, 1.0], atol=1e-12)
    np.testing.assert_allclose(risk, [1 / 2, 1 / 3, 1 / 2], atol=1e-12)


def test_risk_coverage_curve_without_ties():
    # Descending 0.9 (right), 0.6 (wrong), 0.3 (right): risks 0/1, 1/2, 1/3
    coverage, risk = risk_coverage_curve([0.3, 0.9, 0.6], [1, 1, 0])
    np.testing.assert_allclose(coverage, [1 / 3, 2 / 3, 1.0], atol=1e-12)
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3], atol=1e-12)


def test_aurc_perfect_ranking():
    # 2 right then 2 wrong: risks at k = 1..4 are 0, 0, 1/3, 2/4 -> (1/3 + 1/2) / 4 = 5/24
    assert aurc([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 0]) == pytest.approx(5 / 24, abs=1e-12)
    # Inverted: 1/1, 2/2, 2/3, 2/4 -> (1 + 1 + 2/3 + 1/2) / 4 = 19/24
    assert aurc([0.2, 0.3, 0.8, 0.9], [1, 1, 0, 0]) == pytest.approx(19 / 24, abs=1e-12)


def test_aurc_all_tied_is_the_error_rate():
    # Every k keeps k/5 of the single group, with expected k * 2/5 errors -> risk 2/5 at every k.
    assert aurc([0.6] * 5, [1, 0, 1, 1, 0]) == pytest.approx(0.4, abs=1e-12)


def test_aurc_hand_computed_with_ties():
    # Expected errors per ranked position (group mean error): 1/2, 1/2 | 0 | 2/3, 2/3, 2/3
    # cumulative: 1/2, 1, 1, 5/3, 7/3, 3 -> risks 1/2, 1/2, 1/3, 5/12, 7/15, 1/2
    # AURC = (30 + 30 + 20 + 25 + 28 + 30) / 60 / 6 = 163/360
    assert aurc(TIED_Q, TIED_C) == pytest.approx(163 / 360, abs=1e-12)


def test_tie_conventions_are_the_mean_over_tie_breaks():
    # Brute force over all 2! * 1! * 3! = 12 tie-breaking orders of TIED_Q.
    c = np.asarray(TIED_C, dtype=float)
    risks = np.array([np.cumsum(1 - c[o]) / np.arange(1, 7) for o in _tie_orders(TIED_Q)])  # [12, 6]
    assert len(risks) == 12
    assert aurc(TIED_Q, TIED_C) == pytest.approx(risks.mean(axis=1).mean(), abs=1e-12)
    for k in range(1, 7):
        assert accuracy_at_coverage(TIED_Q, TIED_C, k / 6) == pytest.approx(1 - risks[:, k - 1].mean(), abs=1e-12)


def test_selective_metrics_ignore_input_order():
    rng = np.random.default_rng(5)
    q = rng.choice([0.2, 0.5, 0.8, 1.0], size=50)
    c = (rng.uniform(size=50) < q).astype(int)
    perm = rng.permutation(50)
    assert aurc(q[perm], c[perm]) == pytest.approx(aurc(q, c), abs=1e-12)
    assert accuracy_at_coverage(q[perm], c[perm], 0.3) == pytest.approx(accuracy_at_coverage(q, c, 0.3), abs=1e-12)


@pytest.mark.parametrize(
    ("coverage", "expected"),
    [
        (1 / 6, 1 - 1 / 2),  # k=1: half of the tied 0.9 group -> expected accuracy 1/2
        (0.25, 1 - 1 / 2),  # k=ceil(1.5)=2: the whole 0.9 group, 1 right of 2
        (0.5, 1 - 1 / 3),  # k=3: {0.9, 0.9, 0.7}, 2 right of 3
        (4 / 6, 1 - 5 / 12),  # k=4: + 1 of the 0.5 group (2/3 expected errors) -> 5/3 errors of 4
        (1.0, 0.5),  # everything: 3 right of 6
    ],
)
def test_accuracy_at_coverage_hand_computed(coverage, expected):
    assert accuracy_at_coverage(TIED_Q, TIED_C, coverage) == pytest.approx(expected, abs=1e-12)


def test_accuracy_at_coverage_float_noise_does_not_add_a_row():
    # 0.07 * 100 = 7.000000000000001 in floating point; ceil must still keep 7 rows (all right),
    # not 8 (7/8 right).
    q = np.linspace(1.0, 0.01, 100)
    c = [1] * 7 + [0] * 93
    assert 0.07 * 100 > 7
    assert accuracy_at_coverage(q, c, 0.07) == 1.0
    assert accuracy_at_coverage(q, c, 0.0701) == pytest.approx(7 / 8, abs=1e-12)  # ceil(7.01) = 8


@pytest.mark.parametrize("coverage", [0.0, -0.1, 1.0001, float("nan")])
def test_accuracy_at_coverage_bad_coverage_raises(coverage):
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage([0.5], [1], coverage)


def test_confident_error_rate_hand_computed():
    q, c = [0.95, 0.9, 0.85, 0.99, 0.5], [0, 0, 0, 1, 0]
    # >= 0.9 and wrong: 0.95, 0.9 (the threshold itself counts) -> 2 of all 5
    assert confident_error_rate(q, c) == pytest.approx(0.4, abs=1e-12)
    # threshold 0: every wrong prediction -> 4/5; threshold 1: none reaches it -> 0
    assert confident_error_rate(q, c, threshold=0.0) == pytest.approx(0.8, abs=1e-12)
    assert confident_error_rate(q, c, threshold=1.0) == 0.0


@pytest.mark.parametrize("threshold", [-0.1, 1.1, float("nan")])
def test_confident_error_rate_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match="threshold"):
        confident_error_rate([0.5], [1], threshold=threshold)


# --------------------------------------------------------------------------- scalar metrics registry

SCALAR_NAMES = [
    "accuracy", "confidence_mean", "ece", "ece_quantile", "rmsce", "mce", "brier", "log_loss", "auroc",
    "aurc", "acc_at_cov_50", "acc_at_cov_80", "confident_error_rate", "brier_reliability",
    "brier_resolution", "brier_uncertainty",
]


def test_scalar_metrics_names():
    assert list(SCALAR_METRICS) == SCALAR_NAMES
    assert list(scalar_metrics(n_bins=3, threshold=0.5)) == SCALAR_NAMES


def test_scalar_metrics_hand_computed():
    q, c = [0.1, 0.3, 0.8, 0.9], [0, 1, 1, 1]
    m = {k: fn(q, c) for k, fn in scalar_metrics(n_bins=2, threshold=0.3).items()}
    assert m["accuracy"] == 0.75
    assert m["confidence_mean"] == pytest.approx(0.525, abs=1e-12)  # 2.1 / 4
    # 2 bins {0.1, 0.3} acc 1/2, {0.8, 0.9} acc 1: ECE = 0.5*|0.2-0.5| + 0.5*|0.85-1| = 0.225
    assert m["ece"] == pytest.approx(0.225, abs=1e-12)
    # l2 = sqrt(0.5*0.09 + 0.5*0.0225) = sqrt(0.05625); max = 0.3
    assert m["rmsce"] == pytest.approx(math.sqrt(0.05625), abs=1e-12)
    assert m["mce"] == pytest.approx(0.3, abs=1e-12)
    # quantile bins: median 0.55 splits the same way
    assert m["ece_quantile"] == pytest.approx(0.225, abs=1e-12)
    # brier = (0.01 + 0.49 + 0.04 + 0.01) / 4 = 0.1375
    assert m["brier"] == pytest.approx(0.1375, abs=1e-12)
    assert m["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.3) + math.log(0.8) + math.log(0.9)) / 4, abs=1e-12)
    assert m["auroc"] == 1.0  # the one wrong (0.1) is below every right one
    # descending 0.9, 0.8, 0.3 right, 0.1 wrong: risks 0, 0, 0, 1/4 -> AURC 1/16
    assert m["aurc"] == pytest.approx(1 / 16, abs=1e-12)
    assert m["acc_at_cov_50"] == 1.0 and m["acc_at_cov_80"] == 0.75  # k = 2; k = ceil(3.2) = 4
    # threshold 0.3: the wrong 0.1 is below it -> 0
    assert m["confident_error_rate"] == 0.0
    # REL = 0.5*0.09 + 0.5*0.0225 = 0.05625; RES = 0.5*(0.5-0.75)^2 + 0.5*(1-0.75)^2 = 0.0625;
    # UNC = 0.75 * 0.25 = 0.1875
    assert m["brier_reliability"] == pytest.approx(0.05625, abs=1e-12)
    assert m["brier_resolution"] == pytest.approx(0.0625, abs=1e-12)
    assert m["brier_uncertainty"] == pytest.approx(0.1875, abs=1e-12)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_constant_data_has_a_point_interval():
    # 20 identical rows: every resample equals the data, so every finite metric's CI is its value;
    # AUROC has one class everywhere -> NaN value, no valid resample, NaN interval.
    q, c = [0.9] * 20, [1] * 20
    r = bootstrap_ci(q, c, SCALAR_METRICS, n_resamples=50)
    assert list(r) == SCALAR_NAMES
    assert r["ece"]["value"] == pytest.approx(0.1, abs=1e-12)  # |0.9 - 1|
    for name in SCALAR_NAMES:
        if name == "auroc":
            continue
        entry = r[name]
        assert entry["ci_low"] == pytest.approx(entry["value"], abs=1e-12), name
        assert entry["ci_high"] == pytest.approx(entry["value"], abs=1e-12), name
        assert entry["n_valid"] == 50, name
    assert math.isnan(r["auroc"]["value"]) and math.isnan(r["auroc"]["ci_low"]) and math.isnan(r["auroc"]["ci_high"])
    assert r["auroc"]["n_valid"] == 0


def test_bootstrap_accuracy_interval_matches_the_binomial():
    # 50 right of 100: the resampled accuracy is Binomial(100, 0.5)/100, sd 0.05, so the 95%
    # percentile interval is about 0.5 -+ 1.96 * 0.05 = [0.402, 0.598].
    r = bootstrap_ci([0.5] * 100, [1] * 50 + [0] * 50, {"accuracy": SCALAR_METRICS["accuracy"]}, n_resamples=2000)
    assert r["accuracy"]["value"] == 0.5
    assert r["accuracy"]["ci_low"] == pytest.approx(0.402, abs=0.02)
    assert r["accuracy"]["ci_high"] == pytest.approx(0.598, abs=0.02)
    # A narrower level gives a narrower interval (about 0.5 -+ 0.645 * 0.05).
    r90 = bootstrap_ci([0.5] * 100, [1] * 50 + [0] * 50, {"accuracy": SCALAR_METRICS["accuracy"]}, n_resamples=2000, level=0.8)
    assert r["accuracy"]["ci_low"] < r90["accuracy"]["ci_low"] < 0.5 < r90["accuracy"]["ci_high"] < r["accuracy"]["ci_high"]


def test_bootstrap_drops_one_class_resamples_with_shared_indices():
    # One wrong row (index 0) of 20: a resample without it has one class, AUROC NaN. Replaying the
    # documented draws (one index vector of length N per resample from default_rng(seed)) gives
    # exactly how many resamples hold row 0 -- the same index vectors for every metric.
    q = np.linspace(0.05, 0.95, 20)
    c = np.ones(20, dtype=int)
    c[0] = 0
    r = bootstrap_ci(q, c, {"auroc": auroc, "accuracy": SCALAR_METRICS["accuracy"]}, n_resamples=200, seed=7)
    rng = np.random.default_rng(7)
    draws = [rng.integers(0, 20, size=20) for _ in range(200)]
    holds_wrong = sum(bool((d == 0).any()) for d in draws)
    assert 0 < holds_wrong < 200  # (19/20)^20 = 36% of resamples miss row 0
    assert r["auroc"]["n_valid"] == holds_wrong
    assert r["accuracy"]["n_valid"] == 200
    # accuracy of a resample = 1 - (copies of row 0)/20; the lowest replayed one bounds ci_low below
    worst = min(1 - (d == 0).sum() / 20 for d in draws)
    assert worst <= r["accuracy"]["ci_low"] < r["accuracy"]["value"] == 0.95


def test_bootstrap_is_deterministic_per_seed():
    rng = np.random.default_rng(0)
    q = rng.uniform(size=60)
    c = (rng.uniform(size=60) < q).astype(int)
    a = metric_report(q, c, n_resamples=30, seed=1)
    assert a == metric_report(q, c, n_resamples=30, seed=1)  # no NaN here, so == is exact
    b = metric_report(q, c, n_resamples=30, seed=2)
    assert a["ece"]["value"] == b["ece"]["value"] and a["ece"]["ci_low"] != b["ece"]["ci_low"]


def test_bootstrap_without_resamples_gives_point_estimates():
    q, c = [0.9, 0.2, 0.6], [1, 0, 0]
    r = metric_report(q, c, n_resamples=0)
    assert list(r) == SCALAR_NAMES
    assert r["ece"]["value"] == pytest.approx(0.3, abs=1e-12)  # test_ece_uniform_hand_computed
    for entry in r.values():
        assert set(entry) == {"value", "ci_low", "ci_high", "n_valid"}
        assert math.isnan(entry["ci_low"]) and math.isnan(entry["ci_high"]) and entry["n_valid"] == 0


def test_metric_report_passes_bins_and_threshold():
    q, c = [0.1, 0.3, 0.8, 0.9], [0, 1, 1, 1]
    r = metric_report(q, c, n_bins=2, threshold=0.05, n_resamples=0)
    assert r["ece"]["value"] == pytest.approx(0.225, abs=1e-12)  # 2 bins, as in the registry test
    assert r["confident_error_rate"]["value"] == 0.25  # 0.1 >= 0.05 and wrong: 1 of 4


@pytest.mark.parametrize(("kwargs", "match"), [({"n_resamples": -1}, "n_resamples"), ({"level": 1.0}, "level"), ({"level": 0.0}, "level")])
def test_bootstrap_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci([0.5], [1], SCALAR_METRICS, **kwargs)


# --------------------------------------------------------------------------- slices


def test_slice_report_groups_rows_by_label():
    q = [0.9, 0.2, 0.8, 0.4, 0.7]
    c = [1, 0, 0, 1, 1]
    labels = ["b", "a", "b", "a", "b"]
    r = slice_report(q, c, labels, n_resamples=20, seed=3)
    assert list(r) == ["a", "b"]  # sorted
    # a: rows 1, 3 -> q [0.2, 0.4], c [0, 1]; b: rows 0, 2, 4 -> q [0.9, 0.8, 0.7], c [1, 0, 1]
    assert r["a"]["count"] == {"value": 2, "ci_low": pytest.approx(math.nan, nan_ok=True),
                               "ci_high": pytest.approx(math.nan, nan_ok=True), "n_valid": 0}
    assert r["b"]["count"]["value"] == 3
    assert r["a"]["accuracy"]["value"] == 0.5 and r["b"]["accuracy"]["value"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["a"]["confidence_mean"]["value"] == pytest.approx(0.3, abs=1e-12)
    # b's ECE (10 bins, one row per bin): (|0.9-1| + |0.8-0| + |0.7-1|)/3 = 1.2/3 = 0.4
    assert r["b"]["ece"]["value"] == pytest.approx(0.4, abs=1e-12)
    # Each slice is resampled on its own with the same seed: equal to metric_report on its rows.
    expected_b = metric_report([0.9, 0.8, 0.7], [1, 0, 1], n_resamples=20, seed=3)
    assert {k: v for k, v in r["b"].items() if k != "count"} == expected_b


def test_slice_report_labels_must_match_rows():
    with pytest.raises(ValueError, match="labels"):
        slice_report([0.5, 0.6], [1, 0], ["a"], n_resamples=0)
    with pytest.raises(ValueError, match="labels"):
        slice_report([0.5, 0.6], [1, 0], [["a", "b"]], n_resamples=0)


# --------------------------------------------------------------------------- validation


# Every public metric: the scalar registry plus the array-valued ones and the reports.
METRICS = {
    **SCALAR_METRICS,
    "reliability_bins": reliability_bins,
    "brier_decomposition": brier_decomposition,
    "risk_coverage_curve": risk_coverage_curve,
    "metric_report": partial(metric_report, n_resamples=0),
    "slice_report": lambda q, c: slice_report(q, c, ["x"] * np.size(q), n_resamples=0),
}
METRIC_IDS = list(METRICS)


@pytest.mark.parametrize("fn", METRICS.values(), ids=METRIC_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_confidence_raises(fn, bad):
    with pytest.raises(ValueError, match="finite"):
        fn([0.5, bad], [1, 0])


@pytest.mark.parametrize("fn", METRICS.values(), ids=METRIC_IDS)
@pytest.mark.parametrize("bad", [-0.1, -1e-12, 1.0000001, 85.0])
def test_out_of_range_confidence_raises(fn, bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn([0.5, bad], [1, 0])


@pytest.mark.parametrize("fn", METRICS.values(), ids=METRIC_IDS)
@pytest.mark.parametrize("bad", [2, 0.5, -1, float("nan")])
def test_correct_must_be_binary(fn, bad):
    with pytest.raises(ValueError, match="0/1"):
        fn([0.5, 0.6], [1, bad])


@pytest.mark.parametrize("fn", METRICS.values(), ids=METRIC_IDS)
def test_shape_mismatch_raises(fn):
    with pytest.raises(ValueError):
        fn([0.5, 0.6, 0.7], [1, 0])
    with pytest.raises(ValueError, match="1-D"):
        fn([[0.5, 0.6]], [[1, 0]])
    with pytest.raises(ValueError):
        fn([], [])


# --------------------------------------------------------------------------- calibration_summary


def test_calibration_summary_mixed_batch():
    correct = [1, 0, 0, 0, 0]
    confidence = [0.9, 0.2, float("nan"), float("nan"), 0.6]
    format_ok = [True, True, False, False, True]
    s = calibration_summary(correct, confidence, format_ok)
    # over all 5: accuracy 1/5, format rate 3/5
    assert s["accuracy"] == pytest.approx(0.2, abs=1e-12)
    assert s["format_rate"] == pytest.approx(0.6, abs=1e-12)
    # over the 3 well-formed: q = [0.9, 0.2, 0.6], c = [1, 0, 0]
    # mean q = 1.7/3 = 17/30; in units of 1/30 the deviations are 10, -11, 1 -> var = 222/3/900
    assert s["confidence_mean"] == pytest.approx(17 / 30, abs=1e-12)
    assert s["confidence_std"] == pytest.approx(math.sqrt(74) / 30, abs=1e-12)
    # overconfidence = 17/30 - 1/3 (well-formed accuracy, not the batch accuracy 1/5) = 7/30
    assert s["overconfidence"] == pytest.approx(7 / 30, abs=1e-12)
    # ECE (10 uniform bins) = (0.1 + 0.2 + 0.6)/3 = 0.3; Brier = 0.41/3; AUROC = 1 (0.9 > 0.2, 0.6)
    assert s["ece"] == pytest.approx(0.3, abs=1e-12)
    assert s["brier"] == pytest.approx(0.41 / 3, abs=1e-12)
    assert s["auroc"] == 1.0
    assert set(s) == {"accuracy", "format_rate", "confidence_mean", "confidence_std", "overconfidence", "ece", "brier", "auroc"}


def test_calibration_summary_all_malformed():
    s = calibration_summary([0, 0], [float("nan"), float("nan")], [False, False])
    assert s["accuracy"] == 0.0 and s["format_rate"] == 0.0
    for k in ("confidence_mean", "confidence_std", "overconfidence", "ece", "brier", "auroc"):
        assert math.isnan(s[k]), k


def test_calibration_summary_one_class_auroc_nan_rest_finite():
    s = calibration_summary([1, 1], [0.8, 0.6], [True, True])
    # accuracy 1; mean q 0.7; overconfidence 0.7 - 1 = -0.3; brier (0.04 + 0.16)/2 = 0.1
    assert s["accuracy"] == 1.0
    assert s["overconfidence"] == pytest.approx(-0.3, abs=1e-12)
    assert s["brier"] == pytest.approx(0.1, abs=1e-12)
    assert math.isnan(s["auroc"])


def test_calibration_summary_empty_raises():
    with pytest.raises(ValueError):
        calibration_summary([], [], [])
