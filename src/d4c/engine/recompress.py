"""Deltas of compressed files: diff what is inside, rebuild the exact bytes.

A small change to the content of a `.gz`, a zip member or an `.xz` changes
every byte of the compressed stream after it, so a byte delta of the files is
about as large as the new file.  Here a file is *expanded*: cut into pieces,
each raw (kept as it is: headers, stored members, a central directory) or a
compressed stream (replaced by its content).  The delta is the delta of the
expanded files plus, per stream of the new file, the parameters that make
Python's zlib (or lzma) give those exact bytes again from the content: the
first few guesses of level and memory level almost always do (Google's
archive-patcher found the same).  A stream no guess re-creates stays raw.

The old file is expanded by the same parser on both sides (no parameters are
needed to decompress), so only the new file's layout is stored, compressed
against the old file's layout.  Payload layout: docs/DELTA.md, method 4.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import zlib
from typing import Callable, NamedTuple

import numpy as np
import zstandard

from .. import accel
from ..codec import Cursor, Encoder
from ..zstdframes import read_bounded

PAYLOAD_VERSION = 2           # written when a table names old streams, else 1
READ_PAYLOAD_VERSIONS = (1, 2)
# KIND_REBLOCKED: zlib finds the stream's tokens but ends its blocks elsewhere (GNU gzip's deflate):
# zlib's tokens are written out again in the stream's own blocks (the _deflate kernel).
# KIND_SPLICED: a deflate stream whose tokens are runs of an old stream's tokens between stretches
# zlib makes again (each from a clean point, with the 32 KiB before it as a preset dictionary).
# Any other stream that names an old stream (Piece.source) is that stream byte for byte (an
# unchanged zip member): copied, not recompressed.
KIND_RAW, KIND_DEFLATE, KIND_XZ, KIND_REBLOCKED, KIND_SPLICED = 0, 1, 2, 3, 4
STREAM_KINDS = (KIND_DEFLATE, KIND_XZ, KIND_REBLOCKED, KIND_SPLICED)
BLOCK_KINDS = (KIND_REBLOCKED, KIND_SPLICED)   # the table lists their deflate blocks
V1_KINDS = (KIND_RAW, KIND_DEFLATE, KIND_XZ, KIND_REBLOCKED)
EXPANDED_LIMIT = 2 << 30      # bytes an expansion may reach; beyond, a file counts as not compressed
DEFLATE_RATIO = 1032          # deflate's largest expansion: 258 bytes from 2 bits
XZ_RATIO = 8000               # generous: lzma2 reaches ~7000:1 on runs of one byte
MIN_STREAM = 64               # smaller compressed streams are kept raw: nothing to gain
COMPARE_STEP = 64 << 10       # content fed per step while checking a guess
LEVELS = (6, 9, 1, 5, 4, 3, 2, 7, 8)   # zlib's default first, then gzip -9, then the rest
MEM_LEVELS = (8, 9)           # zlib's default, and the largest
XZ_PRESETS = (6, 9, 0, 1, 2, 3, 4, 5, 7, 8)
XZ_MAX_CONTENT = 64 << 20     # lzma guesses are slow: larger .xz files stay raw
XZ_EXTREME = 0x80             # in a stored xz preset byte: lzma.PRESET_EXTREME


Blocks = tuple[tuple[int, int], ...]  # (block type, token count) of each deflate block


class Run(NamedTuple):
    """Tokens of a spliced stream copied from the old stream's."""
    start: int          # first token in the new stream
    content_at: int     # where that token's bytes start in the piece's content
    old_start: int      # first token in the old stream
    count: int


class Params(NamedTuple):
    """How a stream was made: deflate (level, memLevel, wbits, strategy) or xz (preset, check, 0, 0)."""
    a: int
    b: int
    c: int
    d: int


class Piece(NamedTuple):
    kind: int
    start: int          # offset in the file
    size: int           # bytes in the file
    content_size: int   # bytes in the expanded file (== size for raw pieces)
    params: Params | None = None
    blocks: Blocks = ()  # BLOCK_KINDS: (type, token count) of each block
    source: int = -1     # the old file's piece this one is (or, spliced, is made from)
    runs: tuple[Run, ...] = ()  # KIND_SPLICED, in token order


class Expanded(NamedTuple):
    pieces: list[Piece]
    content: bytes

    @property
    def compressed(self) -> bool:
        return any(p.kind != KIND_RAW for p in self.pieces)


def _append(pieces: list[Piece], parts: list[bytes | memoryview], piece: Piece, part: bytes | memoryview) -> None:
    """Add a piece; a raw one right after a raw one extends it (a shorter table)."""
    if piece.kind == KIND_RAW and pieces and pieces[-1].kind == KIND_RAW:
        last = pieces[-1]
        pieces[-1] = last._replace(size=last.size + piece.size, content_size=last.content_size + piece.size)
        parts.append(part)
        return
    pieces.append(piece)
    parts.append(part)


class _Stop(Exception):
    """The parser met something it does not follow: the rest of the file is raw."""


# ---------------------------------------------------------------- expansion

