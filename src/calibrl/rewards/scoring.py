"""Completions -> parsed completions -> verifier verdicts -> reward components.

The one path shared by training and evaluation, so the number a model is trained on is the
number it is judged by. The verifier runs under the reward function's
:class:`~calibrl.rewards.guard.VerifierGuard` (answer size cap, time limit per answer, in a
worker process), and the batch's guard counts ride on :attr:`RewardBatch.counters` to the step
metrics (``rewards/verifier_timeouts``, ``rewards/verifier_too_long``, ``rewards/verifier_errors``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from calibrl.data.example import Example
from calibrl.data.format import CompletionFormat
from calibrl.rewards import ParsedCompletion, RewardBatch, RewardFunction, parse_completion

__all__ = ["needs_verifier", "score_completions", "verdict"]


def needs_verifier(parsed: ParsedCompletion, example: Example) -> bool:
    """Whether :func:`verdict` runs the verifier: a well-formed answer that is not an abstention,
    to an answerable question."""
    return parsed.format_ok and not parsed.abstained and not example.unanswerable


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
    if needs_verifier(parsed, example):
        return bool(is_correct(parsed.answer, example))
    return parsed.format_ok and parsed.abstained and example.unanswerable


def score_completions(
    texts: Sequence[str],
    examples: Sequence[Example],
    is_correct: Callable[[str | None, Example], bool],
    reward_fn: RewardFunction,
    fmt: CompletionFormat = CompletionFormat(),
) -> tuple[list[ParsedCompletion], RewardBatch]:
    """Parse and score N completions, ``texts[i]`` answering ``examples[i]``.

    The verdict of each completion is :func:`verdict`: the verifier sees only the parsed answer
    (never the raw text), only when the format is ok, and only through ``reward_fn.guard``: an
    answer over the size cap, one whose verifier runs past the time limit or raises is incorrect
    and counted in the returned batch's ``counters``. Never raises for anything a completion
    holds.

    Raises:
        ValueError: ``texts`` and ``examples`` differ in length.
    """
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} completions for {len(examples)} examples")
    parsed = [parse_completion(t, fmt) for t in texts]
    asked = [i for i, (p, ex) in enumerate(zip(parsed, examples)) if needs_verifier(p, ex)]
    checked = reward_fn.guard.verify(is_correct, [(parsed[i].answer, examples[i]) for i in asked])
    verified = dict(zip(asked, checked.correct))
    correct = [verdict(p, ex, lambda _a, _e, i=i: verified[i]) for i, (p, ex) in enumerate(zip(parsed, examples))]
    return parsed, replace(reward_fn(parsed, correct), counters=checked.counts)
