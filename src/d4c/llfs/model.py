"""What an image stack looks like as a read-only file system, without FUSE.

The tree is the top image's (a delta image carries its complete tree).  Inode
numbers are entry indices + 1, so they are stable across mounts of the same
image; the root is 1 and a hard link shares its primary's inode.  Contents are
resolved lazily: a body stored as a zstd frame anywhere in the stack is
streamed from it; a body that needs deltas is rebuilt once, checked against its
digest, and kept in a bounded on-disk cache (never in RAM).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import zstandard

from ..image.reader import ONE_SHOT_MAX
from ..image.reader import Image
from ..errors import CorruptImage
from ..image.tree import S_IFMT_OF, Entry, EntryType, Storage
from .threads import WakePool
from ..digests import file_sha256, sha256

ROOT_INO = 1
BLOCK = 4096


class Attrs(NamedTuple):
    ino: int
    mode: int          # S_IFMT | permission bits
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int


class FsError(Exception):
    """An errno for the adapter to report (ENOENT, ENOTDIR, EIO...)."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(why or os.strerror(code))
        self.errno = code


# ---------------------------------------------------------------- the stack


# ---------------------------------------------------------------- cache

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


# ---------------------------------------------------------------- open files

class Handle:
    """An open file: a cached body (pread) or a zstd frame streamed forward.

    A stream keeps the last KEEP_BEHIND bytes it produced: with several FUSE
    workers the kernel's readahead requests arrive slightly out of order, and
    each of them used to send the whole body to the cache as "random access"."""

    def __init__(self, fs: "ImageFS", node: Entry, image: Image, stored: Entry | None, fd: int) -> None:
        self.fs, self.node, self.image, self.stored, self.fd = fs, node, image, stored, fd
        self.reader = None
        self.window: deque[bytes] = deque()  # the newest chunks produced, in order
        self.base = self.end = 0             # body offsets of the window's first and past-last byte
        self.lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        assert self.stored is not None
        self.reader = _open_reader(self.image, self.stored, self.fs.verified_bodies)
        self.window.clear()
        self.base = self.end = 0

    def read(self, offset: int, size: int) -> bytes | memoryview:
        with self.lock:
            if self.closed:  # looked up just before its release
                raise FsError(errno.EBADF)
            if self.fd >= 0:
                return os.pread(self.fd, size, offset)
            if self.reader is None:
                self.start()
            stop = min(offset + size, self.node.size)
            if offset < self.base or offset - self.end > MAX_SKIP:
                return self._switch_to_cache(offset, size)  # random access
            while self.end < stop:
                chunk = self.reader.read(STREAM_CHUNK)  # type: ignore[union-attr]
                if not chunk:
                    break
                self.window.append(chunk)
                self.end += len(chunk)
                while self.end - self.base - len(self.window[0]) >= KEEP_BEHIND and len(self.window) > 1:
                    self.base += len(self.window.popleft())
            return self._slice(offset, min(stop, self.end))

    def _slice(self, offset: int, stop: int) -> bytes | memoryview:
        """Bytes [offset, stop) of the window; a view, not a copy, when one
        chunk holds them (llfuse takes any buffer; copies were a third of a
        streamed read's time)."""
        parts, at = [], self.base
        for chunk in self.window:
            if at >= stop:
                break
            if at + len(chunk) > offset:
                parts.append(memoryview(chunk)[max(offset - at, 0):stop - at])
            at += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _switch_to_cache(self, offset: int, size: int) -> bytes:
        """Random access into a large frame: keep the decompressed body in the cache
        (streamed there beyond ONE_SHOT_MAX: a body may be larger than memory)."""
        assert self.stored is not None
        stored = self.stored
        self.fd = self.fs.cache.open(self.node.digest or b"", self.node.size,
                                     (lambda: self.image.body_chunks(stored)) if stored.size > ONE_SHOT_MAX
                                     else lambda: self.image.read_body(stored))
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.window.clear()
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        with self.lock:  # not under a read in progress (ImageFS.close releases every handle)
            self.closed = True
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            self.window.clear()


