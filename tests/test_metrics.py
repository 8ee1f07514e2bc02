"""Calibration metrics: shared cases, hand-computed values, and cross-checks against
torchmetrics (ECE) and scikit-learn (AUROC)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import case_id, load_cases
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

from calibrl.metrics.calibration import (
    _bin_index,
    auroc,
    brier_score,
    calibration_summary,
    expected_calibration_error,
)

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
    idx = _bin_index(k / n_bins, n_bins, "uniform")
    np.testing.assert_array_equal(idx, np.maximum(k - 1, 0))
    # Midpoints (k + 0.5)/n lie strictly inside bin k.
    mids = (np.arange(n_bins) + 0.5) / n_bins
    np.testing.assert_array_equal(_bin_index(mids, n_bins, "uniform"), np.arange(n_bins))


def test_quantile_bins_never_split_identical_confidences():
    # Four identical confidences, half right: one shared bin gives |0.5 - 0.5| = 0. A split by rank
    # into {1,1} and {0,0} would give 0.5*|0.5-1| + 0.5*|0.5-0| = 0.5.
    assert expected_calibration_error([0.5] * 4, [1, 1, 0, 0], n_bins=2, strategy="quantile") == 0.0
    # Property on data with many ties: every distinct value maps to exactly one bin.
    rng = np.random.default_rng(1)
    q = rng.choice([0.1, 0.2, 0.5, 0.7, 0.9, 1.0], size=200, p=[0.05, 0.05, 0.6, 0.1, 0.1, 0.1])
    for n_bins in (2, 3, 5, 10, 20):
        idx = _bin_index(q, n_bins, "quantile")
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
    idx = _bin_index(q, 5, "quantile")
    np.testing.assert_array_equal(np.bincount(idx, minlength=5), [2, 2, 2, 2, 2])


@pytest.mark.parametrize(("kwargs", "match"), [({"n_bins": 0}, "n_bins"), ({"strategy": "equal"}, "uniform")])
def test_bad_binning_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error([0.5], [1], **kwargs)


# --------------------------------------------------------------------------- vs torchmetrics


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_torchmetrics_off_the_edges(seed, n_bins):
    # torchmetrics (1.9) binary_calibration_error uses `preds` directly as the confidence of the
    # positive class and `target` as the outcome, i.e. exactly our (q, c). Its bins are [lo, hi)
    # with 1.0 in an extra bin; ours are (lo, hi]. Continuous draws in (0.001, 0.999) never sit on an
    # edge, so the two must agree. float64 avoids torchmetrics' default float32 rounding.
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.001, 0.999, 400)
    c = (rng.uniform(size=400) < q**1.5).astype(np.int64)  # miscalibrated on purpose
    ours = expected_calibration_error(q, c, n_bins=n_bins)
    theirs = binary_calibration_error(torch.tensor(q), torch.tensor(c), n_bins=n_bins, norm="l1").item()
    assert ours > 0.01  # not a vacuous comparison
    assert abs(ours - theirs) <= 1e-12


def test_torchmetrics_uses_prob_not_top1_confidence():
    # Documents the reference's definition: with q=[0.2, 0.8], c=[1, 1], n_bins=10:
    #   ours / torchmetrics: 0.5*|0.2-1| + 0.5*|0.8-1| = 0.4 + 0.1 = 0.5
    #   a top-1 definition (conf max(p,1-p)=0.8 for both, acc [0,1]) would give |0.8-0.5| = 0.3
    q, c = [0.2, 0.8], [1, 1]
    theirs = binary_calibration_error(torch.tensor(q, dtype=torch.float64), torch.tensor(c), n_bins=10).item()
    assert theirs == pytest.approx(0.5, abs=1e-12)
    assert expected_calibration_error(q, c) == pytest.approx(0.5, abs=1e-12)


def test_torchmetrics_differs_on_bin_edges():
    # The known difference: a value on an edge. n_bins=4 (edges 0, .25, .5, .75, 1 exact in binary).
    # ours: 0.5 in (0.25,0.5], 0.6 in (0.5,0.75]: 0.5*|0.5-1| + 0.5*|0.6-0| = 0.55
    # torchmetrics: 0.5 and 0.6 both in [0.5,0.75): |0.55 - 0.5| = 0.05
    q, c = [0.5, 0.6], [1, 0]
    assert expected_calibration_error(q, c, n_bins=4) == pytest.approx(0.55, abs=1e-12)
    theirs = binary_calibration_error(torch.tensor(q, dtype=torch.float64), torch.tensor(c), n_bins=4).item()
    assert theirs == pytest.approx(0.05, abs=1e-12)
    # And 1.0: ours shares (0.9,1] with 0.95: |0.975 - 0.5| = 0.475; torchmetrics gives 1.0 its own
    # bin: 0.5*|0.95-1| + 0.5*|1-0| = 0.525.
    q, c = [0.95, 1.0], [1, 0]
    assert expected_calibration_error(q, c) == pytest.approx(0.475, abs=1e-12)
    theirs = binary_calibration_error(torch.tensor(q, dtype=torch.float64), torch.tensor(c), n_bins=10).item()
    assert theirs == pytest.approx(0.525, abs=1e-12)


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


# --------------------------------------------------------------------------- validation


METRICS = [expected_calibration_error, brier_score, auroc]
METRIC_IDS = ["ece", "brier", "auroc"]


@pytest.mark.parametrize("fn", METRICS, ids=METRIC_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_confidence_raises(fn, bad):
    with pytest.raises(ValueError, match="finite"):
        fn([0.5, bad], [1, 0])


@pytest.mark.parametrize("fn", METRICS, ids=METRIC_IDS)
@pytest.mark.parametrize("bad", [-0.1, -1e-12, 1.0000001, 85.0])
def test_out_of_range_confidence_raises(fn, bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn([0.5, bad], [1, 0])


@pytest.mark.parametrize("fn", METRICS, ids=METRIC_IDS)
@pytest.mark.parametrize("bad", [2, 0.5, -1, float("nan")])
def test_correct_must_be_binary(fn, bad):
    with pytest.raises(ValueError, match="0/1"):
        fn([0.5, 0.6], [1, bad])


@pytest.mark.parametrize("fn", METRICS, ids=METRIC_IDS)
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
