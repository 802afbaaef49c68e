# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""x86 branch conversion: the rel32 of each call (E8) and jmp (E9) whose value fits in
25 signed bits is made absolute (position + 5 + rel), so the many calls of one function
become one repeated byte string that zstd finds (as xz's x86 filter does).  An opcode
byte left unconverted keeps the next three from converting: their rel32 would overlap
the byte the decoder judges it by.  In place, on buf[start:end], positions counted from
`start`; decode is the exact inverse of encode.  docs/FORMAT.md ("x86 programs")
defines it; _x86_py.py is the reference and must give the same bytes."""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

API_VERSION = "1"


cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil


cdef inline Py_ssize_t _skip(const uint8_t* p) noexcept nogil:
    """How many of the 8 bytes at p come before the first E8 or E9 (8: none is).  A
    zero-byte test on (bytes ^ E8) & FE: its lowest flag is exact (a borrow only
    flags bytes above a real zero)."""
    cdef uint64_t word
    memcpy(&word, p, 8)
    word = (word ^ 0xE8E8E8E8E8E8E8E8ULL) & 0xFEFEFEFEFEFEFEFEULL
    word = (word - 0x0101010101010101ULL) & ~word & 0x8080808080808080ULL
    return 8 if word == 0 else __builtin_ctzll(word) >> 3


cdef void _convert(uint8_t* buf, Py_ssize_t start, Py_ssize_t end, bint forward) noexcept nogil:
    cdef Py_ssize_t i = start, kept = start - 4  # the last opcode left unconverted
    cdef uint32_t value, at
    cdef uint8_t top
    while i + 5 <= end:
        if i + 8 <= end:
            i += _skip(buf + i)
            if i + 5 > end:
                break
            if buf[i] != 0xE8 and buf[i] != 0xE9:
                continue
        elif buf[i] != 0xE8 and buf[i] != 0xE9:
            i += 1
            continue
        top = buf[i + 4]
        if (top == 0 or top == 0xFF) and i - kept > 3:
            value = buf[i + 1] | (<uint32_t>buf[i + 2] << 8) | (<uint32_t>buf[i + 3] << 16) | (<uint32_t>top << 24)
            at = <uint32_t>(i - start + 5)
            if forward:
                value = (value + at) & 0x1FFFFFF
            else:
                value = (value - at) & 0x1FFFFFF
            if value & 0x1000000:
                value |= ~(<uint32_t>0x1FFFFFF)
            buf[i + 1] = value & 0xFF
            buf[i + 2] = (value >> 8) & 0xFF
            buf[i + 3] = (value >> 16) & 0xFF
            buf[i + 4] = value >> 24
            i += 5
        else:
            kept = i
            i += 1


cdef int _check(uint8_t[::1] buf, Py_ssize_t start, Py_ssize_t end) except -1:
    if not 0 <= start <= end <= buf.shape[0]:
        raise ValueError(f"range {start}..{end} outside a buffer of {buf.shape[0]} bytes")
    return 0


def encode(uint8_t[::1] buf, Py_ssize_t start, Py_ssize_t end) -> None:
    """Branch targets of buf[start:end] made absolute, in place."""
    _check(buf, start, end)
    with nogil:
        _convert(&buf[0] if buf.shape[0] else NULL, start, end, True)


def decode(uint8_t[::1] buf, Py_ssize_t start, Py_ssize_t end) -> None:
    """The inverse of encode, in place."""
    _check(buf, start, end)
    with nogil:
        _convert(&buf[0] if buf.shape[0] else NULL, start, end, False)


def decoded(const uint8_t[::1] data) -> bytes:
    """decode of a copy of `data` (the whole of it), as bytes: one pass of copying
    fused with the conversion, where bytearray + decode + bytes made two copies."""
    cdef Py_ssize_t n = data.shape[0]
    out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    if n:
        with nogil:
            memcpy(p, &data[0], n)
            _convert(p, 0, n, False)
    return out
