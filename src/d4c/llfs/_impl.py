"""The only module that imports llfuse: the rest of d4c works (and explains
itself) where the binding or FUSE is missing."""

from __future__ import annotations

try:
    import llfuse
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the machine
    llfuse = None  # type: ignore[assignment]
    IMPORT_ERROR = str(exc)

__all__ = ["llfuse", "IMPORT_ERROR"]