def _inflate(data: memoryview, start: int, size: int | None, budget: int) -> tuple[bytes, int]:
    """(content, compressed length) of the raw deflate stream at `start`; `size` if the
    container says it.  Raises _Stop on a broken stream or one beyond `budget`."""
    end = len(data) if size is None else start + size
    if end > len(data):
        raise _Stop
    limit = min(budget, DEFLATE_RATIO * (end - start) + 1024)
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data[start:end], limit + 1)
    except zlib.error:
        raise _Stop from None
    if len(out) > limit or not d.eof:
        raise _Stop
    used = end - start - len(d.unused_data)
    if size is not None and used != size:
        raise _Stop
    return out, used


def _gzip_pieces(data: memoryview, budget: int, emit: Callable[[int, int, int, int, bytes], None]) -> int:
    """Pieces of one gzip member at 0 (RFC 1952); returns where it ends."""
    if len(data) < 18 or data[2] != 8 or data[3] & 0xE0:
        raise _Stop
    flags, pos = data[3], 10
    if flags & 4:
        pos += 2 + int.from_bytes(data[pos:pos + 2], "little")
    for bit in (8, 16):  # name, comment: zero-terminated
        if flags & bit:
            end = bytes(data[pos:pos + 65536]).find(b"\0")
            if end < 0:
                raise _Stop
            pos += end + 1
    if flags & 2:
        pos += 2
    if pos + 8 > len(data):
        raise _Stop
    content, used = _inflate(data, pos, None, budget)
    if len(data) < pos + used + 8 or struct.unpack_from("<II", data, pos + used) != (
            zlib.crc32(content), len(content) & 0xFFFFFFFF):
        raise _Stop
    emit(KIND_RAW, 0, pos, 0, b"")
    emit(KIND_DEFLATE, pos, used, len(content), content)
    emit(KIND_RAW, pos + used, 8, 0, b"")
    return pos + used + 8


def _zip64_sizes(extra: memoryview, usize: int, csize: int) -> tuple[int, int, bool]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            field = extra[pos + 4:pos + 4 + n]
            at = 0
            if usize == 0xFFFFFFFF and at + 8 <= len(field):
                usize = struct.unpack_from("<Q", field, at)[0]
                at += 8
            if csize == 0xFFFFFFFF and at + 8 <= len(field):
                csize = struct.unpack_from("<Q", field, at)[0]
            return usize, csize, True
        pos += 4 + n
    return usize, csize, False


class _Member(NamedTuple):
    offset: int         # of its local header
    size: int           # compressed
    method: int
    flags: int
    zip64: bool


def _central_directory(data: memoryview) -> list[_Member] | None:
    """The members the central directory lists (the sizes a data descriptor hides
    from the local headers), or None where there is none to read."""
    tail = bytes(data[max(0, len(data) - 65557):])
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    count, cd_size, cd_offset = struct.unpack_from("<HII", tail, at + 10)
    eocd = len(data) - len(tail) + at
    if 0xFFFFFFFF in (cd_size, cd_offset) or count == 0xFFFF:  # zip64: the locator before the record
        loc = eocd - 20
        if loc < 0 or data[loc:loc + 4] != b"PK\x06\x07":
            return None
        rec = struct.unpack_from("<Q", data, loc + 8)[0]
        if rec + 56 > len(data) or data[rec:rec + 4] != b"PK\x06\x06":
            return None
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", data, rec + 32)
    if cd_offset + cd_size > len(data):
        return None
    members, pos = [], cd_offset
    for _ in range(count):
        if pos + 46 > len(data) or data[pos:pos + 4] != b"PK\x01\x02":
            return None
        flags, method = struct.unpack_from("<HH", data, pos + 8)
        csize, usize = struct.unpack_from("<II", data, pos + 20)
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        offset = struct.unpack_from("<I", data, pos + 42)[0]
        extra = data[pos + 46 + nlen:pos + 46 + nlen + xlen]
        usize, csize, zip64 = _zip64_sizes(extra, usize, csize)
        if offset == 0xFFFFFFFF:
            offset = _zip64_offset(extra, usize == 0xFFFFFFFF, csize == 0xFFFFFFFF)
        members.append(_Member(offset, csize, method, flags, zip64))
        pos += 46 + nlen + xlen + clen
    return sorted(members)


def _zip64_offset(extra: memoryview, had_usize: bool, had_csize: bool) -> int:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            at = pos + 4 + 8 * (had_usize + had_csize)
            return struct.unpack_from("<Q", extra, at)[0] if at + 8 <= pos + 4 + n else -1
        pos += 4 + n
    return -1


