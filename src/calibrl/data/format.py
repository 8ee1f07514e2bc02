"""The completion format a prompt teaches and the parser reads: tag names and the abstain phrase.

It lives with the data (prompts are built from it); :mod:`calibrl.rewards.parsing` parses
completions written in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["CompletionFormat", "completion_format", "normalize_answer"]


def normalize_answer(text: str) -> str:
    """``text`` trimmed, case-folded, whitespace collapsed, one trailing period dropped: the form
    in which an answer is compared with the abstain phrase."""
    return re.sub(r"\s+", " ", text.strip().removesuffix(".").strip()).casefold()


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


def completion_format(cfg: Any) -> CompletionFormat:
    """The completion format a run parses: ``prompt.tags`` and ``prompt.abstain_phrase``.

    Raises:
        ValueError: a blank abstain phrase.
    """
    return CompletionFormat(**cfg.prompt.tags, abstain=cfg.prompt.abstain_phrase)
