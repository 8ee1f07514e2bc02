"""The evaluator's report: which rows each metric sees, slices, voting, flat scalars, settings."""

from __future__ import annotations

import json
import math

import pytest

from calibrl.config import EvalConfig
from calibrl.eval.evaluator import EvalResult, _summarize, check_eval_config


def _row(qid, sample, answer, conf, correct, ok=True, slice_="a", ap=None, lw=None, terms=2, ec=None):
    return {
        "dataset": "d", "id": qid, "sample": sample, "slice": slice_, "fields": {"num_terms": terms},
        "question": "?", "reference": "1", "completion": "...", "answer": answer, "format_ok": ok,
        "error": None if ok else "no confidence tag", "correct": correct, "confidence": conf if ok else None,
        "answer_prob": ap, "lowest_window_prob": lw, "expected_confidence": ec,
    }


ROWS = [
    # q1: answers A (right, 0.8), A (right, 0.6); q2: B (wrong, 0.9), malformed (wrong).
    _row("q1", 0, "A", 0.8, 1, ap=0.5, lw=0.4),
    _row("q1", 1, "A", 0.6, 1, ap=0.7, lw=0.2, terms=3),
    _row("q2", 0, "B", 0.9, 0, slice_="b", ap=0.9, lw=0.5),
    _row("q2", 1, "C", None, 0, ok=False, slice_="b", ap=0.3, lw=0.3, terms=3),
]


def _eval_config(**kw):
    return EvalConfig(**({"n_bootstrap": 0, "n_samples": 2, "do_sample": True, "seed": 0} | kw))


def test_accuracy_over_all_rows_calibration_over_well_formed_rows():
    report = _summarize(ROWS, _eval_config(), "d")
    # accuracy: 2 right of 4 rows (the malformed row counts as wrong); format rate 3/4.
    assert report["accuracy"]["value"] == 0.5
    assert report["format_rate"]["value"] == 0.75
    assert report["n_questions"] == 2 and report["n_samples"] == 2
    v = report["signals"]["verbalized"]
    assert v["n"] == 3
    # well-formed rows: q=(0.8, 0.6, 0.9), c=(1, 1, 0): Brier = (0.04 + 0.16 + 0.81) / 3 = 0.336667.
    assert v["brier"]["value"] == pytest.approx(1.01 / 3)
    assert v["accuracy_well_formed"]["value"] == pytest.approx(2 / 3)
    # confident errors (q >= 0.9 and wrong): the 0.9 row -> 1 of 3.
    assert v["confident_error_rate"]["value"] == pytest.approx(1 / 3)
    # The intrinsic signals are scored on the same (well-formed) rows: the malformed row's 0.3 is
    # ignored, so answer_prob's mean is (0.5 + 0.7 + 0.9) / 3 = 0.7.
    assert report["signals"]["answer_prob"]["n"] == 3
    assert report["signals"]["answer_prob"]["confidence_mean"]["value"] == pytest.approx(0.7)


def test_slices_by_label_and_by_field():
    report = _summarize(ROWS, _eval_config(slice_by=["slice", "num_terms"]), "d")
    a, b = report["slices"]["slice"]["a"], report["slices"]["slice"]["b"]
    assert (a["count"], a["accuracy"]["value"]) == (2, 1.0)
    assert (b["count"], b["accuracy"]["value"], b["format_rate"]["value"]) == (2, 0.0, 0.5)
    # slice b's only well-formed row is 0.9 and wrong -> ECE 0.9.
    assert b["signals"]["verbalized"]["ece"]["value"] == pytest.approx(0.9)
    terms = report["slices"]["num_terms"]
    assert set(terms) == {"2", "3"} and terms["3"]["count"] == 2 and terms["3"]["accuracy"]["value"] == 0.5


def test_voting_methods_pick_by_their_rule():
    report = _summarize(ROWS, _eval_config(), "d")
    maj = report["voting"]["majority"]
    # q1: A twice -> right; q2: only B votes (the malformed sample cannot) -> wrong. Accuracy 1/2.
    assert maj["accuracy"]["value"] == 0.5 and maj["coverage"] == 1.0
    # vote shares: q1 2/2 = 1.0 (right), q2 1/1 = 1.0 (wrong) -> mean confidence 1.0, Brier
    # ((1 - 1)^2 + (1 - 0)^2) / 2 = 0.5.
    assert maj["confidence_mean"]["value"] == pytest.approx(1.0)
    assert maj["brier"]["value"] == pytest.approx(0.5)
    # best of n: q1 keeps 0.8 (right), q2 0.9 (wrong).
    assert report["voting"]["best_of_n"]["confidence_mean"]["value"] == pytest.approx((0.8 + 0.9) / 2)
    # confidence-weighted: q1 A weight 1.4 of 1.4 -> 1.0; q2 B 0.9 of 0.9 -> 1.0.
    assert report["voting"]["confidence_weighted"]["confidence_mean"]["value"] == pytest.approx(1.0)


