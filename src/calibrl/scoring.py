"""Completions -> parsed completions -> verifier verdicts -> reward components.

The one path shared by training and evaluation, so the number a model is trained on is the
number it is judged by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from calibrl.data.sources import Example
from calibrl.rewards import CompletionFormat, ParsedCompletion, RewardBatch, RewardFunction, parse_completion

__all__ = ["score_completions", "verdict"]


def verdict(parsed: ParsedCompletion, example: Example, is_correct: Callable[[str | None, Example], bool]) -> bool:
    """Whether one parsed completion is correct; the verifier sees only the parsed answer.

    ================================  ==========================  =========================
    completion                        answerable example          unanswerable example
    ================================  ==========================  =========================
    format failure                    wrong                       wrong
    abstention (``parsed.abstained``)  wrong                       **correct**
    any other answer                  ``is_correct(answer, ex)``  wrong (verifier not run)
    ================================  ==========================  =========================

    So the stated confidence always means "the probability that this response is correct": a
    calibrated abstention on an answerable question states 0, on an unanswerable one 1. What an
    abstention on an answerable question earns is the ``abstention`` reward component's business
    (:mod:`calibrl.rewards.components`), not the verdict's.
    """
    if not parsed.format_ok:
        return False
    if example.unanswerable:
        return parsed.abstained
    return not parsed.abstained and bool(is_correct(parsed.answer, example))


def score_completions(
    texts: Sequence[str],
    examples: Sequence[Example],
    is_correct: Callable[[str | None, Example], bool],
    reward_fn: RewardFunction,
    fmt: CompletionFormat = CompletionFormat(),
) -> tuple[list[ParsedCompletion], RewardBatch]:
    """Parse and score N completions, ``texts[i]`` answering ``examples[i]``.

    The verdict of each completion is :func:`verdict`: the verifier sees only the parsed answer
    (never the raw text), and only when the format is ok.

    Raises:
        ValueError: ``texts`` and ``examples`` differ in length.
    """
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} completions for {len(examples)} examples")
    parsed = [parse_completion(t, fmt) for t in texts]
    correct = [verdict(p, ex, is_correct) for p, ex in zip(parsed, examples)]
    return parsed, reward_fn(parsed, correct)
