"""Pure-Python reference of _patch.pyx: same results, much slower.

Used when D4C_PUREPYTHON=1 and by the parity tests (small inputs only: the
suffix sort here is a plain comparison sort).
"""

from __future__ import annotations

import struct

API_VERSION = "5"


def suffix_array(text, sa):  # type: ignore[no-untyped-def]
    data = bytes(text)
    n = len(data)
    if len(sa) != n + 1:
        raise ValueError("sa must have len(text) + 1 entries")
    for i, s in enumerate(sorted(range(n + 1), key=lambda i: data[i:])):
        sa[i] = s
    return 0


def _matchlen(a: bytes, ai: int, b: bytes, bi: int) -> int:
    n = 0
    while ai + n < len(a) and bi + n < len(b) and a[ai + n] == b[bi + n]:
        n += 1
    return n


def _search(sa, old: bytes, new: bytes, start: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    st, en = 0, len(old)
    tail = new[start:]
    while en - st >= 2:
        mid = st + (en - st) // 2
        if old[int(sa[mid]):] < tail:
            st = mid
        else:
            en = mid
    x = _matchlen(old, int(sa[st]), new, start)
    y = _matchlen(old, int(sa[en]), new, start)
    return (x, int(sa[st])) if x > y else (y, int(sa[en]))


_SKIP_AFTER, _SKIP_GROW, _SKIP_CAP = 4, 4, 32


def diff(old, new, sa, diff_out, extra_out):  # type: ignore[no-untyped-def]
    old, new = bytes(old), bytes(new)
    oldsize, newsize = len(old), len(new)
    ctrl: list[int] = []
    nd = ne = 0
    scan = length = pos = lastscan = lastpos = lastoffset = 0
    while scan < newsize:
        oldscore = 0
        scan += length
        scsc = scan
        fails = 0
        while scan < newsize:
            length, pos = _search(sa, old, new, scan)
            while scsc < scan + length:
                if 0 <= scsc + lastoffset < oldsize and old[scsc + lastoffset] == new[scsc]:
                    oldscore += 1
                scsc += 1
            if (length == oldscore and length != 0) or length > oldscore + 8:
                break
            fails += 1  # stepping faster after failed searches, as _patch.pyx (SKIP_*)
            step = 1 if fails < _SKIP_AFTER else 1 + (fails - _SKIP_AFTER) // _SKIP_GROW
            for _ in range(min(step, _SKIP_CAP, newsize - scan)):
                if 0 <= scan + lastoffset < oldsize and old[scan + lastoffset] == new[scan]:
                    oldscore -= 1
                scan += 1
            if scsc < scan:
                scsc, oldscore = scan, 0
        if length != oldscore or scan == newsize:
            s = sf = lenf = i = 0
            while lastscan + i < scan and lastpos + i < oldsize:
                if old[lastpos + i] == new[lastscan + i]:
                    s += 1
                i += 1
                if s * 2 - i > sf * 2 - lenf:
                    sf, lenf = s, i
            lenb = 0
            if scan < newsize:
                s = sb = 0
                i = 1
                while scan >= lastscan + i and pos >= i:
                    if old[pos - i] == new[scan - i]:
                        s += 1
                    if s * 2 - i > sb * 2 - lenb:
                        sb, lenb = s, i
                    i += 1
            if lastscan + lenf > scan - lenb:
                overlap = (lastscan + lenf) - (scan - lenb)
                s = ss = lens = 0
                for i in range(overlap):
                    if new[lastscan + lenf - overlap + i] == old[lastpos + lenf - overlap + i]:
                        s += 1
                    if new[scan - lenb + i] == old[pos - lenb + i]:
                        s -= 1
                    if s > ss:
                        ss, lens = s, i + 1
                lenf += lens - overlap
                lenb -= lens
            for i in range(lenf):
                diff_out[nd + i] = (new[lastscan + i] - old[lastpos + i]) & 0xFF
            nd += lenf
            m = (scan - lenb) - (lastscan + lenf)
            extra_out[ne:ne + m] = new[lastscan + lenf:lastscan + lenf + m]
            ne += m
            ctrl += [lenf, m, (pos - lenb) - (lastpos + lenf)]
            lastscan, lastpos, lastoffset = scan - lenb, pos - lenb, pos - scan
    return struct.pack(f"<{len(ctrl)}q", *ctrl), nd, ne


def apply(old, ctrl, diff, extra, out):  # type: ignore[no-untyped-def]
    oldsize, newsize = len(old), len(out)
    nctrl, ndiff, nextra = len(ctrl), len(diff), len(extra)
    if nctrl % 3:
        return -6
    if newsize == 0:
        return 0 if nctrl == ndiff == nextra == 0 else -6
    if nctrl == 0:
        return -6
    oldpos = newpos = dpos = epos = 0
    for k in range(0, nctrl, 3):
        a, b, c = int(ctrl[k]), int(ctrl[k + 1]), int(ctrl[k + 2])
        if a < 0 or b < 0:
            return -1
        if a > newsize - newpos or b > newsize - newpos - a:
            return -2
        if a > 0 and (oldpos < 0 or oldpos > oldsize - a):
            return -3
        if a > ndiff - dpos:
            return -4
        if b > nextra - epos:
            return -5
        for i in range(a):
            out[newpos + i] = (old[oldpos + i] + diff[dpos + i]) & 0xFF
        newpos += a
        oldpos += a
        dpos += a
        out[newpos:newpos + b] = bytes(extra[epos:epos + b])
        newpos += b
        epos += b
        if c > oldsize or c < -oldsize - newsize:
            return -3
        oldpos += c
    return 0 if (newpos, dpos, epos) == (newsize, ndiff, nextra) else -6


# ---------------------------------------------------------------- add-stream coder
# Bit-exact port of AddCoder in _patch.pyx (see there for the design).

import math

_STRETCH = []
_SQUASH = []
for _i in range(4096):
    _x = (_i - 2048) / 256.0
    _SQUASH.append(min(4095, max(1, int(4096.0 / (1.0 + math.exp(-_x))))))
    _x = (_i + 0.5) / 4096.0
    _STRETCH.append(int(math.log(_x / (1.0 - _x)) * 256.0))
_NM = 4
_T1, _T2, _T3, _T4, _TV = 1 << 17, 1 << 16, 1 << 16, 1 << 14, 1 << 16
_BLOCK, _TB1, _TB2 = 32, 1 << 11, 1 << 17
_M32 = 0xFFFFFFFF


def _squash(d: int) -> int:
    return _SQUASH[max(-2047, min(2047, d)) + 2048]


class _Mixer:
    def __init__(self) -> None:
        self.w = [16384] * (64 * _NM)
        self.st = [0] * _NM
        self.pr = 0
        self.sel = 0

    def mix(self, sel: int) -> int:
        self.sel = sel
        base = sel * _NM
        dot = sum(self.st[i] * self.w[base + i] for i in range(_NM))
        self.pr = _squash(dot >> 16)
        return self.pr

    def update(self, y: int) -> None:
        err = ((y << 12) - self.pr) * 6
        base = self.sel * _NM
        for i in range(_NM):
            self.w[base + i] = max(-4194304, min(4194304, self.w[base + i] + ((self.st[i] * err) >> 10)))


def _upd(table: list, idx: int, y: int, rate: int) -> None:
    p = table[idx]
    table[idx] = p + ((65535 - p) >> rate) if y else p - (p >> rate)


class AddCoder:
    def __init__(self, encoding: bool, data: bytes | None = None) -> None:
        self.encoding = encoding
        self.t1, self.t2, self.t3, self.t4 = [1024] * _T1, [1024] * _T2, [1024] * _T3, [1024] * _T4
        self.v = [[32768] * _TV for _ in range(4)]
        self.mf, self.mv, self.mb = _Mixer(), _Mixer(), _Mixer()
        self.b1, self.b2 = [32768] * _TB1, [32768] * _TB2
        self.bhist = self.bcount = 0
        self.hist = self.run = self.prevv = self.prevd = 0
        self.x1, self.x2, self.x = 0, _M32, 0
        self.out = bytearray()
        self.src = bytes(data or b"")
        self.pos = 0
        if not encoding:
            for _ in range(4):
                self.x = ((self.x << 8) | self._next_in()) & _M32

    def _next_in(self) -> int:
        b = self.src[self.pos] if self.pos < len(self.src) else 0
        self.pos += 1
        return b

    def _bit(self, y: int, p: int) -> int:
        p = max(1, min(4095, p))
        xmid = (self.x1 + (((self.x2 - self.x1) * p) >> 12)) & _M32
        if not self.encoding:
            y = int(self.x <= xmid)
        if y:
            self.x2 = xmid
        else:
            self.x1 = (xmid + 1) & _M32
        while ((self.x1 ^ self.x2) >> 24) == 0:
            if self.encoding:
                self.out.append(self.x2 >> 24)
            else:
                self.x = ((self.x << 8) | self._next_in()) & _M32
            self.x1 = (self.x1 << 8) & _M32
            self.x2 = ((self.x2 << 8) | 255) & _M32
        return y

    def _code_one(self, o, d, i: int) -> int:  # type: ignore[no-untyped-def]
        oi = o[i]
        om1 = o[i - 1] if i >= 1 else 0
        om2 = o[i - 2] if i >= 2 else 0
        om3 = o[i - 3] if i >= 3 else 0
        om4 = o[i - 4] if i >= 4 else 0
        rb = 0
        while rb < 15 and (self.run >> rb) > 0:
            rb += 1
        i1 = ((oi << 9) | (om1 << 1) | (self.hist & 1)) & (_T1 - 1)
        i2 = ((oi << 8) | (self.hist & 0xFF)) & (_T2 - 1)
        h3 = (((oi * 2654435761) & _M32) ^ ((om1 * 2246822507) & _M32) ^ ((om2 * 3266489909) & _M32)
              ^ ((om3 * 668265263) & _M32) ^ ((om4 * 374761393) & _M32)) >> 12
        i3 = h3 & (_T3 - 1)
        i4 = ((rb << 9) | (oi << 1) | (self.hist & 1)) & (_T4 - 1)
        tables = ((self.t1, i1), (self.t2, i2), (self.t3, i3), (self.t4, i4))
        for k, (t, idx) in enumerate(tables):
            self.mf.st[k] = _STRETCH[t[idx] >> 4]
        pr = self.mf.mix((self.hist & 3) | (rb << 2))
        y = self._bit(int(d[i] != 0) if self.encoding else 0, pr)
        self.mf.update(y)
        for k, (t, idx) in enumerate(tables):
            _upd(t, idx, y, 5 if k == 3 else 4)
        self.hist = ((self.hist << 1) | y) & _M32
        if not y:
            self.run += 1
            if not self.encoding:
                d[i] = 0
            self.prevd = 0
            return 0
        self.run = 0
        node = 1
        for b in range(7, -1, -1):
            idxs = (((self.prevv << 8) | node) & (_TV - 1), ((oi << 8) | node) & (_TV - 1),
                    ((self.prevd << 8) | node) & (_TV - 1), ((om1 << 8) | node) & (_TV - 1))
            for k in range(4):
                self.mv.st[k] = _STRETCH[self.v[k][idxs[k]] >> 4]
            pr = self.mv.mix(7 - b)
            y = self._bit((d[i] >> b) & 1 if self.encoding else 0, pr)
            self.mv.update(y)
            for k in range(4):
                _upd(self.v[k], idxs[k], y, 4)
            node = (node << 1) | y
        if not self.encoding:
            d[i] = node & 0xFF
        self.prevv = self.prevd = node & 0xFF
        return 1

    def _code(self, o, d, n: int) -> None:  # type: ignore[no-untyped-def]
        i = 0
        while i < n:
            end = min(i + _BLOCK, n)
            z = int(any(d[j] for j in range(i, end))) if self.encoding else 0
            i1 = (((self.bhist & 0xFF) << 3) | self.bcount) & (_TB1 - 1)
            i2 = (((self.bhist & 1) << 16) | (o[i] << 8) | (o[i + 1] if i + 1 < n else 0)) & (_TB2 - 1)
            self.mb.st[0] = _STRETCH[self.b1[i1] >> 4]
            self.mb.st[1] = _STRETCH[self.b2[i2] >> 4]
            self.mb.st[2] = 256
            self.mb.st[3] = 0
            pr = self.mb.mix(self.bhist & 3)
            z = self._bit(z, pr)
            self.mb.update(z)
            _upd(self.b1, i1, z, 4)
            _upd(self.b2, i2, z, 4)
            self.bhist = ((self.bhist << 1) | z) & _M32
            changed = 0
            if not z:
                if not self.encoding:
                    for j in range(i, end):
                        d[j] = 0
                self.hist = ((self.hist << (end - i)) & _M32) if end - i < 32 else 0
                self.run += end - i
                self.prevd = 0
            else:
                for j in range(i, end):
                    changed += self._code_one(o, d, j)
            self.bcount = 0 if changed == 0 else 1 if changed == 1 else 2 if changed < 4 else 3 if changed < 8 else 4
            i = end

    def encode(self, diff, old_ctx) -> None:  # type: ignore[no-untyped-def]
        if not self.encoding or len(old_ctx) != len(diff):
            raise ValueError("encode needs an encoder and one old byte per add byte")
        self._code(old_ctx, diff, len(diff))

    def decode(self, old_ctx, out) -> None:  # type: ignore[no-untyped-def]
        if self.encoding or len(old_ctx) != len(out):
            raise ValueError("decode needs a decoder and one old byte per add byte")
        self._code(old_ctx, out, len(out))

    def finish(self) -> bytes:
        for _ in range(4):
            self.out.append(self.x1 >> 24)
            self.x1 = (self.x1 << 8) & _M32
        return bytes(self.out)


def gather_old(old, ctrl, out):  # type: ignore[no-untyped-def]
    oldsize, nout, nctrl = len(old), len(out), len(ctrl)
    if nctrl % 3:
        return -6
    if nout == 0:
        return 0
    oldpos = pos = 0
    for k in range(0, nctrl, 3):
        a, c = int(ctrl[k]), int(ctrl[k + 2])
        if a < 0:
            return -1
        if a > nout - pos:
            return -4
        if a > 0 and (oldpos < 0 or oldpos > oldsize - a):
            return -3
        out[pos:pos + a] = bytes(old[oldpos:oldpos + a])
        pos += a
        oldpos += a
        if c > oldsize or c < -oldsize - nout:
            return -3
        oldpos += c
    return 0 if pos == nout else -6


def scatter_runs(stream, count, run, pos, value, begin, out):  # type: ignore[no-untyped-def]
    nout = len(out)
    end = begin + nout
    if count < 0 or 8 + 16 * count > len(stream) or run < 0 or run > count:
        return -1
    nvalues = len(stream) - 8 - 16 * count

    def plane_value(base: int, k: int) -> int:
        return sum(stream[base + b * count + k] << (8 * b) for b in range(8))

    while run < count:
        gap, length = plane_value(8, run), plane_value(8 + 8 * count, run)
        if length == 0 or length > 1 << 62 or gap > 1 << 62:
            return -1
        if pos + gap >= end:
            break
        pos += gap
        if pos < begin or length > end - pos:
            return -2
        if length > nvalues - value:
            return -3
        start = 8 + 16 * count + value
        out[pos - begin:pos - begin + length] = memoryview(stream)[start:start + length]
        pos += length
        value += length
        run += 1
    return run, pos, value
