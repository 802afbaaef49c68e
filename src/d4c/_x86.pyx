# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""x86 branch conversion: the rel32 of each call (E8) and jmp (E9) whose value fits in
25 signed bits is made absolute (position + 5 + rel), so the many calls of one function
become one repeated byte string that zstd finds (as xz's x86 filter does).  An opcode
byte left unconverted keeps the next three from converting: their rel32 would overlap
the byte the decoder judges it by.  In place, on buf[start:end], positions counted from
`start`; decode is the exact inverse of encode.  docs/FORMAT.md ("x86 programs")
defines it; _x86_py.py is the reference and must give the same bytes."""

from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

API_VERSION = "1"


cdef extern from *:
    """
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* Bit j set: p[j] is E8 or E9, for the 16 bytes at p. */
    static inline unsigned d4c_branch_mask16(const uint8_t* p) {
    #if defined(__SSE2__)
        __m128i bytes = _mm_and_si128(_mm_loadu_si128((const __m128i*)p), _mm_set1_epi8((char)0xFE));
        return (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_set1_epi8((char)0xE8)));
    #else
        unsigned mask = 0;
        for (int j = 0; j < 16; j++) mask |= (unsigned)((p[j] & 0xFE) == 0xE8) << j;
        return mask;
    #endif
    }
    /* The rel32 at p, and its store: little-endian whatever the host. */
    static inline uint32_t d4c_load_le32(const uint8_t* p) {
        uint32_t v;
        memcpy(&v, p, 4);
    #if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }
    static inline void d4c_store_le32(uint8_t* p, uint32_t v) {
    #if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        memcpy(p, &v, 4);
    }
    """
    unsigned d4c_branch_mask16(const uint8_t* p) noexcept nogil
    uint32_t d4c_load_le32(const uint8_t* p) noexcept nogil
    void d4c_store_le32(uint8_t* p, uint32_t v) noexcept nogil
    int __builtin_ctzll(unsigned long long) nogil


cdef enum:
    BLOCK = 64  # bytes whose opcodes one mask holds


cdef inline bint _convert_at(uint8_t* buf, Py_ssize_t i, Py_ssize_t start, Py_ssize_t kept,
                             bint forward) noexcept nogil:
    """Convert the branch whose opcode is buf[i], if its rel32 fits and no opcode left
    unconverted overlaps it; whether it did.  Without branches on the data (a quarter
    of the tests would be mispredicted): the rel32 is always written back."""
    cdef uint32_t at = <uint32_t>(i - start + 5)
    cdef uint8_t top = buf[i + 4]
    cdef bint fits = (<uint8_t>(top + 1) <= 1) & (i - kept > 3)  # top byte 00 or FF
    cdef uint32_t value = d4c_load_le32(buf + i + 1)
    cdef uint32_t converted = ((value + at) if forward else (value - at)) & 0x1FFFFFF
    converted = (converted ^ 0x1000000) - 0x1000000  # sign-extended from bit 24
    d4c_store_le32(buf + i + 1, converted if fits else value)
    return fits


cdef void _convert(uint8_t* buf, Py_ssize_t start, Py_ssize_t end, bint forward) noexcept nogil:
    """Opcodes are found BLOCK bytes at a time (a mask of the E8/E9 bytes, taken before
    any branch in the block is converted: a conversion only rewrites the four bytes
    after its opcode, which are skipped), then byte by byte in the last BLOCK + 4."""
    cdef Py_ssize_t i = start, kept = start - 4  # the next byte that may be an opcode; the last left unconverted
    cdef Py_ssize_t base = start, p
    cdef int bit
    cdef unsigned long long mask
    cdef bint converted
    while base + BLOCK + 4 <= end:  # every opcode in the block has its rel32 inside
        mask = (<unsigned long long>d4c_branch_mask16(buf + base)
                | <unsigned long long>d4c_branch_mask16(buf + base + 16) << 16
                | <unsigned long long>d4c_branch_mask16(buf + base + 32) << 32
                | <unsigned long long>d4c_branch_mask16(buf + base + 48) << 48)
        mask &= ~0ULL << (i - base if i > base else 0)  # i - base <= 4 here
        while mask:
            bit = __builtin_ctzll(mask)
            p = base + bit
            converted = _convert_at(buf, p, start, kept, forward)
            i = p + 5 if converted else p + 1
            kept = kept if converted else p
            mask &= mask - 1
            if mask & (<unsigned long long>0x1E << bit):  # rare: an opcode among its rel32's bytes
                if converted:
                    mask &= ~(<unsigned long long>0x1E << bit)
        base += BLOCK
    if i < base:
        i = base
    while i + 5 <= end:
        if buf[i] != 0xE8 and buf[i] != 0xE9:
            i += 1
        elif _convert_at(buf, i, start, kept, forward):
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
