# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Deflate streams as tokens and blocks, and back (docs/DELTA.md, method 4).

`tokens` reads a raw deflate stream into its tokens (a literal byte, or
length << 16 | distance) and its blocks (type, token count); `encode` writes
tokens as deflate cut into given blocks, with Huffman codes built as zlib's
trees.c builds them (GNU gzip's, which it comes from, are the same).  GNU gzip
and zlib find the same tokens but end blocks in other places, so a gzip file
zlib cannot re-create whole is re-created from zlib's tokens with gzip's blocks.
`common_runs` finds the long runs of tokens two streams share (a splice plan's).
The loops run without the GIL.  _deflate_py.py is the reference: same results.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

API_VERSION = "3"
# what the negative results mean (the same in _deflate_py)
E_TRUNCATED, E_BAD, E_TOO_MANY, E_NOMEM, E_OVERFLOW = (ERR_TRUNCATED, ERR_BAD, ERR_TOO_MANY, ERR_NOMEM,
                                                      ERR_OVERFLOW)

cdef enum:
    L_CODES = 286
    D_CODES = 30
    BL_CODES = 19
    HEAP_SIZE = 2 * L_CODES + 1
    END_BLOCK = 256
    MAXBITS = 15
    MATCH_SHIFT = 16
    ERR_TRUNCATED = -1
    ERR_BAD = -2
    ERR_TOO_MANY = -3
    ERR_NOMEM = -4
    ERR_OVERFLOW = -5

cdef int LBASE[29]
cdef int LEXT[29]
cdef int DBASE[30]
cdef int DEXT[30]
cdef int ORDER[19]
cdef uint8_t LCODE[259]     # length -> length code index 0..28
cdef uint8_t DCODE_LO[257]  # distance 1..256 -> code
cdef uint8_t DCODE_HI[256]  # (distance - 1) >> 7 for distances above 256 -> code

_lbase = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163,
          195, 227, 258)
_lext = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0)
_dbase = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049,
          3073, 4097, 6145, 8193, 12289, 16385, 24577)
_dext = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13)
_order = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


cdef void _init_tables():
    cdef int i, n, c
    for i in range(29):
        LBASE[i] = _lbase[i]
        LEXT[i] = _lext[i]
    for i in range(30):
        DBASE[i] = _dbase[i]
        DEXT[i] = _dext[i]
    for i in range(19):
        ORDER[i] = _order[i]
    for n in range(3, 259):
        c = 27
        while c > 0 and n < LBASE[c]:
            c -= 1
        LCODE[n] = 28 if n == 258 else c
    for n in range(1, 257):
        c = 29
        while n < DBASE[c]:
            c -= 1
        DCODE_LO[n] = c
    for n in range(256):
        c = 29
        while c > 0 and (n << 7) + 1 < DBASE[c]:
            c -= 1
        DCODE_HI[n] = c


_init_tables()


cdef inline int _dist_code(int d) noexcept nogil:
    return DCODE_LO[d] if d <= 256 else DCODE_HI[(d - 1) >> 7]


# ---------------------------------------------------------------- reading

cdef struct Reader:
    const uint8_t* data
    Py_ssize_t size
    Py_ssize_t pos      # next byte
    uint64_t buf
    int cnt
    int err


cdef inline int _bits(Reader* r, int n) noexcept nogil:
    cdef uint64_t v
    while r.cnt < n:
        if r.pos >= r.size:
            r.err = 1
            return 0
        r.buf |= (<uint64_t>r.data[r.pos]) << r.cnt
        r.pos += 1
        r.cnt += 8
    v = r.buf & ((1 << n) - 1)
    r.buf >>= n
    r.cnt -= n
    return <int>v


cdef struct Huffman:
    short count[16]
    short symbol[288]


cdef int _build(Huffman* h, const uint8_t* lengths, int n) noexcept nogil:
    """Canonical decoding tables; -1 for an over-subscribed set (incomplete is allowed)."""
    cdef short offs[16]
    cdef int i, left
    memset(h.count, 0, sizeof(h.count))
    for i in range(n):
        h.count[lengths[i]] += 1
    if h.count[0] == n:
        return 0
    left = 1
    for i in range(1, 16):
        left = (left << 1) - h.count[i]
        if left < 0:
            return -1
    offs[1] = 0
    for i in range(1, 15):
        offs[i + 1] = offs[i] + h.count[i]
    for i in range(n):
        if lengths[i]:
            h.symbol[offs[lengths[i]]] = i
            offs[lengths[i]] += 1
    return 0


