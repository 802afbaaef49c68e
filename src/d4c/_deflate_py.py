"""Pure-Python reference of the `_deflate` kernel (bit-exact; slow: for tests).

A deflate stream is read into its tokens (literals, length/distance pairs) and
its blocks (type, token count), and tokens are written back as deflate with
given blocks.  Huffman codes are built as zlib's trees.c (and GNU gzip, which
it comes from) builds them: a heap ordered by frequency then depth, lengths
limited by moving overflowed leaves, canonical codes, code lengths run-length
coded with 16/17/18.  So a stream whose tokens zlib can re-create but whose
blocks end elsewhere (GNU gzip's) is re-created by re-blocking zlib's tokens.
"""

from __future__ import annotations

import numpy as np

API_VERSION = "3"

LBASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163,
         195, 227, 258)
LEXT = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0)
DBASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049,
         3073, 4097, 6145, 8193, 12289, 16385, 24577)
DEXT = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13)
ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
L_CODES, D_CODES, BL_CODES = 286, 30, 19
HEAP_SIZE = 2 * L_CODES + 1
END_BLOCK = 256
MATCH_SHIFT = 16  # a token: a literal byte, or (length << 16) | distance

E_TRUNCATED, E_BAD, E_TOO_MANY, E_NOMEM, E_OVERFLOW = -1, -2, -3, -4, -5


def _length_code(n: int) -> int:
    if n == 258:
        return 28
    for i in range(27, -1, -1):
        if n >= LBASE[i]:
            return i
    raise ValueError(n)


def _dist_code(d: int) -> int:
    for i in range(29, -1, -1):
        if d >= DBASE[i]:
            return i
    raise ValueError(d)


# ---------------------------------------------------------------- reading

class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0  # in bits

    def get(self, n: int) -> int:
        v = 0
        for i in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise EOFError
            v |= ((self.data[byte] >> (self.pos & 7)) & 1) << i
            self.pos += 1
        return v


def _decoder(lengths: list[int]) -> dict[tuple[int, int], int] | None:
    count = [0] * 16
    for n in lengths:
        count[n] += 1
    count[0] = 0
    left = 1
    for n in range(1, 16):  # over-subscribed sets are refused (incomplete ones are legal)
        left = (left << 1) - count[n]
        if left < 0:
            return None
    code, first = 0, [0] * 16
    for n in range(1, 16):
        code = (code + count[n - 1]) << 1
        first[n] = code
    table = {}
    for sym, n in enumerate(lengths):
        if n:
            table[(n, first[n])] = sym
            first[n] += 1
    return table


def _symbol(bits: _Bits, table: dict[tuple[int, int], int]) -> int:
    code = 0
    for n in range(1, 16):
        code = (code << 1) | bits.get(1)
        sym = table.get((n, code))
        if sym is not None:
            return sym
    raise ValueError("bad code")


def _fixed() -> tuple[list[int], list[int]]:
    return [8] * 144 + [9] * 112 + [7] * 24 + [8] * 8, [5] * 30