def _zip_pieces(data: memoryview, budget: int, emit: Callable[[int, int, int, int, bytes], None]) -> int:
    """Pieces of the local entries of a zip, in file order, as its central directory
    lists them (or, without one, as the local headers chain); returns where they
    end (the central directory, kept raw by the caller)."""
    listed = _central_directory(data)
    pos = 0
    for i in range(len(listed) if listed is not None else 1 << 62):
        if pos + 30 > len(data) or data[pos:pos + 4] != b"PK\x03\x04":
            break
        _, flags, method, _, _, _, csize, usize, nlen, xlen = struct.unpack_from("<HHHHHIIIHH", data, pos + 4)
        head = 30 + nlen + xlen
        if pos + head > len(data):
            raise _Stop
        usize, csize, zip64 = _zip64_sizes(data[pos + 30 + nlen:pos + head], usize, csize)
        described = bool(flags & 8)
        size: int | None = None if described else csize
        if listed is not None:
            member = listed[i]
            if member.offset != pos or member.method != method:
                raise _Stop  # something between the entries, or a directory that disagrees
            size, zip64 = member.size, zip64 or member.zip64
        emit(KIND_RAW, pos, head, 0, b"")
        pos += head
        if method == 8 and not flags & 1:
            content, used = _inflate(data, pos, size, budget)
            emit(KIND_DEFLATE, pos, used, len(content), content)
        elif size is None or pos + size > len(data):
            raise _Stop  # a stored (or unknown) member of unknown size
        else:
            emit(KIND_RAW, pos, size, 0, b"")
            used = size
        pos += used
        if described:  # data descriptor: [signature] crc32, compressed size, size (8-byte sizes in zip64)
            sig = 4 if data[pos:pos + 4] == b"PK\x07\x08" else 0
            n = sig + 4 + (16 if zip64 else 8)
            if pos + n > len(data):
                raise _Stop
            fmt = "<Q" if zip64 else "<I"
            if struct.unpack_from(fmt, data, pos + sig + 4)[0] != used:
                raise _Stop
            emit(KIND_RAW, pos, n, 0, b"")
            pos += n
    return pos


def _xz_pieces(data: memoryview, budget: int, emit: Callable[[int, int, int, int, bytes], None]) -> int:
    d = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=256 << 20)
    limit = min(budget, XZ_MAX_CONTENT, XZ_RATIO * len(data))
    try:
        content = d.decompress(data, limit + 1)
    except lzma.LZMAError:
        raise _Stop from None
    if len(content) > limit or not d.eof or d.unused_data:
        raise _Stop  # several streams, padding or a bomb: kept raw
    emit(KIND_XZ, 0, len(data), len(content), content)
    return len(data)


def looks_compressed(data: bytes | memoryview) -> bool:
    """Whether `expand` may find streams in `data` (a gzip, zip or xz magic)."""
    head = bytes(data[:6])
    return head[:3] == b"\x1f\x8b\x08" or head[:4] == b"PK\x03\x04" or head == b"\xfd7zXZ\x00"


def expand(data: bytes | memoryview, budget: int = EXPANDED_LIMIT) -> Expanded:
    """The pieces of a gzip, zip or xz file and its expanded bytes; any other
    file (or one beyond `budget` expanded) is one raw piece.  Depends on the
    bytes only: the patcher expands the old file exactly as the diff did."""
    data = memoryview(data).cast("B")
    pieces: list[Piece] = []
    parts: list[bytes | memoryview] = []
    total = [0]

    def emit(kind: int, start: int, size: int, content_size: int, content: bytes) -> None:
        if kind == KIND_RAW:
            if size:
                _append(pieces, parts, Piece(KIND_RAW, start, size, size), data[start:start + size])
            return
        total[0] += content_size
        if total[0] > budget:
            raise _Stop
        _append(pieces, parts, Piece(kind, start, size, content_size), content)

    parser = None
    if data[:3] == b"\x1f\x8b\x08":
        parser = _gzip_pieces
    elif data[:4] == b"PK\x03\x04":
        parser = _zip_pieces
    elif data[:6] == b"\xfd7zXZ\x00":
        parser = _xz_pieces
    end = 0
    if parser is not None:
        try:
            end = parser(data, budget, emit)
        except _Stop:
            pass
        if not any(p.kind != KIND_RAW for p in pieces):
            pieces, parts, end = [], [], 0
        else:
            end = pieces[-1].start + pieces[-1].size
    if end < len(data):
        _append(pieces, parts, Piece(KIND_RAW, end, len(data) - end, len(data) - end), data[end:])
    return Expanded(pieces, b"".join(parts))


# ---------------------------------------------------------------- parameters

def _deflater(p: Params) -> "zlib._Compress":
    return zlib.compressobj(p.a, zlib.DEFLATED, -p.c, p.b, p.d)


def _recreates(stream: memoryview, content: bytes, make: Callable[[], object]) -> bool:
    """Whether the compressor `make()` gives exactly `stream` from `content`, compared as
    it goes so a wrong guess stops at its first differing block."""
    c = make()
    pos = 0
    view = memoryview(content)
    for i in range(0, len(content), COMPARE_STEP):
        out = c.compress(view[i:i + COMPARE_STEP])  # type: ignore[attr-defined]
        if out:
            if stream[pos:pos + len(out)] != out:
                return False
            pos += len(out)
    out = c.flush()  # type: ignore[attr-defined]
    return pos + len(out) == len(stream) and stream[pos:] == out


def _deflate_guesses() -> list[Params]:
    out = []
    for strategy in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED):
        for mem in MEM_LEVELS:
            out += [Params(level, mem, 15, strategy) for level in LEVELS]
    return out