cdef inline int _decode(Reader* r, Huffman* h) noexcept nogil:
    cdef int code = 0, first = 0, index = 0, count, length
    for length in range(1, 16):
        code |= _bits(r, 1)
        if r.err:
            return -1
        count = h.count[length]
        if code - count < first:
            return h.symbol[index + (code - first)]
        index += count
        first += count
        first <<= 1
        code <<= 1
    return -2


cdef int _grow_blocks(int64_t** blocks, Py_ssize_t* cap) noexcept nogil:
    cdef int64_t* p = <int64_t*>realloc(blocks[0], 2 * cap[0] * 2 * sizeof(int64_t))
    if p == NULL:
        return -1
    blocks[0] = p
    cap[0] *= 2
    return 0


cdef int _read_stream(const uint8_t* data, Py_ssize_t size, uint32_t* toks, Py_ssize_t max_tokens,
                      int64_t** blocks, Py_ssize_t* nblocks, Py_ssize_t* cap, Py_ssize_t* ntok,
                      Py_ssize_t* used, Py_ssize_t history) noexcept nogil:
    cdef Reader r
    cdef Huffman lt, dt, ct
    cdef uint8_t lens[320]
    cdef uint8_t cl[19]
    cdef int final, btype, i, hlit, hdist, hclen, sym, n, rep, length, ds, dist, prev
    cdef Py_ssize_t start, out_len = 0, k = 0
    r.data, r.size, r.pos, r.buf, r.cnt, r.err = data, size, 0, 0, 0, 0
    while True:
        final = _bits(&r, 1)
        btype = _bits(&r, 2)
        if r.err:
            return ERR_TRUNCATED
        start = k
        if btype == 0:
            r.buf, r.cnt = 0, 0  # whole bytes only: drop the rest of the current byte
            if r.pos + 4 > r.size:
                return ERR_TRUNCATED
            n = r.data[r.pos] | (r.data[r.pos + 1] << 8)
            if (n ^ 0xFFFF) != (r.data[r.pos + 2] | (r.data[r.pos + 3] << 8)):
                return ERR_BAD
            r.pos += 4
            if r.pos + n > r.size:
                return ERR_TRUNCATED
            if k + n > max_tokens:
                return ERR_TOO_MANY
            for i in range(n):
                toks[k + i] = r.data[r.pos + i]
            k += n
            r.pos += n
            out_len += n
        elif btype == 3:
            return ERR_BAD
        else:
            if btype == 1:
                for i in range(144):
                    lens[i] = 8
                for i in range(144, 256):
                    lens[i] = 9
                for i in range(256, 280):
                    lens[i] = 7
                for i in range(280, 288):
                    lens[i] = 8
                for i in range(30):
                    lens[288 + i] = 5
                hlit, hdist = 288, 30
            else:
                hlit = _bits(&r, 5) + 257
                hdist = _bits(&r, 5) + 1
                hclen = _bits(&r, 4) + 4
                if r.err:
                    return ERR_TRUNCATED
                if hlit > 286 or hdist > 30:
                    return ERR_BAD
                memset(cl, 0, sizeof(cl))
                for i in range(hclen):
                    cl[ORDER[i]] = _bits(&r, 3)
                if r.err:
                    return ERR_TRUNCATED
                if _build(&ct, cl, 19) < 0:
                    return ERR_BAD
                i = 0
                while i < hlit + hdist:
                    sym = _decode(&r, &ct)
                    if sym == -1:
                        return ERR_TRUNCATED
                    if sym < 0:
                        return ERR_BAD
                    if sym < 16:
                        lens[i] = sym
                        i += 1
                        continue
                    if sym == 16:
                        if i == 0:
                            return ERR_BAD
                        prev, rep = lens[i - 1], 3 + _bits(&r, 2)
                    elif sym == 17:
                        prev, rep = 0, 3 + _bits(&r, 3)
                    else:
                        prev, rep = 0, 11 + _bits(&r, 7)
                    if r.err:
                        return ERR_TRUNCATED
                    if i + rep > hlit + hdist:
                        return ERR_BAD
                    while rep:
                        lens[i] = prev
                        i += 1
                        rep -= 1
                memmove(&lens[288], &lens[hlit], hdist)
            if _build(&lt, lens, hlit) < 0 or _build(&dt, &lens[288], hdist) < 0:
                return ERR_BAD
            while True:
                sym = _decode(&r, &lt)
                if sym == -1:
                    return ERR_TRUNCATED
                if sym < 0:
                    return ERR_BAD
                if sym < 256:
                    if k >= max_tokens:
                        return ERR_TOO_MANY
                    toks[k] = sym
                    k += 1
                    out_len += 1
                elif sym == END_BLOCK:
                    break
                else:
                    sym -= 257
                    if sym >= 29:
                        return ERR_BAD
                    length = LBASE[sym] + _bits(&r, LEXT[sym])
                    ds = _decode(&r, &dt)
                    if ds == -1 or r.err:
                        return ERR_TRUNCATED
                    if ds < 0 or ds >= 30:
                        return ERR_BAD
                    dist = DBASE[ds] + _bits(&r, DEXT[ds])
                    if r.err:
                        return ERR_TRUNCATED
                    if dist > out_len + history:
                        return ERR_BAD
                    if k >= max_tokens:
                        return ERR_TOO_MANY
                    toks[k] = (<uint32_t>length << MATCH_SHIFT) | dist
                    k += 1
                    out_len += length
        if nblocks[0] == cap[0] and _grow_blocks(blocks, cap) < 0:
            return ERR_NOMEM
        blocks[0][2 * nblocks[0]] = btype
        blocks[0][2 * nblocks[0] + 1] = k - start
        nblocks[0] += 1
        if final:
            break
    ntok[0] = k
    used[0] = r.pos  # the bits left in the last byte are padding
    return 0


