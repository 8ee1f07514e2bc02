"""Scoring rules: hand values, properness, ranges and input validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from calibrl.rewards.scoring_rules import LOG_EPS, SCORING_RULES, score

EPS = LOG_EPS  # 1e-4
# 2001 confidences k / 2000: spacing 5e-4, and every p = k / 2000 below lies exactly on it.
Q_GRID = np.arange(2001) / 2000
# True probabilities 0.0, 0.05, ..., 1.0, plus 0.0005, 0.001, 0.999, 0.9995 near the ends.
P_GRID = np.union1d(np.arange(0, 2001, 100), [1, 2, 1998, 1999]) / 2000
# Q_GRID plus points inside the log score's clipped ends [0, EPS] and [1 - EPS, 1].
Q_FINE = np.union1d(Q_GRID, np.concatenate([np.linspace(0.0, EPS, 11), 1.0 - np.linspace(0.0, EPS, 11)]))


def expected_score(fn, p: float, qs: np.ndarray) -> np.ndarray:
    """E_p(q) = p * S(q, 1) + (1 - p) * S(q, 0) at every q in qs."""
    return p * fn(qs, np.ones_like(qs)) + (1.0 - p) * fn(qs, np.zeros_like(qs))


def maximisers(fn, p: float, qs: np.ndarray) -> np.ndarray:
    """The q in qs with the highest expected score (exact ties kept)."""
    e = expected_score(fn, p, qs)
    return qs[e == e.max()]


def is_proper_at(fn, p: float, qs: np.ndarray = Q_GRID, strict: bool = True, margin: float = 1e-3) -> bool:
    """q = p maximises E_p over qs; if strict, also every q with |q - p| > margin scores strictly less."""
    (at_p,) = np.flatnonzero(qs == p)
    e = expected_score(fn, p, qs)
    if e[at_p] < e.max():
        return False
    return not strict or bool(np.all(e[np.abs(qs - p) > margin] < e[at_p]))


def linear(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The improper linear score q if c else 1 - q: E_p(q) = 1 - p + q(2p - 1), best at q in {0, 1}."""
    return np.where(c == 1, q, 1.0 - q)


# --------------------------------------------------------------------------- registry


def test_registered_rules_and_flags():
    assert SCORING_RULES.names() == ["brier", "log", "spherical"]
    for name in SCORING_RULES:
        rule = SCORING_RULES.get(name)
        assert rule.strictly_proper
        assert math.isfinite(rule.low) and math.isfinite(rule.high) and rule.low < rule.high
        assert rule.source
    with pytest.raises(dataclasses.FrozenInstanceError):
        SCORING_RULES.get("brier").low = -2.0  # type: ignore[misc]


def test_unknown_rule_lists_valid_names():
    with pytest.raises(KeyError, match="valid choices: brier, log, spherical"):
        score("brierr", [0.5], [1])


# --------------------------------------------------------------------------- hand values