def find_params(kind: int, stream: memoryview, content: bytes,
                first: Params | None = None) -> tuple[int, Params, Blocks] | None:
    """(kind, parameters, blocks) under which this machine's zlib/lzma re-create `stream`
    from `content`: the stream whole, or (deflate) zlib's tokens in the stream's blocks."""
    if kind == KIND_DEFLATE:
        if first is not None and _recreates(stream, content, lambda: _deflater(first)):
            return KIND_DEFLATE, first, ()
        parsed = accel.deflate.tokens(stream, len(content) + 1)
        mems = _zlib_mem_levels(parsed[2])
        for p in _deflate_guesses():
            if p != first and p.b in mems and _recreates(stream, content, lambda p=p: _deflater(p)):
                return KIND_DEFLATE, p, ()
        return _reblocked(stream, content, first, parsed)
    check = stream[7] & 0x0F if len(stream) > 8 else -1
    if check not in (lzma.CHECK_NONE, lzma.CHECK_CRC32, lzma.CHECK_CRC64, lzma.CHECK_SHA256):
        return None
    for preset in XZ_PRESETS:
        for extreme in (0, XZ_EXTREME):
            p = Params(preset | extreme, check, 0, 0)
            if _recreates(stream, content, lambda p=p: _xz(p)):
                return KIND_XZ, p, ()
    return None


def _zlib_mem_levels(blocks: np.ndarray) -> tuple[int, ...]:
    """The memLevels whose zlib could have cut these blocks.  zlib ends a Huffman block when
    its symbol buffer is full, after 2**(memLevel + 6) - 1 tokens; so a first block of any
    other length, not the last, rules zlib out without compressing (GNU gzip's blocks do)."""
    if len(blocks) < 2 or blocks[0][0] == 0:  # one block, or stored: nothing learnt
        return MEM_LEVELS
    return tuple(m for m in MEM_LEVELS if int(blocks[0][1]) == (1 << (m + 6)) - 1)


# guesses tried for their tokens, each a whole compression (a wrong exact guess stops at its
# first block, these do not): the previous member's, then gzip -9's and -6's (zlib level 9 and 6
# at memLevel 8, which is GNU gzip's hash size), then the same at memLevel 9
REBLOCK_GUESSES = (Params(9, 8, 15, 0), Params(6, 8, 15, 0), Params(9, 9, 15, 0), Params(6, 9, 15, 0))


def _reblocked(stream: memoryview, content: bytes, first: Params | None,
               parsed: tuple[int, np.ndarray, np.ndarray, int]) -> tuple[int, Params, Blocks] | None:
    kernel = accel.deflate
    rc, tokens, blocks, used = parsed
    if rc or used != len(stream):
        return None
    for p in dict.fromkeys(([first] if first is not None else []) + list(REBLOCK_GUESSES)):
        rc, ours, _, _ = kernel.tokens(recompress(KIND_DEFLATE, p, content), len(content) + 1)
        if rc or len(ours) != len(tokens) or not np.array_equal(ours, tokens):
            continue
        rc, out = kernel.encode(ours, blocks, content, len(stream))
        if rc == 0 and stream == out:
            return KIND_REBLOCKED, p, tuple((int(t), int(n)) for t, n in blocks)
        return None  # the tokens are zlib's, the trees are not: no other guess helps
    return None


def _xz(p: Params) -> lzma.LZMACompressor:
    preset = (p.a & ~XZ_EXTREME) | (lzma.PRESET_EXTREME if p.a & XZ_EXTREME else 0)
    return lzma.LZMACompressor(lzma.FORMAT_XZ, check=p.b, preset=preset)


def valid_params(kind: int, p: Params) -> bool:
    if kind in (KIND_DEFLATE, KIND_REBLOCKED, KIND_SPLICED):
        return 0 <= p.a <= 9 and 1 <= p.b <= 9 and 9 <= p.c <= 15 and 0 <= p.d <= 4
    return (p.a & ~XZ_EXTREME) <= 9 and p.b in (0, 1, 4, 10) and p.c == p.d == 0


def recompress(kind: int, p: Params, content: bytes | memoryview) -> bytes:
    """The stream of a deflate or xz piece, from its content."""
    c = _xz(p) if kind == KIND_XZ else _deflater(p)
    return c.compress(content) + c.flush()


def restream(piece: Piece, content: bytes | memoryview) -> bytes | None:
    """A stream piece rebuilt from its content (None: it cannot be, at its size)."""
    assert piece.params is not None
    stream = recompress(piece.kind, piece.params, content)
    if piece.kind == KIND_REBLOCKED:
        kernel = accel.deflate
        rc, tokens, _, _ = kernel.tokens(stream, len(content) + 1)
        if rc:
            return None
        rc, stream = kernel.encode(tokens, np.array(piece.blocks, dtype=np.int64).reshape(-1, 2), content,
                                   piece.size)
        if rc:
            return None
    return stream if len(stream) == piece.size else None


def with_params(data: bytes | memoryview, expanded: Expanded) -> Expanded:
    """The expansion of a new file with each stream's parameters, or the stream
    made raw again where no guess re-creates it (the content is re-joined)."""
    data = memoryview(data).cast("B")
    pieces: list[Piece] = []
    parts: list[bytes | memoryview] = []
    offset, last = 0, None
    view = memoryview(expanded.content)
    for piece in expanded.pieces:
        content = view[offset:offset + piece.content_size]
        offset += piece.content_size
        if piece.kind == KIND_RAW:
            _append(pieces, parts, piece, content)
            continue
        stream = data[piece.start:piece.start + piece.size]
        found = find_params(piece.kind, stream, bytes(content), last) if piece.size >= MIN_STREAM else None
        if found is None:
            _append(pieces, parts, Piece(KIND_RAW, piece.start, piece.size, piece.size), stream)
        else:
            kind, params, blocks = found
            last = params if kind != KIND_XZ else last
            _append(pieces, parts, piece._replace(kind=kind, params=params, blocks=blocks), content)
    return Expanded(pieces, b"".join(parts))