def tokens(const uint8_t[::1] stream, Py_ssize_t max_tokens, Py_ssize_t history=0):
    """(0, tokens uint32, blocks int64 [n, 2] of (type, token count), bytes used), or
    (negative error, ...) for a truncated or invalid stream or more than `max_tokens`.
    history: bytes before the stream that distances may reach (a preset dictionary)."""
    import numpy as np  # here: `version` loads every kernel, and must not load numpy (~10 MiB)
    cdef Py_ssize_t cap = 16, nblocks = 0, ntok = 0, used = 0
    cdef int rc
    cdef int64_t* blocks = <int64_t*>malloc(cap * 2 * sizeof(int64_t))
    toks = np.empty(max(max_tokens, 1), dtype=np.uint32)
    cdef uint32_t[::1] tv = toks
    if blocks == NULL:
        raise MemoryError
    try:
        with nogil:
            rc = _read_stream(&stream[0] if stream.shape[0] else NULL, stream.shape[0], &tv[0], max_tokens,
                              &blocks, &nblocks, &cap, &ntok, &used, history)
        if rc < 0:
            return rc, np.zeros(0, np.uint32), np.zeros((0, 2), np.int64), 0
        out = np.empty((nblocks, 2), dtype=np.int64)
        for i in range(nblocks):
            out[i, 0] = blocks[2 * i]
            out[i, 1] = blocks[2 * i + 1]
        return 0, toks[:ntok].copy(), out, used
    finally:
        free(blocks)


# ---------------------------------------------------------------- writing

cdef struct Writer:
    uint8_t* out
    Py_ssize_t cap
    Py_ssize_t pos
    uint64_t acc
    int n
    int err


cdef inline void _put(Writer* w, uint32_t value, int n) noexcept nogil:
    w.acc |= (<uint64_t>value) << w.n
    w.n += n
    while w.n >= 8:
        if w.pos >= w.cap:
            w.err = 1
            return
        w.out[w.pos] = w.acc & 0xFF
        w.pos += 1
        w.acc >>= 8
        w.n -= 8


