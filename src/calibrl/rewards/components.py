"""Reward components and their weighted combination.

A *component* is a pure function of one parsed completion and its verifier verdict
``c in {0, 1}`` (the task's verifier applied to the parsed answer against the reference answer).
Each component declares the range it can take on a well-formed completion and the value it takes
on a format failure; :class:`RewardFunction` uses those to prove, at construction, that a format
failure's weighted total is strictly below the lowest total any well-formed completion can get.

Components (all rewards are unitless; higher is better):

=============  ===========================  ================  =========================
name           value on a well-formed       range             value on a format failure
=============  ===========================  ================  =========================
correctness    c                            [0, 1]            0 (no credit, even if the
                                                              answer happens to be right)
format         1                            [1, 1]            0
brier          -(q - c)^2                   [-1, 0]           -1 (the worst Brier score)
log_score      log q if c else log(1 - q),  [ln 1e-4,         ln 1e-4 (the worst value)
               q clipped to [1e-4, 1-1e-4]  ln(1 - 1e-4)]
spherical_     (qc + (1-q)(1-c)) /          [0, 1]            0
score          sqrt(q^2 + (1-q)^2)
abstention     1 on an abstention that is   [0, 1]            0
               not correct (an answerable
               question), else 0
=============  ===========================  ================  =========================

``c`` is the verdict of :func:`calibrl.rewards.scoring.verdict`: an abstention is correct on an
unanswerable question (it earns ``correctness`` 1 there) and wrong on an answerable one, where it
earns the ``abstention`` weight ``w`` instead. Answering pays 1 if right and 0 if wrong, so
abstention is worth it when the chance of being right is low: with weights correctness 1,
brier 1 and a calibrated confidence p, answering is worth ``p - p(1 - p) = p^2`` and abstaining
with confidence 0 is worth ``w``, so the rational policy abstains iff ``p < sqrt(w)``
(``w = 0.25``: abstain below 1/2). The trade-off of a fixed abstention reward is that of R-Tuning
(arXiv:2311.09677) and TruthRL's ternary reward (arXiv:2509.25760); :class:`RewardFunction`
requires ``0 <= w < weights["correctness"]`` (at or above it abstaining pays at least as much as a
right answer; below 0 abstaining scores below a wrong answer).

The calibration components are the scoring rules of :mod:`calibrl.rewards.scoring_rules`
(ranges and properness there). Each component declares its ``kind``; the weight of a
``correctness`` or ``scoring_rule`` component must be ``>= 0`` (a negative weight on a proper
scoring rule makes the least calibrated confidence the best one, whatever the other weights).
A zero weight is allowed (RLVR).

RLCR (Damani et al., "Beyond Binary Rewards", arXiv:2507.16806) is
``correctness + brier`` = ``1[correct] - (q - 1[correct])^2``, plus a format term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from calibrl.registry import Registry
from calibrl.rewards.guard import DEFAULT_MAX_ANSWER_CHARS, DEFAULT_TIMEOUT_S, VerifierGuard
from calibrl.rewards.parsing import ParsedCompletion
from calibrl.rewards.scoring_rules import SCORING_RULES

__all__ = [
    "COMPONENTS",
    "NONNEGATIVE_KINDS",
    "RewardComponent",
    "RewardBatch",
    "RewardFunction",
    "weighted_sum",
    "reward_metrics",
]


@dataclass(frozen=True)
class RewardComponent:
    """A named reward term.

    Attributes:
        fn: ``fn(parsed, correct) -> float`` for a *well-formed* completion.
        low: lowest value ``fn`` can return on a well-formed completion.
        high: highest value ``fn`` can return on a well-formed completion.
        on_format_failure: the value used when the completion fails the format.
        kind: what the term rewards: ``"correctness"`` (a right answer), ``"scoring_rule"`` (a
            proper scoring rule of the stated confidence), ``"format"`` or ``"other"``. The weight
            of a correctness or scoring-rule term must be ``>= 0`` (:data:`NONNEGATIVE_KINDS`).
        rule: for a scoring-rule term, the name of its rule in
            :data:`calibrl.rewards.scoring_rules.SCORING_RULES` (``None`` otherwise).
    """

    fn: Callable[[ParsedCompletion, bool], float]
    low: float
    high: float
    on_format_failure: float
    kind: str = "other"
    rule: str | None = None


#: Component kind -> why a negative weight on it is refused. A proper scoring rule is maximised in
#: expectation by the true probability, so a negative weight makes the *least* calibrated
#: confidence the best answer; a negative correctness weight makes a wrong answer the best answer.
#: Zero is allowed for both (RLVR has no calibration term).
NONNEGATIVE_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "scoring_rule": "a proper scoring rule's weight must be >= 0 (a negative weight rewards miscalibration)",
        "correctness": "the correctness weight must be >= 0 (a negative weight rewards wrong answers)",
    }
)


COMPONENTS: Registry[RewardComponent] = Registry("reward component")


def _correctness(parsed: ParsedCompletion, correct: bool) -> float:
    return 1.0 if correct else 0.0


def _format(parsed: ParsedCompletion, correct: bool) -> float:
    return 1.0


def _abstention(parsed: ParsedCompletion, correct: bool) -> float:
    return 1.0 if parsed.abstained and not correct else 0.0


def _scoring_rule_component(rule_name: str) -> RewardComponent:
    """The calibration component scoring the stated confidence with a registered scoring rule
    (:mod:`calibrl.rewards.scoring_rules`); a format failure gets the rule's worst value."""
    rule = SCORING_RULES.get(rule_name)

    def fn(parsed: ParsedCompletion, correct: bool) -> float:
        assert parsed.confidence is not None  # only called on well-formed completions
        return float(rule.fn(np.array([parsed.confidence]), np.array([1.0 if correct else 0.0]))[0])

    return RewardComponent(fn, rule.low, rule.high, rule.low, kind="scoring_rule", rule=rule_name)


