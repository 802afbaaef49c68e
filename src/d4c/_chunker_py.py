"""Pure-Python reference of _chunker.pyx (same results, much slower).

Used when D4C_PUREPYTHON=1 and by the parity tests.
"""

from __future__ import annotations

API_VERSION = "1"
_MASK64 = (1 << 64) - 1


def find_cuts(data, gear, min_size, avg_size, max_size, mask_small, mask_large, out, final):  # type: ignore[no-untyped-def]
    data = memoryview(data).cast("B")
    n_all = len(data)
    pos = count = 0
    cap = len(out)
    while pos < n_all and count < cap:
        n = n_all - pos
        cut = n
        if n > min_size:
            n = min(n, max_size)
            cut = n
            h = 0
            i = min_size
            limit = min(avg_size, n)
            while i < n:
                h = ((h << 1) + int(gear[data[pos + i]])) & _MASK64
                if not h & (mask_small if i < limit else mask_large):
                    cut = i + 1
                    break
                i += 1
        if pos + cut == n_all and not final and cut < max_size:
            break
        pos += cut
        out[count] = pos
        count += 1
    return count