cdef inline void _align(Writer* w) noexcept nogil:
    if w.n:
        if w.pos >= w.cap:
            w.err = 1
            return
        w.out[w.pos] = w.acc & 0xFF
        w.pos += 1
    w.acc = 0
    w.n = 0


cdef struct Tree:
    int freq[HEAP_SIZE]
    int dad[HEAP_SIZE]
    int length[HEAP_SIZE]
    uint8_t depth[HEAP_SIZE]
    int heap[HEAP_SIZE]
    int code[L_CODES + 2]


cdef inline bint _smaller(Tree* t, int a, int b) noexcept nogil:
    return t.freq[a] < t.freq[b] or (t.freq[a] == t.freq[b] and t.depth[a] <= t.depth[b])


cdef inline void _down(Tree* t, int k, int heap_len) noexcept nogil:
    cdef int v = t.heap[k], j = k << 1
    while j <= heap_len:
        if j < heap_len and _smaller(t, t.heap[j + 1], t.heap[j]):
            j += 1
        if _smaller(t, v, t.heap[j]):
            break
        t.heap[k] = t.heap[j]
        k = j
        j <<= 1
    t.heap[k] = v


cdef int _build_tree(Tree* t, int elems, int max_length) noexcept nogil:
    """zlib's build_tree and gen_bitlen on t.freq[:elems]: t.length; returns max_code."""
    cdef int n, m, node, h, bits, overflow = 0, heap_len = 0, heap_max = HEAP_SIZE, max_code = -1
    cdef int bl_count[16]
    for n in range(elems):
        t.depth[n] = 0
        t.length[n] = 0
        if t.freq[n]:
            heap_len += 1
            t.heap[heap_len] = n
            max_code = n
    while heap_len < 2:
        if max_code < 2:
            max_code += 1
            node = max_code
        else:
            node = 0
        heap_len += 1
        t.heap[heap_len] = node
        t.freq[node] = 1
        t.depth[node] = 0
    n = heap_len // 2
    while n >= 1:
        _down(t, n, heap_len)
        n -= 1
    node = elems
    while True:
        n = t.heap[1]
        t.heap[1] = t.heap[heap_len]
        heap_len -= 1
        _down(t, 1, heap_len)
        m = t.heap[1]
        heap_max -= 1
        t.heap[heap_max] = n
        heap_max -= 1
        t.heap[heap_max] = m
        t.freq[node] = t.freq[n] + t.freq[m]
        t.depth[node] = (t.depth[n] if t.depth[n] >= t.depth[m] else t.depth[m]) + 1
        t.dad[n] = node
        t.dad[m] = node
        t.heap[1] = node
        node += 1
        _down(t, 1, heap_len)
        if heap_len < 2:
            break
    heap_max -= 1
    t.heap[heap_max] = t.heap[1]
    for bits in range(16):
        bl_count[bits] = 0
    t.length[t.heap[heap_max]] = 0
    for h in range(heap_max + 1, HEAP_SIZE):
        n = t.heap[h]
        bits = t.length[t.dad[n]] + 1
        if bits > max_length:
            bits = max_length
            overflow += 1
        t.length[n] = bits
        if n > max_code:
            continue
        bl_count[bits] += 1
    if overflow:
        while overflow > 0:
            bits = max_length - 1
            while bl_count[bits] == 0:
                bits -= 1
            bl_count[bits] -= 1
            bl_count[bits + 1] += 2
            bl_count[max_length] -= 1
            overflow -= 2
        h = HEAP_SIZE
        bits = max_length
        while bits != 0:
            n = bl_count[bits]
            while n != 0:
                h -= 1
                m = t.heap[h]
                if m > max_code:
                    continue
                t.length[m] = bits
                n -= 1
            bits -= 1
    return max_code


cdef void _gen_codes(const int* length, int* code, int n) noexcept nogil:
    cdef int count[16]
    cdef int next_code[16]
    cdef int i, c = 0, bits, ln, v, r
    memset(count, 0, sizeof(count))
    for i in range(n):
        if length[i]:
            count[length[i]] += 1
    for bits in range(1, 16):
        c = (c + count[bits - 1]) << 1
        next_code[bits] = c
    for i in range(n):
        ln = length[i]
        code[i] = 0
        if ln:
            v = next_code[ln]
            next_code[ln] += 1
            r = 0
            for bits in range(ln):
                r = (r << 1) | (v & 1)
                v >>= 1
            code[i] = r


