"""Which kernels run: the compiled Cython modules, or the pure-Python references.

The compiled kernels are required (like zstandard requires its C extension);
`D4C_PUREPYTHON=1` selects the references explicitly, for tests and debugging.
Python and Cython sides must agree on API_VERSION, or a stale build would run
with new Python code.
"""

from __future__ import annotations

import os
from types import ModuleType

from .errors import ExtensionMismatch

# what the Python side expects of each kernel module
API_VERSIONS = {"_patch": "4", "_chunker": "1", "_tables": "1"}

backend: str
import_error: str | None = None
patch: ModuleType
chunker: ModuleType
tables: ModuleType


def _load() -> None:
    global backend, import_error, patch, chunker, tables
    if os.environ.get("D4C_PUREPYTHON"):
        from . import _chunker_py, _patch_py, _tables_py
        backend, patch, chunker, tables = "python", _patch_py, _chunker_py, _tables_py
        return
    try:
        from . import _chunker, _patch, _tables  # type: ignore[attr-defined]
    except ImportError as exc:
        from . import _chunker_py, _patch_py, _tables_py
        backend, patch, chunker, tables = "missing", _patch_py, _chunker_py, _tables_py
        import_error = str(exc)
        return
    backend, patch, chunker, tables = "compiled", _patch, _chunker, _tables


def check() -> None:
    """Raise unless usable compiled kernels (or the explicit pure mode) are loaded."""
    if backend == "missing":
        raise ExtensionMismatch(f"cannot import them: {import_error}")
    for name, mod in (("_patch", patch), ("_chunker", chunker), ("_tables", tables)):
        version = getattr(mod, "API_VERSION", None)
        if version != API_VERSIONS[name]:
            raise ExtensionMismatch(f"{mod.__name__} has API {version}, expected {API_VERSIONS[name]}")


def describe() -> str:
    if backend == "compiled":
        return "compiled (Cython)"
    if backend == "python":
        return "pure Python (D4C_PUREPYTHON is set)"
    return f"missing ({import_error}); run `make deps`"


_load()
