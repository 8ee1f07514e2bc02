"""Reward components, their weighted sum and the logged reward metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import case_id, load_cases

from calibrl.rewards import COMPONENTS, RewardFunction, reward_metrics, weighted_sum
from calibrl.rewards.parsing import ParsedCompletion, parse_completion

REWARD_CASES = load_cases("reward_totals.jsonl")

RLCR = {"correctness": 1.0, "brier": 1.0, "format": 0.5}
RLVR = {"correctness": 1.0, "format": 0.5}


def ok(q: float, answer: str = "15") -> ParsedCompletion:
    """A well-formed completion with confidence q."""
    return ParsedCompletion(answer=answer, confidence=q, format_ok=True)


def failed(answer: str | None = "15") -> ParsedCompletion:
    return ParsedCompletion(answer=answer, confidence=None, format_ok=False, error="invalid confidence")


# --------------------------------------------------------------------------- shared cases


@pytest.mark.parametrize("case", REWARD_CASES, ids=case_id)
def test_shared_case(case):
    comps = {k: np.asarray(v, dtype=np.float64) for k, v in case["components"].items()}
    total = weighted_sum(comps, case["weights"])
    m = reward_metrics(comps, total)
    expect = case["expect"]
    assert abs(m["rewards/total/mean"] - expect["total_mean"]) <= 1e-9
    for name, mean in expect["component_means"].items():
        assert abs(m[f"rewards/{name}/mean"] - mean) <= 1e-9
    # The logged total is the weighted sum of the logged means (the sum is linear).
    recombined = sum(case["weights"][k] * m[f"rewards/{k}/mean"] for k in comps)
    assert abs(m["rewards/total/mean"] - recombined) <= 1e-9


def test_reward_metrics_keys_and_population_std():
    comps = {"correctness": np.array([1.0, 0.0, 1.0, 0.0])}
    total = np.array([1.0, 3.0, 1.0, 3.0])
    m = reward_metrics(comps, total, prefix="eval")
    assert set(m) == {"eval/correctness/mean", "eval/correctness/std", "eval/total/mean", "eval/total/std"}
    # correctness: mean 0.5, population var = mean((+-0.5)^2) = 0.25 -> std 0.5
    assert m["eval/correctness/mean"] == 0.5 and m["eval/correctness/std"] == 0.5
    # total: mean 2, deviations +-1 -> population std 1 (the unbiased one would be sqrt(4/3))
    assert m["eval/total/mean"] == 2.0 and m["eval/total/std"] == 1.0


# --------------------------------------------------------------------------- hand-computed totals


def test_rlcr_hand_computed_totals():
    rf = RewardFunction(RLCR)
    batch = rf([ok(0.8), ok(0.3), failed(), ok(1.0), ok(0.0)], [True, False, True, False, False])
    # correct, q=0.8: 1 - (0.8-1)^2 + 0.5*1 = 1 - 0.04 + 0.5 = 1.46
    # wrong,   q=0.3: 0 - (0.3-0)^2 + 0.5   = -0.09 + 0.5   = 0.41
    # format failure (answer right): 0 + (-1) + 0.5*0        = -1.0
    # wrong,   q=1.0: 0 - 1 + 0.5                            = -0.5 (worst well-formed)
    # wrong,   q=0.0: 0 - 0 + 0.5                            = 0.5
    np.testing.assert_allclose(batch.total, [1.46, 0.41, -1.0, -0.5, 0.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(batch.components["correctness"], [1, 0, 0, 0, 0], rtol=0, atol=0)
    np.testing.assert_allclose(batch.components["brier"], [-0.04, -0.09, -1.0, -1.0, 0.0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(batch.components["format"], [1, 1, 0, 1, 1])
    # A format failure is never counted correct, even when the verifier said so.
    np.testing.assert_array_equal(batch.correct, [True, False, False, False, False])
    np.testing.assert_array_equal(batch.format_ok, [True, True, False, True, True])
    assert batch.confidence[0] == 0.8 and batch.confidence[1] == 0.3 and math.isnan(batch.confidence[2])
    for arr in (batch.total, *batch.components.values()):
        assert arr.dtype == np.float64 and arr.shape == (5,)


def test_rlvr_hand_computed_totals():
    rf = RewardFunction(RLVR)
    batch = rf([ok(0.8), ok(0.3), failed()], [True, False, True])
    # 1 + 0.5 = 1.5; 0 + 0.5 = 0.5; failure: 0 + 0 = 0
    np.testing.assert_array_equal(batch.total, [1.5, 0.5, 0.0])


def test_real_parsed_completions_end_to_end():
    texts = [
        "<think>7+8</think><answer>15</answer><confidence>0.8</confidence>",
        "<think>7+8</think><answer>15</answer><confidence>very sure</confidence>",
    ]
    parsed = [parse_completion(t) for t in texts]
    batch = RewardFunction(RLCR)(parsed, [True, True])
    # 1 - 0.04 + 0.5 = 1.46; the right answer with a malformed confidence gets -1.0
    np.testing.assert_allclose(batch.total, [1.46, -1.0], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- format-failure ordering


@pytest.mark.parametrize("weights", [RLCR, RLVR], ids=["rlcr", "rlvr"])
def test_format_failure_strictly_below_every_well_formed_total(weights):
    rf = RewardFunction(weights)
    grid = np.linspace(0.0, 1.0, 101)
    parsed = [ok(float(q)) for q in grid for _ in (0, 1)]
    verdicts = [bool(c) for _ in grid for c in (0, 1)]
    well_formed = rf(parsed, verdicts).total
    fail_total = rf([failed(), failed()], [True, False]).total
    assert np.all(np.isfinite(well_formed)) and np.all(np.isfinite(fail_total))
    assert fail_total.max() < well_formed.min()
    # The constructor's bound is a true lower bound of the brute-forced minimum.
    assert rf.lowest_well_formed <= well_formed.min()
    assert rf.format_failure_total == fail_total[0] == fail_total[1]


def test_bound_values_rlcr():
    rf = RewardFunction(RLCR)
    # lowest: 1*0 + 1*(-1) + 0.5*1 = -0.5; failure: 1*0 + 1*(-1) + 0.5*0 = -1.0
    assert rf.lowest_well_formed == -0.5
    assert rf.format_failure_total == -1.0


def test_correct_with_malformed_confidence_below_wrong_overconfident():
    rf = RewardFunction(RLCR)
    batch = rf([failed("15"), ok(1.0, "16")], [True, False])
    # failure: -1.0; wrong with q=1 (worst Brier): 0 - 1 + 0.5 = -0.5
    assert batch.total[0] == -1.0 and batch.total[1] == -0.5
    assert batch.total[0] < batch.total[1]


# --------------------------------------------------------------------------- construction errors


@pytest.mark.parametrize(
    "weights",
    [
        {"correctness": 1.0, "brier": 1.0, "format": 0.0},  # failure -1 == lowest -1
        {"correctness": 1.0, "brier": 1.0},  # no format term at all
        {"correctness": 1.0, "brier": 1.0, "format": -0.5},  # failure -1 > lowest -1.5
        {"correctness": 1.0},  # failure 0 == lowest 0
    ],
    ids=["format-0", "no-format", "negative-format", "correctness-only"],
)
def test_weights_without_format_gap_are_rejected(weights):
    with pytest.raises(ValueError, match="format"):
        RewardFunction(weights)


def test_unknown_component_lists_valid_choices():
    with pytest.raises(KeyError) as err:
        RewardFunction({"correctness": 1.0, "format": 0.5, "calibratoin": 1.0})
    msg = str(err.value)
    assert "calibratoin" in msg
    for name in COMPONENTS.names():
        assert name in msg
    assert {"brier", "correctness", "format"} <= set(COMPONENTS.names())


@pytest.mark.parametrize(
    "name, q, correct, expected, failure",
    [
        # log score: ln 0.8 when right; ln(1 - 0.8) = ln 0.2 when wrong; failure ln 1e-4.
        ("log_score", 0.8, True, math.log(0.8), math.log(1e-4)),
        ("log_score", 0.8, False, math.log(0.2), math.log(1e-4)),
        # spherical: 0.8 / sqrt(0.64 + 0.04) when right, 0.2 / sqrt(0.68) when wrong; failure 0.
        ("spherical_score", 0.8, True, 0.8 / math.sqrt(0.68), 0.0),
        ("spherical_score", 0.8, False, 0.2 / math.sqrt(0.68), 0.0),
    ],
)
def test_scoring_rule_components(name, q, correct, expected, failure):
    fn = RewardFunction({"correctness": 1.0, name: 1.0, "format": 0.5})
    good = ParsedCompletion("5", q, True)
    bad = ParsedCompletion("5", None, False, "no confidence tag")
    batch = fn([good, bad], [correct, correct])
    assert batch.components[name][0] == pytest.approx(expected, abs=1e-12)
    assert batch.components[name][1] == failure
    # the failure still totals strictly below every well-formed completion
    assert batch.total[1] < fn.lowest_well_formed


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_rejected(bad):
    with pytest.raises(ValueError):
        RewardFunction({"correctness": 1.0, "brier": bad, "format": 0.5})


def test_empty_weights_rejected():
    with pytest.raises(ValueError):
        RewardFunction({})


def test_length_mismatch_rejected():
    with pytest.raises(ValueError):
        RewardFunction(RLCR)([ok(0.5)], [True, False])


# --------------------------------------------------------------------------- weighted_sum


def test_weighted_sum_hand_computed():
    total = weighted_sum({"a": np.array([1.0, 2.0]), "b": np.array([-1.0, 0.5])}, {"a": 0.5, "b": 2.0})
    # [0.5*1 + 2*(-1), 0.5*2 + 2*0.5] = [-1.5, 2.0]
    np.testing.assert_array_equal(total, [-1.5, 2.0])
    assert total.dtype == np.float64


@pytest.mark.parametrize(
    ("components", "weights"),
    [
        ({"a": [1.0], "b": [1.0]}, {"a": 1.0}),  # weight missing
        ({"a": [1.0]}, {"a": 1.0, "b": 1.0}),  # extra weight
        ({"a": [1.0]}, {"b": 1.0}),  # different name
        ({}, {}),  # nothing to combine
        ({"a": [1.0, 2.0], "b": [1.0]}, {"a": 1.0, "b": 1.0}),  # lengths differ
        ({"a": [[1.0]]}, {"a": 1.0}),  # not 1-D
    ],
    ids=["missing-weight", "extra-weight", "other-name", "empty", "lengths", "2-D"],
)
def test_weighted_sum_mismatch_raises(components, weights):
    with pytest.raises(ValueError):
        weighted_sum({k: np.asarray(v) for k, v in components.items()}, weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weighted_sum_non_finite_component_raises(bad):
    with pytest.raises(ValueError, match="non-finite"):
        weighted_sum({"a": np.array([0.0, bad]), "b": np.array([1.0, 1.0])}, {"a": 1.0, "b": 1.0})


def test_weighted_sum_non_finite_weight_raises():
    with pytest.raises(ValueError):
        weighted_sum({"a": np.array([1.0])}, {"a": float("nan")})


def test_reward_function_refuses_to_emit_nan():
    # A well-formed result whose confidence is NaN (not something the parser produces) must not
    # leak a NaN reward: weighted_sum rejects it.
    with pytest.raises(ValueError, match="non-finite"):
        RewardFunction(RLCR)([ok(float("nan"))], [True])


# --------------------------------------------------------------------------- no NaN ever


def test_no_reward_is_ever_nan():
    rng = np.random.default_rng(0)
    texts = [c["text"] for c in load_cases("confidence_parsing.jsonl")]
    texts += [f"<answer>{i}</answer><confidence>{q:.3f}</confidence>" for i, q in enumerate(rng.uniform(0, 1, 50))]
    parsed = [parse_completion(t) for t in texts]
    verdicts = [bool(b) for b in rng.integers(0, 2, len(parsed))]
    for weights in (RLCR, RLVR, {"correctness": 2.0, "brier": 0.25, "format": 1.0}):
        batch = RewardFunction(weights)(parsed, verdicts)
        assert np.all(np.isfinite(batch.total))
        for arr in batch.components.values():
            assert np.all(np.isfinite(arr))
        m = reward_metrics(batch.components, batch.total)
        assert all(math.isfinite(v) for v in m.values())


# --------------------------------------------------------------------------- weight signs


@pytest.mark.parametrize(
    "weights, key",
    [
        ({"correctness": 1.0, "brier": -1.0, "format": 0.5}, "brier"),
        # format 2 covers the gap, so only the sign check stands between this and a run that
        # rewards miscalibration.
        ({"correctness": 1.0, "brier": -1.0, "format": 2.0}, "brier"),
        ({"correctness": 1.0, "log_score": -0.25, "format": 5.0}, "log_score"),
        ({"correctness": 1.0, "spherical_score": -1.0, "format": 2.0}, "spherical_score"),
        ({"correctness": -1.0, "brier": 1.0, "format": 2.0}, "correctness"),
    ],
    ids=["brier", "brier-format-2", "log", "spherical", "correctness"],
)
def test_negative_weight_on_scoring_rule_or_correctness_is_refused(weights, key):
    with pytest.raises(ValueError) as err:
        RewardFunction.from_config({"weights": weights})
    msg = str(err.value)
    assert msg.startswith(f"reward.weights.{key}={weights[key]:g}: ")
    assert "must be >= 0" in msg and "\n" not in msg
    assert "format" not in msg  # the format weight is not the problem


def test_negative_brier_message_exact():
    with pytest.raises(ValueError) as err:
        RewardFunction.from_config({"weights": {"correctness": 1.0, "brier": -1, "format": 2.0}})
    assert str(err.value) == (
        "reward.weights.brier=-1: a proper scoring rule's weight must be >= 0 "
        "(a negative weight rewards miscalibration)"
    )


def test_every_scoring_rule_component_declares_its_kind():
    # Every registered scoring rule is offered as a component of kind scoring_rule, so the sign
    # check covers it without naming it.
    kinds = {name: COMPONENTS.get(name).kind for name in COMPONENTS.names()}
    assert kinds["correctness"] == "correctness"
    assert {k for k, v in kinds.items() if v == "scoring_rule"} == {"brier", "log_score", "spherical_score"}


@pytest.mark.parametrize("name", ["correctness", "brier", "log_score", "spherical_score"])
def test_zero_weight_is_allowed(name):
    weights = {"correctness": 1.0, "format": 0.5, name: 0.0}
    assert RewardFunction(weights).weights[name] == 0.0


@pytest.mark.parametrize(
    "weights, advice",
    [
        ({"correctness": 1.0, "brier": 1.0, "format": 0.0}, "reward.weights.format=0 must be above 0"),
        ({"correctness": 1.0, "brier": 1.0, "format": -0.5}, "reward.weights.format=-0.5 must be above 0"),
        ({"correctness": 1.0, "brier": 1.0}, "add the 'format' component with a weight above 0"),
    ],
    ids=["format-0", "negative-format", "no-format"],
)
def test_format_gap_message_names_what_to_change(weights, advice):
    with pytest.raises(ValueError) as err:
        RewardFunction(weights)
    assert str(err.value).endswith(advice)