cdef void _scan_tree(const int* lengths, int max_code, int* bl_freq, Writer* w, const int* bl_len,
                     const int* bl_code) noexcept nogil:
    """zlib's scan_tree (w == NULL: counts into bl_freq) and send_tree (writes to w)."""
    cdef int n, curlen, prevlen = -1, nextlen = lengths[0], count = 0, max_count = 7, min_count = 4, sym
    if nextlen == 0:
        max_count, min_count = 138, 3
    for n in range(max_code + 1):
        curlen = nextlen
        nextlen = lengths[n + 1] if n < max_code else 0xFFFF
        count += 1
        if count < max_count and curlen == nextlen:
            continue
        if count < min_count:
            if w == NULL:
                bl_freq[curlen] += count
            else:
                while count:
                    _put(w, bl_code[curlen], bl_len[curlen])
                    count -= 1
        elif curlen != 0:
            if curlen != prevlen:
                if w == NULL:
                    bl_freq[curlen] += 1
                else:
                    _put(w, bl_code[curlen], bl_len[curlen])
                count -= 1
            if w == NULL:
                bl_freq[16] += 1
            else:
                _put(w, bl_code[16], bl_len[16])
                _put(w, count - 3, 2)
        elif count <= 10:
            if w == NULL:
                bl_freq[17] += 1
            else:
                _put(w, bl_code[17], bl_len[17])
                _put(w, count - 3, 3)
        else:
            if w == NULL:
                bl_freq[18] += 1
            else:
                _put(w, bl_code[18], bl_len[18])
                _put(w, count - 11, 7)
        count = 0
        prevlen = curlen
        if nextlen == 0:
            max_count, min_count = 138, 3
        elif curlen == nextlen:
            max_count, min_count = 6, 3
        else:
            max_count, min_count = 7, 4


cdef struct Trees:
    Tree lt
    Tree dt
    Tree bt
    int ll[288]
    int dl[30]
    int lc[288]
    int dc[30]