def tokens(stream: bytes | memoryview, max_tokens: int, history: int = 0) -> tuple[int, np.ndarray, np.ndarray, int]:
    """(0, tokens uint32, blocks int64 [n, 2] of (type, token count), bytes used), or
    (negative error, ...) for a truncated or invalid stream or more than `max_tokens`.
    history: bytes before the stream that distances may reach (a preset dictionary)."""
    bits = _Bits(bytes(stream))
    toks: list[int] = []
    blocks: list[tuple[int, int]] = []
    out_len = 0
    empty = (np.zeros(0, np.uint32), np.zeros((0, 2), np.int64), 0)
    try:
        while True:
            final, btype = bits.get(1), bits.get(2)
            start = len(toks)
            if btype == 0:
                bits.pos = (bits.pos + 7) & ~7
                n, nn = bits.get(16), bits.get(16)
                if n != nn ^ 0xFFFF:
                    return (E_BAD, *empty)
                for _ in range(n):
                    toks.append(bits.get(8))
                out_len += n
            elif btype == 3:
                return (E_BAD, *empty)
            else:
                if btype == 1:
                    ll, dl = _fixed()
                else:
                    hlit, hdist, hclen = bits.get(5) + 257, bits.get(5) + 1, bits.get(4) + 4
                    cl = [0] * 19
                    for i in range(hclen):
                        cl[ORDER[i]] = bits.get(3)
                    ct = _decoder(cl)
                    if ct is None:
                        return (E_BAD, *empty)
                    lens: list[int] = []
                    while len(lens) < hlit + hdist:
                        sym = _symbol(bits, ct)
                        if sym < 16:
                            lens.append(sym)
                        elif sym == 16:
                            if not lens:
                                return (E_BAD, *empty)
                            lens += [lens[-1]] * (3 + bits.get(2))
                        elif sym == 17:
                            lens += [0] * (3 + bits.get(3))
                        else:
                            lens += [0] * (11 + bits.get(7))
                    if len(lens) > hlit + hdist or hlit > 286 or hdist > 30:
                        return (E_BAD, *empty)
                    ll, dl = lens[:hlit], lens[hlit:]
                lt, dt = _decoder(ll), _decoder(dl)
                if lt is None or dt is None:
                    return (E_BAD, *empty)
                while True:
                    sym = _symbol(bits, lt)
                    if sym < 256:
                        toks.append(sym)
                        out_len += 1
                    elif sym == END_BLOCK:
                        break
                    elif sym > 285:
                        return (E_BAD, *empty)
                    else:
                        length = LBASE[sym - 257] + bits.get(LEXT[sym - 257])
                        ds = _symbol(bits, dt)
                        if ds > 29:
                            return (E_BAD, *empty)
                        dist = DBASE[ds] + bits.get(DEXT[ds])
                        if dist > out_len + history:
                            return (E_BAD, *empty)
                        toks.append((length << MATCH_SHIFT) | dist)
                        out_len += length
                    if len(toks) > max_tokens:
                        return (E_TOO_MANY, *empty)
            if len(toks) > max_tokens:
                return (E_TOO_MANY, *empty)
            blocks.append((btype, len(toks) - start))
            if final:
                break
    except (EOFError, ValueError):
        return (E_TRUNCATED, *empty)
    return 0, np.array(toks, np.uint32), np.array(blocks, np.int64).reshape(-1, 2), (bits.pos + 7) >> 3


# ---------------------------------------------------------------- writing

class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def bits(self, value: int, n: int) -> None:
        self.acc |= value << self.n
        self.n += n
        while self.n >= 8:
            self.out.append(self.acc & 0xFF)
            self.acc >>= 8
            self.n -= 8

    def align(self) -> None:
        if self.n:
            self.out.append(self.acc & 0xFF)
        self.acc = self.n = 0


def _reverse(code: int, n: int) -> int:
    r = 0
    for _ in range(n):
        r = (r << 1) | (code & 1)
        code >>= 1
    return r