# ---------------------------------------------------------------- layout table

def table_version(pieces: list[Piece]) -> int:
    return 1 if all(p.kind in V1_KINDS and p.source < 0 for p in pieces) else PAYLOAD_VERSION


def _old_streams(old: list[Piece]) -> list[int]:
    """Indexes of the old file's stream pieces: a table names them by their rank."""
    return [i for i, p in enumerate(old) if p.kind != KIND_RAW]


def encode_table(pieces: list[Piece], old: list[Piece] | None = None) -> bytes:
    """Columns (kinds, sizes, expanded sizes of streams, parameters, blocks, then for
    version 2 the old streams named and the runs): the new file's table compresses to
    little against the old file's, where most values repeat.  An old stream is named by
    its rank among the old streams relative to this one's rank: 0 for an unchanged member
    of an unchanged zip layout, so a column of them costs next to nothing."""
    enc = Encoder()
    enc.uvarint(len(pieces))
    for p in pieces:
        enc.u8(p.kind)
    for p in pieces:
        enc.uvarint(p.size)
    for p in pieces:
        if p.kind != KIND_RAW:
            enc.uvarint(p.content_size)
    for p in pieces:
        if p.kind != KIND_RAW:
            for v in p.params or Params(0, 0, 0, 0):
                enc.u8(v)
    for p in pieces:
        if p.kind in BLOCK_KINDS:
            enc.uvarint(len(p.blocks))
            for btype, _ in p.blocks:
                enc.u8(btype)
            for _, count in p.blocks:
                enc.uvarint(count)
    if table_version(pieces) == 1:
        return enc.getvalue()
    rank = {index: r for r, index in enumerate(_old_streams(old or []))}
    for r, p in enumerate(q for q in pieces if q.kind != KIND_RAW):
        enc.uvarint(0 if p.source < 0 else 1 + _zigzag(rank[p.source] - r))
    for p in pieces:
        if p.kind == KIND_SPLICED:
            enc.uvarint(len(p.runs))
            token, at = 0, 0
            for r in p.runs:  # gaps: the stretches zlib makes again
                enc.uvarint(r.start - token)
                enc.uvarint(r.content_at - at)
                enc.uvarint(r.old_start)
                enc.uvarint(r.count)
                token, at = r.start + r.count, r.content_at
    return enc.getvalue()


def _zigzag(v: int) -> int:
    return v * 2 if v >= 0 else -v * 2 - 1


def _unzigzag(v: int) -> int:
    return v // 2 if v % 2 == 0 else -(v + 1) // 2


def decode_table(data: bytes, file_size: int, fail: Callable[[str], None], version: int,
                 old: list[Piece]) -> list[Piece]:
    """Pieces of the new file from its table; every size, ratio, parameter and every
    old stream named checked."""
    cur = Cursor(data, fail)
    n = cur.uvarint(max(1, file_size))
    kinds = [cur.u8() for _ in range(n)]
    if any(k not in (V1_KINDS if version == 1 else (KIND_RAW, *STREAM_KINDS)) for k in kinds):
        fail("unknown piece kind")
    sizes = [cur.uvarint(file_size) for _ in range(n)]
    if sum(sizes) != file_size:
        fail("pieces do not add up to the file size")
    expanded = {}
    total = 0
    for i, k in enumerate(kinds):
        if k != KIND_RAW:
            ratio = XZ_RATIO if k == KIND_XZ else DEFLATE_RATIO
            expanded[i] = cur.uvarint(ratio * sizes[i] + 1024)  # a bomb is refused before any work
            total += expanded[i]
    if total > EXPANDED_LIMIT:
        fail(f"declares {total} expanded bytes (limit {EXPANDED_LIMIT})")
    pieces, start = [], 0
    for i, k in enumerate(kinds):
        params = None
        if k != KIND_RAW:
            params = Params(cur.u8(), cur.u8(), cur.u8(), cur.u8())
            if not valid_params(k, params):
                fail(f"invalid {'xz' if k == KIND_XZ else 'deflate'} parameters {tuple(params)}")
        pieces.append(Piece(k, start, sizes[i], expanded.get(i, sizes[i]), params))
        start += sizes[i]
    for i, k in enumerate(kinds):
        if k in BLOCK_KINDS:
            # a block holds at least one token but the last (an empty final block)
            n = cur.uvarint(pieces[i].content_size + 1)
            types = [cur.u8() for _ in range(n)]
            if any(t > 2 for t in types):
                fail("unknown deflate block type")
            pieces[i] = pieces[i]._replace(blocks=tuple((t, cur.uvarint(pieces[i].content_size)) for t in types))
    if version > 1:
        streams = _old_streams(old)
        for r, i in enumerate(i for i, k in enumerate(kinds) if k != KIND_RAW):
            named = cur.uvarint()
            if named == 0:
                if kinds[i] == KIND_SPLICED:
                    fail("a spliced stream names no old stream")
                continue
            rank = r + _unzigzag(named - 1)
            if not 0 <= rank < len(streams) or not _fits_source(pieces[i], old[streams[rank]]):
                fail("a piece names an old stream that does not fit it")
            pieces[i] = pieces[i]._replace(source=streams[rank])
        for i, k in enumerate(kinds):
            if k == KIND_SPLICED:
                pieces[i] = pieces[i]._replace(runs=_decode_runs(cur, pieces[i], fail))
    if cur.remaining():
        fail("trailing bytes after the layout table")
    return pieces