def test_flat_scalars_keys_and_overconfidence():
    result = EvalResult("d", ROWS, _summarize(ROWS, _eval_config(), "d"))
    s = result.scalars()
    assert s["accuracy"] == 0.5 and s["format_rate"] == 0.75
    assert s["brier"] == pytest.approx(1.01 / 3)
    # overconfidence: mean stated confidence 2.3/3 minus accuracy among those rows 2/3 = 0.1.
    assert s["overconfidence"] == pytest.approx(0.1)
    assert "answer_prob/ece" in s and "lowest_window_prob/auroc" in s
    assert s["slice/a/count"] == 2.0 and s["slice/b/accuracy"] == 0.0
    assert s["vote/majority/accuracy"] == 0.5
    assert all(isinstance(v, float) for v in s.values())


def test_no_well_formed_rows_reports_accuracy_without_calibration():
    rows = [_row("q1", 0, "A", None, 0, ok=False)]
    report = _summarize(rows, EvalConfig(n_bootstrap=0, seed=0), "d")
    assert report["signals"] == {} and report["accuracy"]["value"] == 0.0
    s = EvalResult("d", rows, report).scalars()
    assert s["format_rate"] == 0.0 and math.isnan(s["overconfidence"])


def test_bootstrap_cis_are_seeded():
    a = _summarize(ROWS, _eval_config(n_bootstrap=200, seed=3), "d")
    b = _summarize(ROWS, _eval_config(n_bootstrap=200, seed=3), "d")
    assert json.dumps(a) == json.dumps(b)  # NaN-safe equality
    ci = a["signals"]["verbalized"]["brier"]
    assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_samples": 4}, "needs eval.do_sample=true"),
        ({"n_samples": 0}, "eval.n_samples must be >= 1"),
        ({"window": 0}, "eval.window must be >= 1"),
        ({"confident_threshold": 1.5}, "eval.confident_threshold"),
        ({"ci_level": 1.0}, "eval.ci_level"),
        ({"n_bootstrap": -1}, "eval.n_bootstrap"),
        ({"batch_size": 0}, "eval.batch_size"),
        ({"grid_step": 0.03},
         r"^eval.grid_step: confidence grid step 0.03 does not divide 1 .*; null: no expected confidence$"),
        ({"grid_step": 0.125}, "eval.grid_step: confidence grid step 0.125 cannot be written with 2 decimals"),
        ({"grid_step": 0.0}, r"eval.grid_step: confidence grid step must be in \(0, 1\]"),
    ],
)
def test_invalid_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        check_eval_config(EvalConfig(**kwargs))
    assert "\n" not in str(err.value)


def test_grid_step_null_turns_the_expected_confidence_off():
    check_eval_config(EvalConfig(grid_step=None, seed=0))
    check_eval_config(EvalConfig(grid_step=1, seed=0))


def test_expected_confidence_metrics_by_hand():
    # Expected confidences (1.0, 0.55, 0.25, 0.9) of right, right, wrong, wrong answers, and a
    # malformed row whose 0.3 is ignored (the verbalized row policy), as are rows without a value.
    rows = [
        _row("q1", 0, "A", 0.5, 1, ec=1.0),
        _row("q2", 0, "A", 0.5, 1, ec=0.55),
        _row("q3", 0, "B", 0.5, 0, ec=0.25),
        _row("q4", 0, "B", 0.5, 0, ec=0.9),
        _row("q5", 0, "C", None, 0, ok=False, ec=0.3),
        _row("q6", 0, "A", 0.5, 1, ec=None),
    ]
    report = _summarize(rows, EvalConfig(n_bootstrap=0, seed=0), "d")
    e = report["signals"]["expected_confidence"]
    assert e["n"] == 4 and report["signals"]["verbalized"]["n"] == 5
    # mean (1 + 0.55 + 0.25 + 0.9) / 4 = 0.675; Brier (0 + 0.45^2 + 0.25^2 + 0.9^2) / 4 = 1.075 / 4.
    assert e["confidence_mean"]["value"] == pytest.approx(0.675)
    assert e["brier"]["value"] == pytest.approx(0.26875)
    # ECE, 10 bins: one row per bin, so the mean of |correct - q| = (0 + 0.45 + 0.25 + 0.9) / 4 = 0.4.
    assert e["ece"]["value"] == pytest.approx(0.4)
    # AUROC: right {1.0, 0.55} over wrong {0.25, 0.9}: 3 of the 4 pairs ordered -> 0.75.
    assert e["auroc"]["value"] == pytest.approx(0.75)
    s = EvalResult("d", rows, report).scalars()
    assert s["expected_confidence/ece"] == pytest.approx(0.4) and s["expected_confidence/auroc"] == pytest.approx(0.75)
    assert s["expected_confidence/confidence_mean"] == pytest.approx(0.675)


def test_rows_without_the_signal_leave_it_out():
    # prediction rows written before expected_confidence existed have no such key
    rows = [{k: v for k, v in r.items() if k != "expected_confidence"} for r in ROWS]
    report = _summarize(rows, _eval_config(), "d")
    assert "expected_confidence" not in report["signals"] and "answer_prob" in report["signals"]


def test_composed_eval_group_is_the_settings_type():
    from omegaconf import OmegaConf

    from helpers import compose_config

    s = OmegaConf.to_object(compose_config(["seed=7", "eval.n_bins=5", "eval.slice_by=[slice,task]"]).eval)
    assert isinstance(s, EvalConfig) and s.n_bins == 5 and s.slice_by == ["slice", "task"] and s.seed == 7
    check_eval_config(s)
