"""A named registry of choices: the one list that configs, the CLI and error messages all read.

    INIT_STRATEGIES = Registry("init")

    @INIT_STRATEGIES.register("stepwise")
    def stepwise(...): ...

    INIT_STRATEGIES.register("mine", my_function)   # or as a call
    INIT_STRATEGIES.names()      # ("stepwise", "mine"), in registration order
    INIT_STRATEGIES.get("nope")  # ValueError: unknown init 'nope'; allowed: stepwise, mine

Adding a choice is one `register` call next to its implementation; nothing else lists the names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, in insertion order. `kind` names the choice in error messages ("init", "KD loss")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry=None):
        """Add `entry` under `name`; without `entry`, return a decorator that adds what it decorates."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def add(value: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> T:
        """Remove and return an entry (for tests that register a throwaway one)."""
        self.check(name)
        return self._entries.pop(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def allowed(self) -> str:
        """The names as one comma-separated string, for help texts and error messages."""
        return ", ".join(self._entries)

    def error(self, name: object) -> ValueError:
        return ValueError(f"unknown {self.kind} {name!r}; allowed: {self.allowed()}")

    def check(self, name: object) -> str:
        """Return name if registered, else raise the ValueError that names it and the allowed ones."""
        if name not in self:
            raise self.error(name)
        return name  # type: ignore[return-value]

    def get(self, name: str) -> T:
        return self._entries[self.check(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self.allowed()})"
