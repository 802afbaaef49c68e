"""Content-defined chunking: gear table, parameters and the Python API.

The scan loop is `accel.chunker.find_cuts`; this module holds what must never
change silently (the table, the masks) -- a golden test pins the cut points.
"""

from __future__ import annotations

import numpy as np

from .. import accel

_SEED = 0x9E3779B97F4A7C15


def _gear_table() -> np.ndarray:
    """256 pseudo-random 64-bit values from a fixed splitmix64 sequence."""
    out = np.empty(256, dtype=np.uint64)
    state = _SEED
    mask = (1 << 64) - 1
    for i in range(256):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out[i] = z ^ (z >> 31)
    return out


GEAR = _gear_table()


def _masks(avg_size: int) -> tuple[int, int]:
    bits = max(avg_size.bit_length() - 1, 1)
    # FastCDC normalisation level 2: two bits stricter before, two looser after
    small = ((1 << (bits + 2)) - 1) << (64 - bits - 2)
    large = ((1 << max(bits - 2, 1)) - 1) << (64 - max(bits - 2, 1))
    return small, large


def cut_points(data: bytes | bytearray | memoryview, min_size: int = 2048, avg_size: int = 8192,
               max_size: int = 65536, final: bool = True) -> np.ndarray:
    """End offsets of the chunks of `data` (the last one is len(data) if final)."""
    if not 0 < min_size <= avg_size <= max_size:
        raise ValueError("need 0 < min_size <= avg_size <= max_size")
    view = memoryview(data).cast("B")
    small, large = _masks(avg_size)
    out = np.empty(len(view) // min_size + 2, dtype=np.uint64)
    n = accel.chunker.find_cuts(view, GEAR, min_size, avg_size, max_size, small, large, out, final)
    return out[:n]