MAX_SKIP = 4 << 20  # reads further ahead than this (or behind the window) switch a stream to the cache
KEEP_BEHIND = 2 << 20  # bytes a stream keeps behind its newest chunk, for out-of-order requests
STREAM_CHUNK = 1 << 20  # a stream is pulled from its reader in chunks of this size
WHOLE_MAX = 1 << 20  # smaller bodies are read and decoded whole at the first read


def _open_reader(image: Image, stored: Entry, verified: bool = False):  # type: ignore[no-untyped-def]
    """A forward reader of a stored body.  Bodies up to ONE_SHOT_MAX are read
    whole and decompressed a frame at a time in one call each, partly on
    DECODERS threads (zstd checks each frame's checksum before a byte is
    served); larger ones stream.  Unless the bodies were `verified` when the
    images were stored (Options.verified_bodies), the sha256 digest is checked
    before the last bytes are handed out, so a read to the end fails on a
    mismatch."""
    if stored.size > ONE_SHOT_MAX:
        return _Prefetcher.streaming(image.open_body(stored))
    if stored.size < WHOLE_MAX:
        return _Buffered(image.read_body(stored, check=not verified))
    return _Frames(image, stored, verified)


DECODERS = 2  # the shared decode pool's threads: each helps one reader at a time (zstd releases the GIL)
AHEAD = 2  # frames a reader may have decoded or in decoding beyond the one it reads
HELPER_PATIENCE = 0.05  # seconds a helper waits for a slow reader before it leaves the pool to others
HASHED_BEHIND = 2  # a reader's frames the hasher may still owe: bounds what its queue holds
_pools: dict[str, WakePool] = {}
_pools_lock = threading.Lock()


def _pool(name: str, workers: int) -> WakePool:
    with _pools_lock:
        if name not in _pools:
            _pools[name] = WakePool(name, workers)
        return _pools[name]


class _Forward:
    """A body read forward: up to `n` bytes per read, without a copy, from the
    chunks `_next` produces (None at the end).  A failure stays: every later
    read raises it too -- the kernel may have swallowed the first (a readahead
    request), and an empty read after it would be a short file -- and the
    reader is closed at once (close may run again from the handle)."""

    def __init__(self) -> None:
        self._buf = memoryview(b"")
        self._error: BaseException | None = None

    def _next(self) -> bytes | memoryview | None:
        return None

    def read(self, n: int) -> memoryview:
        if self._error is not None:
            raise self._error
        if not len(self._buf):
            try:
                data = self._next()
            except BaseException as exc:
                self._error = exc
                self.close()
                raise
            if data is not None:
                self._buf = memoryview(data)
        take = self._buf[:n]
        self._buf = self._buf[len(take):]
        return take

    def close(self) -> None:
        self._buf = memoryview(b"")


