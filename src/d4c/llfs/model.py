"""What an image stack looks like as a read-only file system, without FUSE.

The tree is the top image's (a delta image carries its complete tree).  Inode
numbers are entry indices + 1, so they are stable across mounts of the same
image; the root is 1 and a hard link shares its primary's inode.  Contents are
resolved lazily: a body stored as a zstd frame anywhere in the stack is
streamed from it; a body that needs deltas is rebuilt once, checked against its
digest, and kept in a bounded on-disk cache (never in RAM).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from typing import NamedTuple

import zstandard

from ..errors import CorruptImage
from ..image.reader import GROUP_CACHE, ONE_SHOT_MAX, Image
from ..image.tree import S_IFMT_OF, Entry, EntryType, Storage
from .cache import BodyCache
from .streams import FsError, open_reader

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


# ---------------------------------------------------------------- the stack


# ---------------------------------------------------------------- cache


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
        self.reader = open_reader(self.image, self.stored, self.fs.verified_bodies)
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



# ---------------------------------------------------------------- the file system

class Options(NamedTuple):
    cache_dir: str
    cache_limit: int = 2 << 30
    # The images' stored bodies were checked against their sha256 digests when
    # they were stored (the snapshotter does so at load, in its root-only
    # store): reads of unchanged files then rely on zstd's frame checksums and
    # skip a second sha256 pass, as overlayfs snapshots are not re-hashed on
    # read either.  Files rebuilt from deltas are always checked.
    verified_bodies: bool = False
    group_cache: int = GROUP_CACHE  # bytes of decoded group frames (format 2) each image keeps

    @classmethod
    def of(cls, cache_dir: str, cache_limit: int, verified_bodies: bool, group_cache: int | None) -> "Options":
        """Options from command-line values (None: the default)."""
        return cls(cache_dir, cache_limit, verified_bodies, GROUP_CACHE if group_cache is None else group_cache)


READDIR_BATCH = 512  # directory entries per readdir call: more than a kernel buffer takes


class ImageFS:
    """The protocol-free file system over an open image stack (base first)."""

    def __init__(self, images: list[Image], options: Options) -> None:
        self.images = images
        self.top = images[-1]
        self.entries = self.top.entries
        self.cache = BodyCache(options.cache_dir, options.cache_limit)
        self.verified_bodies = options.verified_bodies
        for image in images:
            image.group_cache = options.group_cache
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
            if stored.storage not in (Storage.FRAME, Storage.GROUPED):  # rebuilt from deltas, once, into the cache
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

