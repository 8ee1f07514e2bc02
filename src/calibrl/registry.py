"""A tiny name -> object registry for the pluggable parts (reward components, objective
combiners, loss aggregations, data sources, SFT confidence policies).

An unknown name raises ``KeyError`` listing every registered name, so a typo in a config fails at
start-up with the valid choices in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named collection of objects of one kind.

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"reward component"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``.

        Raises:
            ValueError: ``name`` is already registered.
        """

        def wrap(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return wrap

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            KeyError: unknown name; the message lists the known names.
        """
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