class _Frames(_Forward):
    """A body's frames, decoded by two hands: the reading thread and one helper
    from the decode pool take the frames in order, so a file decodes on both
    cores with one thread handoff per file.  (A pool task per frame, with the
    reader waiting on each, kept decoding at ~1.1 cores: waking a thread costs
    0.1-0.2 ms on a VM, a fifth of decoding a frame.)  The reader serves its
    next frame when it is done, or else decodes the next unclaimed frame itself;
    it waits only while the helper finishes the frame it needs.  At most AHEAD
    frames are decoded beyond the one being read.  A failed frame fails the read
    that meets it and every read after it.  Unless `verified`, one hasher thread
    takes each frame in order (FIFO across all files) while the reader is
    served, at most HASHED_BEHIND frames behind, and the last frame waits for
    the digest."""

    def __init__(self, image: Image, stored: Entry, verified: bool) -> None:
        super().__init__()
        self._image, self._stored = image, stored
        self._frames = image.body_frames(stored)  # advanced by one hand at a time (_claiming)
        self._cond = threading.Condition()
        self._decoded: dict[int, bytes] = {}
        self._claimed = self._served = 0  # frames handed to a decoder / to the reader
        self._claimed_bytes = self._served_bytes = 0
        self._claiming = self._exhausted = self._closed = self._helping = False
        self._failure: tuple[int, BaseException] | None = None  # the first failed frame
        self._digest = None if verified else sha256()
        self._hashing: deque[Future[None]] = deque()

    def _claim(self) -> tuple[int, memoryview, int] | None:
        """The next frame to decode, or None when there is none to take.  Called
        under _cond, which it releases while body_frames reads the disk."""
        while self._claiming:
            self._cond.wait()
        if self._ended() or not self._room():
            return None  # no room: the other hand claimed while this one waited
        index = self._claimed
        self._claiming = True
        self._cond.release()
        job: tuple[int, memoryview, int] | None = None
        failure: BaseException | None = None
        try:
            frame, size = next(self._frames)
            job = (index, frame, size)
            if self._claimed_bytes + size >= self._stored.size:
                next(self._frames, None)  # body_frames' end-of-body checks
        except StopIteration:
            pass
        except BaseException as exc:
            failure = exc
        finally:
            self._cond.acquire()
            self._claiming = False
            self._cond.notify_all()
        if job is not None:
            self._claimed += 1
            self._claimed_bytes += job[2]
        if job is None or self._claimed_bytes >= self._stored.size:
            self._exhausted = True
        if failure is not None:  # after the frame claimed with it, if any
            self._fail(self._claimed, failure)
        return job

    def _fail(self, index: int, exc: BaseException) -> None:
        if self._failure is None or index < self._failure[0]:
            self._failure = (index, exc)
        self._cond.notify_all()

    def _decode(self, index: int, frame: memoryview, size: int) -> None:
        """Decode a claimed frame with _cond released."""
        self._cond.release()
        try:
            data = self._image.decode_frame(self._stored, frame, size)
        except BaseException as exc:
            self._cond.acquire()
            self._fail(index, exc)
            return
        self._cond.acquire()
        if not self._closed:
            self._decoded[index] = data
        self._cond.notify_all()

    def _room(self) -> bool:
        return self._claimed - self._served <= AHEAD

    def _ended(self) -> bool:
        """No frame will be claimed any more."""
        return self._exhausted or self._closed or self._failure is not None

    def _can_claim(self) -> bool:
        return not (self._claiming or self._ended()) and self._room()

    def _call_helper(self) -> None:
        if not (self._helping or self._ended()) and self._room():
            self._helping = True
            _pool("decode", DECODERS).submit_elsewhere(self._help)  # the caller decodes next

    def _help(self) -> None:
        with self._cond:
            try:
                while not self._ended():
                    if not self._cond.wait_for(lambda: self._room() or self._closed, HELPER_PATIENCE):
                        return  # a slow reader: it calls a helper again when it catches up
                    job = self._claim()
                    if job is not None:
                        self._decode(*job)
            finally:
                self._helping = False

    def _next(self) -> bytes | None:
        with self._cond:
            while True:  # past empty frames: an empty read is the end of the file
                index = self._served
                while index not in self._decoded:
                    if self._failure is not None and index >= self._failure[0]:
                        raise self._failure[1]
                    if self._closed:
                        raise FsError(errno.EBADF, "read of a released file")
                    if self._exhausted and index >= self._claimed:
                        return None
                    if self._can_claim():
                        job = self._claim()  # None only when it ended the body or failed
                        if job is not None:
                            self._call_helper()
                            self._decode(*job)
                        continue
                    # the other hand has this frame; checked first, as it may be done already
                    self._cond.wait_for(lambda: index in self._decoded or self._can_claim() or self._closed
                                        or (self._failure is not None and index >= self._failure[0]))
                data = self._decoded.pop(index)
                self._served += 1
                self._served_bytes += len(data)
                last = self._served_bytes >= self._stored.size
                if last and self._failure is not None:
                    raise self._failure[1]  # frames past the body's size: nothing would read them
                self._cond.notify_all()  # a helper waiting for room
                self._call_helper()
                if len(data) or last:
                    break
        if self._digest is not None:
            self._hashing.append(_pool("sha256", 1).submit(self._digest.update, data))
            while len(self._hashing) > (0 if last else HASHED_BEHIND):
                self._hashing.popleft().result()  # the last frame waits for all of it
            if last and self._digest.digest() != self._stored.digest:
                raise CorruptImage(self._image.path, f"{self._stored.display()}: content digest mismatch")
        return data

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._claiming:  # body_frames is not to be closed while it reads
                self._cond.wait()
            self._decoded.clear()
            self._frames.close()  # the compressed body it holds (a helper decoding keeps its frame)
            self._cond.notify_all()
        for future in self._hashing:
            future.cancel()
        self._hashing.clear()
        super().close()


