"""The on-disk cache of files rebuilt from deltas: byte-budgeted, least
recently used first out, one build per digest at a time, and an entry left by an
earlier mount checked against its digest before it is used."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import OrderedDict
from typing import Callable, Iterator

from ..digests import file_sha256
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
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.dir = directory
        self.limit = limit
        self._lock = threading.Lock()
        self._sizes: OrderedDict[bytes, int] = OrderedDict()
        self._checked: set[bytes] = set()  # bodies built or checked by this process
        self._building: dict[bytes, threading.Lock] = {}
        for name in os.listdir(directory):  # a previous mount's bodies are reused
            path = os.path.join(directory, name)
            with contextlib.suppress(ValueError, OSError):  # not a digest, or gone meanwhile
                if len(name) == 64 and os.path.isfile(path):
                    self._sizes[bytes.fromhex(name)] = os.path.getsize(path)
                elif name.startswith(".tmp-"):
                    os.unlink(path)
        self._evict()

    def path(self, digest: bytes) -> str:
        return os.path.join(self.dir, digest.hex())

    def open(self, digest: bytes, size: int, build: Callable[[], bytes | Iterator[bytes]]) -> int:
        """An fd of the cached body; `build()` makes it on a miss, whole or as
        chunks (a body larger than memory), and must check it against `digest`
        (Image.read_body and Image.body_chunks do: a chunk stream raises at its
        end on a mismatch, before the body is kept).  Concurrent first reads of
        one body build it once."""
        with self._lock:
            lock = self._building.setdefault(digest, threading.Lock())
        with lock:
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
            with self._lock:
                self._sizes[digest] = size
                self._sizes.move_to_end(digest)
                self._checked.add(digest)
            self._evict(keep=digest)  # the fd stays readable if another thread's eviction unlinks it
            return fd

    def _write(self, digest: bytes, size: int, body: bytes | Iterator[bytes]) -> int:
        """Write a body under its digest's name (a temp name, then a rename): an
        fd opened before the rename, so an eviction cannot take it from the caller."""
        import tempfile  # not in an idle mount server
        tmp = tempfile.NamedTemporaryFile(dir=self.dir, prefix=".tmp-", delete=False)
        fd = -1
        try:
            with tmp:
                written = 0
                for chunk in [body] if isinstance(body, bytes) else body:
                    tmp.write(chunk)
                    written += len(chunk)
                if written != size:  # build() checked the digest; a wrong size means a wrong caller
                    raise CorruptImage("stack", f"rebuilt body has {written} bytes, expected {size}")
            fd = os.open(tmp.name, os.O_RDONLY | os.O_CLOEXEC)
            os.rename(tmp.name, self.path(digest))
            return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):  # renamed already, or cleared by another mount
                os.unlink(tmp.name)
            raise

    def _make_room(self, size: int, keep: bytes) -> bool:
        """Evict least recently used bodies until `size` bytes are free; False,
        evicting nothing, when even all of them would not make that room.
        (A body still open frees its space only when closed.)"""
        def free() -> int:
            st = os.statvfs(self.dir)
            return st.f_bavail * st.f_frsize

        with self._lock:
            others = sum(n for digest, n in self._sizes.items() if digest != keep)
        if free() + others < size:
            return False
        self._evict(keep, enough=lambda: free() >= size)
        return True

    def _open_cached(self, digest: bytes, size: int) -> int:
        with self._lock:
            if digest not in self._sizes:
                return -1
            self._sizes.move_to_end(digest)
            checked = digest in self._checked
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                self._sizes.pop(digest, None)
            return -1
        try:
            usable = os.fstat(fd).st_size == size and (checked or self._matches(fd, digest))
        except BaseException:
            os.close(fd)
            raise
        if not usable:
            os.close(fd)
            with self._lock:
                self._sizes.pop(digest, None)
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
        while not (enough() if enough is not None else self.used <= self.limit):
            with self._lock:
                victim = next((digest for digest in self._sizes if digest != keep), None)
                if victim is None:
                    return
                del self._sizes[victim]
                self._checked.discard(victim)
            with contextlib.suppress(OSError):  # gone already, or a cache directory gone read-only
                os.unlink(self.path(victim))

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._sizes.values())
