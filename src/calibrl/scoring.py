"""Completions -> parsed completions -> verifier verdicts -> reward components.

The one path shared by training and evaluation, so the number a model is trained on is the
number it is judged by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from calibrl.data.sources import Example
from calibrl.rewards import CompletionFormat, ParsedCompletion, RewardBatch, RewardFunction, parse_completion

__all__ = ["score_completions"]


def score_completions(
    texts: Sequence[str],
    examples: Sequence[Example],
    is_correct: Callable[[str | None, Example], bool],
    reward_fn: RewardFunction,
    fmt: CompletionFormat = CompletionFormat(),
) -> tuple[list[ParsedCompletion], RewardBatch]:
    """Parse and score N completions, ``texts[i]`` answering ``examples[i]``.

    The verifier sees only the parsed answer (never the raw text), and only when the format
    is ok.

    Raises:
        ValueError: ``texts`` and ``examples`` differ in length.
    """
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} completions for {len(examples)} examples")
    parsed = [parse_completion(t, fmt) for t in texts]
    correct = [p.format_ok and is_correct(p.answer, ex) for p, ex in zip(parsed, examples)]
    return parsed, reward_fn(parsed, correct)
