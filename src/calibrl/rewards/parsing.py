"""Parse a model completion into (answer, stated confidence, format verdict).

Default completion format (RLCR, arXiv:2507.16806)::

    <think> reasoning </think> <answer> final answer </answer>
    [<analysis> optional reflection </analysis>] <confidence> q </confidence>

Policy, in the order it is checked (the first failure is the reported ``error``):

1. Only the completion is parsed, never the prompt.
2. ``<think>`` and ``<analysis>`` blocks are *scratch space*: their contents are removed before
   the answer and confidence are looked for, so tags written inside them are ignored. An opened
   but unclosed scratch block is a format failure.
3. Exactly one top-level ``<answer>…</answer>`` and exactly one ``<confidence>…</confidence>``
   are required; missing, unclosed or duplicated tags are format failures. The answer must close
   before the confidence opens.
4. The answer, stripped of surrounding whitespace, must be non-empty.
5. The confidence is a decimal in [0, 1] (``"0.85"``, ``" .85 "``, ``"0.85."`` with one trailing
   period, ``"1e-3"``) or a percentage written with ``%`` (``"85%"`` -> 0.85). Words, bare
   numbers above 1 without ``%``, non-finite values and values outside [0, 1] are format failures.
   Only ASCII digits are read (``float`` would accept other scripts' digits; we do not).

A format failure returns ``confidence=None`` even when an answer was found, so nothing downstream
can score an unparseable confidence.

Abstention (off unless :attr:`CompletionFormat.abstain` is set, ``prompt.abstain_phrase``): a
well-formed completion whose answer equals the abstain phrase after trimming, case-folding,
collapsing whitespace and dropping one trailing period (``"I don't know."`` matches
``"i don't  know"``) is an *abstention* (``abstained=True``). It still needs a confidence: the
stated confidence is the probability that the *response* is correct, see
:func:`calibrl.scoring.verdict` for when an abstention is correct. A format failure never abstains.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["CompletionFormat", "ParsedCompletion", "normalize_answer", "parse_completion", "parse_confidence"]

# A decimal with optional exponent, then optional '%', then at most one trailing period.
_NUMBER = re.compile(
    r"""^\s*
    (?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    \s*(?P<pct>%)?\s*\.?\s*$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class CompletionFormat:
    """Tag names of the completion format. Every tag is written ``<name>…</name>``.

    Attributes:
        think: scratch tag before the answer (contents ignored by the parser).
        answer: tag that holds the final answer.
        analysis: optional scratch tag between answer and confidence (contents ignored).
        confidence: tag that holds the stated probability of being correct.
        abstain: the answer that means "I abstain" (``None``: abstention is off, no answer is
            an abstention).

    Raises:
        ValueError: ``abstain`` is set but blank.
    """

    think: str = "think"
    answer: str = "answer"
    analysis: str = "analysis"
    confidence: str = "confidence"
    abstain: str | None = None

    def __post_init__(self) -> None:
        if self.abstain is not None and not normalize_answer(self.abstain):
            raise ValueError(f"the abstain phrase must be non-blank, got {self.abstain!r}")


@dataclass(frozen=True)
class ParsedCompletion:
    """Result of :func:`parse_completion`.

    Attributes:
        answer: the top-level answer, stripped; ``None`` when absent or ambiguous.
        confidence: stated confidence in [0, 1]; ``None`` unless ``format_ok``.
        format_ok: the completion follows the format (see module docstring).
        error: reason for the format failure, ``None`` when ``format_ok``.
        answer_span: ``(start, end)`` character offsets of the answer text in the completion.
        confidence_span: ``(start, end)`` character offsets of the confidence text.
        abstained: the answer is the abstain phrase (only on well-formed completions).
    """

    answer: str | None
    confidence: float | None
    format_ok: bool
    error: str | None = None
    answer_span: tuple[int, int] | None = None
    confidence_span: tuple[int, int] | None = None
    abstained: bool = False


def normalize_answer(text: str) -> str:
    """``text`` trimmed, case-folded, whitespace collapsed, one trailing period dropped: the form
    in which an answer is compared with the abstain phrase."""
    return re.sub(r"\s+", " ", text.strip().removesuffix(".").strip()).casefold()


def parse_confidence(text: str) -> tuple[float | None, str | None]:
    """Read a stated confidence.

    Args:
        text: the contents of the confidence tag.

    Returns:
        ``(q, None)`` with q in [0, 1], or ``(None, reason)`` when ``text`` is not a valid
        confidence under the module's policy.
    """
    if not text.strip():
        return None, "empty confidence"
    m = _NUMBER.match(text)
    if m is None:
        return None, f"confidence is not a number: {text.strip()[:40]!r}"
    value = float(m.group("num"))
    if not math.isfinite(value):
        return None, "confidence is not finite"
    if m.group("pct"):
        value /= 100.0
    elif value > 1.0:
        return None, f"confidence {value:.10g} is above 1 (percentages need '%')"
    if not 0.0 <= value <= 1.0:
        return None, f"confidence {value:.10g} is outside [0, 1]"
    return value, None


@lru_cache(maxsize=8)
def _patterns(fmt: CompletionFormat) -> dict[str, re.Pattern[str]]:
    def block(tag: str) -> re.Pattern[str]:
        return re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)

    return {
        "scratch": re.compile(
            rf"<(?P<tag>{re.escape(fmt.think)}|{re.escape(fmt.analysis)})>.*?</(?P=tag)>", re.DOTALL
        ),
        "answer": block(fmt.answer),
        "confidence": block(fmt.confidence),
    }


