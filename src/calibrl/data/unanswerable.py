"""Unanswerable items: questions with an operand removed, flagged in the data.

A model that may abstain (``prompt.abstain_phrase``) should abstain on these and only these (see
:func:`calibrl.rewards.scoring.verdict`). ``data.unanswerable.train_fraction`` / ``eval_fraction`` turn
that share of a split's rows into unanswerable ones: one number of the question, chosen at random,
is replaced by ``placeholder`` (default ``x``), e.g. ``"... problem: 4 + 3 - 12 ="`` becomes
``"... problem: 4 + x - 12 ="``, whose value depends on an ``x`` the question never gives. Works
for tasks whose operands are written as numbers (reasoning-gym ``chain_sum``, ``products``,
``basic_arithmetic``, ...). A local table can flag its own rows with an ``unanswerable`` column
instead (:attr:`calibrl.data.example.Example.unanswerable`).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from calibrl.data.example import Example

__all__ = ["make_unanswerable"]

# A whole number or decimal not glued to a letter, digit, '_' or '.' on its left (so "x2" and the
# "5" of "1.5" are not operands of their own).
_OPERAND = re.compile(r"(?<![A-Za-z0-9_.])[0-9]+(?:\.[0-9]+)?")


def make_unanswerable(examples: Sequence[Example], fraction: float, seed: int, placeholder: str = "x") -> list[Example]:
    """Turn ``round(fraction * len(examples))`` rows, chosen with ``seed``, into unanswerable ones.

    With ``fraction > 0`` every row gets ``fields["unanswerable"]`` (True on the changed rows, the
    row's own flag elsewhere), so ``eval.slice_by: [unanswerable]`` works; a changed row keeps its
    id, slice and reference answer (never verified) and records its original question as
    ``meta["answerable_question"]``. With ``fraction == 0`` the rows are returned unchanged.

    Args:
        examples: the rows of one split.
        fraction: share of rows to change, in [0, 1].
        seed: seeds the choice of rows and of the operand removed.
        placeholder: text that replaces the operand.

    Returns:
        A new list of the same length and order.

    Raises:
        ValueError: ``fraction`` outside [0, 1], a blank ``placeholder``, or a chosen question
            with no number to remove (the message names the example).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.unanswerable fraction must be in [0, 1], got {fraction}")
    if not placeholder.strip():
        raise ValueError("data.unanswerable.placeholder must be non-blank")
    if fraction == 0.0:
        return list(examples)
    rng = random.Random(f"unanswerable-{seed}")
    chosen = set(rng.sample(range(len(examples)), round(fraction * len(examples))))
    out = []
    for i, e in enumerate(examples):
        if i not in chosen:
            out.append(dataclasses.replace(e, fields={**e.fields, "unanswerable": e.unanswerable}))
            continue
        operands = list(_OPERAND.finditer(e.question))
        if not operands:
            raise ValueError(
                f"cannot make example {e.id!r} unanswerable: its question has no number to remove: {e.question[:80]!r}"
            )
        m = operands[rng.randrange(len(operands))]
        out.append(
            dataclasses.replace(
                e,
                question=e.question[: m.start()] + placeholder + e.question[m.end() :],
                fields={**e.fields, "unanswerable": True},
                meta={**e.meta, "answerable_question": e.question},
            )
        )
    return out