def _build_lengths(freq: list[int], max_length: int) -> tuple[list[int], int]:
    """Code lengths for `freq` as zlib's build_tree + gen_bitlen make them, and max_code."""
    elems = len(freq)
    size = 2 * elems + 1
    f = list(freq) + [0] * (size - elems)
    depth = [0] * size
    dad = [0] * size
    length = [0] * size
    heap = [0] * HEAP_SIZE
    heap_len, heap_max = 0, HEAP_SIZE
    max_code = -1
    for n in range(elems):
        if f[n]:
            heap_len += 1
            heap[heap_len] = max_code = n
    while heap_len < 2:  # at least two codes of non-zero frequency
        if max_code < 2:
            max_code += 1
            node = max_code
        else:
            node = 0
        heap_len += 1
        heap[heap_len] = node
        f[node] = 1
        depth[node] = 0

    def smaller(a: int, b: int) -> bool:
        return f[a] < f[b] or (f[a] == f[b] and depth[a] <= depth[b])

    def down(k: int) -> None:
        v = heap[k]
        j = k << 1
        while j <= heap_len:
            if j < heap_len and smaller(heap[j + 1], heap[j]):
                j += 1
            if smaller(v, heap[j]):
                break
            heap[k] = heap[j]
            k = j
            j <<= 1
        heap[k] = v

    for k in range(heap_len // 2, 0, -1):
        down(k)
    node = elems
    while True:
        n = heap[1]
        heap[1] = heap[heap_len]
        heap_len -= 1
        down(1)
        m = heap[1]
        heap_max -= 1
        heap[heap_max] = n
        heap_max -= 1
        heap[heap_max] = m
        f[node] = f[n] + f[m]
        depth[node] = max(depth[n], depth[m]) + 1
        dad[n] = dad[m] = node
        heap[1] = node
        node += 1
        down(1)
        if heap_len < 2:
            break
    heap_max -= 1
    heap[heap_max] = heap[1]
    # gen_bitlen
    bl_count = [0] * 16
    length[heap[heap_max]] = 0
    overflow = 0
    for h in range(heap_max + 1, len(heap)):
        n = heap[h]
        bits = length[dad[n]] + 1
        if bits > max_length:
            bits = max_length
            overflow += 1
        length[n] = bits
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
        h = len(heap)
        for bits in range(max_length, 0, -1):
            n = bl_count[bits]
            while n:
                h -= 1
                m = heap[h]
                if m > max_code:
                    continue
                length[m] = bits
                n -= 1
    return length[:elems], max_code


def _codes(lengths: list[int]) -> list[int]:
    count = [0] * 16
    for n in lengths:
        if n:
            count[n] += 1
    next_code, code = [0] * 16, 0
    for bits in range(1, 16):
        code = (code + count[bits - 1]) << 1
        next_code[bits] = code
    out = [0] * len(lengths)
    for n, ln in enumerate(lengths):
        if ln:
            out[n] = _reverse(next_code[ln], ln)
            next_code[ln] += 1
    return out


def _scan(lengths: list[int], max_code: int, bl_freq: list[int] | None, w: _Writer | None,
          bl_len: list[int] | None = None, bl_code: list[int] | None = None) -> None:
    """zlib's scan_tree (bl_freq) and send_tree (w): code lengths, run-length coded."""
    prevlen, nextlen, count = -1, lengths[0], 0
    max_count, min_count = (138, 3) if nextlen == 0 else (7, 4)
    lens = lengths[:max_code + 1] + [0xFFFF]

    def put(sym: int) -> None:
        if bl_freq is not None:
            bl_freq[sym] += 1
        else:
            assert w is not None and bl_len is not None and bl_code is not None
            w.bits(bl_code[sym], bl_len[sym])

    for n in range(max_code + 1):
        curlen, nextlen = nextlen, lens[n + 1]
        count += 1
        if count < max_count and curlen == nextlen:
            continue
        if count < min_count:
            for _ in range(count):
                put(curlen)
        elif curlen != 0:
            if curlen != prevlen:
                put(curlen)
                count -= 1
            put(16)
            if w is not None:
                w.bits(count - 3, 2)
        elif count <= 10:
            put(17)
            if w is not None:
                w.bits(count - 3, 3)
        else:
            put(18)
            if w is not None:
                w.bits(count - 11, 7)
        count, prevlen = 0, curlen
        if nextlen == 0:
            max_count, min_count = 138, 3
        elif curlen == nextlen:
            max_count, min_count = 6, 3
        else:
            max_count, min_count = 7, 4


def encode(toks: np.ndarray, blocks: np.ndarray, content: bytes, capacity: int) -> tuple[int, bytes]:
    """(0, deflate stream) of `toks` cut into `blocks` (the last one final); stored
    blocks take their bytes from `content`.  Negative: blocks and tokens disagree, or
    the stream would pass `capacity` bytes."""
    w = _Writer()
    pos = 0  # token index
    at = 0   # content offset
    ntok = len(toks)
    for b, (btype, count) in enumerate(blocks.tolist()):
        if count < 0 or pos + count > ntok or btype not in (0, 1, 2):
            return E_BAD, b""
        part = toks[pos:pos + count].tolist()
        pos += count
        covered = sum((t >> MATCH_SHIFT) if t > 255 else 1 for t in part)
        last = b == len(blocks) - 1
        w.bits(int(last) | (btype << 1), 3)
        if btype == 0:
            if covered > 0xFFFF or at + covered > len(content):
                return E_BAD, b""
            w.align()
            w.bits(covered, 16)
            w.bits(covered ^ 0xFFFF, 16)
            w.out += content[at:at + covered]
            at += covered
            continue
        at += covered
        if btype == 1:
            ll, dl = _fixed()
            lmax, dmax = 285, 29
        else:
            lf, df = [0] * L_CODES, [0] * D_CODES
            lf[END_BLOCK] = 1
            for t in part:
                if t > 255:
                    lf[257 + _length_code(t >> MATCH_SHIFT)] += 1
                    df[_dist_code(t & 0xFFFF)] += 1
                else:
                    lf[t] += 1
            ll, lmax = _build_lengths(lf, 15)
            dl, dmax = _build_lengths(df, 15)
            blf = [0] * BL_CODES
            _scan(ll, lmax, blf, None)
            _scan(dl, dmax, blf, None)
            bll, _ = _build_lengths(blf, 7)
            blc = _codes(bll)
            nbl = BL_CODES - 1
            while nbl >= 3 and bll[ORDER[nbl]] == 0:
                nbl -= 1
            w.bits(lmax + 1 - 257, 5)
            w.bits(dmax + 1 - 1, 5)
            w.bits(nbl + 1 - 4, 4)
            for r in range(nbl + 1):
                w.bits(bll[ORDER[r]], 3)
            _scan(ll, lmax, None, w, bll, blc)
            _scan(dl, dmax, None, w, bll, blc)
        lc, dc = _codes(ll), _codes(dl)
        for t in part:
            if t > 255:
                length, dist = t >> MATCH_SHIFT, t & 0xFFFF
                c = _length_code(length)
                w.bits(lc[257 + c], ll[257 + c])
                if LEXT[c]:
                    w.bits(length - LBASE[c], LEXT[c])
                d = _dist_code(dist)
                w.bits(dc[d], dl[d])
                if DEXT[d]:
                    w.bits(dist - DBASE[d], DEXT[d])
            else:
                w.bits(lc[t], ll[t])
        w.bits(lc[END_BLOCK], ll[END_BLOCK])
        if len(w.out) > capacity:
            return E_OVERFLOW, b""
    if pos != ntok:
        return E_BAD, b""
    w.align()
    if len(w.out) > capacity:
        return E_OVERFLOW, b""
    return 0, bytes(w.out)


def common_runs(new: np.ndarray, old: np.ndarray, k: int, min_run: int) -> np.ndarray:
    """(n, 3) int64 of (new start, old start, count): runs of at least min_run equal tokens
    in new's order.  A window of k tokens of new is looked up by its hash among old's
    (the first old window with that hash); after a run its diagonal is tried first."""
    runs: list[tuple[int, int, int]] = []
    if k < 1 or min_run < 1 or len(new) < k or len(old) < k:
        return np.zeros((0, 3), dtype=np.int64)
    hashes_old, hashes_new = _window_hashes(old, k), _window_hashes(new, k)
    order = np.argsort(hashes_old, kind="stable")
    sorted_old = hashes_old[order]
    at = np.minimum(np.searchsorted(sorted_old, hashes_new), len(sorted_old) - 1)
    candidate = np.where(sorted_old[at] == hashes_new, order[at], -1)
    hits = np.flatnonzero(candidate >= 0)
    i, diagonal = 0, None
    while i < len(new) - k + 1:
        j = -1
        if diagonal is not None and 0 <= i + diagonal <= len(old) - k and \
                np.array_equal(new[i:i + k], old[i + diagonal:i + diagonal + k]):
            j = i + diagonal
        else:
            nxt = np.searchsorted(hits, i)
            if nxt == len(hits):
                break
            i = int(hits[nxt])
            j = int(candidate[i])
        n = _equal_prefix(new[i:], old[j:])
        if n >= min_run:
            runs.append((i, j, n))
            diagonal = j - i
            i += n
        else:
            i += 1
            diagonal = None if n == 0 else diagonal
    return np.array(runs, dtype=np.int64).reshape(-1, 3)


def _window_hashes(t: np.ndarray, k: int) -> np.ndarray:
    n = len(t) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for i in range(k):
        h = h * np.uint64(0x100000001B3) + t[i:i + n].astype(np.uint64)
    return h


def _equal_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading entries a and b share, compared in growing chunks."""
    n, step = min(len(a), len(b)), 256
    done = 0
    while done < n:
        end = min(n, done + step)
        diff = np.flatnonzero(a[done:end] != b[done:end])
        if len(diff):
            return done + int(diff[0])
        done, step = end, step * 2
    return n