COMPONENTS.register("correctness")(RewardComponent(_correctness, 0.0, 1.0, 0.0, kind="correctness"))
COMPONENTS.register("format")(RewardComponent(_format, 1.0, 1.0, 0.0, kind="format"))
# RLCR calibration term, arXiv:2507.16806 eq. (1): -(q - 1[correct])^2.
COMPONENTS.register("brier")(_scoring_rule_component("brier"))
COMPONENTS.register("log_score")(_scoring_rule_component("log"))
COMPONENTS.register("spherical_score")(_scoring_rule_component("spherical"))
COMPONENTS.register("abstention")(RewardComponent(_abstention, 0.0, 1.0, 0.0))


def _lowest(weight: float, component: RewardComponent) -> float:
    """The lowest value of ``weight * component`` over well-formed completions."""
    return min(weight * component.low, weight * component.high)


def _format_advice(weights: Mapping[str, float], components: Mapping[str, RewardComponent]) -> str:
    """What ``reward.weights.format`` must be for a format failure to total strictly below every
    well-formed completion under the other ``weights``: the ``format`` component pays a
    well-formed completion ``low - on_format_failure`` more than a failure (per unit weight),
    which has to cover the gap ``others' failure total - others' lowest well-formed total``."""
    fmt = COMPONENTS.get("format")
    gap = sum(weights[k] * c.on_format_failure - _lowest(weights[k], c) for k, c in components.items() if k != "format")
    needed = max(gap / (fmt.low - fmt.on_format_failure), 0.0)
    if "format" not in weights:
        return f"add the 'format' component with a weight above {needed:g}"
    return f"reward.weights.format={weights['format']:g} must be above {needed:g}"


