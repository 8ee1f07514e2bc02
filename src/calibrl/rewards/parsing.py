"""Parse a model completion into (answer, stated confidence, format verdict).

Default completion format (RLCR, arXiv:2507.16806)::

    <think> reasoning </think> <answer> final answer </answer>
    [<analysis> optional reflection </analysis>] <confidence> q </confidence>

Policy, in the order it is checked (the first failure is the reported ``error``):

1. Only the completion is parsed, never the prompt.
2. ``<think>`` and ``<analysis>`` blocks are *scratch space*: their contents are removed before
   the answer and confidence are looked for, so tags written inside them are ignored. A block
   runs from an opening tag to the first closing tag of the same name after it. An opened but
   unclosed scratch block is a format failure.
3. Exactly one top-level ``<answer>…</answer>`` and exactly one ``<confidence>…</confidence>``
   are required; missing, unclosed or duplicated tags are format failures. The answer must close
   before the confidence opens.
4. The answer, stripped of surrounding whitespace, must hold a visible character: an answer of
   only whitespace, control characters (NUL) and invisible format characters (zero-width space,
   BOM, word joiner) is an empty answer.
5. The confidence is a decimal in [0, 1] (``"0.85"``, ``" .85 "``, ``"0.85."`` with one trailing
   period, ``"1e-3"``) or a percentage written with ``%`` (``"85%"`` -> 0.85). Words, fractions
   (``"3/4"``), bare numbers above 1 without ``%``, non-finite values, values outside [0, 1] and
   anything over :data:`MAX_CONFIDENCE_CHARS` characters after trimming are format failures.
   Only ASCII digits are read (``float`` would accept other scripts' digits; we do not).

A format failure returns ``confidence=None`` even when an answer was found, so nothing downstream
can score an unparseable confidence; every format failure gets the same, lowest reward
(:mod:`calibrl.rewards.components`).

Reward-hacking probes (``tests/rewards/test_reward_probes.py`` pins each outcome and its reward; under
``reward=rlcr`` a format failure totals ``0 - 1 + 0 = -1``, the least any completion can get):

=============================================  ==============================================
completion                                     outcome
=============================================  ==============================================
the answer repeated in several top-level tags  format failure ("2 top-level <answer> tags"),
                                               even when every copy is the right answer
a second answer or confidence inside <think>   ignored: only the top-level tags count
confidence only inside <think> / <analysis>    format failure ("missing <confidence>")
confidence as a fraction ("3/4") or a word     format failure ("confidence is not a number")
("high", "certain")
empty or invisible answer with confidence 0    format failure ("empty answer"), not the
                                               ``+0.5`` a wrong answer stated at 0 earns
the format's tags echoed from the prompt       a second top-level tag: format failure
=============================================  ==============================================

Cost: :func:`parse_completion` is linear in the text length (one scan for tags, then lookups),
whatever the text holds: thousands of unclosed tags or a megabyte of spaces take milliseconds
(regular expressions with lazy ``.*?`` blocks or adjacent ``\\s*`` would be quadratic or cubic
there, and the policy would find it).

Abstention (off unless :attr:`CompletionFormat.abstain` is set, ``prompt.abstain_phrase``): a
well-formed completion whose answer equals the abstain phrase after trimming, case-folding,
collapsing whitespace and dropping one trailing period (``"I don't know."`` matches
``"i don't  know"``) is an *abstention* (``abstained=True``). It still needs a confidence: the
stated confidence is the probability that the *response* is correct, see
:func:`calibrl.rewards.scoring.verdict` for when an abstention is correct. A format failure never abstains.
"""

from __future__ import annotations

import bisect
import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from calibrl.data.format import CompletionFormat, normalize_answer

__all__ = [
    "MAX_CONFIDENCE_CHARS",
    "ParsedCompletion",
    "parse_completion",
    "parse_confidence",
]

MAX_CONFIDENCE_CHARS = 64
"""Longest confidence text, after trimming, that is read as a number (``"0.85"`` is 4); longer is
a format failure. It bounds the work of reading a confidence however the policy pads it."""

# On trimmed text: a decimal with optional exponent, then optional '%', then at most one
# trailing period. (No leading/trailing \s*: adjacent \s* runs backtrack cubically on padding.)
_NUMBER = re.compile(
    r"""(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    \s*(?P<pct>%)?\s*\.?""",
    re.VERBOSE,
)

# Unicode categories that print nothing: controls (NUL), format characters (zero-width space,
# BOM), separators. An answer made only of these is empty.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


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


def parse_confidence(text: str) -> tuple[float | None, str | None]:
    """Read a stated confidence.

    Args:
        text: the contents of the confidence tag.

    Returns:
        ``(q, None)`` with q in [0, 1], or ``(None, reason)`` when ``text`` is not a valid
        confidence under the module's policy.
    """
    stripped = text.strip()
    if not stripped:
        return None, "empty confidence"
    m = _NUMBER.fullmatch(stripped) if len(stripped) <= MAX_CONFIDENCE_CHARS else None
    if m is None:
        return None, f"confidence is not a number: {stripped[:40]!r}"
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
def _tag_pattern(fmt: CompletionFormat) -> re.Pattern[str]:
    """Every opening or closing tag of the format; tags hold no ``<``, so they never overlap and
    one ``finditer`` finds them all."""
    names = sorted({fmt.think, fmt.analysis, fmt.answer, fmt.confidence}, key=len, reverse=True)
    return re.compile(rf"<(/?)({'|'.join(map(re.escape, names))})>")


def _has_visible_char(text: str) -> bool:
    return any(unicodedata.category(ch) not in _INVISIBLE for ch in text)


_Span = tuple[int, int]
"""``(start, end)`` character offsets in the completion."""
_TagSpans = dict[str, list[_Span]]
"""Tag name -> the spans of its opening (or closing) tags, in order."""