class _Buffered(_Forward):
    """A body already in memory, read forward."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._buf = memoryview(data)


class _Prefetcher(_Forward):
    """Produces a body's chunks on another thread (zstd and sha256 release the
    GIL), so FUSE round trips and decompression overlap.  Errors of the
    producer (a bad frame, a digest mismatch) surface in read()."""

    CHUNK = 1 << 20
    DEPTH = 4
    _END = object()

    def __init__(self, chunks: Iterator[bytes | memoryview], close: Callable[[], None]) -> None:
        super().__init__()
        self._chunks, self._close = chunks, close
        self._queue: queue.Queue[object] = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="d4c-prefetch", daemon=True)
        self._thread.start()

    @classmethod
    def streaming(cls, body) -> "_Prefetcher":  # type: ignore[no-untyped-def]
        """Chunks read from a body reader (read/close), closed with the prefetcher."""
        return cls(iter(lambda: body.read(cls.CHUNK), b""), body.close)

    def _run(self) -> None:
        try:
            for chunk in self._chunks:
                if self._stop.is_set():
                    return
                if len(chunk):
                    self._put(chunk)
            self._put(self._END)
        except BaseException as exc:  # handed to the reader
            self._put(exc)

    def _put(self, item: object) -> None:
        if not self._stop.is_set():  # after a stop, close() empties the queue until this thread ends
            self._queue.put(item)

    def _next(self) -> bytes | memoryview | None:
        if self._done:
            return None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is self._END:
            self._done = True
            return None
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stops the producer at once: the queue is emptied until it ends, so a
        producer waiting to put goes on, sees the stop and returns."""
        if not self._stop.is_set():
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.01)
                except queue.Empty:
                    pass
            self._close()
        super().close()


# ---------------------------------------------------------------- the file system

@dataclass
class Options:
    cache_dir: str
    cache_limit: int = 2 << 30
    # The images' stored bodies were checked against their sha256 digests when
    # they were stored (the snapshotter does so at load, in its root-only
    # store): reads of unchanged files then rely on zstd's frame checksums and
    # skip a second sha256 pass, as overlayfs snapshots are not re-hashed on
    # read either.  Files rebuilt from deltas are always checked.
    verified_bodies: bool = False


READDIR_BATCH = 512  # directory entries per readdir call: more than a kernel buffer takes


