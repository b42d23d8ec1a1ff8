"""A small name -> builder registry. One instance per kind of thing; duplicate names raise."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Maps lowercase snake-case names to objects (builders or classes).

    Args:
        kind: what the registry holds, used in error messages ("backbone", "head", "tuner").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; raises ``ValueError`` on bad or duplicate names."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid {self.kind} name {name!r}: use lowercase letters, digits and underscores")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``KeyError`` naming the known ones for anything else
        (a name read from a user's file may be any JSON value)."""
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# The registries of the models package. Builders register themselves at import time.
BACKBONES: Registry = Registry("backbone")
HEADS: Registry = Registry("head")
