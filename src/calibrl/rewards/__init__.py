"""Completion parsing, the verifier guard and reward components (pure functions over parsed
completions)."""

from calibrl.rewards.components import (
    COMPONENTS,
    RewardBatch,
    RewardComponent,
    RewardFunction,
    reward_metrics,
    weighted_sum,
)
from calibrl.rewards.guard import GuardedVerdicts, VerifierGuard
from calibrl.rewards.parsing import ParsedCompletion, parse_completion, parse_confidence

__all__ = [
    "COMPONENTS",
    "GuardedVerdicts",
    "ParsedCompletion",
    "RewardBatch",
    "RewardComponent",
    "RewardFunction",
    "VerifierGuard",
    "parse_completion",
    "parse_confidence",
    "reward_metrics",
    "weighted_sum",
]
