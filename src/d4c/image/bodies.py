"""Compressing file bodies: zstd frames per distinct content, spooled to disk.

Workers compress in parallel, each into its own spool file (no lock on the hot
path; zstd and sha256 release the GIL).  The image writer later copies the
frames it needs, in canonical path order, so the output does not depend on
thread count or on the order files were read.  Memory stays bounded by the
read chunk size times the number of threads, whatever the file sizes.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import threading
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple, Sequence

import zstandard

from .. import accel
from ..errors import BadInput
from ..fsutil import copy_range
from ..digests import sha256
from ..progress import Progress
from ..zstdframes import MAX_WINDOW_LOG
from .tree import Entry, EntryType

DEFAULT_LEVEL = 3      # format 1's default, and of the scratch images commands write for themselves
GROUPED_LEVEL = 19     # format 2's default: made once, pulled by every device over a thin link
DEFAULT_FORMAT = 2     # what convert, pack, patch and the server's full images write
READ_CHUNK = 1 << 20
FRAME_CHUNK = 1 << 20  # content bytes per zstd frame of a body (format constant: docs/FORMAT.md)
GROUP_FILE_MAX = FRAME_CHUNK  # format 2: bodies up to one frame's content are grouped
MAX_X86_BODY = 64 << 20  # x86-converted FRAME bodies are at most this large (readers decode them whole)
# content per group frame, and the dictionary they are coded against: evenly spaced slices of
# all grouped content, decoded once per open image.  nginx image (105 MB of grouped content, its
# `zstd -19` as one stream 28.13 MB), level 19: groups alone, 1 MiB 43.0 MB of image, 4 MiB 39.1;
# 256 KiB groups with an 8 MiB dictionary 1.081 x the one stream, 16 MiB 1.045, 24 MiB 1.039,
# 32 MiB 1.031; 64 KiB slices beat 32 and 128 KiB; 512 KiB groups 1.039.  A cold read of a small
# file decodes its group: 0.3 ms for 256 KiB, where 4 MiB groups took ~10 ms.  With level 19's
# chain_log (24) its binary tree kept only the newest 8 M positions of the 16 MiB dictionary;
# reaching all of it (GroupCoder): the nginx image 38.45 -> 38.13 MB, pack 40 -> 52 s here,
# pack's peak RSS 324 -> 520 MB (each thread's compressor holds a copy of the larger tables).
# With x86 programs converted (is_x86_program) and a 32 MiB dictionary: 36.68 MB, 0.991 x
# `tar | zstd -19` (16 MiB: 37.25, 1.006); pack 58 s, peak RSS 970 MB; readers keep 32 MiB.
# 128 KiB groups then: 36.84 MB (0.995 x), and a cold small-file read decodes 0.27 ms of
# group where 256 KiB took 0.40 (median group; through a mount 1.13 -> 0.83 ms, format 1 0.54).
GROUP_TARGET = 128 << 10
DICT_TARGET = 32 << 20
DICT_SLICE = 64 << 10
DICT_MIN_CONTENT = 4 * GROUP_TARGET  # less grouped content than this: no dictionary
# zstd decodes a block at a time, so a cold read decoded up to 128 KiB (a whole block) to reach
# the first bytes of a group; blocks that end at a body start every BLOCK_MIN bytes or more
# (8 KiB: the nginx groups came out 0.1 % smaller than zstd's own blocks, 4 KiB as large)
# cut decoding the first 100 bytes 0.064 -> 0.03 ms.  Readers need not know: a frame is a frame.
BLOCK_MIN = 8 << 10
GROUP_CODER = 5  # bumped when group frames come out otherwise (the benches key cached images by it)


def base_level(image_format: int, level: int | None = None) -> int:
    """`level`, or the default of a base image written in `image_format`."""
    if level is not None:
        return level
    return GROUPED_LEVEL if image_format == 2 else DEFAULT_LEVEL


class Frame(NamedTuple):
    spool: int      # index of the spool file (-1: a range of the file `fd`)
    offset: int
    length: int
    fd: int = -1    # add_ref: an open file the blob is copied from


def is_x86_program(head: bytes | memoryview) -> bool:
    """An ELF file for x86 or x86-64 (little-endian), judged on its first 20 bytes: format 2
    stores such bodies x86-converted (accel.x86; the nginx image 38.13 -> 37.25 MB)."""
    return (len(head) >= 20 and head[:4] == b"\x7fELF" and head[5] == 1
            and bytes(head[18:20]) in (b"\x3e\x00", b"\x03\x00"))


def x86_encoded(data: bytes) -> bytes:
    buf = bytearray(data)
    accel.x86.encode(buf, 0, len(buf))
    return bytes(buf)


class Body(NamedTuple):
    digest: bytes
    size: int


class GroupPlan(NamedTuple):
    """A group frame being written: its spooled blob and the bodies in it, in order."""
    key: object
    digests: list[bytes]
    offsets: list[int]  # of each body in the group's content
    usize: int


class BodySpool:
    """grouped (image format 2): bodies of at most GROUP_FILE_MAX bytes are spooled
    raw, and group_bodies later compresses them together in group frames; x86
    programs of at most MAX_X86_BODY bytes are stored x86-converted (`x86`: their digests)."""

    def __init__(self, tmpdir: str | None = None, level: int = DEFAULT_LEVEL, grouped: bool = False) -> None:
        if not 1 <= level <= 22:
            raise BadInput(f"compression level {level} out of range 1..22")
        self.level = level
        self.grouped = grouped
        self._raw: dict[bytes, Frame] = {}  # grouped: digest -> its content, spooled uncompressed
        self._tmpdir = tmpdir
        self._files: list[BinaryIO] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._frames: dict[object, Frame] = {}
        self.dictionary: GroupPlan | None = None  # group_bodies: the dictionary frame, if it made one
        self.x86: set[bytes] = set()  # digests of the contents stored x86-converted

    # each thread writes only to its own spool file and uses its own compressor
    def _mine(self) -> tuple[int, BinaryIO, zstandard.ZstdCompressor]:
        mine = getattr(self._local, "mine", None)
        if mine is None:
            import tempfile  # writers only
            f = tempfile.TemporaryFile(dir=self._tmpdir, prefix="d4c-spool-")
            with self._lock:
                self._files.append(f)
                index = len(self._files) - 1
            cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                            write_content_size=True, threads=0)
            mine = self._local.mine = (index, f, cctx)
        return mine

    def add_chunks(self, chunks: Iterable[bytes], size: int, what: str) -> Body:
        """Compress content given as chunks totalling exactly `size` bytes: one
        zstd frame per FRAME_CHUNK bytes of content (docs/FORMAT.md, "Bodies"),
        so a reader can decompress a large body in pieces, in parallel."""
        if size == 0:
            for chunk in chunks:
                if chunk:
                    raise BadInput(f"{what}: changed while reading (grew)")
            return Body(sha256(b"").digest(), 0)
        if self.grouped and size <= GROUP_FILE_MAX:
            return self._add_raw_body(chunks, size, what)
        if self.grouped and size <= MAX_X86_BODY:
            head, chunks = _peek(chunks, 20)
            if is_x86_program(head):
                return self._add_x86_body(chunks, size, what)
        index, f, cctx = self._mine()
        start = f.seek(0, os.SEEK_END)
        h = sha256()
        seen = 0
        cobj = cctx.compressobj(size=min(size, FRAME_CHUNK))
        frame_end = min(size, FRAME_CHUNK)
        for chunk in _checked_chunks(chunks, size, what, h):
            view = memoryview(chunk)
            while len(view):
                take = view[:frame_end - seen]
                out = cobj.compress(take)
                if out:
                    f.write(out)
                seen += len(take)
                view = view[len(take):]
                if seen == frame_end and seen < size:
                    f.write(cobj.flush())
                    cobj = cctx.compressobj(size=min(size - seen, FRAME_CHUNK))
                    frame_end = min(size, seen + FRAME_CHUNK)
        f.write(cobj.flush())
        end = f.tell()
        digest = h.digest()
        frame = Frame(index, start, end - start)
        with self._lock:
            self._frames.setdefault(digest, frame)
        return Body(digest, size)

    def _add_x86_body(self, chunks: Iterable[bytes], size: int, what: str) -> Body:
        """A large program: each FRAME_CHUNK of content x86-converted on its own, then
        compressed, so a reader decodes any frame alone."""
        index, f, cctx = self._mine()
        start = f.seek(0, os.SEEK_END)
        h = sha256()
        frame = bytearray()

        def write_frame() -> None:
            accel.x86.encode(frame, 0, len(frame))
            f.write(cctx.compress(frame))
            frame.clear()
        for chunk in _checked_chunks(chunks, size, what, h):
            view = memoryview(chunk)
            while len(view):
                take = view[:FRAME_CHUNK - len(frame)]
                frame += take
                view = view[len(take):]
                if len(frame) == FRAME_CHUNK:
                    write_frame()
        if frame:
            write_frame()
        digest = h.digest()
        with self._lock:
            self._frames.setdefault(digest, Frame(index, start, f.tell() - start))
            self.x86.add(digest)
        return Body(digest, size)

    def _add_raw_body(self, chunks: Iterable[bytes], size: int, what: str) -> Body:
        data = b"".join(chunks)
        if len(data) != size:
            raise BadInput(f"{what}: changed while reading ({len(data)} of {size} bytes)")
        digest = sha256(data).digest()
        index, f, _ = self._mine()
        start = f.tell()
        f.write(data)
        with self._lock:
            self._raw.setdefault(digest, Frame(index, start, size))
            if is_x86_program(data[:20]):
                self.x86.add(digest)
        return Body(digest, size)

    def group_bodies(self, entries: list[Entry], threads: int = 1) -> list[GroupPlan]:
        """Compress the raw-spooled bodies in group frames: the holders (first file of
        each content, in canonical order) sorted by extension then name, so that like
        files share a frame, cut after GROUP_TARGET bytes of content, coded against
        `self.dictionary` when the content is large enough for one.  Each frame is
        one single-threaded zstd frame: the bytes do not depend on `threads`."""
        from ..parallel import run_parallel

        seen: set[bytes] = set()
        holders = []
        for e in entries:
            if e.type == EntryType.FILE and e.digest in self._raw and e.digest not in seen:
                seen.add(e.digest)
                holders.append(e)
        holders.sort(key=_group_order)
        plans: list[GroupPlan] = []
        digests: list[bytes] = []
        offsets: list[int] = []
        at = 0
        for e in holders:
            assert e.digest is not None
            digests.append(e.digest)
            offsets.append(at)
            at += e.size
            if at >= GROUP_TARGET:
                plans.append(GroupPlan(("group", len(plans)), digests, offsets, at))
                digests, offsets, at = [], [], 0
        if digests:
            plans.append(GroupPlan(("group", len(plans)), digests, offsets, at))
        for f in self._files:
            f.flush()
        dictionary = self._dictionary_content(holders, sum(p.usize for p in plans))
        self.dictionary = GroupPlan(("dictionary",), [], [], len(dictionary)) if dictionary else None

        coder = GroupCoder(self.level, dictionary)

        def compress(plan: GroupPlan) -> None:
            if plan is self.dictionary:
                self.add_raw(plan.key, GroupCoder(self.level).compress(dictionary))
                return
            self.add_raw(plan.key, coder.compress(b"".join(self._grouped_content(d) for d in plan.digests), plan.offsets))

        jobs = ([self.dictionary] if self.dictionary else []) + plans
        with Progress("grouping", total_items=len(jobs)) as progress:
            run_parallel(lambda plan: (compress(plan), progress.advance(plan.usize, 1)), jobs, threads)
        return plans

    def _dictionary_content(self, holders: list[Entry], total: int) -> bytes:
        """DICT_SLICE-byte slices of the grouped content (holders back to back), evenly
        spaced, up to DICT_TARGET or half the content; empty for little content."""
        if total < DICT_MIN_CONTENT:
            return b""
        count = min(DICT_TARGET, total // 2) // DICT_SLICE
        step = total // count
        starts, at = [], 0
        for e in holders:
            starts.append(at)
            at += e.size
        out = bytearray()
        for k in range(count):
            pos, end = k * step, k * step + DICT_SLICE
            i = bisect.bisect_right(starts, pos) - 1
            while pos < end and i < len(holders):
                body = self._grouped_content(holders[i].digest)  # type: ignore[arg-type]
                take = body[pos - starts[i]:end - starts[i]]
                out += take
                pos += len(take)
                i += 1
        return bytes(out)

    def _grouped_content(self, digest: bytes) -> bytes:
        """A grouped body as its group frame holds it (x86 programs converted)."""
        frame = self._raw[digest]
        data = os.pread(self._files[frame.spool].fileno(), frame.length, frame.offset)
        return x86_encoded(data) if digest in self.x86 else data

    def add_raw(self, key: object, data: bytes) -> None:
        """Keep an already encoded blob (a delta payload, a frame made
        elsewhere) under `key`, for copy_frames."""
        index, f, _ = self._mine()
        start = f.tell()  # spool files are only appended to (a seek would flush: 800 blobs, 800 writes)
        f.write(data)
        with self._lock:
            self._frames.setdefault(key, Frame(index, start, len(data)))  # type: ignore[arg-type]

    def add_ref(self, key: object, fd: int, offset: int, length: int) -> None:
        """A blob that already lies in an open file (a merge's stored frames
        and delta payloads): copy_frames copies it from there, and blobs
        back to back in that file in one go.  `fd` must stay open until then."""
        with self._lock:
            self._frames.setdefault(key, Frame(-1, offset, length, fd))

    def add_file(self, f: BinaryIO, size: int, what: str) -> Body:
        return self.add_chunks(_read_chunks(f), size, what)

    def add_bytes(self, data: bytes, what: str = "data") -> Body:
        return self.add_chunks([data], len(data), what)

    def frame_lengths(self) -> dict[object, int]:
        return {d: fr.length for d, fr in self._frames.items()}

    def copy_frames(self, keys: Iterable[object], out: BinaryIO) -> None:
        """Copy the blobs of `keys`, in that order, to `out`; blobs that lie back
        to back in one file (a merge's stored frames and chains) go in one copy."""
        for f in self._files:
            f.flush()
        run: tuple[int, int, int] | None = None  # source fd, offset, length
        for key in keys:
            frame = self._frames[key]
            fd = frame.fd if frame.spool < 0 else self._files[frame.spool].fileno()
            if run is not None and run[0] == fd and run[1] + run[2] == frame.offset:
                run = (fd, run[1], run[2] + frame.length)
                continue
            if run is not None:
                copy_range(*run, out)
            run = (fd, frame.offset, frame.length)
        if run is not None:
            copy_range(*run, out)

    def close(self) -> None:
        """Every spool file, even when one's close fails (a full disk fails the
        flush of buffered bytes nobody will read): none stays open."""
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._files.clear()

    def __enter__(self) -> "BodySpool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroupCoder:
    """Compresses group frames, against `dictionary` if one is given.  The dictionary is
    loaded into zstd's match finder once (at level 19 that is most of a group's work) and
    shared by every thread; the parameters follow the largest group, so the bytes do not
    depend on the thread count, and the window reaches all of the dictionary."""

    def __init__(self, level: int, dictionary: bytes = b"") -> None:
        self.level = level
        self._dictionary: zstandard.ZstdCompressionDict | None = None
        if dictionary:
            largest = len(dictionary) + GROUP_TARGET + GROUP_FILE_MAX
            params = zstandard.ZstdCompressionParameters.from_level(level, source_size=largest)
            window_log = min(MAX_WINDOW_LOG, (largest - 1).bit_length())
            # the binary-tree strategies (levels 13+) keep 2 ** (chain_log - 1) positions: with the
            # level's own chain_log, the older half of a 16 MiB dictionary was out of their reach
            reach = (len(dictionary) - 1).bit_length() + 1 if params.strategy >= zstandard.STRATEGY_BTLAZY2 else 0
            self._params = zstandard.ZstdCompressionParameters.from_level(
                level, source_size=largest, window_log=window_log,
                chain_log=max(params.chain_log, min(reach, window_log + 1)),
                write_checksum=True, write_content_size=True, threads=0)
            self._dictionary = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            self._dictionary.precompute_compress(compression_params=self._params)
        self._mine = threading.local()

    def compress(self, content: bytes, starts: Sequence[int] = ()) -> bytes:
        """One group frame; with the bodies' `starts`, zstd blocks end at body starts
        once BLOCK_MIN bytes have gone by (see BLOCK_MIN).  Each thread keeps its
        compressor: zstd copies the dictionary's tables into it for every frame, and a
        fresh one's tables (hundreds of MB at level 19 with a 32 MiB dictionary) were new
        memory each time (a 128 KiB group 0.25 -> 0.17 s)."""
        compressor = getattr(self._mine, "compressor", None)
        if compressor is None:
            compressor = self._mine.compressor = (
                zstandard.ZstdCompressor(level=self.level, write_checksum=True, write_content_size=True)
                if self._dictionary is None else
                zstandard.ZstdCompressor(compression_params=self._params, dict_data=self._dictionary))
        cuts, last = [], 0
        for start in starts:
            if start - last >= BLOCK_MIN:
                cuts.append(start)
                last = start
        if not cuts:
            return compressor.compress(content)
        stream = compressor.compressobj(size=len(content))
        out, at = [], 0
        with memoryview(content) as view:
            for cut in cuts:
                out.append(stream.compress(view[at:cut]))
                out.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
                at = cut
            out.append(stream.compress(view[at:]))
        out.append(stream.flush())
        return b"".join(out)


def _checked_chunks(chunks: Iterable[bytes], size: int, what: str, h: Any) -> Iterator[bytes]:
    """`chunks`, hashed into `h` as they pass; BadInput once they total more than
    `size`, or at the end less (the file changed while it was read)."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > size:
            raise BadInput(f"{what}: changed while reading (grew)")
        h.update(chunk)
        yield chunk
    if seen != size:
        raise BadInput(f"{what}: changed while reading ({seen} of {size} bytes)")


def _peek(chunks: Iterable[bytes], n: int) -> tuple[bytes, Iterable[bytes]]:
    """The first `n` bytes of a chunk stream (fewer if it is shorter), and the whole stream."""
    it = iter(chunks)
    taken: list[bytes] = []
    have = 0
    while have < n:
        chunk = next(it, None)
        if chunk is None:
            break
        taken.append(chunk)
        have += len(chunk)
    return b"".join(c[:n] for c in taken)[:n], itertools.chain(taken, it)


def _read_chunks(f: BinaryIO) -> Iterable[bytes]:
    while True:
        chunk = f.read(READ_CHUNK)
        if not chunk:
            return
        yield chunk


def _group_order(e: Entry) -> tuple[bytes, bytes, bytes]:
    """Extension, then name, then path (measured on the nginx image with 4 MiB groups:
    39.05 MB, against 39.50 by extension then directory, 39.54 in path order)."""
    name = e.name
    dot = name.rfind(b".", 1)
    return (name[dot + 1:] if dot > 0 else b"", name, e.path)
