"""The on-disk cache of files rebuilt from deltas: byte-budgeted, least
recently used first out, one build per digest at a time, and an entry left by an
earlier mount checked against its digest before it is used."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from typing import Callable, Iterator

from ..digests import file_sha256
from ..diskcache import DiskCache
from ..errors import CorruptImage


FULL = (errno.ENOSPC, errno.EDQUOT)  # a write that eviction may make room for


class BodyCache:
    """Rebuilt file bodies on disk, by content digest, evicted least recently
    used beyond `limit` bytes.  A body being served stays on disk until closed
    (an unlinked file stays readable through its open descriptor).

    A body is written to a temp name and renamed; one left by an earlier mount
    is checked against its digest at its first open (a crash may have torn it,
    or anyone touched it since) and rebuilt if it does not match, so no fsync
    is needed: that would cost a journal commit per rebuilt file on an SD card.
    A full disk evicts least recently used bodies until the new one fits, when
    evicting can make room, and tries once more."""

    def __init__(self, directory: str, limit: int) -> None:
        # a previous mount's bodies are reused; a --cache-dir may hold other files
        self.entries: DiskCache[bytes] = DiskCache(directory, limit, bytes.hex, _digest_of_name)
        self.dir = directory
        self._lock = threading.Lock()
        self._checked: set[bytes] = set()  # bodies built or checked by this process
        self._evict()

    @property
    def limit(self) -> int:
        return self.entries.limit

    def path(self, digest: bytes) -> str:
        return self.entries.path(digest)

    def open(self, digest: bytes, size: int, build: Callable[[], bytes | Iterator[bytes]]) -> int:
        """An fd of the cached body; `build()` makes it on a miss, whole or as
        chunks (a body larger than memory), and must check it against `digest`
        (Image.read_body and Image.body_chunks do: a chunk stream raises at its
        end on a mismatch, before the body is kept).  Concurrent first reads of
        one body build it once."""
        with self.entries.build_lock(digest):
            fd = self._open_cached(digest, size)
            if fd >= 0:
                return fd
            made = build()
            try:
                fd = self._write(digest, size, made)
            except OSError as exc:
                if exc.errno not in FULL:
                    raise
                if not isinstance(made, bytes) and hasattr(made, "close"):
                    made.close()  # the stream cut short: its decoder goes before a second one starts
                if not self._make_room(size, keep=digest):
                    raise OSError(exc.errno, f"body cache {self.dir}: no room for a {size}-byte body") from None
                try:
                    fd = self._write(digest, size, made if isinstance(made, bytes) else build())
                except OSError as again:
                    if again.errno not in FULL:
                        raise
                    raise OSError(again.errno, f"body cache {self.dir}: no room for a {size}-byte body") from None
            self.entries.added(digest, size)
            with self._lock:
                self._checked.add(digest)
            self._evict(keep=digest)  # the fd stays readable if another thread's eviction unlinks it
            return fd

    def _write(self, digest: bytes, size: int, body: bytes | Iterator[bytes]) -> int:
        """Write a body under its digest's name (a temp name, then a rename): an
        fd opened before the rename, so an eviction cannot take it from the caller."""
        tmp_name = self.entries.temp_path()
        fd = -1
        try:
            try:
                tmp = open(tmp_name, "xb")
            except FileNotFoundError:  # the cache directory was removed under the mount: made again
                os.makedirs(self.dir, mode=0o700, exist_ok=True)
                tmp = open(tmp_name, "xb")
            with tmp:
                written = 0
                for chunk in [body] if isinstance(body, bytes) else body:
                    tmp.write(chunk)
                    written += len(chunk)
                if written != size:  # build() checked the digest; a wrong size means a wrong caller
                    raise CorruptImage("stack", f"rebuilt body has {written} bytes, expected {size}")
            fd = os.open(tmp_name, os.O_RDONLY | os.O_CLOEXEC)
            os.rename(tmp_name, self.path(digest))
            return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):  # renamed already, or cleared by another mount
                os.unlink(tmp_name)
            raise

    def _make_room(self, size: int, keep: bytes) -> bool:
        """Evict least recently used bodies until `size` bytes are free; False,
        evicting nothing, when even all of them would not make that room.
        (A body still open frees its space only when closed.)"""
        def free() -> int:
            st = os.statvfs(self.dir)
            return st.f_bavail * st.f_frsize

        others = self.entries.used - (self.entries.lookup(keep) or 0)
        if free() + others < size:
            return False
        self._evict(keep, enough=lambda: free() >= size)
        return True

    def _open_cached(self, digest: bytes, size: int) -> int:
        if self.entries.lookup(digest) is None:
            return -1
        with self._lock:
            checked = digest in self._checked
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.entries.forget(digest)
            return -1
        try:
            usable = os.fstat(fd).st_size == size and (checked or self._matches(fd, digest))
        except BaseException:
            os.close(fd)
            raise
        if not usable:
            os.close(fd)
            self.entries.forget(digest)
            return -1
        return fd

    def _matches(self, fd: int, digest: bytes) -> bool:
        """A body from an earlier mount hashes to its name (then it is not hashed again)."""
        with open(fd, "rb", closefd=False) as f:
            if file_sha256(f).digest() != digest:
                return False
        with self._lock:
            self._checked.add(digest)
        return True

    def _evict(self, keep: bytes | None = None, enough: Callable[[], bool] | None = None) -> None:
        """Least recently used bodies other than `keep` go until `enough()`: by
        default, until the rest fit the limit."""
        gone = self.entries.evict(() if keep is None else (keep,), enough)
        with self._lock:
            self._checked.difference_update(gone)

    @property
    def used(self) -> int:
        return self.entries.used


def _digest_of_name(name: str) -> bytes | None:
    """A body's file name is its digest in hex."""
    try:
        return bytes.fromhex(name) if len(name) == 64 else None
    except ValueError:
        return None