cdef int _encode(const uint32_t* toks, Py_ssize_t ntok, const int64_t* blocks, Py_ssize_t nblocks,
                 const uint8_t* content, Py_ssize_t content_len, Writer* w, Trees* s) noexcept nogil:
    cdef Py_ssize_t b, i, pos = 0, at = 0, count, covered
    cdef int btype, last, lmax, dmax, nbl, c, d, length, dist, r
    cdef uint32_t t
    for b in range(nblocks):
        btype = <int>blocks[2 * b]
        count = blocks[2 * b + 1]
        if count < 0 or pos + count > ntok or btype < 0 or btype > 2:
            return ERR_BAD
        covered = 0
        for i in range(pos, pos + count):
            covered += (toks[i] >> MATCH_SHIFT) if toks[i] > 255 else 1
        last = b == nblocks - 1
        _put(w, last | (btype << 1), 3)
        if btype == 0:
            if covered > 0xFFFF or at + covered > content_len:
                return ERR_BAD
            _align(w)
            _put(w, <uint32_t>covered, 16)
            _put(w, <uint32_t>(covered ^ 0xFFFF), 16)
            if w.pos + covered > w.cap:
                return ERR_OVERFLOW
            memcpy(&w.out[w.pos], &content[at], covered)
            w.pos += covered
            at += covered
            pos += count
            continue
        at += covered
        if btype == 1:
            for i in range(144):
                s.ll[i] = 8
            for i in range(144, 256):
                s.ll[i] = 9
            for i in range(256, 280):
                s.ll[i] = 7
            for i in range(280, 288):
                s.ll[i] = 8
            for i in range(30):
                s.dl[i] = 5
            _gen_codes(s.ll, s.lc, 288)
            _gen_codes(s.dl, s.dc, 30)
        else:
            memset(s.lt.freq, 0, sizeof(s.lt.freq))
            memset(s.dt.freq, 0, sizeof(s.dt.freq))
            memset(s.bt.freq, 0, sizeof(s.bt.freq))
            s.lt.freq[END_BLOCK] = 1
            for i in range(pos, pos + count):
                t = toks[i]
                if t > 255:
                    s.lt.freq[257 + LCODE[t >> MATCH_SHIFT]] += 1
                    s.dt.freq[_dist_code(t & 0xFFFF)] += 1
                else:
                    s.lt.freq[t] += 1
            lmax = _build_tree(&s.lt, L_CODES, 15)
            dmax = _build_tree(&s.dt, D_CODES, 15)
            for i in range(L_CODES):
                s.ll[i] = s.lt.length[i]
            for i in range(D_CODES):
                s.dl[i] = s.dt.length[i]
            _scan_tree(s.ll, lmax, s.bt.freq, NULL, NULL, NULL)
            _scan_tree(s.dl, dmax, s.bt.freq, NULL, NULL, NULL)
            _build_tree(&s.bt, BL_CODES, 7)
            _gen_codes(s.bt.length, s.bt.code, BL_CODES)
            nbl = BL_CODES - 1
            while nbl >= 3 and s.bt.length[ORDER[nbl]] == 0:
                nbl -= 1
            _put(w, lmax + 1 - 257, 5)
            _put(w, dmax, 5)
            _put(w, nbl + 1 - 4, 4)
            for r in range(nbl + 1):
                _put(w, s.bt.length[ORDER[r]], 3)
            _scan_tree(s.ll, lmax, NULL, w, s.bt.length, s.bt.code)
            _scan_tree(s.dl, dmax, NULL, w, s.bt.length, s.bt.code)
            _gen_codes(s.ll, s.lc, L_CODES)
            _gen_codes(s.dl, s.dc, D_CODES)
        for i in range(pos, pos + count):
            t = toks[i]
            if t > 255:
                length = t >> MATCH_SHIFT
                dist = t & 0xFFFF
                if length < 3 or length > 258 or dist < 1 or dist > 32768:
                    return ERR_BAD
                c = LCODE[length]
                _put(w, s.lc[257 + c], s.ll[257 + c])
                if LEXT[c]:
                    _put(w, length - LBASE[c], LEXT[c])
                d = _dist_code(dist)
                _put(w, s.dc[d], s.dl[d])
                if DEXT[d]:
                    _put(w, dist - DBASE[d], DEXT[d])
            else:
                _put(w, s.lc[t], s.ll[t])
        _put(w, s.lc[END_BLOCK], s.ll[END_BLOCK])
        pos += count
        if w.err:
            return ERR_OVERFLOW
    if pos != ntok:
        return ERR_BAD
    _align(w)
    return ERR_OVERFLOW if w.err else 0


def encode(const uint32_t[::1] toks, const int64_t[:, ::1] blocks, const uint8_t[::1] content,
           Py_ssize_t capacity):
    """(0, deflate stream) of `toks` cut into `blocks` (the last one final); stored
    blocks take their bytes from `content`.  Negative: blocks and tokens disagree, or
    the stream would pass `capacity` bytes."""
    cdef Writer w
    cdef int rc
    cdef Trees* s = <Trees*>malloc(sizeof(Trees))
    out = bytearray(max(capacity, 1))
    cdef uint8_t[::1] ov = out
    if s == NULL:
        raise MemoryError
    if blocks.shape[0] and blocks.shape[1] != 2:
        free(s)
        return ERR_BAD, b""
    w.out, w.cap, w.pos, w.acc, w.n, w.err = &ov[0], capacity, 0, 0, 0, 0
    try:
        with nogil:
            rc = _encode(&toks[0] if toks.shape[0] else NULL, toks.shape[0],
                         &blocks[0, 0] if blocks.shape[0] else NULL, blocks.shape[0],
                         &content[0] if content.shape[0] else NULL, content.shape[0], &w, s)
    finally:
        free(s)
    if rc < 0:
        return rc, b""
    return 0, bytes(out[:w.pos])


# ---------------------------------------------------------------- common runs of tokens

cdef uint64_t _HASH_MUL = 0x100000001B3
cdef uint64_t _SLOT_MUL = 0x9E3779B97F4A7C15  # Fibonacci hashing spreads the window hashes over the slots


