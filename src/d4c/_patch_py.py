"""Pure-Python reference of _patch.pyx (same results, much slower)."""

from __future__ import annotations

API_VERSION = "1"


def add_bytes(old, diff, out):  # type: ignore[no-untyped-def]
    n = len(diff)
    if len(old) < n or len(out) < n:
        raise ValueError("buffers shorter than the diff")
    for i in range(n):
        out[i] = (old[i] + diff[i]) & 0xFF