def _fits_source(piece: Piece, old: Piece) -> bool:
    """A spliced stream takes tokens from an old deflate stream; another is an old stream."""
    return old.kind == KIND_DEFLATE if piece.kind == KIND_SPLICED else old.size == piece.size


def _decode_runs(cur: Cursor, piece: Piece, fail: Callable[[str], None]) -> tuple[Run, ...]:
    """Runs in token and content order inside the stream, each but the first after a
    stretch (two runs in a row would have been one).  Gaps count from the previous
    run's start; whether the old tokens cover what the runs claim is checked on use."""
    tokens = sum(count for _, count in piece.blocks)
    n = cur.uvarint(tokens + 1)
    runs: list[Run] = []
    token, at = 0, 0
    for _ in range(n):
        gap = cur.uvarint(tokens)
        start, content_at = token + gap, at + cur.uvarint(piece.content_size)
        old_start, count = cur.uvarint(), cur.uvarint(tokens)
        if count == 0 or start + count > tokens or content_at > piece.content_size \
                or (runs != [] and (gap == 0 or content_at <= at)) or (not runs and (start == 0) != (content_at == 0)):
            fail("spliced runs do not fit the stream")
        runs.append(Run(start, content_at, old_start, count))
        token, at = start + count, content_at
    return tuple(runs)


def reassemble(pieces: list[Piece], content: bytes | memoryview, fail: Callable[[str], None],
               old_data: bytes | memoryview = b"", old: list[Piece] | None = None) -> bytearray:
    """The file from its expanded content: raw pieces copied, streams recompressed (each
    must come out at its recorded size), old streams copied or spliced from."""
    view = memoryview(content).cast("B")
    old_view = memoryview(old_data).cast("B")
    old_tokens: dict[int, np.ndarray] = {}
    out = bytearray()
    offset = 0
    for p in pieces:
        part = view[offset:offset + p.content_size]
        offset += p.content_size
        if p.kind == KIND_RAW:
            out += part
            continue
        if p.source >= 0:
            if old is None or p.source >= len(old) or not _fits_source(p, old[p.source]):
                fail("a piece names an old stream that does not fit it")
                raise AssertionError  # fail raises
            src = old[p.source]
            if p.kind != KIND_SPLICED:
                out += old_view[src.start:src.start + src.size]
                continue
            if p.source not in old_tokens:
                old_tokens[p.source] = stream_tokens(old_view[src.start:src.start + src.size], src.content_size)
            stream = splice(p, old_tokens[p.source], part)
        else:
            stream = restream(p, part)
        if stream is None:
            fail("a recompressed stream differs from the original")
            raise AssertionError  # fail raises
        out += stream
    if offset != len(view):
        fail("expanded content has the wrong size")
    return out


# ---------------------------------------------------------------- old streams: copies and splices

SPLICE_MIN = 64 << 10     # content bytes: smaller streams are cheap to deflate whole
SPLICE_MIN_LEVEL = 4      # zlib's lazy levels insert every string, so a preset dictionary
                          # restarts them exactly; levels 1-3 skip strings inside long matches
SPLICE_RUN = 1024         # tokens: a shorter common run saves less deflating than a restart costs
SPLICE_SAVES = 0.5        # splice only when zlib then deflates at most this share of the content
WINDOW = 32 << 10         # deflate's window: a restarted stretch gets this much history
LOOKAHEAD = 4 << 10       # content past a stretch fed to zlib, so its last tokens are the stream's
_HASH_TOKENS = 16         # tokens per hashed window when looking for common runs


def stream_tokens(stream: bytes | memoryview, content_size: int) -> np.ndarray:
    """An old deflate stream's tokens (empty if it does not parse: then no run fits)."""
    rc, toks, _, _ = accel.deflate.tokens(stream, content_size + 1)
    return toks if rc == 0 else np.zeros(0, np.uint32)


def token_lengths(toks: np.ndarray) -> np.ndarray:
    """Content bytes of each token: 1 for a literal, the length of a match."""
    return np.where(toks < (1 << 16), 1, toks >> 16).astype(np.int64)


def splice(piece: Piece, old_tokens: np.ndarray, content: bytes | memoryview) -> bytes | None:
    """The stream of a KIND_SPLICED piece (None: it cannot be made at its size)."""
    toks = splice_tokens(piece, old_tokens, content)
    if toks is None:
        return None
    rc, stream = accel.deflate.encode(toks, np.array(piece.blocks, dtype=np.int64).reshape(-1, 2),
                                      content, piece.size)
    return stream if rc == 0 and len(stream) == piece.size else None


