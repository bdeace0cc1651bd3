"""A name -> entry registry, shared by tasks and methods.

Each task or method module registers itself by name when its package imports it; a duplicate name is a
programming error, an unknown name is a user error listing the valid names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from ftctl.errors import FtctlError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise FtctlError(
                f"unknown {self.kind} '{name}'{suggest(name, self._entries)}; "
                f"valid {self.kind}s: {', '.join(self._entries)}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())