HAND_VALUES = [
    # brier: -(q - c)^2
    ("brier", 0.8, 1, -0.04),  # -(0.8 - 1)^2 = -0.2^2
    ("brier", 0.8, 0, -0.64),  # -(0.8 - 0)^2
    ("brier", 0.5, 0, -0.25),  # -(0.5)^2
    ("brier", 0.0, 0, 0.0),  # best: confident and right that it is wrong
    ("brier", 1.0, 0, -1.0),  # worst
    # log: ln(q) if c else ln(1 - q), q clipped to [1e-4, 1 - 1e-4]
    ("log", 0.5, 1, -0.6931471805599453),  # ln 0.5 = -ln 2
    ("log", 0.8, 1, -0.2231435513142097),  # ln 0.8
    ("log", 0.8, 0, -1.6094379124341003),  # ln 0.2
    ("log", 2e-4, 1, -8.517193191416238),  # ln 2e-4, just inside the clip: not clipped
    ("log", 0.0, 1, -9.210340371976182),  # ln(0) -> ln 1e-4 = -4 ln 10 = -9.2103...
    ("log", 5e-5, 1, -9.210340371976182),  # 5e-5 clipped up to 1e-4
    ("log", 1.0, 0, -9.210340371976182),  # ln(1 - 1) -> ln(1 - 0.9999) = ln 1e-4
    ("log", 1.0, 1, -1.0000500033334732e-4),  # ln 1 -> ln 0.9999 = -(1e-4 + 1e-8/2 + ...)
    ("log", 0.0, 0, -1.0000500033334732e-4),  # ln(1 - 0) -> ln 0.9999
    # spherical: (q c + (1 - q)(1 - c)) / sqrt(q^2 + (1 - q)^2)
    ("spherical", 0.5, 1, 0.7071067811865475),  # 0.5 / sqrt(0.25 + 0.25) = 0.5 / sqrt(0.5) = 1/sqrt 2
    ("spherical", 0.5, 0, 0.7071067811865475),  # same: q = 1 - q
    ("spherical", 0.8, 1, 0.9701425001453319),  # 0.8 / sqrt(0.64 + 0.04) = 0.8 / 0.8246211
    ("spherical", 0.8, 0, 0.24253562503633297),  # 0.2 / 0.8246211
    ("spherical", 0.6, 1, 0.8320502943378436),  # 0.6 / sqrt(0.36 + 0.16) = 0.6 / 0.7211103
    ("spherical", 1.0, 0, 0.0),  # 0 / sqrt(1 + 0)
    ("spherical", 0.0, 0, 1.0),  # 1 / sqrt(0 + 1)
]


@pytest.mark.parametrize(("rule", "q", "c", "expected"), HAND_VALUES)
def test_hand_value(rule, q, c, expected):
    (got,) = score(rule, [q], [c])
    assert abs(got - expected) <= 1e-12


@pytest.mark.parametrize("rule", ["brier", "log", "spherical"])
def test_vectorised_matches_hand_values_and_bool_verdicts(rule):
    rows = [(q, c, e) for r, q, c, e in HAND_VALUES if r == rule]
    q = np.array([r[0] for r in rows])
    c = np.array([r[1] for r in rows])
    expected = np.array([r[2] for r in rows])
    got = score(rule, q, c)
    assert got.dtype == np.float64 and got.shape == q.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(score(rule, list(q), c.astype(bool)), got)


# --------------------------------------------------------------------------- properness


def _strict_ps(name: str) -> np.ndarray:
    """True probabilities at which the rule promises q = p as the unique maximiser."""
    if name == "log":
        return P_GRID[(P_GRID > EPS) & (P_GRID < 1.0 - EPS)]
    return P_GRID


@pytest.mark.parametrize("name", ["brier", "log", "spherical"])
def test_strictly_proper_on_grid(name):
    fn = SCORING_RULES.get(name).fn
    for p in _strict_ps(name):
        assert is_proper_at(fn, p), f"{name} is not strictly proper at p={p}"
        np.testing.assert_array_equal(maximisers(fn, p, Q_GRID), [p])


def test_log_grid_covers_both_ends():
    # The log properness grid must not collapse to the middle: it runs from 0.0005 to 0.9995.
    ps = _strict_ps("log")
    assert ps.min() == 0.0005 and ps.max() == 0.9995 and len(ps) == len(P_GRID) - 2


@pytest.mark.parametrize(
    ("p", "clipped_end"),
    [(0.0, "low"), (5e-5, "low"), (EPS, "low"), (1.0 - EPS, "high"), (1.0 - 5e-5, "high"), (1.0, "high")],
)
def test_log_outside_strict_interval_is_proper_but_not_strict(p, clipped_end):
    # For p <= EPS every q in [0, EPS] clips to EPS and ties for best; symmetrically at the top.
    fn = SCORING_RULES.get("log").fn
    qs = np.union1d(Q_FINE, [p])
    tied = qs[qs <= EPS] if clipped_end == "low" else qs[qs >= 1.0 - EPS]
    best = maximisers(fn, p, qs)
    np.testing.assert_array_equal(best, tied)
    assert p in best and len(best) > 1  # proper (q = p is among the best), not strictly
    assert is_proper_at(fn, p, qs, strict=False)


