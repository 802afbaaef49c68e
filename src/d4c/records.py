"""Mutable records with dataclass-style equality and repr, without dataclasses.

`dataclasses` imports `inspect` (with `ast` and `dis`): ~1.2 MiB of every FUSE
mount server, which has to stay small (one process per mounted image).  The
modules a mount server loads therefore define their records as a `Record` (a
`__slots__` class whose `__init__` is written out, so its signature documents
the fields) or as a `typing.NamedTuple` when they are immutable."""

from __future__ import annotations

from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """Subclasses list their fields in `__slots__`, in order, and write `__init__`."""

    __slots__: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]  # mutable: like a dataclass with eq=True

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def replace(self: R, **changes: Any) -> R:
        """A copy with `changes` applied (dataclasses.replace)."""
        unknown = set(changes) - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]}")
        new = object.__new__(type(self))
        for name in self.__slots__:
            setattr(new, name, changes[name] if name in changes else getattr(self, name))
        return new
