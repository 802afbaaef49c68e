"""How a read reaches a body's bytes: frames decoded ahead on a small shared
pool (hashed on the side unless the bodies were verified at load), or a
producer thread for large bodies and those rebuilt from deltas."""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterator

from ..digests import sha256
from ..errors import CorruptImage
from ..image.reader import ONE_SHOT_MAX, Image
from ..image.tree import Entry, Storage
from .threads import WakePool, run_anywhere

WHOLE_MAX = 1 << 20  # smaller bodies are read and decoded whole at the first read


class FsError(Exception):
    """An errno for the adapter to report (ENOENT, ENOTDIR, EIO...)."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(why or os.strerror(code))
        self.errno = code


def open_reader(image: Image, stored: Entry, verified: bool = False):  # type: ignore[no-untyped-def]
    """A forward reader of a stored body.  Bodies up to ONE_SHOT_MAX are read
    whole and decompressed a frame at a time in one call each, partly on
    DECODERS threads (zstd checks each frame's checksum before a byte is
    served); larger ones stream.  Unless the bodies were `verified` when the
    images were stored (Options.verified_bodies), the sha256 digest is checked
    before the last bytes are handed out, so a read to the end fails on a
    mismatch."""
    if stored.size > ONE_SHOT_MAX:
        return Prefetcher.streaming(image.open_body(stored))
    if stored.size < WHOLE_MAX or stored.storage == Storage.GROUPED:  # a slice of a cached group frame
        return Buffered(image.read_body(stored, check=not verified))
    return Frames(image, stored, verified)


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


class Frames(_Forward):
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


class Buffered(_Forward):
    """A body already in memory, read forward."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._buf = memoryview(data)


class Prefetcher(_Forward):
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
    def streaming(cls, body) -> "Prefetcher":  # type: ignore[no-untyped-def]
        """Chunks read from a body reader (read/close), closed with the prefetcher."""
        return cls(iter(lambda: body.read(cls.CHUNK), b""), body.close)

    def _run(self) -> None:
        run_anywhere()  # started by a FUSE worker, which keeps to one CPU
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
