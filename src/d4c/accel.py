"""Which kernels run: the compiled Cython modules, or the pure-Python references.

The compiled kernels are required (like zstandard requires its C extension).
`D4C_PUREPYTHON=1` selects the references, for tests and debugging from the
source tree only: they are orders of magnitude slower and unbounded in memory
(a 70 MiB diff needed 23 GB), so the frozen programs ignore it and do not ship
them.  Each kernel loads at its first use (`accel.patch`, `accel.chunker`,
`accel.tables`, `accel.deflate`, `accel.x86`): a FUSE mount server needs only the table
scanner (and the x86 filter for programs) until it rebuilds a file.  Python and Cython sides must agree on API_VERSION, or a stale
build would run with new Python code.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from .errors import ExtensionMismatch

# what the Python side expects of each kernel module
API_VERSIONS = {"_patch": "5", "_chunker": "1", "_tables": "1", "_deflate": "3", "_x86": "1"}
_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def pure_python() -> bool:
    """The references were asked for (never in a frozen program)."""
    return bool(os.environ.get("D4C_PUREPYTHON")) and not getattr(sys, "frozen", False)


def kernel(name: str) -> ModuleType:
    """The kernel module `name` (`_patch`, `_chunker`, `_tables`, `_deflate`, `_x86`), loaded once."""
    mod = _loaded.get(name)
    if mod is None:
        if pure_python():
            mod = importlib.import_module(f"{__package__}.{name}_py")
        else:
            try:
                mod = importlib.import_module(f"{__package__}.{name}")
            except ImportError as exc:
                _errors[name] = str(exc)
                raise ExtensionMismatch(f"cannot import {name}: {exc}; run `make deps`") from None
            version = getattr(mod, "API_VERSION", None)
            if version != API_VERSIONS[name]:
                raise ExtensionMismatch(f"{mod.__name__} has API {version}, expected {API_VERSIONS[name]}")
        _loaded[name] = mod
    return mod


def __getattr__(attr: str) -> Any:
    if attr in ("patch", "chunker", "tables", "deflate", "x86"):
        return kernel("_" + attr)
    if attr == "backend":
        return _backend()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _backend() -> str:
    if pure_python():
        return "python"
    try:
        check()
    except ExtensionMismatch:
        return "missing"
    return "compiled"


def check() -> None:
    """Raise unless every kernel loads (compiled, or the references when asked for)."""
    for name in API_VERSIONS:
        kernel(name)


def describe() -> str:
    backend = _backend()
    if backend == "compiled":
        return "compiled (Cython)"
    if backend == "python":
        return "pure Python (D4C_PUREPYTHON is set)"
    return f"missing ({'; '.join(_errors.values())}); run `make deps`"
