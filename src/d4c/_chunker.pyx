# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Content-defined chunking (gear hash, FastCDC-style normalised cut masks).

Only the scan loop lives here; d4c/chunker.py owns the table, the parameters
and the Python API.  The loop runs without the GIL so threads chunk in parallel.
"""

from libc.stdint cimport uint8_t, uint64_t

API_VERSION = "1"


cdef Py_ssize_t _next_cut(const uint8_t* p, Py_ssize_t n, const uint64_t* gear,
                          Py_ssize_t min_size, Py_ssize_t avg_size, Py_ssize_t max_size,
                          uint64_t mask_small, uint64_t mask_large) noexcept nogil:
    cdef uint64_t h = 0
    cdef Py_ssize_t i
    cdef Py_ssize_t limit
    if n <= min_size:
        return n
    if n > max_size:
        n = max_size
    limit = avg_size if avg_size < n else n
    i = min_size
    # before the average size: a stricter mask makes early cuts rarer
    while i < limit:
        h = (h << 1) + gear[p[i]]
        if not (h & mask_small):
            return i + 1
        i += 1
    while i < n:
        h = (h << 1) + gear[p[i]]
        if not (h & mask_large):
            return i + 1
        i += 1
    return n


def find_cuts(const uint8_t[::1] data, const uint64_t[::1] gear, Py_ssize_t min_size,
              Py_ssize_t avg_size, Py_ssize_t max_size, uint64_t mask_small,
              uint64_t mask_large, uint64_t[::1] out, bint final):
    """Write chunk end offsets of `data` into `out`; return how many.

    With `final` false the last, possibly incomplete chunk is not reported:
    the caller feeds it again with more data.
    """
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t pos = 0, cut, count = 0
    cdef Py_ssize_t cap = out.shape[0]
    if gear.shape[0] != 256:
        raise ValueError("gear table must have 256 entries")
    if n == 0:
        return 0
    cdef const uint8_t* p = &data[0]
    cdef const uint64_t* g = &gear[0]
    with nogil:
        while pos < n and count < cap:
            cut = _next_cut(p + pos, n - pos, g, min_size, avg_size, max_size,
                            mask_small, mask_large)
            if pos + cut == n and not final and cut < max_size:
                break
            pos += cut
            out[count] = pos
            count += 1
    return count
