"""Calibration objectives that reach the confidence tokens with a low-variance signal.

``objective.calibration`` picks how the calibration objective trains the stated confidence
(:mod:`calibrl.rl.calibration` runs them; this module holds their math, model-free):

- ``reward``: the scoring rules are reward components in the GRPO reward (RLCR,
  arXiv:2507.16806); the confidence tokens get the same, sampled, REINFORCE advantage as the rest
  of the completion, whose baseline is taken over rollouts whose correctness differs.
- ``expected``: the exact expected score of the scoring rules under the model's confidence
  distribution over the grid (:func:`expected_score`; ConfTuner's "tokenized Brier" loss,
  arXiv:2508.18847). No sampling variance.
- ``branch``: K sampled confidence continuations of each finished rollout, the answer fixed
  (Rewarding Doubt, arXiv:2503.02623, optimises the confidence given the answer), scored and
  baselined among themselves (:func:`loo_advantages`).

In ``expected`` and ``branch`` the confidence is scored against a *target* probability
(:data:`TARGETS`, :func:`calibration_target`) instead of the sampled verdict alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calibrl.data.format import normalize_answer
from calibrl.registry import Registry
from calibrl.rewards.scoring_rules import SCORING_RULES

__all__ = [
    "TARGETS",
    "Target",
    "calibration_target",
    "expected_score",
    "grid_scores",
    "loo_advantages",
]


@dataclass(frozen=True)
class Target:
    """A calibration target: the probability of being right that the confidence is scored against.

    Attributes:
        fn: ``fn(correct [N] bool, group_index [N] int, answers N, answer_prob [N] or None) ->
            float64 [N]`` in [0, 1].
        proper: scoring against it keeps the scoring rule proper with respect to correctness
            (the optimum states the true probability of being right); otherwise the confidence
            is trained to *distil* another signal, calibrated only insofar as that signal is.
        needs_answer_prob: the target reads the answer-token probability.
        source: where it comes from.
    """

    fn: Callable[[np.ndarray, np.ndarray, Sequence[str | None], np.ndarray | None], np.ndarray]
    proper: bool
    needs_answer_prob: bool
    source: str


TARGETS: Registry[Target] = Registry("calibration target")


def _correct(correct, group_index, answers, answer_prob):
    return correct.astype(np.float64)


def _group_accuracy(correct, group_index, answers, answer_prob):
    out = np.empty(len(correct), dtype=np.float64)
    for g in np.unique(group_index):
        rows = group_index == g
        out[rows] = correct[rows].mean()
    return out


def _loo_agreement(correct, group_index, answers, answer_prob):
    keys = [normalize_answer(a) if a is not None else None for a in answers]
    out = np.zeros(len(correct), dtype=np.float64)
    for g in np.unique(group_index):
        rows = np.flatnonzero(group_index == g)
        if len(rows) < 2:
            raise ValueError("loo_agreement needs groups of at least 2 completions")
        for i in rows:
            if keys[i] is None:
                continue  # no answer agrees with nothing
            out[i] = sum(keys[j] == keys[i] for j in rows if j != i) / (len(rows) - 1)
    return out


def _answer_prob(correct, group_index, answers, answer_prob):
    if answer_prob is None:
        raise ValueError("the answer_prob target needs answer-token probabilities")
    a = np.asarray(answer_prob, dtype=np.float64)
    return np.where(np.isfinite(a), np.clip(a, 0.0, 1.0), 0.0)


TARGETS.register("correct")(Target(_correct, True, False, "RLCR, arXiv:2507.16806"))
TARGETS.register("group_accuracy")(Target(_group_accuracy, False, False, "DCPO, arXiv:2603.09117"))
TARGETS.register("loo_agreement")(Target(_loo_agreement, False, False, "self-consistency, arXiv:2203.11171"))
TARGETS.register("answer_prob")(Target(_answer_prob, False, True, "answer-token probability"))


def calibration_target(
    name: str, gamma: float, correct: np.ndarray, group_index: np.ndarray, answers: Sequence[str | None],
    answer_prob: np.ndarray | None = None,
) -> np.ndarray:
    """The target ``t = gamma * correct + (1 - gamma) * target(name)`` of every completion.

    Properness: ``correct`` (the default) is proper with respect to correctness: the expected
    score against it is maximised by stating the true probability of being right. The others
    are *distillation*: ``group_accuracy`` (DCPO, arXiv:2603.09117) is the group's mean accuracy,
    a lower-variance estimate of the question's difficulty shared by the group, proper for the
    question but blind to which sample is right; ``loo_agreement`` (share of the other group
    members whose normalised answer equals this one's; no answer agrees with nothing) and
    ``answer_prob`` (the answer-token probability, a model-intrinsic signal; missing values count
    as 0) teach the confidence to report another signal. A mix with ``gamma > 0`` keeps a proper
    part: ``gamma = 1`` is correctness alone.

    Args:
        name: a name in :data:`TARGETS`.
        gamma: weight of correctness, in [0, 1].
        correct: bool ``[N]`` verdicts.
        group_index: int ``[N]`` GRPO group of each completion.
        answers: ``N`` parsed answers (``None``: no answer).
        answer_prob: float ``[N]`` answer-token probabilities, needed by ``answer_prob`` only.

    Returns:
        float64 ``[N]`` in [0, 1].

    Raises:
        KeyError: unknown target; the message lists the known ones.
        ValueError: ``gamma`` outside [0, 1]; lengths differ; ``answer_prob`` missing where
            needed; a group of one under ``loo_agreement``.
    """
    target = TARGETS.get(name)
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"objective.gamma must be in [0, 1], got {gamma!r}")
    c = np.asarray(correct, dtype=bool)
    g = np.asarray(group_index)
    if len(g) != len(c) or len(answers) != len(c) or (answer_prob is not None and len(answer_prob) != len(c)):
        raise ValueError("correct, group_index, answers and answer_prob must have the same length")
    t = target.fn(c, g, answers, answer_prob)
    return gamma * c.astype(np.float64) + (1.0 - gamma) * t


def grid_scores(rule: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S(v, 1), S(v, 0))``: float64 ``[V]`` scores of every grid value under ``rule`` (a name
    in :data:`calibrl.rewards.scoring_rules.SCORING_RULES`) when right and when wrong."""
    spec = SCORING_RULES.get(rule)
    v = values.detach().cpu().double().numpy()
    return (torch.from_numpy(spec.fn(v, np.ones_like(v))), torch.from_numpy(spec.fn(v, np.zeros_like(v))))


def expected_score(probs: torch.Tensor, values: torch.Tensor, target: torch.Tensor,
                   rules: Mapping[str, float]) -> torch.Tensor:
    """Exact expected score of a stated confidence drawn from ``probs`` against ``target``.

    ``E_m = sum_k w_k ( sum_v p_m(v) [t_m S_k(v, 1) + (1 - t_m) S_k(v, 0)] + (1 - sum_v p_m(v)) low_k )``

    the expected value, over the confidence the model would state and over the verdict
    ``c ~ Bernoulli(t_m)``, of the weighted scoring rules (ConfTuner's tokenized Brier loss,
    arXiv:2508.18847, is ``-E`` for Brier and a 0/1 target). ``probs`` are the model's
    probabilities of writing each grid value; the rest of the mass, ``1 - sum_v p(v)`` (a value off
    the grid, or no number at all), scores the rule's worst value ``low_k``, as a format failure
    does in the reward: moving mass off the grid never raises ``E``. For fixed ``t`` ``E`` is linear
    in ``p``, so ``-E`` is minimised by putting all mass on the grid value that maximises
    ``t S(v, 1) + (1 - t) S(v, 0)``: for Brier, ``-(v - t)^2 - t (1 - t)``, the grid value nearest
    ``t``. No sampling: the loss and its gradient are exact.

    Args:
        probs: float ``[M, V]``, non-negative, each row summing to at most 1 (differentiable).
        values: float ``[V]``, the grid, in [0, 1].
        target: float ``[M]`` in [0, 1].
        rules: scoring rule name -> weight (>= 0), e.g. ``{"brier": 1.0}``.

    Returns:
        float ``[M]`` expected scores (higher is better), in ``[sum w_k low_k, sum w_k high_k]``.

    Raises:
        ValueError: shapes disagree, a target outside [0, 1], a row of ``probs`` summing above 1,
            no rule or a negative weight.
        KeyError: unknown rule.
    """
    if probs.ndim != 2 or values.shape != (probs.shape[1],) or target.shape != (probs.shape[0],):
        raise ValueError(f"probs [M, V], values [V], target [M] expected; got {tuple(probs.shape)}, "
                         f"{tuple(values.shape)}, {tuple(target.shape)}")
    if not rules:
        raise ValueError("expected_score needs at least one scoring rule")
    if bool(((target < 0) | (target > 1)).any()):
        raise ValueError("calibration targets must lie in [0, 1]")
    if bool((probs.detach().sum(dim=1) > 1 + 1e-4).any()):
        raise ValueError("each row of probs must sum to at most 1")
    out = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
    t = target.to(probs.dtype).to(probs.device)[:, None]
    off_grid = 1 - probs.sum(dim=1)
    for name, w in rules.items():
        if w < 0:
            raise ValueError(f"scoring rule {name!r} has a negative weight {w}")
        s1, s0 = (s.to(probs.dtype).to(probs.device) for s in grid_scores(name, values))
        on_grid = (probs * (t * s1[None] + (1 - t) * s0[None])).sum(dim=1)
        out = out + w * (on_grid + off_grid * SCORING_RULES.get(name).low)
    return out


def loo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages within each row: ``A_k = s_k - mean_{j != k} s_j``.

    Used for the K confidence branches of one rollout (``objective.calibration=branch``): the
    baseline of a branch is the mean of its K - 1 siblings, which share the reasoning and answer,
    so the answer's correctness cancels and only the confidence is credited. No std division
    (RLOO, Ahmadian et al., arXiv:2402.14740; Kool et al. 2019). Equal to
    ``K / (K - 1) * (s_k - mean_j s_j)``.

    Args:
        scores: float ``[M, K]``, K >= 2.

    Returns:
        float ``[M, K]``, each row summing to 0.

    Raises:
        ValueError: not 2-D or K < 2.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"leave-one-out needs scores [M, K] with K >= 2, got {tuple(scores.shape)}")
    k = scores.shape[1]
    return (scores - scores.mean(dim=1, keepdim=True)) * (k / (k - 1))
