"""Compressing file bodies: zstd frames per distinct content, spooled to disk.

Workers compress in parallel, each into its own spool file (no lock on the hot
path; zstd and sha256 release the GIL).  The image writer later copies the
frames it needs, in canonical path order, so the output does not depend on
thread count or on the order files were read.  Memory stays bounded by the
read chunk size times the number of threads, whatever the file sizes.
"""

from __future__ import annotations

import os
import threading
from typing import BinaryIO, Iterable, NamedTuple

import zstandard

from ..errors import BadInput
from ..fsutil import copy_range
from ..digests import sha256

DEFAULT_LEVEL = 3
READ_CHUNK = 1 << 20
FRAME_CHUNK = 1 << 20  # content bytes per zstd frame of a body (format constant: docs/FORMAT.md)


class Frame(NamedTuple):
    spool: int      # index of the spool file (-1: a range of the file `fd`)
    offset: int
    length: int
    fd: int = -1    # add_ref: an open file the blob is copied from


class Body(NamedTuple):
    digest: bytes
    size: int


class BodySpool:
    def __init__(self, tmpdir: str | None = None, level: int = DEFAULT_LEVEL) -> None:
        if not 1 <= level <= 22:
            raise BadInput(f"compression level {level} out of range 1..22")
        self.level = level
        self._tmpdir = tmpdir
        self._files: list[BinaryIO] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._frames: dict[object, Frame] = {}

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
        index, f, cctx = self._mine()
        start = f.seek(0, os.SEEK_END)
        h = sha256()
        seen = 0
        cobj = cctx.compressobj(size=min(size, FRAME_CHUNK))
        frame_end = min(size, FRAME_CHUNK)
        for chunk in chunks:
            if seen + len(chunk) > size:
                raise BadInput(f"{what}: changed while reading (grew)")
            h.update(chunk)
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
        if seen != size:
            raise BadInput(f"{what}: changed while reading ({seen} of {size} bytes)")
        f.write(cobj.flush())
        end = f.tell()
        digest = h.digest()
        frame = Frame(index, start, end - start)
        with self._lock:
            self._frames.setdefault(digest, frame)
        return Body(digest, size)

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
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> "BodySpool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_chunks(f: BinaryIO) -> Iterable[bytes]:
    while True:
        chunk = f.read(READ_CHUNK)
        if not chunk:
            return
        yield chunk
