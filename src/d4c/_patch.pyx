# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Delta kernels: suffix sorting (SA-IS), the bsdiff-class match scan, patch application.

Thin on purpose (see bsdiff4's core.c): d4c/delta.py owns the format, the
stream encodings and every size check that can be made before calling in.
These functions only run loops over buffers the caller sized, without the GIL,
and report failure through return codes that delta.py turns into errors.

The second half is AddCoder (fed by gather_old): a context-mixing binary arithmetic
coder for the add stream.  Its models condition on the old bytes under each add byte,
which the patcher already holds, so that context costs nothing to send; delta.py offers
its output as one coding of the add stream (DIFF_CM) and keeps whichever is smallest.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcmp, memcpy

API_VERSION = "5"

ctypedef fused idx_t:
    int32_t
    int64_t


# ---------------------------------------------------------------- SA-IS
# Nong, Zhang & Chan, "Two Efficient Algorithms for Linear Time Suffix Array
# Construction" (2011).  Level 0 reads bytes shifted by one with a virtual
# sentinel 0 at the end; deeper levels read the reduced string (stored in the
# upper part of SA, as in the paper).  Types are one byte per position.  The
# symbol type is fused so each level's loops are compiled without branching on it.

ctypedef fused sym_t:
    uint8_t
    int32_t
    int64_t


cdef inline idx_t _chr(const sym_t* t, idx_t i, idx_t n) noexcept nogil:
    if sym_t is uint8_t:
        return (t[i] + 1) if i < n - 1 else 0
    else:
        return <idx_t>t[i]


cdef inline bint _is_lms(const uint8_t* typ, idx_t i) noexcept nogil:
    return i > 0 and typ[i] and not typ[i - 1]


cdef void _counts(const sym_t* t, idx_t n, idx_t k, idx_t* cnt) noexcept nogil:
    cdef idx_t i
    for i in range(k + 1):
        cnt[i] = 0
    for i in range(n):
        cnt[_chr(t, i, n)] += 1


cdef void _buckets(const idx_t* cnt, idx_t k, idx_t* bkt, bint end) noexcept nogil:
    """Bucket starts or ends from the symbol counts (counted once per level)."""
    cdef idx_t i, total = 0
    for i in range(k + 1):
        total += cnt[i]
        bkt[i] = total if end else total - cnt[i]


cdef void _induce(const sym_t* t, const uint8_t* typ, idx_t* sa, idx_t n,
                  idx_t k, const idx_t* cnt, idx_t* bkt) noexcept nogil:
    cdef idx_t i, j, c
    _buckets(cnt, k, bkt, False)
    for i in range(n):
        j = sa[i] - 1
        if j >= 0 and not typ[j]:
            c = _chr(t, j, n)
            sa[bkt[c]] = j
            bkt[c] += 1
    _buckets(cnt, k, bkt, True)
    i = n - 1
    while i >= 0:
        j = sa[i] - 1
        if j >= 0 and typ[j]:
            c = _chr(t, j, n)
            bkt[c] -= 1
            sa[bkt[c]] = j
        i -= 1


cdef int _sais(const sym_t* t, idx_t* sa, idx_t n, idx_t k) noexcept nogil:
    """Suffix array of a string of n symbols in 0..k whose last symbol is a unique 0."""
    cdef idx_t i, j, c, n1, name, prev, pos, d
    cdef bint differ
    cdef uint8_t* typ
    cdef idx_t* bkt
    cdef idx_t* cnt
    cdef idx_t* s1
    if n == 1:
        sa[0] = 0
        return 0
    typ = <uint8_t*>malloc(n)
    bkt = <idx_t*>malloc(2 * (k + 1) * sizeof(idx_t))
    if typ == NULL or bkt == NULL:
        free(typ)
        free(bkt)
        return -1
    cnt = bkt + k + 1
    _counts(t, n, k, cnt)
    # S = 1, L = 0
    typ[n - 1] = 1
    typ[n - 2] = 0
    i = n - 3
    while i >= 0:
        c = _chr(t, i, n)
        j = _chr(t, i + 1, n)
        typ[i] = 1 if (c < j or (c == j and typ[i + 1])) else 0
        i -= 1
    # stage 1: sort LMS substrings
    _buckets(cnt, k, bkt, True)
    for i in range(n):
        sa[i] = -1
    for i in range(1, n):
        if _is_lms(typ, i):
            c = _chr(t, i, n)
            bkt[c] -= 1
            sa[bkt[c]] = i
    _induce(t, typ, sa, n, k, cnt, bkt)
    n1 = 0
    for i in range(n):
        if _is_lms(typ, sa[i]):
            sa[n1] = sa[i]
            n1 += 1
    # name the LMS substrings
    for i in range(n1, n):
        sa[i] = -1
    name = 0
    prev = -1
    for i in range(n1):
        pos = sa[i]
        differ = False
        d = 0
        while True:
            if prev == -1 or _chr(t, pos + d, n) != _chr(t, prev + d, n) \
                    or typ[pos + d] != typ[prev + d]:
                differ = True
                break
            if d > 0 and (_is_lms(typ, pos + d) or _is_lms(typ, prev + d)):
                break
            d += 1
        if differ:
            name += 1
            prev = pos
        sa[n1 + pos // 2] = name - 1
    j = n - 1
    i = n - 1
    while i >= n1:
        if sa[i] >= 0:
            sa[j] = sa[i]
            j -= 1
        i -= 1
    # stage 2: sort the reduced string (recursively if names repeat)
    s1 = sa + n - n1
    if name < n1:
        if _sais_reduced(s1, sa, n1, name - 1) != 0:
            free(typ)
            free(bkt)
            return -1
    else:
        for i in range(n1):
            sa[s1[i]] = i
    # stage 3: induce the full order from the sorted LMS suffixes
    _buckets(cnt, k, bkt, True)
    j = 0
    for i in range(1, n):
        if _is_lms(typ, i):
            s1[j] = i
            j += 1
    for i in range(n1):
        sa[i] = s1[sa[i]]
    for i in range(n1, n):
        sa[i] = -1
    i = n1 - 1
    while i >= 0:
        j = sa[i]
        sa[i] = -1
        c = _chr(t, j, n)
        bkt[c] -= 1
        sa[bkt[c]] = j
        i -= 1
    _induce(t, typ, sa, n, k, cnt, bkt)
    free(typ)
    free(bkt)
    return 0


cdef int _sais_reduced(const idx_t* s1, idx_t* sa, idx_t n, idx_t k) noexcept nogil:
    # the reduced string's symbols have the index type
    return _sais(s1, sa, n, k)


def suffix_array(const uint8_t[::1] text, idx_t[::1] sa):
    """Fill sa (len(text) + 1 entries) with the suffix array of text.

    sa[0] is len(text) (the empty suffix); int32 indices suffice below 2 GiB.
    Returns 0, or -1 when memory ran out.
    """
    cdef idx_t n = text.shape[0]
    cdef int rc
    cdef const uint8_t* p
    if sa.shape[0] != n + 1:
        raise ValueError("sa must have len(text) + 1 entries")
    if n == 0:
        sa[0] = 0
        return 0
    p = &text[0]
    with nogil:
        rc = _sais(p, &sa[0], n + 1, 256)
    return rc


# ---------------------------------------------------------------- match scan

cdef inline int64_t _matchlen(const uint8_t* a, int64_t alen, const uint8_t* b, int64_t blen) noexcept nogil:
    cdef int64_t i = 0
    cdef int64_t m = alen if alen < blen else blen
    while i < m and a[i] == b[i]:
        i += 1
    return i


cdef int64_t _search(const idx_t* sa, const uint8_t* old, int64_t oldsize, const uint8_t* new,
                     int64_t newsize, int64_t* pos, const int64_t* buckets) noexcept nogil:
    """Longest match of new[...] in old: binary search over the suffix array.

    Keeps the match lengths of both bounds: every suffix between them shares at
    least the smaller one with new, so comparisons start there (Manber & Myers),
    making a search O(log n + match length) instead of O(log n * match length).
    buckets (_prefix_buckets) settles the steps outside new's
    range without touching old: the same steps, so the same answer, with fewer
    cache misses.
    """
    cdef int64_t st = 0, en = oldsize, mid, k, p, avail, l, lo = 0, hi = oldsize + 1
    cdef int64_t lst, len_
    if newsize >= 2:
        k = (<int64_t>new[0] << 8) | new[1]
        lo = buckets[k]
        hi = lo + buckets[65536 + k]
    if hi <= lo:  # no suffix starts with those two bytes: the plain search
        lo = 0
        hi = oldsize + 1
    lst = _matchlen(old + sa[0], oldsize - sa[0], new, newsize) if lo == 0 else 0
    len_ = _matchlen(old + sa[en], oldsize - sa[en], new, newsize) if hi > oldsize else 0
    while en - st >= 2:
        mid = st + (en - st) // 2
        if mid < lo:  # sorts before every suffix sharing new's first two bytes
            st = mid
            lst = 0
            continue
        if mid >= hi:
            en = mid
            len_ = 0
            continue
        k = lst if lst < len_ else len_
        p = sa[mid]
        avail = oldsize - p
        l = k + _matchlen(old + p + k, avail - k, new + k, newsize - k)
        if l == newsize:
            en = mid
            len_ = l
        elif l == avail or old[p + l] < new[l]:
            st = mid
            lst = l
        else:
            en = mid
            len_ = l
    if st < lo:  # outside the range: at most one byte in common, measured now
        lst = _matchlen(old + sa[st], oldsize - sa[st], new, newsize)
    if en >= hi:
        len_ = _matchlen(old + sa[en], oldsize - sa[en], new, newsize)
    if lst > len_:
        pos[0] = sa[st]
        return lst
    pos[0] = sa[en]
    return len_


cdef void _prefix_buckets(const uint8_t* old, int64_t oldsize, int64_t* buckets) noexcept nogil:
    """buckets[ab] and buckets[ab + 1]: where the suffixes starting with bytes a, b begin
    and end in the suffix array (sa[0] is the empty suffix; the one-byte suffix old[-1:]
    sorts before the longer ones starting with its byte).  2 x 65536 entries:
    starts, then counts."""
    cdef int64_t i, x, at = 1
    cdef int64_t* counts = buckets + 65536
    for i in range(2 * 65536):
        buckets[i] = 0
    for i in range(oldsize - 1):
        counts[(<int64_t>old[i] << 8) | old[i + 1]] += 1
    for x in range(65536):
        if (x & 255) == 0 and oldsize > 0 and old[oldsize - 1] == (x >> 8):
            at += 1
        buckets[x] = at
        at += counts[x]


cdef struct _Out:
    int64_t* ctrl      # triples: copy length, insert length, old seek
    int64_t nctrl
    int64_t capctrl
    uint8_t* diff
    int64_t ndiff
    uint8_t* extra
    int64_t nextra


cdef int _emit(_Out* o, int64_t a, int64_t b, int64_t c) noexcept nogil:
    cdef int64_t* grown
    if o.nctrl + 3 > o.capctrl:
        grown = <int64_t*>realloc(o.ctrl, (o.capctrl * 2 + 48) * sizeof(int64_t))
        if grown == NULL:
            return -1
        o.ctrl = grown
        o.capctrl = o.capctrl * 2 + 48
    o.ctrl[o.nctrl] = a
    o.ctrl[o.nctrl + 1] = b
    o.ctrl[o.nctrl + 2] = c
    o.nctrl += 3
    return 0


cdef int _scan(const idx_t* sa, const uint8_t* old, int64_t oldsize, const uint8_t* new,
               int64_t newsize, _Out* o, int64_t slack) noexcept nogil:
    """bsdiff's scan: approximate matches (copy + add bytes) and inserted bytes."""
    cdef int64_t* buckets = <int64_t*>malloc(2 * 65536 * sizeof(int64_t))
    cdef int rc
    if buckets == NULL:
        return -1
    _prefix_buckets(old, oldsize, buckets)
    rc = _scan_with(sa, old, oldsize, new, newsize, o, slack, buckets)
    free(buckets)
    return rc


# After SKIP_AFTER searches in a row that found nothing better than the current alignment,
# the scan steps one byte further for each SKIP_GROW more, up to SKIP_CAP: a match it lands
# inside is extended back to its start (lenb below), so little is lost.  Measured on the delta
# bench's binaries: libcrypto's 1.13 M searches -> 0.44 M (scan time -36 %), its delta 1.0 %
# larger, the others within 0.25 %.
cdef enum:
    SKIP_AFTER = 4
    SKIP_GROW = 4
    SKIP_CAP = 32


cdef int _scan_with(const idx_t* sa, const uint8_t* old, int64_t oldsize, const uint8_t* new,
                    int64_t newsize, _Out* o, int64_t slack, const int64_t* buckets) noexcept nogil:
    cdef int64_t scan = 0, length = 0, pos = 0, lastscan = 0, lastpos = 0, lastoffset = 0
    cdef int64_t oldscore, scsc, s, sf, lenf, sb, lenb, i, overlap, ss, lens, fails, step
    while scan < newsize:
        oldscore = 0
        scan += length
        scsc = scan
        fails = 0
        while scan < newsize:
            length = _search(sa, old, oldsize, new + scan, newsize - scan, &pos, buckets)
            while scsc < scan + length:
                if scsc + lastoffset < oldsize and scsc + lastoffset >= 0 \
                        and old[scsc + lastoffset] == new[scsc]:
                    oldscore += 1
                scsc += 1
            if (length == oldscore and length != 0) or length > oldscore + slack:
                break
            fails += 1
            step = 1 if fails < SKIP_AFTER else 1 + (fails - SKIP_AFTER) // SKIP_GROW
            step = min(step, SKIP_CAP, newsize - scan)
            for i in range(step):
                if scan + lastoffset < oldsize and scan + lastoffset >= 0 \
                        and old[scan + lastoffset] == new[scan]:
                    oldscore -= 1
                scan += 1
            if scsc < scan:  # stepped past what oldscore counted: nothing is counted
                scsc = scan
                oldscore = 0
        if length != oldscore or scan == newsize:
            s = 0
            sf = 0
            lenf = 0
            i = 0
            while lastscan + i < scan and lastpos + i < oldsize:
                if old[lastpos + i] == new[lastscan + i]:
                    s += 1
                i += 1
                if s * 2 - i > sf * 2 - lenf:
                    sf = s
                    lenf = i
            lenb = 0
            if scan < newsize:
                s = 0
                sb = 0
                i = 1
                while scan >= lastscan + i and pos >= i:
                    if old[pos - i] == new[scan - i]:
                        s += 1
                    if s * 2 - i > sb * 2 - lenb:
                        sb = s
                        lenb = i
                    i += 1
            if lastscan + lenf > scan - lenb:
                overlap = (lastscan + lenf) - (scan - lenb)
                s = 0
                ss = 0
                lens = 0
                for i in range(overlap):
                    if new[lastscan + lenf - overlap + i] == old[lastpos + lenf - overlap + i]:
                        s += 1
                    if new[scan - lenb + i] == old[pos - lenb + i]:
                        s -= 1
                    if s > ss:
                        ss = s
                        lens = i + 1
                lenf += lens - overlap
                lenb -= lens
            for i in range(lenf):
                o.diff[o.ndiff + i] = <uint8_t>(new[lastscan + i] - old[lastpos + i])
            o.ndiff += lenf
            for i in range((scan - lenb) - (lastscan + lenf)):
                o.extra[o.nextra + i] = new[lastscan + lenf + i]
            o.nextra += (scan - lenb) - (lastscan + lenf)
            if _emit(o, lenf, (scan - lenb) - (lastscan + lenf),
                     (pos - lenb) - (lastpos + lenf)) != 0:
                return -1
            lastscan = scan - lenb
            lastpos = pos - lenb
            lastoffset = pos - scan
    return 0


def diff(const uint8_t[::1] old, const uint8_t[::1] new, idx_t[::1] sa,
         uint8_t[::1] diff_out, uint8_t[::1] extra_out, int64_t slack=8):
    """Scan new against old (whose suffix array is sa) into copy/add/insert streams.

    diff_out and extra_out must hold len(new) bytes each.  Returns
    (controls as bytes of int64 triples, diff length, extra length) or None when
    memory ran out.  Each triple: copy n bytes (old + diff), insert m bytes,
    then move the old position by k (relative to the end of the copy).
    """
    cdef int64_t oldsize = old.shape[0], newsize = new.shape[0]
    cdef _Out o
    cdef int rc
    cdef const uint8_t* po
    cdef const uint8_t* pn
    cdef uint8_t dummy = 0
    if sa.shape[0] != oldsize + 1:
        raise ValueError("sa does not belong to old")
    if diff_out.shape[0] < newsize or extra_out.shape[0] < newsize:
        raise ValueError("output buffers are too small")
    o.ctrl = NULL
    o.nctrl = o.capctrl = o.ndiff = o.nextra = 0
    if newsize == 0:
        return b"", 0, 0
    o.diff = &diff_out[0]
    o.extra = &extra_out[0]
    po = &old[0] if oldsize > 0 else &dummy
    pn = &new[0]
    with nogil:
        rc = _scan(&sa[0], po, oldsize, pn, newsize, &o, slack)
    try:
        if rc != 0:
            return None
        return (<char*>o.ctrl)[:o.nctrl * sizeof(int64_t)], o.ndiff, o.nextra
    finally:
        free(o.ctrl)


# ---------------------------------------------------------------- patch

def apply(const uint8_t[::1] old, const int64_t[::1] ctrl, const uint8_t[::1] diff,
          const uint8_t[::1] extra, uint8_t[::1] out):
    """Rebuild new into out (its exact size).  Every control is range-checked.

    Returns 0 on success, or a negative code: -1 a length is negative, -2 the
    output would overflow, -3 a copy reads outside old, -4 the diff stream is
    exhausted, -5 the insert stream is exhausted, -6 streams or output were
    not consumed exactly.
    """
    cdef int64_t oldsize = old.shape[0], newsize = out.shape[0]
    cdef int64_t nctrl = ctrl.shape[0], ndiff = diff.shape[0], nextra = extra.shape[0]
    cdef int64_t oldpos = 0, newpos = 0, dpos = 0, epos = 0, k, i, a, b, c
    cdef int rc = 0
    cdef uint8_t zero = 0
    cdef const uint8_t* po = &old[0] if oldsize > 0 else &zero
    cdef const uint8_t* pd = &diff[0] if ndiff > 0 else &zero
    cdef const uint8_t* pe = &extra[0] if nextra > 0 else &zero
    cdef const int64_t* pc
    cdef uint8_t* pout
    if nctrl % 3:
        return -6
    if newsize == 0:
        return 0 if nctrl == 0 and ndiff == 0 and nextra == 0 else -6
    if nctrl == 0:
        return -6
    pc = &ctrl[0]
    pout = &out[0]
    with nogil:
        k = 0
        while k < nctrl:
            a = pc[k]
            b = pc[k + 1]
            c = pc[k + 2]
            k += 3
            if a < 0 or b < 0:
                rc = -1
                break
            if a > newsize - newpos or b > newsize - newpos - a:
                rc = -2
                break
            if a > 0 and (oldpos < 0 or oldpos > oldsize - a):
                rc = -3
                break
            if a > ndiff - dpos:
                rc = -4
                break
            if b > nextra - epos:
                rc = -5
                break
            for i in range(a):
                pout[newpos + i] = <uint8_t>(po[oldpos + i] + pd[dpos + i])
            newpos += a
            oldpos += a
            dpos += a
            for i in range(b):
                pout[newpos + i] = pe[epos + i]
            newpos += b
            epos += b
            if c > oldsize or c < -oldsize - newsize:
                rc = -3
                break
            oldpos += c
        if rc == 0 and (newpos != newsize or dpos != ndiff or epos != nextra):
            rc = -6
    return rc


# ---------------------------------------------------------------- add-stream coder
# A context-mixing binary arithmetic coder for the add (diff) stream.  The
# patcher knows the old bytes under every add byte before it decodes them, so
# the models condition on those bytes without paying for them: whether a byte
# changes depends strongly on what it is and what precedes it (opcodes before a
# displacement, pointers in tables).  Measured on Debian binaries: 31% smaller
# than the best of zstd/bzip2/lzma on the same stream.  Per position: a
# changed/unchanged bit from 4 models mixed by a small logistic mixer; for a
# changed byte its value, bit by bit, from 4 more.

from libc.math cimport log, exp

cdef int32_t _STRETCH[4096]
cdef int32_t _SQUASH[4096]


cdef void _cm_tables() noexcept:
    cdef int i
    cdef double x
    for i in range(4096):
        x = (i - 2048) / 256.0
        _SQUASH[i] = <int32_t>(4096.0 / (1.0 + exp(-x)))
        if _SQUASH[i] > 4095:
            _SQUASH[i] = 4095
        if _SQUASH[i] < 1:
            _SQUASH[i] = 1
        x = (i + 0.5) / 4096.0
        _STRETCH[i] = <int32_t>(log(x / (1.0 - x)) * 256.0)


_cm_tables()

DEF _NM = 4
DEF _T1 = 1 << 17
DEF _T2 = 1 << 16
DEF _T3 = 1 << 16
DEF _T4 = 1 << 14
DEF _TV = 1 << 16
DEF _BLOCK = 32
DEF _TB1 = 1 << 11
DEF _TB2 = 1 << 17


cdef inline int32_t _squash(int32_t d) noexcept nogil:
    if d > 2047:
        d = 2047
    if d < -2047:
        d = -2047
    return _SQUASH[d + 2048]


cdef struct _Mixer:
    int32_t w[64 * _NM]
    int32_t st[_NM]
    int32_t pr
    int sel


cdef inline int32_t _mix(_Mixer* m, int sel) noexcept nogil:
    cdef int i
    cdef int64_t dot = 0
    m.sel = sel
    for i in range(_NM):
        dot += <int64_t>m.st[i] * m.w[sel * _NM + i]
    m.pr = _squash(<int32_t>(dot >> 16))
    return m.pr


cdef inline void _mix_update(_Mixer* m, int y) noexcept nogil:
    cdef int i
    cdef int32_t w
    cdef int32_t err = ((y << 12) - m.pr) * 6
    for i in range(_NM):
        # weights stay within +-2^22 so the dot product can never overflow
        w = m.w[m.sel * _NM + i] + ((m.st[i] * err) >> 10)
        if w > 4194304:
            w = 4194304
        elif w < -4194304:
            w = -4194304
        m.w[m.sel * _NM + i] = w


cdef inline void _upd(uint16_t* p, int y, int rate) noexcept nogil:
    if y:
        p[0] += (65535 - p[0]) >> rate
    else:
        p[0] -= p[0] >> rate


cdef class AddCoder:
    """Codes the add stream segment by segment (state carries over), so memory
    stays one segment plus ~1.5 MiB of model tables.  Decoding arbitrary bytes
    only yields arbitrary add bytes (the result digest catches them)."""

    cdef uint16_t* t1
    cdef uint16_t* t2
    cdef uint16_t* t3
    cdef uint16_t* t4
    cdef uint16_t* v[4]
    cdef uint16_t* b1
    cdef uint16_t* b2
    cdef _Mixer mf
    cdef _Mixer mv
    cdef _Mixer mb
    cdef uint32_t bhist
    cdef int bcount
    cdef uint32_t hist
    cdef int64_t run
    cdef uint8_t prevv, prevd
    cdef uint32_t x1, x2, x
    cdef bint encoding
    cdef uint8_t* buf
    cdef int64_t pos, cap
    cdef bytes src
    cdef const uint8_t* inp
    cdef int64_t inlen

    def __cinit__(self, bint encoding, bytes data=None):
        cdef int64_t i
        cdef int k
        self.encoding = encoding
        self.t1 = <uint16_t*>malloc(_T1 * sizeof(uint16_t))
        self.t2 = <uint16_t*>malloc(_T2 * sizeof(uint16_t))
        self.t3 = <uint16_t*>malloc(_T3 * sizeof(uint16_t))
        self.t4 = <uint16_t*>malloc(_T4 * sizeof(uint16_t))
        for k in range(4):
            self.v[k] = <uint16_t*>malloc(_TV * sizeof(uint16_t))
        self.b1 = <uint16_t*>malloc(_TB1 * sizeof(uint16_t))
        self.b2 = <uint16_t*>malloc(_TB2 * sizeof(uint16_t))
        self.cap = 1 << 16
        self.buf = <uint8_t*>malloc(self.cap) if encoding else NULL
        if not (self.t1 and self.t2 and self.t3 and self.t4 and self.v[0] and self.v[1]
                and self.v[2] and self.v[3] and self.b1 and self.b2) or (encoding and self.buf == NULL):
            raise MemoryError("add-stream coder")
        for i in range(_T1):
            self.t1[i] = 1024
        for i in range(_T2):
            self.t2[i] = 1024
        for i in range(_T3):
            self.t3[i] = 1024
        for i in range(_T4):
            self.t4[i] = 1024
        for k in range(4):
            for i in range(_TV):
                self.v[k][i] = 32768
        for i in range(_TB1):
            self.b1[i] = 32768
        for i in range(_TB2):
            self.b2[i] = 32768
        for i in range(64 * _NM):
            self.mf.w[i] = 16384
            self.mv.w[i] = 16384
            self.mb.w[i] = 16384
        self.bhist = 0
        self.bcount = 0
        self.x1 = 0
        self.x2 = 0xFFFFFFFF
        self.x = 0
        self.pos = 0
        if not encoding:
            self.src = data if data is not None else b""
            self.inlen = len(self.src)
            self.inp = <const uint8_t*>self.src
            for k in range(4):
                self.x = (self.x << 8) | self._next_in()

    def __dealloc__(self):
        cdef int k
        free(self.t1)
        free(self.t2)
        free(self.t3)
        free(self.t4)
        for k in range(4):
            free(self.v[k])
        free(self.b1)
        free(self.b2)
        free(self.buf)

    cdef inline uint32_t _next_in(self) noexcept nogil:
        cdef uint32_t b = self.inp[self.pos] if self.pos < self.inlen else 0
        self.pos += 1
        return b

    cdef inline int _put(self, uint8_t b) noexcept nogil:
        cdef uint8_t* grown
        if self.pos >= self.cap:
            grown = <uint8_t*>realloc(self.buf, self.cap * 2)
            if grown == NULL:
                return -1
            self.buf = grown
            self.cap *= 2
        self.buf[self.pos] = b
        self.pos += 1
        return 0

    cdef inline int _bit(self, int y, int32_t p) noexcept nogil:
        """Encode y (encoding) or decode and return a bit, with P(1) = p/4096."""
        cdef uint32_t xmid
        if p < 1:
            p = 1
        if p > 4095:
            p = 4095
        xmid = self.x1 + <uint32_t>((<uint64_t>(self.x2 - self.x1) * <uint64_t>p) >> 12)
        if not self.encoding:
            y = self.x <= xmid
        if y:
            self.x2 = xmid
        else:
            self.x1 = xmid + 1
        while ((self.x1 ^ self.x2) >> 24) == 0:
            if self.encoding:
                if self._put(<uint8_t>(self.x2 >> 24)) != 0:
                    return -1
            else:
                self.x = (self.x << 8) | self._next_in()
            self.x1 <<= 8
            self.x2 = (self.x2 << 8) | 255
        return y

    cdef int _code_one(self, const uint8_t* o, uint8_t* d, int64_t i) noexcept nogil:
        """One add byte: its changed bit, and its value if changed. Returns the bit, or -1."""
        cdef uint32_t h3
        cdef int y, node, b, rb, k
        cdef uint8_t oi, om1, om2, om3, om4
        cdef uint16_t* p[4]
        cdef int32_t pr
        oi = o[i]
        om1 = o[i - 1] if i >= 1 else 0
        om2 = o[i - 2] if i >= 2 else 0
        om3 = o[i - 3] if i >= 3 else 0
        om4 = o[i - 4] if i >= 4 else 0
        rb = 0
        while rb < 15 and (self.run >> rb) > 0:
            rb += 1
        p[0] = &self.t1[((<uint32_t>oi << 9) | (<uint32_t>om1 << 1) | (self.hist & 1)) & (_T1 - 1)]
        p[1] = &self.t2[((<uint32_t>oi << 8) | (self.hist & 0xFF)) & (_T2 - 1)]
        h3 = ((<uint32_t>oi * 2654435761U) ^ (<uint32_t>om1 * 2246822507U) ^ (<uint32_t>om2 * 3266489909U)
              ^ (<uint32_t>om3 * 668265263U) ^ (<uint32_t>om4 * 374761393U)) >> 12
        p[2] = &self.t3[h3 & (_T3 - 1)]
        p[3] = &self.t4[((<uint32_t>rb << 9) | (<uint32_t>oi << 1) | (self.hist & 1)) & (_T4 - 1)]
        for k in range(4):
            self.mf.st[k] = _STRETCH[p[k][0] >> 4]
        pr = _mix(&self.mf, <int>(self.hist & 3) | (rb << 2))
        y = self._bit(d[i] != 0 if self.encoding else 0, pr)
        if y < 0:
            return -1
        _mix_update(&self.mf, y)
        _upd(p[0], y, 4)
        _upd(p[1], y, 4)
        _upd(p[2], y, 4)
        _upd(p[3], y, 5)
        self.hist = (self.hist << 1) | y
        if not y:
            self.run += 1
            if not self.encoding:
                d[i] = 0
            self.prevd = 0
            return 0
        self.run = 0
        node = 1
        for b in range(7, -1, -1):
            p[0] = &self.v[0][((<uint32_t>self.prevv << 8) | node) & (_TV - 1)]
            p[1] = &self.v[1][((<uint32_t>oi << 8) | node) & (_TV - 1)]
            p[2] = &self.v[2][((<uint32_t>self.prevd << 8) | node) & (_TV - 1)]
            p[3] = &self.v[3][((<uint32_t>om1 << 8) | node) & (_TV - 1)]
            for k in range(4):
                self.mv.st[k] = _STRETCH[p[k][0] >> 4]
            pr = _mix(&self.mv, 7 - b)
            y = self._bit((d[i] >> b) & 1 if self.encoding else 0, pr)
            if y < 0:
                return -1
            _mix_update(&self.mv, y)
            for k in range(4):
                _upd(p[k], y, 4)
            node = (node << 1) | y
        if not self.encoding:
            d[i] = <uint8_t>(node & 0xFF)
        self.prevv = <uint8_t>(node & 0xFF)
        self.prevd = self.prevv
        return 1

    cdef int _code(self, const uint8_t* o, uint8_t* d, int64_t n) noexcept nogil:
        """Blocks of 32 add bytes: one bit says whether a block has any change
        (most have none); only changed blocks are coded byte by byte."""
        cdef int64_t i = 0, j, end
        cdef int z, y, k, changed
        cdef uint16_t* p[2]
        cdef int32_t pr
        while i < n:
            end = i + _BLOCK if i + _BLOCK < n else n
            z = 0
            if self.encoding:
                for j in range(i, end):
                    if d[j]:
                        z = 1
                        break
            p[0] = &self.b1[((self.bhist & 0xFF) << 3 | self.bcount) & (_TB1 - 1)]
            p[1] = &self.b2[(((self.bhist & 1) << 16) | (<uint32_t>o[i] << 8)
                             | (<uint32_t>(o[i + 1] if i + 1 < n else 0))) & (_TB2 - 1)]
            self.mb.st[0] = _STRETCH[p[0][0] >> 4]
            self.mb.st[1] = _STRETCH[p[1][0] >> 4]
            self.mb.st[2] = 256
            self.mb.st[3] = 0
            pr = _mix(&self.mb, <int>(self.bhist & 3))
            z = self._bit(z, pr)
            if z < 0:
                return -1
            _mix_update(&self.mb, z)
            _upd(p[0], z, 4)
            _upd(p[1], z, 4)
            self.bhist = (self.bhist << 1) | z
            changed = 0
            if not z:
                if not self.encoding:
                    for j in range(i, end):
                        d[j] = 0
                self.hist = (self.hist << (end - i)) if end - i < 32 else 0
                self.run += end - i
                self.prevd = 0
            else:
                for j in range(i, end):
                    y = self._code_one(o, d, j)
                    if y < 0:
                        return -1
                    changed += y
            self.bcount = 0 if changed == 0 else (1 if changed == 1 else (2 if changed < 4 else
                                                                          (3 if changed < 8 else 4)))
            i = end
        return 0

    def encode(self, const uint8_t[::1] diff, const uint8_t[::1] old_ctx):
        """Code one segment's add bytes; old_ctx: the old bytes under them."""
        cdef int64_t n = diff.shape[0]
        cdef int rc = 0
        if not self.encoding or old_ctx.shape[0] != n:
            raise ValueError("encode needs an encoder and one old byte per add byte")
        if n == 0:
            return
        with nogil:
            rc = self._code(&old_ctx[0], <uint8_t*>&diff[0], n)
        if rc != 0:
            raise MemoryError("add-stream coder")

    def decode(self, const uint8_t[::1] old_ctx, uint8_t[::1] out):
        cdef int64_t n = out.shape[0]
        if self.encoding or old_ctx.shape[0] != n:
            raise ValueError("decode needs a decoder and one old byte per add byte")
        if n == 0:
            return
        with nogil:
            self._code(&old_ctx[0], &out[0], n)

    def finish(self):
        """The coded bytes (encoder)."""
        cdef int k
        if not self.encoding:
            raise ValueError("not an encoder")
        for k in range(4):
            if self._put(<uint8_t>(self.x1 >> 24)) != 0:
                raise MemoryError("add-stream coder")
            self.x1 <<= 8
        return (<char*>self.buf)[:self.pos]


def gather_old(const uint8_t[::1] old, const int64_t[::1] ctrl, uint8_t[::1] out):
    """The old bytes under each add byte, following the controls (range-checked
    like apply).  Returns 0, or the same negative codes as apply."""
    cdef int64_t oldsize = old.shape[0], nout = out.shape[0], nctrl = ctrl.shape[0]
    cdef int64_t k, i, a, c, oldpos = 0, pos = 0
    cdef int rc = 0
    cdef uint8_t zero = 0
    cdef const uint8_t* po = &old[0] if oldsize > 0 else &zero
    cdef uint8_t* pout
    if nctrl % 3:
        return -6
    if nout == 0:
        return 0
    pout = &out[0]
    with nogil:
        k = 0
        while k < nctrl:
            a = ctrl[k]
            c = ctrl[k + 2]
            k += 3
            if a < 0:
                rc = -1
                break
            if a > nout - pos:
                rc = -4
                break
            if a > 0 and (oldpos < 0 or oldpos > oldsize - a):
                rc = -3
                break
            for i in range(a):
                pout[pos + i] = po[oldpos + i]
            pos += a
            oldpos += a
            if c > oldsize or c < -oldsize - nout:
                rc = -3
                break
            oldpos += c
        if rc == 0 and pos != nout:
            rc = -6
    return rc


cdef uint64_t LIMIT62 = (<uint64_t>1) << 62  # gaps and lengths beyond: corrupt (no int64 overflow)


cdef inline uint64_t _plane_value(const uint8_t* planes, int64_t count, int64_t k) noexcept nogil:
    """Value k of a column stored as 8 byte planes (low bytes of all values first)."""
    cdef uint64_t v = 0
    cdef int b
    for b in range(8):
        v |= (<uint64_t>planes[b * count + k]) << (8 * b)
    return v


def scatter_runs(const uint8_t[::1] stream, int64_t count, int64_t run, int64_t pos, int64_t value,
                 int64_t begin, uint8_t[::1] out):
    """Write the runs of a run-coded add stream that fall in [begin, begin + len(out))
    into out (zeroed by the caller), starting at run `run`, which starts `gap` bytes
    after `pos` (where the run before it ended) and takes its bytes from value index
    `value`.  Returns (run, pos, value) to continue from, or a negative code: -1 a run
    is empty or longer than the stream, -2 a run crosses the end of out, -3 the values
    are exhausted.  `stream` is count (u64), gaps and lengths as 8 byte planes, values."""
    cdef int64_t nout = out.shape[0], nvalues, end = begin + nout, length
    cdef uint64_t gap, ulength
    cdef const uint8_t* gaps
    cdef const uint8_t* lengths
    cdef const uint8_t* values
    cdef uint8_t* pout
    cdef uint8_t zero = 0
    cdef int rc = 0
    if count < 0 or 8 + 16 * count > stream.shape[0] or run < 0 or run > count:
        return -1
    gaps = &stream[8] if stream.shape[0] > 8 else &zero
    lengths = gaps + 8 * count
    values = lengths + 8 * count
    nvalues = stream.shape[0] - 8 - 16 * count
    pout = &out[0] if nout > 0 else &zero
    with nogil:
        while run < count:
            gap = _plane_value(gaps, count, run)
            ulength = _plane_value(lengths, count, run)
            if ulength == 0 or ulength > LIMIT62 or gap > LIMIT62:
                rc = -1
                break
            length = <int64_t>ulength
            if pos + <int64_t>gap >= end:
                break  # a later segment's run
            pos += <int64_t>gap
            if pos < begin or length > end - pos:
                rc = -2
                break
            if length > nvalues - value:
                rc = -3
                break
            memcpy(pout + (pos - begin), values + value, length)
            pos += length
            value += length
            run += 1
    if rc:
        return rc
    return run, pos, value
