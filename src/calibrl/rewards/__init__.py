"""Completion parsing and reward components (pure functions over parsed completions)."""

from calibrl.rewards.components import (
    COMPONENTS,
    RewardBatch,
    RewardComponent,
    RewardFunction,
    reward_metrics,
    weighted_sum,
)
from calibrl.rewards.parsing import CompletionFormat, ParsedCompletion, parse_completion, parse_confidence

__all__ = [
    "COMPONENTS",
    "CompletionFormat",
    "ParsedCompletion",
    "RewardBatch",
    "RewardComponent",
    "RewardFunction",
    "parse_completion",
    "parse_confidence",
    "reward_metrics",
    "weighted_sum",
]