def splice_tokens(piece: Piece, old_tokens: np.ndarray, content: bytes | memoryview) -> np.ndarray | None:
    """Old runs and the stretches between them, deflated again from a clean point: the
    tokens zlib gives the whole content, made from a fraction of it."""
    assert piece.params is not None
    view = memoryview(content).cast("B")
    total = sum(count for _, count in piece.blocks)
    parts: list[np.ndarray] = []
    token, at = 0, 0
    for r in (*piece.runs, Run(total, len(view), 0, 0)):
        if r.start > token:
            stretch = _stretch(piece.params, view, at, r.content_at, r.start - token)
            if stretch is None:
                return None
            parts.append(stretch)
            at = r.content_at
        elif r.content_at != at:
            return None
        if r.count:
            if r.old_start + r.count > len(old_tokens):
                return None
            copied = old_tokens[r.old_start:r.old_start + r.count]
            parts.append(copied)
            at = r.content_at + int(token_lengths(copied).sum())
        token = r.start + r.count
    if at != len(view):
        return None
    return np.concatenate(parts) if parts else np.zeros(0, np.uint32)


def _stretch(p: Params, content: memoryview, start: int, end: int, count: int) -> np.ndarray | None:
    """zlib's first `count` tokens of content[start:], which must cover content[start:end]."""
    if not start <= end <= len(content):
        return None
    history = min(start, WINDOW)
    zdict = bytes(content[start - history:start])
    c = zlib.compressobj(p.a, zlib.DEFLATED, -p.c, p.b, p.d, **({"zdict": zdict} if history else {}))
    stream = c.compress(content[start:min(len(content), end + LOOKAHEAD)]) + c.flush()
    rc, toks, _, _ = accel.deflate.tokens(stream, end - start + LOOKAHEAD + 1, history)
    if rc or len(toks) < count:
        return None
    toks = toks[:count]
    return toks if int(token_lengths(toks).sum()) == end - start else None


def link_to_old(old_data: bytes | memoryview, old: Expanded, new_data: bytes | memoryview,
                new: Expanded) -> Expanded:
    """New streams that are an old stream byte for byte name it (copied on patch, not
    deflated); large deflate streams that share runs of tokens with the old stream in
    their place become KIND_SPLICED (a fraction to deflate on patch)."""
    old_view, new_view = memoryview(old_data).cast("B"), memoryview(new_data).cast("B")
    by_bytes: dict[tuple[int, bytes], int] = {}
    old_deflate = []
    for i, p in enumerate(old.pieces):
        if p.kind != KIND_RAW:
            by_bytes.setdefault((p.size, hashlib.sha256(old_view[p.start:p.start + p.size]).digest()), i)
        if p.kind == KIND_DEFLATE:
            old_deflate.append(i)
    pieces: list[Piece] = []
    parts: list[bytes | memoryview] = []
    content = memoryview(new.content)
    offset, ordinal = 0, 0
    for piece in new.pieces:
        part = content[offset:offset + piece.content_size]
        offset += piece.content_size
        stream = new_view[piece.start:piece.start + piece.size]
        same = by_bytes.get((piece.size, hashlib.sha256(stream).digest())) if piece.kind != KIND_RAW else None
        if same is not None:
            piece = piece._replace(source=same)
        elif piece.kind in (KIND_DEFLATE, KIND_REBLOCKED) and piece.content_size >= SPLICE_MIN:
            for index in _splice_sources(old.pieces, old_deflate, ordinal, piece.content_size):
                src = old.pieces[index]
                spliced = _plan_splice(piece, stream, part, old_view[src.start:src.start + src.size], src)
                if spliced is not None:
                    piece = spliced._replace(source=index)
                    break
        if piece.kind in (KIND_DEFLATE, KIND_REBLOCKED, KIND_SPLICED):
            ordinal += 1
        _append(pieces, parts, piece, part)
    return Expanded(pieces, b"".join(parts))


