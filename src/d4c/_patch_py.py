"""Pure-Python reference of _patch.pyx: same results, much slower.

Used when D4C_PUREPYTHON=1 and by the parity tests (small inputs only: the
suffix sort here is a plain comparison sort).
"""

from __future__ import annotations

import struct

API_VERSION = "2"


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
        while scan < newsize:
            length, pos = _search(sa, old, new, scan)
            while scsc < scan + length:
                if 0 <= scsc + lastoffset < oldsize and old[scsc + lastoffset] == new[scsc]:
                    oldscore += 1
                scsc += 1
            if (length == oldscore and length != 0) or length > oldscore + 8:
                break
            if 0 <= scan + lastoffset < oldsize and old[scan + lastoffset] == new[scan]:
                oldscore -= 1
            scan += 1
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


def add_bytes(old, diff, out):  # type: ignore[no-untyped-def]
    n = len(diff)
    if len(old) < n or len(out) < n:
        raise ValueError("buffers shorter than the diff")
    for i in range(n):
        out[i] = (old[i] + diff[i]) & 0xFF