class ImageFS:
    """The protocol-free file system over an open image stack (base first)."""

    def __init__(self, images: list[Image], options: Options) -> None:
        self.images = images
        self.top = images[-1]
        self.entries = self.top.entries
        self.cache = BodyCache(options.cache_dir, options.cache_limit)
        self.verified_bodies = options.verified_bodies
        n = len(self.entries)
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self._child_index: dict[tuple[int, bytes], int] = {}
        self.nlink = [1] * (n + 1)
        self.parent_of: dict[int, int] = {ROOT_INO: ROOT_INO}
        index_of_dir: dict[bytes, int] = {}
        for i, e in enumerate(self.entries):
            ino = self.ino_of(i)
            if e.type == EntryType.DIR:
                index_of_dir[e.path] = ino
                self.children[ino] = []
                self.nlink[ino] = 2
            if i == 0:
                continue
            parent = index_of_dir[e.parent]
            self.children[parent].append((e.name, ino))
            self._child_index[(parent, e.name)] = ino
            if e.type == EntryType.DIR:
                self.nlink[parent] += 1
                self.parent_of[ino] = parent
            elif e.type == EntryType.HARDLINK:
                self.nlink[ino] += 1
        for kids in self.children.values():
            kids.sort()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._lock = threading.Lock()

    # inodes
    def ino_of(self, index: int) -> int:
        e = self.entries[index]
        return (e.link if e.type == EntryType.HARDLINK else index) + 1

    def entry(self, ino: int) -> Entry:
        if not 1 <= ino <= len(self.entries):
            raise FsError(errno.ENOENT)
        return self.entries[ino - 1]

    def lookup(self, parent: int, name: bytes) -> Attrs:
        if name == b".":
            return self.getattr(parent)
        self._require_dir(parent)
        if name == b"..":
            return self.getattr(self.parent_of[parent])
        ino = self._child_index.get((parent, name))
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.getattr(ino)

    def _require_dir(self, ino: int) -> None:
        if self.entry(ino).type != EntryType.DIR:
            raise FsError(errno.ENOTDIR)

    def getattr(self, ino: int) -> Attrs:
        e = self.entry(ino)
        t = e.type
        size = e.size if t == EntryType.FILE else (len(e.target) if t == EntryType.SYMLINK else 0)
        if t == EntryType.DIR:
            size = BLOCK
        rdev = os.makedev(*e.rdev) if t in (EntryType.CHARDEV, EntryType.BLOCKDEV) else 0
        mode = e.mode if t != EntryType.SYMLINK else 0o777  # what Linux shows for every symlink
        return Attrs(ino, S_IFMT_OF[t] | mode, self.nlink[ino], e.uid, e.gid, size, e.mtime_ns, rdev)

    def readlink(self, ino: int) -> bytes:
        e = self.entry(ino)
        if e.type != EntryType.SYMLINK:
            raise FsError(errno.EINVAL)
        return e.target

    def readdir(self, ino: int, start: int) -> list[tuple[bytes, Attrs, int]]:
        """At most READDIR_BATCH entries from position `start` (offsets are
        positions + 1: stable).  The kernel asks again from the last offset it
        took until a call gives none; all the rest at each call made a listing
        quadratic (37 s for 120k entries, the mount stalled meanwhile)."""
        self._require_dir(ino)
        kids = self.children[ino][start:start + READDIR_BATCH]
        return [(name, self.getattr(child), start + n + 1) for n, (name, child) in enumerate(kids)]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.entry(ino).xattrs.get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self.entry(ino).xattrs)

    # contents
    def open(self, ino: int) -> int:
        e = self.entry(ino)
        if e.type != EntryType.FILE:
            raise FsError(errno.EISDIR if e.type == EntryType.DIR else errno.EINVAL)
        fd = -1
        image, stored = self.top, None
        if e.size:
            image, stored = self.top.resolve(e)
            stored = image.holder(stored)
            if stored.storage != Storage.FRAME:  # rebuilt from deltas, once, into the cache
                fd = self.cache.open(e.digest or b"", e.size, lambda: image.read_body(stored))
                stored = None
        handle = Handle(self, e, image, stored, fd)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        if offset >= handle.node.size or size <= 0:
            return b""
        try:
            return handle.read(offset, size)
        except zstandard.ZstdError as exc:
            raise CorruptImage(handle.image.path, f"{handle.node.display()}: {exc}") from None

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.close()

    def statfs(self) -> tuple[int, int]:
        """(total bytes, files) for statfs."""
        return sum(e.size for e in self.entries if e.type == EntryType.FILE), len(self.entries)

    def close(self) -> None:
        for fh in list(self._handles):
            self.release(fh)
        for image in self.images:
            image.close()