def parse_completion(text: str, fmt: CompletionFormat = CompletionFormat()) -> ParsedCompletion:
    """Parse one completion (never the prompt) under the policy in the module docstring.

    Args:
        text: the generated completion, decoded without special tokens.
        fmt: tag names; the default is ``<think>/<answer>/<analysis>/<confidence>``.

    Returns:
        A :class:`ParsedCompletion`. Never raises on any string input.

    Raises:
        TypeError: ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_completion expects a str, got {type(text).__name__}")
    pats = _patterns(fmt)

    # Scratch blocks become spaces of the same length, so offsets into `text` stay valid; one
    # pass, linear in the text length however many blocks it holds.
    visible = pats["scratch"].sub(lambda m: " " * (m.end() - m.start()), text)
    for tag in (fmt.think, fmt.analysis):
        if f"<{tag}>" in visible:
            return ParsedCompletion(None, None, False, f"unclosed <{tag}>")

    answers = list(pats["answer"].finditer(visible))
    answer, answer_span = None, None
    if len(answers) == 1 and visible.count(f"<{fmt.answer}>") == 1:
        answer_span = answers[0].span(1)
        # Read from the blanked text: a scratch block nested inside the answer is not answer text.
        answer = visible[answer_span[0] : answer_span[1]].strip()

    def fail(reason: str) -> ParsedCompletion:
        return ParsedCompletion(answer, None, False, reason, answer_span, None)

    for tag in (fmt.answer, fmt.confidence):
        opens = visible.count(f"<{tag}>")
        closes = visible.count(f"</{tag}>")
        if opens == 0 and closes == 0:
            return fail(f"missing <{tag}>")
        if opens != closes:
            return fail(f"unclosed or unmatched <{tag}>")
        if opens > 1:
            return fail(f"{opens} top-level <{tag}> tags (exactly one required)")
    confs = list(pats["confidence"].finditer(visible))
    if len(answers) != 1 or len(confs) != 1:
        return fail("answer and confidence tags are not well nested")
    if not answer:
        return fail("empty answer")
    if answers[0].end() > confs[0].start():
        return fail("confidence must come after the answer")
    conf_span = confs[0].span(1)
    q, reason = parse_confidence(text[conf_span[0] : conf_span[1]])
    if q is None:
        return fail(reason or "invalid confidence")
    abstained = fmt.abstain is not None and normalize_answer(answer) == normalize_answer(fmt.abstain)
    return ParsedCompletion(answer, q, True, None, answer_span, conf_span, abstained)