def test_linear_score_fails_the_properness_check():
    # Negative control: E_p(q) = 1 - p + q(2p - 1) is linear in q, so for p > 1/2 the best report
    # is q = 1 and for p < 1/2 it is q = 0. Only p in {0, 1} (and, non-strictly, 1/2) pass.
    strict_pass = {float(p) for p in P_GRID if is_proper_at(linear, p)}
    weak_pass = {float(p) for p in P_GRID if is_proper_at(linear, p, strict=False)}
    assert strict_pass == {0.0, 1.0}
    assert weak_pass == {0.0, 0.5, 1.0}
    np.testing.assert_array_equal(maximisers(linear, 0.7, Q_GRID), [1.0])
    np.testing.assert_array_equal(maximisers(linear, 0.3, Q_GRID), [0.0])


# --------------------------------------------------------------------------- ranges


RANGES = {
    "brier": (-1.0, 0.0),
    "log": (-9.210340371976182, -1.0000500033334732e-4),  # ln 1e-4, ln 0.9999
    "spherical": (0.0, 1.0),
}
# (q, c) points where the module docstring says low / high are attained.
ATTAINED = {
    "brier": {"low": [(0.0, 1), (1.0, 0)], "high": [(1.0, 1), (0.0, 0)]},
    "log": {
        "low": [(0.0, 1), (5e-5, 1), (EPS, 1), (1.0, 0), (1.0 - 5e-5, 0), (1.0 - EPS, 0)],
        "high": [(1.0, 1), (1.0 - 5e-5, 1), (1.0 - EPS, 1), (0.0, 0), (5e-5, 0), (EPS, 0)],
    },
    "spherical": {"low": [(0.0, 1), (1.0, 0)], "high": [(1.0, 1), (0.0, 0)]},
}


@pytest.mark.parametrize("name", ["brier", "log", "spherical"])
def test_range_holds_and_is_attained(name):
    rule = SCORING_RULES.get(name)
    assert (rule.low, rule.high) == pytest.approx(RANGES[name], abs=1e-12)
    values = np.concatenate([score(name, Q_FINE, np.full(Q_FINE.shape, c)) for c in (0, 1)])
    assert values.min() >= rule.low and values.max() <= rule.high
    assert abs(values.min() - rule.low) <= 1e-9 and abs(values.max() - rule.high) <= 1e-9
    for bound in ("low", "high"):
        q, c = zip(*ATTAINED[name][bound])
        np.testing.assert_allclose(score(name, q, c), getattr(rule, bound), rtol=0, atol=1e-9)


def test_spherical_at_one_half_is_not_its_minimum():
    # 1/sqrt(2) at q = 1/2 for either verdict; the range still reaches 0 and 1 at the ends.
    got = score("spherical", [0.5, 0.5, 0.0, 0.0], [0, 1, 1, 0])
    np.testing.assert_allclose(got, [1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 1.0], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("q", "c", "message"),
    [
        ([], [], "empty"),
        ([0.5, 0.5], [1], "2 items but c has 1"),
        ([-0.1], [1], r"\[0, 1\], got -0.1"),
        ([1.0000001], [1], r"\[0, 1\], got 1.0000001"),  # not clipped to 1
        ([0.5, float("nan")], [1, 0], "non-finite"),
        ([float("inf")], [1], "non-finite"),
        ([0.5], [2], "only 0/1"),
        ([0.5], [-1], "only 0/1"),
        ([0.5], [0.5], "only 0/1"),
        ([0.5], [float("nan")], "only 0/1"),
        ([[0.5]], [[1]], "1-D"),
        (0.5, 1, "1-D"),
        (["0.5"], [1], "numeric"),
    ],
)
@pytest.mark.parametrize("rule", ["brier", "log", "spherical"])
def test_invalid_input_raises(rule, q, c, message):
    with pytest.raises(ValueError, match=message):
        score(rule, q, c)
