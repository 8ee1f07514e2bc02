"""Bounded proper scoring rules for a stated confidence, the calibration term of the reward.

A *scoring rule* ``S(q, c)`` scores a stated probability ``q in [0, 1]`` that an answer is right
once the verdict ``c in {0, 1}`` is known. Every rule here is positively oriented: higher is
better, so it can be added to the reward as it is. Against a true probability of being right
``p``, the expected score of stating ``q`` is

    E_p(q) = p * S(q, 1) + (1 - p) * S(q, 0).

``S`` is *proper* if, for every ``p in [0, 1]``, ``q = p`` maximises ``E_p``, and *strictly
proper* if ``q = p`` is the only maximiser: then reporting the true probability is the single
best answer, which is what makes the policy's confidences calibrated at the optimum. RLCR
(Damani et al., "Beyond Binary Rewards: Training LMs to Reason about Their Uncertainty",
arXiv:2507.16806) proves that ``correctness + S`` keeps both accuracy and calibration optimal
for any *bounded* proper ``S``; every rule here is bounded, the log score only through clipping.

Rules (``q`` the stated confidence, ``c`` the verdict):

=========  ===============================================  ==================================
name       S(q, c)                                          range [low, high]
=========  ===============================================  ==================================
brier      -(q - c)^2                                       [-1, 0]
log        log(q_e) if c else log(1 - q_e),                 [log(eps), log(1 - eps)]
           q_e = clip(q, eps, 1 - eps), eps = LOG_EPS       = [-9.2103..., -1.00005e-4]
spherical  (q c + (1 - q)(1 - c)) / sqrt(q^2 + (1 - q)^2)   [0, 1]
=========  ===============================================  ==================================

Where each bound is attained (the tests check each of these):

- brier: ``low = -1`` at ``(q, c) = (0, 1)`` and ``(1, 0)``; ``high = 0`` at ``(1, 1)`` and
  ``(0, 0)``.
- log: ``low = log(eps)`` wherever the stated probability of the outcome is clipped up, i.e.
  ``c = 1, q <= eps`` or ``c = 0, q >= 1 - eps``; ``high = log(1 - eps)`` (not 0: the clip keeps
  ``q_e < 1``) at ``c = 1, q >= 1 - eps`` or ``c = 0, q <= eps``.
- spherical: ``S(q, 1) = q / n(q)`` with ``n(q) = sqrt(q^2 + (1 - q)^2)`` has derivative
  ``(1 - q) / n(q)^3 >= 0``, so it rises from ``S(0, 1) = 0`` to ``S(1, 1) = 1``, and
  ``S(q, 0) = S(1 - q, 1)`` falls from 1 to 0. Hence ``low = 0`` at ``(0, 1)`` and ``(1, 0)``,
  ``high = 1`` at ``(1, 1)`` and ``(0, 0)``. (At ``q = 1/2`` the score is ``1/sqrt(2)`` whatever
  ``c``: the denominator is smallest there, but the rule's range is still the whole [0, 1].)

Properness:

- brier: ``E_p(q) = -(q - p)^2 - p(1 - p)``, uniquely maximised at ``q = p``: strictly proper.
- spherical: strictly proper (Gneiting & Raftery 2007: the ``alpha = 2`` member of the
  pseudospherical family).
- log: unclipped, ``E_p(q) = p log q + (1 - p) log(1 - q)`` is strictly proper. Clipped, ``E_p``
  depends on ``q`` only through ``q_e`` and is strictly concave in it, so:
  for ``eps < p < 1 - eps`` the unique maximiser is ``q = p`` (strictly proper there); for
  ``p <= eps`` every ``q in [0, eps]`` is a maximiser (all clip to ``eps``), and for
  ``p >= 1 - eps`` every ``q in [1 - eps, 1]``. ``q = p`` is always among the maximisers, so the
  clipped rule is proper on all of [0, 1] but strictly proper only for ``p`` in
  ``(eps, 1 - eps)``. ``strictly_proper`` is True for it in that sense. The clip is what bounds
  the rule: without it a confident wrong answer scores ``-inf`` and a format failure could not
  be given a worst value.

Sources:
- Brier, "Verification of forecasts expressed in terms of probability", Monthly Weather Review
  78 (1950); used as the calibration reward by RLCR, arXiv:2507.16806.
- Good, "Rational Decisions", J. R. Stat. Soc. B 14 (1952) (log score); used as an RL reward for
  verbalised confidence by Bani-Harouni, Pellegrini, Stangel et al., "Rewarding Doubt: A
  Reinforcement Learning Approach to Calibrated Confidence Expression of Large Language Models",
  arXiv:2503.02623.
- Gneiting & Raftery, "Strictly Proper Scoring Rules, Prediction, and Estimation", JASA 102
  (2007) 359-378 (definitions; spherical score).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from calibrl.registry import Registry

ArrayLike = Sequence[float] | np.ndarray

__all__ = ["LOG_EPS", "SCORING_RULES", "ScoringRule", "score"]

LOG_EPS = 1e-4
"""The log score clips ``q`` to ``[LOG_EPS, 1 - LOG_EPS]`` inside the log, bounding it below by
``log(LOG_EPS) = -9.2103...``; it is strictly proper only for true probabilities in
``(LOG_EPS, 1 - LOG_EPS)``."""


@dataclass(frozen=True)
class ScoringRule:
    """A bounded, positively oriented scoring rule for a binary outcome.

    Attributes:
        fn: ``fn(q, c) -> scores``, vectorised: ``q`` float ``[N]`` in [0, 1], ``c`` ``[N]`` of
            0/1, returns float64 ``[N]``; higher is better. Does not validate: call
            :func:`score` on untrusted input.
        low: lowest score over ``q in [0, 1]``, ``c in {0, 1}``; finite, and attained.
        high: highest score over the same set; attained.
        strictly_proper: ``q = p`` is the unique maximiser of the expected score (for the clipped
            log score: for every ``p`` in ``(LOG_EPS, 1 - LOG_EPS)``; see the module docstring).
        source: where the rule comes from.
    """

    fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
    low: float
    high: float
    strictly_proper: bool
    source: str


SCORING_RULES: Registry[ScoringRule] = Registry("scoring rule")


def _brier(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    return -((q - c) ** 2)


def _log(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    # Clip the probability given to the realised outcome (q if right, 1 - q if wrong) rather than
    # computing 1 - clip(q): equal in exact arithmetic, and it keeps every float result inside
    # [log(LOG_EPS), log(1 - LOG_EPS)] so `low` stays the true worst value.
    p_outcome = np.where(c == 1, q, 1.0 - q)
    return np.log(np.clip(p_outcome, LOG_EPS, 1.0 - LOG_EPS))


def _spherical(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    r = 1.0 - q
    # hypot(q, r) >= max(q, r) in floating point too, so the score never leaves [0, 1].
    return np.where(c == 1, q, r) / np.hypot(q, r)


SCORING_RULES.register("brier")(
    ScoringRule(_brier, -1.0, 0.0, True, "Brier (1950); RLCR, arXiv:2507.16806")
)
SCORING_RULES.register("log")(
    ScoringRule(
        _log,
        math.log(LOG_EPS),
        math.log(1.0 - LOG_EPS),
        True,
        "Good (1952); Rewarding Doubt, arXiv:2503.02623",
    )
)
SCORING_RULES.register("spherical")(
    ScoringRule(_spherical, 0.0, 1.0, True, "Gneiting & Raftery (2007), JASA 102:359")
)


def score(rule: str, q: ArrayLike, c: ArrayLike) -> np.ndarray:
    """Score stated confidences against verdicts with a registered rule.

    Args:
        rule: a name in :data:`SCORING_RULES` (``"brier"``, ``"log"``, ``"spherical"``).
        q: stated confidences, float ``[N]``, each finite and in [0, 1]; never clipped here.
        c: verdicts, ``[N]`` of 0/1 or bool.

    Returns:
        Scores, float64 ``[N]``, each in ``[rule.low, rule.high]``.

    Raises:
        KeyError: unknown rule; the message lists the registered names.
        ValueError: ``q`` or ``c`` is not a 1-D numeric array, they differ in length, they are
            empty, ``q`` holds a non-finite value or one outside [0, 1], or ``c`` holds a value
            other than 0/1.
    """
    spec = SCORING_RULES.get(rule)
    q_raw, c_raw = np.asarray(q), np.asarray(c)
    for name, a in (("q", q_raw), ("c", c_raw)):
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be numeric or bool, got dtype {a.dtype}")
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if q_raw.shape != c_raw.shape:
        raise ValueError(f"q has {q_raw.shape[0]} items but c has {c_raw.shape[0]}")
    if q_raw.size == 0:
        raise ValueError("empty input: nothing to score")
    qf, cf = q_raw.astype(np.float64), c_raw.astype(np.float64)
    if not np.isfinite(qf).all():
        raise ValueError("q holds a non-finite value")
    out_of_range = (qf < 0.0) | (qf > 1.0)
    if out_of_range.any():
        raise ValueError(f"q must lie in [0, 1], got {float(qf[out_of_range][0])!r}")
    if not ((cf == 0.0) | (cf == 1.0)).all():
        raise ValueError("c must hold only 0/1 (or bool) values")
    return spec.fn(qf, cf)