def _scan_tags(text: str, fmt: CompletionFormat) -> tuple[_TagSpans, _TagSpans]:
    """Every tag of the format in one pass: ``(opens, closes)``."""
    opens: _TagSpans = {}
    closes: _TagSpans = {}
    for m in _tag_pattern(fmt).finditer(text):
        (closes if m.group(1) else opens).setdefault(m.group(2), []).append(m.span())
    return opens, closes


@dataclass(frozen=True)
class _Scratch:
    """The scratch blocks of a completion: disjoint ``(start, end)`` spans in order, and their
    starts (for bisection)."""

    blocks: list[_Span]
    starts: list[int]

    def visible(self, spans: list[_Span]) -> list[_Span]:
        """The tag spans that lie outside every scratch block."""
        out = []
        for s, e in spans:
            i = bisect.bisect_right(self.starts, s) - 1
            if i < 0 or self.blocks[i][1] <= s:
                out.append((s, e))
        return out

    def blank(self, text: str, start: int, end: int) -> str:
        """``text[start:end]`` with the scratch blocks in it turned to spaces."""
        # The tags around [start, end) are visible, so every block meeting it lies inside it.
        parts, pos = [], start
        for s, e in self.blocks[bisect.bisect_left(self.starts, start) :]:
            if s >= end:
                break
            parts += [text[pos:s], " " * (e - s)]
            pos = e
        parts.append(text[pos:end])
        return "".join(parts)


def _scratch_blocks(opens: _TagSpans, closes: _TagSpans, fmt: CompletionFormat) -> tuple[_Scratch, str | None]:
    """The scratch blocks, and the first scratch tag (``think`` before ``analysis``) left
    unclosed, or ``None``.

    Left to right: an opening scratch tag outside earlier blocks starts a block that ends at the
    first closing tag of its name after it; with none it stays visible (unclosed).
    """
    scratch = (fmt.think, fmt.analysis)
    close_starts = {tag: [s for s, _ in closes.get(tag, [])] for tag in scratch}
    candidates = sorted((span, tag) for tag in set(scratch) for span in opens.get(tag, []))
    blocks: list[_Span] = []
    unclosed: set[str] = set()
    for (start, end), tag in candidates:
        if blocks and start < blocks[-1][1]:
            continue  # inside an earlier block
        i = bisect.bisect_left(close_starts[tag], end)
        if i == len(close_starts[tag]):
            unclosed.add(tag)
        else:
            blocks.append((start, closes[tag][i][1]))
    first_unclosed = next((tag for tag in scratch if tag in unclosed), None)
    return _Scratch(blocks, [s for s, _ in blocks]), first_unclosed


def _body(opens: list[_Span], closes: list[_Span]) -> _Span | None:
    """The contents span of a tag's block when the tag opens exactly once (``opens``, top level)
    and a closing tag (``closes``, top level) follows it, else ``None``."""
    if len(opens) != 1:
        return None
    i = bisect.bisect_left([s for s, _ in closes], opens[0][1])
    return (opens[0][1], closes[i][0]) if i < len(closes) else None


def _tag_count_error(tags: dict[str, tuple[list[_Span], list[_Span]]]) -> str | None:
    """Why the top-level tags (name -> (opening spans, closing spans)) are not exactly one
    opening and one closing tag each, checked in order; ``None`` when they are."""
    for tag, (o, c) in tags.items():
        if not o and not c:
            return f"missing <{tag}>"
        if len(o) != len(c):
            return f"unclosed or unmatched <{tag}>"
        if len(o) > 1:
            return f"{len(o)} top-level <{tag}> tags (exactly one required)"
    return None


def parse_completion(text: str, fmt: CompletionFormat = CompletionFormat()) -> ParsedCompletion:
    """Parse one completion (never the prompt) under the policy in the module docstring.

    Args:
        text: the generated completion, decoded without special tokens.
        fmt: tag names; the default is ``<think>/<answer>/<analysis>/<confidence>``.

    Returns:
        A :class:`ParsedCompletion`. Never raises on any string input; linear time in its length.

    Raises:
        TypeError: ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_completion expects a str, got {type(text).__name__}")
    opens, closes = _scan_tags(text, fmt)
    scratch, unclosed = _scratch_blocks(opens, closes, fmt)
    if unclosed is not None:
        return ParsedCompletion(None, None, False, f"unclosed <{unclosed}>")
    tags = {
        tag: (scratch.visible(opens.get(tag, [])), scratch.visible(closes.get(tag, [])))
        for tag in (fmt.answer, fmt.confidence)
    }
    answer_span = _body(*tags[fmt.answer])
    # Read from the blanked text: a scratch block nested inside the answer is not answer text.
    answer = scratch.blank(text, *answer_span).strip() if answer_span is not None else None

    def fail(reason: str) -> ParsedCompletion:
        return ParsedCompletion(answer, None, False, reason, answer_span, None)

    reason = _tag_count_error(tags)
    if reason is not None:
        return fail(reason)
    conf_span = _body(*tags[fmt.confidence])
    if answer_span is None or conf_span is None:
        return fail("answer and confidence tags are not well nested")
    if not answer or not _has_visible_char(answer):
        return fail("empty answer")
    if answer_span[1] + len(f"</{fmt.answer}>") > conf_span[0] - len(f"<{fmt.confidence}>"):
        return fail("confidence must come after the answer")
    q, reason = parse_confidence(text[conf_span[0] : conf_span[1]])
    if q is None:
        return fail(reason or "invalid confidence")
    abstained = fmt.abstain is not None and normalize_answer(answer) == normalize_answer(fmt.abstain)
    return ParsedCompletion(answer, q, True, None, answer_span, conf_span, abstained)
