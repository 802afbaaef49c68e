# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Patch kernels: the byte loops of delta application.

Thin on purpose (see bsdiff4's core.c): d4c/delta.py owns the format; this
module only runs loops over buffers the caller has sized and checked.
"""

from libc.stdint cimport uint8_t

API_VERSION = "1"


def add_bytes(const uint8_t[::1] old, const uint8_t[::1] diff, uint8_t[::1] out):
    """out[i] = old[i] + diff[i] (mod 256): the 'add' step of bsdiff-style patches."""
    cdef Py_ssize_t n = diff.shape[0]
    cdef Py_ssize_t i
    if old.shape[0] < n or out.shape[0] < n:
        raise ValueError("buffers shorter than the diff")
    if n == 0:
        return
    cdef const uint8_t* a = &old[0]
    cdef const uint8_t* d = &diff[0]
    cdef uint8_t* o = &out[0]
    with nogil:
        for i in range(n):
            o[i] = <uint8_t>(a[i] + d[i])
