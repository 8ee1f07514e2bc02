"""One prompt with its reference answer: the row type every data source yields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer.

    Attributes:
        id: unique id within its split.
        question: the task text shown to the model.
        answer: the reference answer (a string).
        slice: group label used for per-slice metrics (e.g. difficulty); ``"all"`` when unset.
        fields: scalar attributes an evaluation can slice by (reasoning-gym: the task name as
            ``task`` and the scalar metadata, e.g. ``num_terms``; hf: the row's scalar columns
            other than question and answer).
        meta: source-specific data the verifier needs (e.g. the reasoning-gym entry).

    An example is *unanswerable* when ``fields["unanswerable"]`` is true (a column of that name
    in a local table, or :func:`calibrl.data.unanswerable.make_unanswerable`); its ``answer`` is
    then never verified (see :func:`calibrl.rewards.scoring.verdict`).
    """

    id: str
    question: str
    answer: str
    slice: str = "all"
    fields: Mapping[str, str | int | float | bool] = field(default_factory=dict, compare=False, hash=False)
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def unanswerable(self) -> bool:
        """``fields["unanswerable"]`` (absent: False).

        Raises:
            ValueError: the field holds something other than a bool or the integers 0/1.
        """
        flag = self.fields.get("unanswerable", False)
        if isinstance(flag, bool):
            return flag
        if isinstance(flag, int) and flag in (0, 1):
            return bool(flag)
        raise ValueError(f"example {self.id!r}: field 'unanswerable' must be true/false or 0/1, got {flag!r}")

    def field_value(self, name: str) -> str:
        """The value of ``name`` as a slice label: ``"slice"`` is :attr:`slice`, ``"unanswerable"``
        is :attr:`unanswerable` (``"True"``/``"False"``, so every set can be sliced by it), any
        other name is looked up in :attr:`fields`.

        Raises:
            KeyError: ``name`` is not a field of this example (the message lists the fields).
        """
        if name == "slice":
            return self.slice
        if name == "unanswerable":
            return str(self.unanswerable)
        if name not in self.fields:
            raise KeyError(f"example {self.id!r} has no field {name!r}; available: slice, {', '.join(sorted(self.fields))}")
        return str(self.fields[name])
