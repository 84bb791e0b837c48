"""One registry pattern for everything chosen by name: models, optimizers, dataset kinds, export
formats and curvatures.

A :class:`Registry` maps names to entries (whatever its domain keeps per name: a builder with its
description and defaults, an operator class, ...). ``register(name, entry)`` adds one, or, without
``entry``, decorates the object to add; a second registration of a name is refused. ``list(pattern)``
gives the entries whose names match a glob (``fnmatch``: ``*``, ``?``, ``[...]``), ``get(name)`` one
entry, or a one-line error that lists the known names.
"""

from __future__ import annotations

import builtins
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from landscape.errors import LandscapeError

E = TypeVar("E")


class Registry(Generic[E]):
    """Named entries of one kind, in registration order (or sorted by name with ``sort=True``).

    Args:
        kind: what an entry is, for messages (``"model"``, ``"export format"``).
        canonical: maps a name, a pattern or a query to its canonical spelling (e.g. lower case,
            hyphens dropped); names are stored and matched canonically. Default: unchanged.
        hint: appended to the unknown-name error after the list of names (e.g. another accepted form).
        error: the exception class of an unknown name (default :class:`LandscapeError`).
        sort: list the names sorted instead of in registration order.
    """

    def __init__(self, kind: str, *, canonical: Callable[[str], str] = str, hint: str = "",
                 error: type[Exception] = LandscapeError, sort: bool = False) -> None:
        self.kind, self.canonical, self.hint, self.error, self.sort = kind, canonical, hint, error, sort
        self._entries: dict[str, E] = {}

    def register(self, name: str, entry: E | None = None):
        """Add ``entry`` as ``name`` and return it; without ``entry``, a decorator that adds what it
        decorates. A name registered before (canonically) raises ValueError."""
        if entry is None:
            return lambda decorated: self.register(name, decorated)
        key = self.canonical(name)
        if key in self._entries:
            raise ValueError(f"{self.kind} '{key}' is registered already; register it under another name")
        self._entries[key] = entry
        return entry

    def names(self) -> builtins.list[str]:
        """The registered names."""
        return sorted(self._entries) if self.sort else builtins.list(self._entries)

    def list(self, pattern: str | None = None) -> builtins.list[E]:
        """The entries whose names match the glob ``pattern`` (all if None)."""
        pattern = None if pattern is None else self.canonical(pattern)
        return [self._entries[name] for name in self.names()
                if pattern is None or fnmatch.fnmatchcase(name, pattern)]

    def get(self, name: str) -> E:
        """The entry registered as ``name``; an unknown name raises ``error`` naming every known one."""
        key = self.canonical(name)
        if key not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; use one of {', '.join(self.names())}{self.hint}")
        return self._entries[key]

    def items(self) -> builtins.list[tuple[str, E]]:
        """``(name, entry)`` pairs in listing order."""
        return [(name, self._entries[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
