# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""x86 branch conversion: the rel32 of each call (E8) and jmp (E9) whose value fits in
25 signed bits is made absolute (position + 5 + rel), so the many calls of one function
become one repeated byte string that zstd finds (as xz's x86 filter does).  An opcode
byte left unconverted keeps the next three from converting: their rel32 would overlap
the byte the decoder judges it by.  In place, on buf[start:end], positions counted from
`start`; decode is the exact inverse of encode.  docs/FORMAT.md ("x86 programs")
defines it; _x86_py.py is the reference and must give the same bytes."""

from libc.stdint cimport uint8_t, uint32_t

API_VERSION = "1"


cdef void _convert(uint8_t[::1] buf, Py_ssize_t start, Py_ssize_t end, bint forward) noexcept nogil:
    cdef Py_ssize_t i = start, kept = start - 4  # the last opcode left unconverted
    cdef uint32_t value, at
    cdef uint8_t top
    while i + 5 <= end:
        if buf[i] != 0xE8 and buf[i] != 0xE9:
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
        _convert(buf, start, end, True)


def decode(uint8_t[::1] buf, Py_ssize_t start, Py_ssize_t end) -> None:
    """The inverse of encode, in place."""
    _check(buf, start, end)
    with nogil:
        _convert(buf, start, end, False)