cdef inline uint64_t _window_hash(const uint32_t* t, Py_ssize_t k) noexcept nogil:
    """The hash of t[:k] (t[0] the highest power): what rolling one token on keeps."""
    cdef uint64_t h = 0
    cdef Py_ssize_t m
    for m in range(k):
        h = h * _HASH_MUL + t[m]
    return h


cdef inline Py_ssize_t _slot(const uint64_t* keys, const int64_t* slots, uint64_t h, Py_ssize_t mask) noexcept nogil:
    """The slot holding h, or the empty one where it would go (linear probing)."""
    cdef Py_ssize_t s = <Py_ssize_t>((h * _SLOT_MUL) >> 32) & mask
    while slots[s] >= 0 and keys[s] != h:
        s = (s + 1) & mask
    return s


cdef Py_ssize_t _common_runs(const uint32_t* new, Py_ssize_t nnew, const uint32_t* old, Py_ssize_t nold,
                             Py_ssize_t k, Py_ssize_t min_run, int64_t* out, int64_t* candidate,
                             uint64_t* keys, int64_t* slots, Py_ssize_t mask) noexcept nogil:
    """The runs into out (3 per run); candidate: the first old window with each new window's hash."""
    cdef Py_ssize_t i, j, m, n, nruns = 0, wn = nnew - k + 1, wo = nold - k + 1, s
    cdef uint64_t h, top = 1
    cdef int64_t diagonal = 0
    cdef bint on_diagonal = False
    for m in range(k - 1):
        top *= _HASH_MUL
    for s in range(mask + 1):
        slots[s] = -1
    h = _window_hash(old, k)
    for j in range(wo):
        if j:
            h = (h - old[j - 1] * top) * _HASH_MUL + old[j + k - 1]
        s = _slot(keys, slots, h, mask)
        if slots[s] < 0:
            slots[s], keys[s] = j, h
    h = _window_hash(new, k)
    for i in range(wn):
        if i:
            h = (h - new[i - 1] * top) * _HASH_MUL + new[i + k - 1]
        candidate[i] = slots[_slot(keys, slots, h, mask)]
    i = 0
    while i < wn:
        j = -1
        if on_diagonal and 0 <= i + diagonal <= wo - 1:
            j = i + diagonal
            for m in range(k):
                if new[i + m] != old[j + m]:
                    j = -1
                    break
        if j < 0:
            while i < wn and candidate[i] < 0:
                i += 1
            if i == wn:
                break
            j = candidate[i]
        n = 0
        while i + n < nnew and j + n < nold and new[i + n] == old[j + n]:
            n += 1
        if n >= min_run:
            out[3 * nruns], out[3 * nruns + 1], out[3 * nruns + 2] = i, j, n
            nruns += 1
            diagonal, on_diagonal = j - i, True
            i += n
        else:
            i += 1
            if n == 0:
                on_diagonal = False
    return nruns


def common_runs(const uint32_t[::1] new, const uint32_t[::1] old, Py_ssize_t k, Py_ssize_t min_run):
    """(n, 3) int64 of (new start, old start, count): runs of at least min_run equal tokens
    in new's order.  A window of k tokens of new is looked up by its hash among old's
    (the first old window with that hash); after a run its diagonal is tried first."""
    import numpy as np
    cdef Py_ssize_t nnew = new.shape[0], nold = old.shape[0], mask = 1, nruns
    if k < 1 or min_run < 1 or nnew < k or nold < k:
        return np.zeros((0, 3), dtype=np.int64)
    while mask < 2 * (nold - k + 1):
        mask <<= 1
    runs = np.empty((nnew // min_run + 1, 3), dtype=np.int64)
    candidate = np.empty(nnew - k + 1, dtype=np.int64)
    keys = np.empty(mask, dtype=np.uint64)
    slots = np.empty(mask, dtype=np.int64)
    cdef int64_t[:, ::1] rv = runs
    cdef int64_t[::1] cv = candidate, sv = slots
    cdef uint64_t[::1] kv = keys
    with nogil:
        nruns = _common_runs(&new[0], nnew, &old[0], nold, k, min_run, &rv[0, 0], &cv[0], &kv[0], &sv[0],
                             mask - 1)
    return runs[:nruns].copy()
