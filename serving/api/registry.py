"""Classes chosen by name from a command-line option (``--tool-call-parser``,
``--reasoning-parser``): one registry per option, filled by a class decorator at import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> classes of one kind (``what`` names the kind in errors)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._by_name: dict[str, type[T]] = {}

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make the class available under each of ``names``; a name taken
        twice is a ValueError."""
        def add(cls: type[T]) -> type[T]:
            for name in names:
                if name in self._by_name:
                    raise ValueError(f"{self.what} {name!r} is already registered")
                self._by_name[name] = cls
            return cls
        return add

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; KeyError listing the valid names otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.what}: '{name}' not found; valid names: "
                           f"{', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._by_name)
