"""Registry errors, and the project's registries answering with their valid choices."""

from __future__ import annotations

import random

import pytest

from calibrl.data.prompts import CONFIDENCE_POLICIES
from calibrl.data.sources import SOURCES, VERIFIERS, build_splits
from calibrl.registry import Registry
from calibrl.objectives import COMBINERS
from calibrl.rewards import COMPONENTS
from calibrl.rewards.scoring_rules import SCORING_RULES
from calibrl.rl.loss import LOSS_AGG


@pytest.fixture
def reg() -> Registry[int]:
    r: Registry[int] = Registry("widget")
    r.register("beta")(2)
    r.register("alpha")(1)
    return r


def test_register_and_get(reg):
    assert reg.get("alpha") == 1 and reg.get("beta") == 2
    assert reg.names() == ["alpha", "beta"]  # sorted, not insertion order
    assert list(reg) == ["alpha", "beta"]
    assert "alpha" in reg and "gamma" not in reg and 3 not in reg


def test_register_returns_target_unchanged():
    r: Registry[object] = Registry("function")

    @r.register("f")
    def f():
        return 42

    assert f() == 42 and r.get("f") is f


def test_duplicate_name_raises_and_keeps_first(reg):
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        reg.register("alpha")(99)
    assert reg.get("alpha") == 1


def test_unknown_name_lists_valid_choices(reg):
    with pytest.raises(KeyError) as err:
        reg.get("gamma")
    msg = str(err.value)
    assert "unknown widget 'gamma'" in msg
    assert "valid choices: alpha, beta" in msg


def test_empty_registry_error():
    with pytest.raises(KeyError, match="unknown thing 'x'"):
        Registry("thing").get("x")


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        (COMPONENTS, {"correctness", "format", "brier", "log_score", "spherical_score"}),
        (COMBINERS, {"sum", "normalize_then_sum", "segment"}),
        (SCORING_RULES, {"brier", "log", "spherical"}),
        (LOSS_AGG, {"token_mean", "seq_mean_token_mean", "constant"}),
        (SOURCES, {"reasoning_gym", "hf"}),
        (VERIFIERS, {"exact", "math_verify"}),
        (CONFIDENCE_POLICIES, {"constant", "uniform", "mixed"}),
    ],
    ids=["components", "combiners", "scoring_rules", "loss_agg", "sources", "verifiers", "confidence_policies"],
)
def test_project_registries(registry, expected):
    assert expected <= set(registry.names())
    with pytest.raises(KeyError) as err:
        registry.get("no-such-name")
    for name in registry.names():
        assert name in str(err.value)


def test_build_splits_unknown_source_lists_choices():
    with pytest.raises(KeyError, match="hf.*reasoning_gym"):
        build_splits("csv", name="x")


def test_confidence_policies_stay_on_the_interior_grid():
    rng = random.Random(0)
    assert CONFIDENCE_POLICIES.get("constant")(value=0.7)(rng) == 0.7
    uniform = CONFIDENCE_POLICIES.get("uniform")(grid_step=0.05)
    draws = [uniform(rng) for _ in range(2000)]
    # grid_step 0.05 -> k * 0.05 for k = 1..19 (never 0 or 1)
    ks = {round(q / 0.05) for q in draws}
    assert ks == set(range(1, 20))
    assert all(abs(q - round(q / 0.05) * 0.05) < 1e-12 for q in draws)
    mixed = CONFIDENCE_POLICIES.get("mixed")(value=0.5, random_fraction=0.0)
    assert {mixed(rng) for _ in range(50)} == {0.5}