def weighted_sum(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted sum of reward components: ``total[i] = sum_k weights[k] * components[k][i]``.

    Args:
        components: name -> rewards, each shape ``[N]``.
        weights: name -> weight; must name exactly the same components.

    Returns:
        Total reward, shape ``[N]``, float64.

    Raises:
        ValueError: the names differ, the shapes differ, or any value or weight is non-finite.
    """
    if set(components) != set(weights):
        raise ValueError(
            f"reward weights {sorted(weights)} must name exactly the components {sorted(components)}"
        )
    if not components:
        raise ValueError("no reward components")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in components.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"reward components must be 1-D arrays of one length, got shapes {shapes}")
    total = np.zeros(next(iter(shapes)), dtype=np.float64)
    for k, a in arrays.items():
        w = float(weights[k])
        if not math.isfinite(w):
            raise ValueError(f"weight of {k!r} is not finite: {w}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"reward component {k!r} holds a non-finite value")
        total += w * a
    return total


@dataclass
class RewardBatch:
    """Rewards of N completions.

    Attributes:
        components: name -> per-completion reward, each float64 ``[N]``.
        total: the weighted sum of the components, float64 ``[N]`` (logged as ``rewards/total``;
            how components become advantages is the objective combiner's business,
            :mod:`calibrl.objectives`).
        correct: verifier verdicts, bool ``[N]`` (False on a format failure).
        format_ok: bool ``[N]``.
        confidence: stated confidence, float64 ``[N]``, NaN where the format failed.
        counters: per-batch counts of the verifier guard, metric key -> count
            (:data:`calibrl.rewards.guard.COUNTERS`: ``rewards/verifier_timeouts``,
            ``rewards/verifier_too_long``, ``rewards/verifier_errors``); filled by
            :func:`calibrl.rewards.scoring.score_completions`, empty when the batch was scored directly.
    """

    components: dict[str, np.ndarray]
    total: np.ndarray
    correct: np.ndarray
    format_ok: np.ndarray
    confidence: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)


class RewardFunction:
    """Scores parsed completions with weighted components.

    Args:
        weights: component name -> weight (``reward.weights`` in the config). Names must be in
            :data:`COMPONENTS`.
        guard: size cap and time limit of the verifier calls that decide ``correct``
            (:mod:`calibrl.rewards.guard`; default: 5 s per answer, answers up to 8192 characters).
            :func:`calibrl.rewards.scoring.score_completions` verifies through it.

    Raises:
        KeyError: unknown component (the message lists the valid ones).
        ValueError: a weight is non-finite; a correctness or scoring-rule component (its
            ``kind``, :data:`NONNEGATIVE_KINDS`) has a negative weight; the ``abstention`` weight
            is negative or not below the ``correctness`` weight; or under these weights a format
            failure would not score strictly below every well-formed completion (e.g. a zero
            ``format`` weight).
    """

    def __init__(self, weights: Mapping[str, float], guard: VerifierGuard | None = None) -> None:
        self.guard = guard if guard is not None else VerifierGuard()
        if not weights:
            raise ValueError("reward.weights is empty: name at least one component")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.components = {k: COMPONENTS.get(k) for k in self.weights}
        for k, w in self.weights.items():
            if not math.isfinite(w):
                raise ValueError(f"reward.weights.{k} is not finite: {w}")
            if w < 0 and self.components[k].kind in NONNEGATIVE_KINDS:
                raise ValueError(f"reward.weights.{k}={w:g}: {NONNEGATIVE_KINDS[self.components[k].kind]}")
        if "abstention" in self.weights:
            w, top = self.weights["abstention"], self.weights.get("correctness", 0.0)
            if w < 0:
                raise ValueError(f"reward.weights.abstention={w:g} must be >= 0 (a negative weight makes "
                                 "abstaining score below a wrong answer)")
            if not w < top:
                raise ValueError(f"reward.weights.abstention={w:g} must be below the correctness weight {top:g} "
                                 "(at or above it, abstaining pays at least as much as a right answer)")
        # Lowest total over well-formed completions, bounding each term on its own (a lower bound
        # of the true minimum, so "failure < bound" is sufficient).
        self.lowest_well_formed = sum(_lowest(self.weights[k], c) for k, c in self.components.items())
        self.format_failure_total = sum(self.weights[k] * c.on_format_failure for k, c in self.components.items())
        if not self.format_failure_total < self.lowest_well_formed:
            raise ValueError(
                f"with reward.weights {self.weights} a format failure totals {self.format_failure_total:g}, "
                f"not strictly below the lowest well-formed total {self.lowest_well_formed:g}; "
                f"{_format_advice(self.weights, self.components)}"
            )

    @classmethod
    def from_config(cls, reward: Mapping[str, Any]) -> RewardFunction:
        """The reward function of the ``reward`` config group: ``weights``, and the guard's
        ``verifier_timeout_s`` (null: no time limit) and ``max_answer_chars`` (defaults as
        :class:`~calibrl.rewards.guard.VerifierGuard` where absent).

        Raises:
            KeyError, ValueError: as the constructor and :class:`VerifierGuard`.
        """
        guard = VerifierGuard(reward.get("verifier_timeout_s", DEFAULT_TIMEOUT_S),
                              reward.get("max_answer_chars", DEFAULT_MAX_ANSWER_CHARS))
        return cls(dict(reward["weights"]), guard)

    def __call__(self, parsed: list[ParsedCompletion], correct: list[bool]) -> RewardBatch:
        """Score N completions.

        Args:
            parsed: N parsed completions.
            correct: N verifier verdicts (ignored where the format failed).

        Returns:
            A :class:`RewardBatch`; every reward is finite.

        Raises:
            ValueError: the two lists differ in length.
        """
        if len(parsed) != len(correct):
            raise ValueError(f"{len(parsed)} completions but {len(correct)} verdicts")
        ok = np.array([p.format_ok for p in parsed], dtype=bool)
        corr = np.array([bool(c) and p.format_ok for p, c in zip(parsed, correct)], dtype=bool)
        comps = {
            name: np.array(
                [
                    comp.fn(p, c) if p.format_ok else comp.on_format_failure
                    for p, c in zip(parsed, corr)
                ],
                dtype=np.float64,
            )
            for name, comp in self.components.items()
        }
        total = weighted_sum(comps, self.weights)
        conf = np.array([p.confidence if p.format_ok else np.nan for p in parsed], dtype=np.float64)
        return RewardBatch(comps, total, corr, ok, conf)


def reward_metrics(components: Mapping[str, np.ndarray], total: np.ndarray, prefix: str = "rewards") -> dict[str, float]:
    """Per-component and total reward mean/std for logging.

    Returns:
        ``{f"{prefix}/{name}/mean", f"{prefix}/{name}/std", f"{prefix}/total/mean", ...}``
        (population std).
    """
    out: dict[str, float] = {}
    for name, values in {**components, "total": total}.items():
        v = np.asarray(values, dtype=np.float64)
        out[f"{prefix}/{name}/mean"] = float(v.mean())
        out[f"{prefix}/{name}/std"] = float(v.std())
    return out