def _splice_sources(old: list[Piece], deflate: list[int], ordinal: int, content_size: int) -> list[int]:
    """Old deflate streams to try splicing from: the one in this stream's place, then the
    one nearest in content size (a zip that gained or lost members shifts the places)."""
    large = [i for i in deflate if old[i].content_size >= SPLICE_MIN // 2]
    out = [deflate[ordinal]] if ordinal < len(deflate) and deflate[ordinal] in large else []
    if large:
        out.append(min(large, key=lambda i: abs(old[i].content_size - content_size)))
    return list(dict.fromkeys(out))


def _plan_splice(piece: Piece, stream: memoryview, content: memoryview, old_stream: memoryview,
                 old_piece: Piece) -> Piece | None:
    """The piece as KIND_SPLICED, when that rebuilds it exactly and saves most of the deflating."""
    assert piece.params is not None
    if piece.params.a < SPLICE_MIN_LEVEL:
        return None
    kernel = accel.deflate
    rc, toks, blocks, used = kernel.tokens(stream, len(content) + 1)
    old_toks = stream_tokens(old_stream, old_piece.content_size)
    if rc or used != len(stream) or not len(old_toks):
        return None
    rc, again = kernel.encode(toks, blocks, content, len(stream))
    if rc or again != stream:
        return None  # our encoder does not write this stream: nothing to splice into
    offsets = np.concatenate(([0], np.cumsum(token_lengths(toks))))
    common = kernel.common_runs(toks, old_toks, _HASH_TOKENS, SPLICE_RUN).tolist()
    runs = [Run(s, int(offsets[s]), o, n) for s, o, n in common]
    if sum(r.count for r in runs) == 0:
        return None
    runs = _clean_ends(runs, toks, offsets)
    stretched = len(content) - sum(int(offsets[r.start + r.count] - offsets[r.start]) for r in runs)
    if not runs or stretched > SPLICE_SAVES * len(content):
        return None
    spliced = piece._replace(kind=KIND_SPLICED, blocks=tuple((int(t), int(n)) for t, n in blocks), runs=tuple(runs))
    made = splice_tokens(spliced, old_toks, content)
    if made is None or not np.array_equal(made, toks):
        return None
    return spliced


def _clean_ends(runs: list[Run], toks: np.ndarray, offsets: np.ndarray) -> list[Run]:
    """Runs ended after a match token, unless at the stream's end: there zlib's lazy
    matcher holds nothing pending, so the stretch after starts as a fresh stream would."""
    out = []
    for r in runs:
        end = r.start + r.count
        if end < len(toks):
            while end > r.start and toks[end - 1] < (1 << 16):
                end -= 1
        if end - r.start >= SPLICE_RUN:
            out.append(r._replace(count=end - r.start))
    return out


# ---------------------------------------------------------------- zlib fingerprint

# a build that deflates otherwise differs on a few KiB at the common levels already (zlib-ng does
# at every level); 6 small runs keep this to ~1 ms of the first patch
_PROBE_PARAMS = tuple(Params(level, 8, 15, s) for s in (0, 1) for level in (1, 6, 9))
PROBE_SIZE = 4 << 10
_fingerprint: bytes | None = None


def _probe() -> bytes:
    """PROBE_SIZE text-like bytes, always the same: words from a fixed generator."""
    words = [b"the", b"delta", b"of", b"a", b"container", b"image", b"layer", b"file", b"zlib", b"\n"]
    out, x = bytearray(), 12345
    while len(out) < PROBE_SIZE:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out += words[(x >> 16) % len(words)] + b" " + str(x % 997).encode() + b" "
    return bytes(out[:PROBE_SIZE])


def zlib_fingerprint() -> bytes:
    """8 bytes that differ between zlib builds whose deflate output differs (zlib-ng,
    a patched zlib): a delta says which it was checked with, a patcher compares."""
    global _fingerprint
    if _fingerprint is None:
        h = hashlib.sha256(b"d4c/zlib/v1\n")
        probe = _probe()
        for p in _PROBE_PARAMS:
            h.update(recompress(KIND_DEFLATE, p, probe))
        _fingerprint = h.digest()[:8]
    return _fingerprint


def uses_zlib(pieces: list[Piece]) -> bool:
    """Whether rebuilding these pieces needs a zlib that deflates as the diff's did."""
    return any(p.kind in (KIND_DEFLATE, KIND_REBLOCKED, KIND_SPLICED) for p in pieces)


def content_tag(content: bytes | memoryview) -> bytes:
    """8 bytes naming an expanded old file, so a patcher whose parser expanded it
    otherwise says so instead of producing garbage."""
    return hashlib.sha256(content).digest()[:8]


# ---------------------------------------------------------------- payload

class Header(NamedTuple):
    fingerprint: bytes
    old_size: int        # expanded old file
    old_tag: bytes
    pieces: list[Piece]
    inner_method: int
    inner_at: int        # where the inner payload starts


def encode_header(old: Expanded, new: Expanded, inner_method: int) -> bytes:
    old_table = encode_table(old.pieces)
    table = encode_table(new.pieces, old.pieces)
    frame = zstandard.ZstdCompressor(level=19, dict_data=zstandard.ZstdCompressionDict(
        old_table, dict_type=zstandard.DICT_TYPE_RAWCONTENT)).compress(table)
    enc = Encoder()
    enc.u8(table_version(new.pieces))
    enc.raw(zlib_fingerprint() if uses_zlib(new.pieces) else bytes(8))
    enc.uvarint(len(old.content))
    enc.raw(content_tag(old.content))
    enc.uvarint(len(table))
    enc.uvarint(len(frame))
    enc.raw(frame)
    enc.u8(inner_method)
    return enc.getvalue()


def decode_header(payload: memoryview, old: Expanded, file_size: int, fail: Callable[[str], None]) -> Header:
    cur = Cursor(payload, fail)
    version = cur.u8()
    if version not in READ_PAYLOAD_VERSIONS:
        fail(f"recompression payload version {version} is not supported "
             f"(this d4c reads {', '.join(map(str, READ_PAYLOAD_VERSIONS))})")
    fingerprint = cur.raw(8)
    old_size = cur.uvarint()
    old_tag = cur.raw(8)
    table_size = cur.uvarint(64 * max(file_size, 1024))
    frame = cur.raw(cur.uvarint(len(payload)))
    old_table = encode_table(old.pieces)
    try:
        # bounded: a frame header may declare any size, and decompress() would allocate it
        table = read_bounded(frame, table_size, prefix=zstandard.ZstdCompressionDict(
            old_table, dict_type=zstandard.DICT_TYPE_RAWCONTENT))
    except zstandard.ZstdError:
        fail("the layout table does not decompress")
        raise AssertionError  # fail raises
    if len(table) != table_size:
        fail("the layout table has the wrong size")
    pieces = decode_table(table, file_size, fail, version, old.pieces)
    inner = cur.u8()
    return Header(fingerprint, old_size, old_tag, pieces, inner, cur.pos)
