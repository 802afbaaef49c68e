"""The dimg / cdimg container: preamble, header (tree + storage tables), bodies.

Layout and every field are documented in docs/FORMAT.md; golden tests pin the
bytes.  This module only reads and writes the container; building entries from
directories or layers lives in pack.py and oci/, bodies in bodies.py.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import zstandard

from .. import accel
from ..codec import Cursor, Encoder
from ..errors import CorruptImage, MissingBase, NotFound, SystemFailure, UnsupportedVersion, WrongBase, from_oserror
from .tree import (MAX_NAME, MAX_PATH, MAX_SYMLINK, MAX_XATTR_NAME, MAX_XATTR_VALUE,
                   DeltaStep, Entry, EntryType, Storage, device_problem, path_problem, symlink_problem)
from .bodies import FRAME_CHUNK
from ..zstdframes import declared_size, decode_frame, frame_length, read_bounded
from ..digests import light_sha256, sha256

DIMG_MAGIC = b"D4C-DIMG"
CDIMG_MAGIC = b"D4C-CDIM"
FORMAT_VERSION = 1              # base images (and the cdimg wrapper)
DELTA_FORMAT_VERSION = 2        # delta images: version 1 + parent storage kinds + parent-coded header
CDIMG_VERSION = 1
FLAG_HAS_PARENT = 0x1
FLAG_MULTI_FRAME = 0x2          # bodies of files over FRAME_CHUNK are several zstd frames
DELTA_METHODS = (1, 2)          # d4c.engine.delta METHOD_SA, METHOD_PREFIX
MAX_DELTA_STEPS = 16
KNOWN_DIMG_FLAGS = FLAG_HAS_PARENT | FLAG_MULTI_FRAME

# magic, version, flags, reserved, header_csize, header_usize, body_size,
# image_id, parent_id, header_digest
DIMG_PREAMBLE = struct.Struct("<8sHHIQQQ32s32s32s")
# magic, version, flags, reserved, config_csize, config_usize, dimg_size,
# config_digest, preamble_digest
CDIMG_PREAMBLE = struct.Struct("<8sHHIQQQ32s32s")

ID_DOMAIN = b"d4c/tree/v1\n"
HEADER_LEVEL = 19
MAX_HEADER_USIZE = 256 << 20   # hostile entries take ~10 bytes each: bound the work too
MAX_ENTRIES = 1_000_000        # real images have tens of thousands
MAX_CONFIG_USIZE = 16 << 20
MAX_FILE_SIZE = (1 << 63) - 1
STREAM_PIECE = 256 << 10  # body_frames reads a multi-frame body in pieces of this size
ASKED_AHEAD = 3 * STREAM_PIECE  # ... and asks the kernel for this much beyond what it has read
ONE_SHOT_MAX = 64 << 20        # bodies up to this decompress in one call; larger ones stream in bounded memory
ZERO_ID = bytes(32)
NO_ID = (1 << 32) - 1  # uid/gid -1: chown cannot set it (an unpack as root would keep root, setuid bits too)


def image_id_of(tree_table: bytes) -> bytes:
    """The image id: sha256 over the canonical tree table (storage excluded)."""
    return light_sha256(ID_DOMAIN + tree_table).digest()


def format_id(digest: bytes) -> str:
    return "sha256:" + digest.hex()


# ---------------------------------------------------------------- tables

def encode_tree(entries: list[Entry]) -> bytes:
    enc = Encoder()
    enc.uvarint(len(entries))
    for e in entries:
        enc.blob(e.path)
        enc.u8(int(e.type))
        if e.type == EntryType.HARDLINK:
            # a hard link is another name of an inode: no metadata of its own
            enc.uvarint(e.link)
            continue
        enc.uvarint(e.mode)
        enc.uvarint(e.uid)
        enc.uvarint(e.gid)
        enc.svarint(e.mtime_ns)
        enc.uvarint(len(e.xattrs))
        for name in sorted(e.xattrs):
            enc.blob(name)
            enc.blob(e.xattrs[name])
        t = e.type
        if t == EntryType.FILE:
            enc.uvarint(e.size)
            assert e.digest is not None and len(e.digest) == 32
            enc.raw(e.digest)
        elif t == EntryType.SYMLINK:
            enc.blob(e.target)
        elif t in (EntryType.CHARDEV, EntryType.BLOCKDEV):
            enc.uvarint(e.rdev[0])
            enc.uvarint(e.rdev[1])
    return enc.getvalue()


def encode_storage(entries: list[Entry]) -> bytes:
    enc = Encoder()
    for e in entries:
        if e.type != EntryType.FILE:
            continue
        enc.u8(int(e.storage))
        if e.storage == Storage.FRAME:
            enc.uvarint(e.body_length)
        elif e.storage == Storage.SHARED:
            enc.uvarint(e.shared_with)
        elif e.storage == Storage.DELTA:
            enc.uvarint(e.delta_source)
            enc.uvarint(len(e.delta_steps))
            for k, step in enumerate(e.delta_steps):
                enc.u8(step.method)
                enc.uvarint(step.length)
                if k < len(e.delta_steps) - 1:
                    enc.uvarint(step.size)
                    enc.raw(step.digest)
    return enc.getvalue()


def decode_header(data: bytes, source: str, body_size: int,
                  parent_entries: list[Entry] | None = None) -> tuple[list[Entry], int]:
    """Decode and fully validate the tree and storage tables.

    `parent_entries` (delta images only) is the parent image's tree: storage
    that refers to it is checked against it.  Returns the entries and the
    length of the tree table.  Raises CorruptImage on anything malformed,
    unsafe or inconsistent.
    """
    def fail(reason: str) -> None:
        raise CorruptImage(source, reason)

    cur = Cursor(data, fail)
    # every entry takes at least 3 bytes, so a hostile count cannot make us loop long
    count = cur.uvarint(min(cur.remaining() // 3 + 1, MAX_ENTRIES))
    if count == 0:
        fail("no root entry")
    buf = bytes(data)
    rows, cur.pos, error, at, value = accel.tables.scan_tree(
        buf, cur.pos, count, MAX_PATH, MAX_NAME, MAX_XATTR_NAME, MAX_XATTR_VALUE, MAX_SYMLINK)
    if error:
        reason = SCAN_ERRORS[error].format(value=value)
        off, n = int(rows[at, 0]), int(rows[at, 1])
        fail(f"entry {buf[off:off + n]!r}: {reason}" if n >= 0 and error >= _FIRST_ENTRY_ERROR else reason)
    tree_len = cur.pos
    with gc_paused():
        entries = _build_entries(buf, _row_lists(rows), fail)
        _decode_storage(cur, entries, body_size, parent_entries, fail)
    return entries, tree_len


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while thousands of (acyclic) entries are made: each
    generation-0 pass would walk everything alive, and opening the three images
    of a merge took 1.6x as long with it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# accel.tables.scan_tree's error codes; from _FIRST_ENTRY_ERROR on, the entry's path is known
SCAN_ERRORS = {
    1: "truncated",
    2: "non-canonical varint",
    3: "varint too long",
    4: f"length {{value}} exceeds limit {MAX_PATH}",
    5: "entries out of order or duplicated",
    6: "unknown entry type",
    7: "the first entry must be the root directory",
    8: "hard link to a non-linkable or later entry",
    9: "mode or owner out of range",
    10: "value {value} out of range",
    11: "xattr name or value of {value} bytes exceeds its limit",
    12: "value {value} out of range",
    13: f"symlink target of {{value}} bytes exceeds limit {MAX_SYMLINK}",
    14: "device number out of range",
}
_FIRST_ENTRY_ERROR = 5


def _row_lists(rows: memoryview, batch: int = 4096) -> Iterator[list[int]]:
    """The scanned rows as lists of ints, made a batch at a time: all at once,
    the ints of a 200k-entry table took 90 MB beside the entries made from them."""
    width = rows.shape[1] if rows.ndim == 2 else 1
    flat = rows.cast("B").cast("q") if rows.ndim == 2 else rows
    for start in range(0, len(flat), batch * width):
        chunk = flat[start:start + batch * width].tolist()
        for i in range(0, len(chunk), width):
            yield chunk[i:i + width]


def _build_entries(buf: bytes, rows: Iterable[list[int]], fail: Any) -> list[Entry]:
    """Entries from the scanned rows, with the checks that need Python objects:
    unusual paths, parent directories, xattr names, symlink targets."""
    entries: list[Entry] = []
    append = entries.append
    dirs: set[bytes] = set()
    types = _ENTRY_TYPES
    file_type, dir_type, hardlink_type = EntryType.FILE, EntryType.DIR, EntryType.HARDLINK
    for index, (poff, plen, t, plain, link, mode, uid, gid, mtime, xoff, nx, size, doff, dlen,
                major, minor) in enumerate(rows):
        path = buf[poff:poff + plen]
        if uid == NO_ID or gid == NO_ID:
            fail(f"entry {path!r}: owner {uid}:{gid} is (uid_t)-1, which chown reads as 'unchanged'")
        if not plain:
            problem = path_problem(path)
            if problem:
                fail(f"entry {path!r}: {problem}")
        if index:
            cut = path.rfind(b"/")
            if (path[:cut] if cut >= 0 else b"") not in dirs:
                fail(f"entry {path!r}: parent is not a directory in the image")
        etype = types[t]
        if etype is file_type:  # most entries: made in one call
            e = Entry(path, etype, mode, uid, gid, mtime, {}, size, buf[doff:doff + 32])
            if nx:
                _read_xattrs(buf, xoff, nx, e, fail)
            append(e)
            continue
        if etype is hardlink_type:
            target = entries[link]
            append(Entry(path, etype, target.mode, target.uid, target.gid, target.mtime_ns, target.xattrs,
                         link=link))
            continue
        e = Entry(path, etype, mode, uid, gid, mtime)
        if nx:
            _read_xattrs(buf, xoff, nx, e, fail)
        if etype is dir_type:
            dirs.add(path)
        elif etype == EntryType.SYMLINK:
            e.target = buf[doff:doff + dlen]
            problem = symlink_problem(path, e.target)
            if problem:
                fail(f"entry {path!r}: {problem}")
        elif etype in (EntryType.CHARDEV, EntryType.BLOCKDEV):
            problem = device_problem(major, minor)
            if problem:
                fail(f"entry {path!r}: {problem}")
            e.rdev = (major, minor)
        append(e)
    return entries


def _read_xattrs(buf: bytes, pos: int, count: int, e: Entry, fail: Any) -> None:
    """The xattr list (already bounds-checked by the scan): names non-empty, without NUL, sorted."""
    cur = Cursor(buf, fail)
    cur.pos = pos
    last_name = b""
    for _ in range(count):
        name = cur.blob(MAX_XATTR_NAME)
        value = cur.blob(MAX_XATTR_VALUE)
        if not name or b"\0" in name or name <= last_name:
            fail(f"entry {e.path!r}: bad or unsorted xattr name")
        last_name = name
        e.xattrs[name] = value


def check_storage(table: bytes, entries: list[Entry], body_size: int, parent_entries: list[Entry] | None,
                  source: str) -> None:
    """Decode and validate a storage table against a tree already in hand (it sets
    the entries' storage fields)."""
    def fail(reason: str) -> None:
        raise CorruptImage(source, reason)
    _decode_storage(Cursor(table, fail), entries, body_size, parent_entries, fail)


_FILES_BY_DIGEST: dict[int, tuple[list[Entry], dict[bytes | None, int]]] = {}


def _files_by_digest(entries: list[Entry]) -> dict[bytes | None, int]:
    """Content digest -> size of a parent's files.  A merge checks three storage
    tables against two parents: the map is built once per parent (the parent's
    entries are never changed once read)."""
    held = _FILES_BY_DIGEST.get(id(entries))
    if held is not None and held[0] is entries:
        return held[1]
    files = {p.digest: p.size for p in entries if p.type == EntryType.FILE}
    if len(_FILES_BY_DIGEST) >= 8:
        _FILES_BY_DIGEST.clear()
    _FILES_BY_DIGEST[id(entries)] = (entries, files)
    return files


def _decode_storage(cur: Cursor, entries: list[Entry], body_size: int, parent_entries: list[Entry] | None,
                    fail: Any) -> None:
    offset = 0
    parent_files = _files_by_digest(parent_entries) if parent_entries is not None else {}
    # the enum members as locals: this loop runs once per file of every image opened
    file_type, kinds, u8, uvarint = EntryType.FILE, _STORAGE_KINDS, cur.u8, cur.uvarint
    empty, frame, shared, parent, delta = (Storage.EMPTY, Storage.FRAME, Storage.SHARED, Storage.PARENT,
                                           Storage.DELTA)
    sizes: dict[bytes | None, int] = {}  # one content has one size: lookups by digest rely on it
    for index, e in enumerate(entries):
        if e.type is not file_type:
            continue
        if sizes.setdefault(e.digest, e.size) != e.size:
            fail(f"entry {e.path!r}: {e.size} bytes, but an earlier file with its digest has {sizes[e.digest]}")
        kind = kinds.get(u8())
        if kind is None:
            fail(f"entry {e.path!r}: unknown storage kind")
        e.storage = kind
        if parent_entries is None and (kind is parent or kind is delta):
            fail(f"entry {e.path!r}: refers to a parent image, but this is a base image")
        if kind is empty:
            if e.size != 0:
                fail(f"entry {e.path!r}: non-empty file without a body")
            if e.digest != EMPTY_DIGEST:
                fail(f"entry {e.path!r}: empty file with a wrong digest")
            continue
        if e.size == 0:
            fail(f"entry {e.path!r}: empty file with a body")
        if kind is frame:
            length = e.body_length = uvarint(body_size)
            if length == 0 or offset + length > body_size:
                fail(f"entry {e.path!r}: body outside the body section")
            e.body_offset = offset
            offset += length
        elif kind is shared:
            e.shared_with = uvarint(max(index - 1, 0))
            holder = entries[e.shared_with]
            if (holder.type is not file_type or holder.storage not in (frame, delta)
                    or holder.digest != e.digest or holder.size != e.size or e.shared_with >= index):
                fail(f"entry {e.path!r}: shared body does not match")
            e.body_offset, e.body_length = holder.body_offset, holder.body_length
        elif kind is parent:
            if parent_files.get(e.digest) != e.size:
                fail(f"entry {e.path!r}: its content is not in the parent image")
        else:
            assert parent_entries is not None
            e.delta_source = uvarint(max(len(parent_entries) - 1, 0))
            if not parent_entries or parent_entries[e.delta_source].type != EntryType.FILE:
                fail(f"entry {e.path!r}: delta source is not a file of the parent image")
            nsteps = uvarint(MAX_DELTA_STEPS)
            e.delta_steps = []
            if nsteps == 0:
                fail(f"entry {e.path!r}: delta without steps")
            for k in range(nsteps):
                method = cur.u8()
                length = cur.uvarint(body_size)
                if method not in DELTA_METHODS:
                    fail(f"entry {e.path!r}: unknown delta method {method}")
                if length == 0 or offset + length > body_size:
                    fail(f"entry {e.path!r}: delta outside the body section")
                if k < nsteps - 1:
                    step = DeltaStep(method, length, cur.uvarint(MAX_FILE_SIZE), cur.raw(32), offset)
                else:
                    step = DeltaStep(method, length, e.size, e.digest or b"", offset)
                e.delta_steps.append(step)
                offset += length
    if cur.remaining():
        fail("trailing bytes after the storage table")
    if offset != body_size:
        fail("body section size does not match the storage table")


EMPTY_DIGEST = light_sha256(b"").digest()
_ENTRY_TYPES = {int(t): t for t in EntryType}
_STORAGE_KINDS = {int(k): k for k in Storage}


# ---------------------------------------------------------------- reading

@dataclass
class ImageInfo:
    kind: str                 # "dimg" or "cdimg"
    version: int
    image_id: bytes
    parent_id: bytes | None
    header_digest: bytes
    header_csize: int
    header_usize: int
    body_size: int
    dimg_offset: int          # where the dimg starts in the file (0 for a dimg)
    dimg_size: int
    multi_frame: bool = False  # FLAG_MULTI_FRAME: a body may be several frames
    config: dict[str, Any] | None = None
    config_bytes: bytes | None = None
    config_digest: bytes | None = None

    @property
    def body_offset(self) -> int:
        return self.dimg_offset + DIMG_PREAMBLE.size + self.header_csize


def _memory_available() -> int:
    """The machine's memory, or the address-space limit of this process if lower."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        physical = 1 << 40
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return physical if soft == resource.RLIM_INFINITY else min(physical, soft)


class Image:
    """An open dimg or cdimg file: validated header, entries, body streams.

    A delta image's header is coded against its parent's tree, so reading its
    entries needs the parent (an open Image whose id is the delta's parent id);
    without it only `info` is available.
    """

    # what read_body may hold at once (a rebuild holds its source and its result):
    # a file's declared size is not what its image can hold (a 270 KB delta declared 8 GiB)
    memory_limit: int = _memory_available()

    def __init__(self, path: str, parent: "Image | None" = None) -> None:
        self.path = path
        self.parent = parent
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no such image file: {path}") from None
        except IsADirectoryError:
            raise NotFound(f"not an image file but a directory: {path}") from None
        except OSError as exc:
            raise from_oserror(exc, "cannot open image") from exc
        try:
            self.info = read_info(self._fd, path)
            self._entries: list[Entry] | None = None
            self.tree_table = b""
            if self.info.parent_id is not None and parent is not None \
                    and parent.info.image_id != self.info.parent_id:
                raise WrongBase(path, format_id(self.info.parent_id), parent.path,
                                format_id(parent.info.image_id))
            if parent is not None and self.info.parent_id is not None:
                parent.entries  # a parent that cannot be read itself: say which base is missing
            if self.info.parent_id is None or parent is not None:
                self._entries, self.tree_table = _read_tables(self._fd, path, self.info, parent)
        except BaseException:
            os.close(self._fd)
            raise
        self._by_path: dict[bytes, int] | None = None
        self._by_digest: dict[bytes, int] | None = None

    @property
    def is_delta(self) -> bool:
        return self.info.parent_id is not None

    @property
    def entries(self) -> list[Entry]:
        if self._entries is None:
            assert self.info.parent_id is not None
            raise MissingBase(self.path, format_id(self.info.parent_id))
        return self._entries

    # context manager / lifetime
    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        return self._fd

    def lookup(self, path: bytes) -> Entry:
        if self._by_path is None:
            self._by_path = {e.path: i for i, e in enumerate(self.entries)}
        try:
            return self.entries[self._by_path[path.strip(b"/")]]
        except KeyError:
            raise NotFound(f"{path.decode(errors='replace')}: not in image {self.path}") from None

    def index_of_digest(self, digest: bytes) -> int:
        """Index of the first file with this content, or -1."""
        if self._by_digest is None:
            index: dict[bytes, int] = {}  # built aside: readers on other threads never see it half done
            for i, e in enumerate(self.entries):
                if e.type == EntryType.FILE and e.digest is not None:
                    index.setdefault(e.digest, i)
            self._by_digest = index
        return self._by_digest.get(digest, -1)

    def holder(self, entry: Entry) -> Entry:
        """The entry whose storage holds `entry`'s content in this image."""
        return self.entries[entry.shared_with] if entry.storage == Storage.SHARED else entry

    def frame_of(self, entry: Entry) -> tuple[int, int] | None:
        """(offset in the file, length) of the zstd frame holding the content,
        here or in an ancestor; None if content must be rebuilt from a delta."""
        image, e = self.resolve(entry)
        e = image.holder(e)
        if e.storage == Storage.FRAME:
            return image.info.body_offset + e.body_offset, e.body_length
        return None

    def resolve(self, entry: Entry) -> tuple["Image", Entry]:
        """Follow PARENT storage down the stack to the image that stores the content."""
        image, e = self, entry
        while e.storage == Storage.PARENT:
            assert image.parent is not None
            image, e = image.parent, image.parent.entries[image.parent.index_of_digest(e.digest or b"")]
        return image, e

    def open_body(self, entry: Entry) -> "BodyReader":
        return BodyReader(self._fd, self.info.body_offset + entry.body_offset, entry.body_length, entry.size,
                          entry.digest or b"", self.path, entry, across_frames=self.info.multi_frame)

    def body_chunks(self, entry: Entry) -> Iterator[bytes]:
        """A FRAME body in BodyReader.CHUNK pieces, in one chunk and zstd's window
        of memory; its size and digest are checked before the last piece is
        given (CorruptImage there, so a consumer keeps nothing unchecked)."""
        with self.open_body(entry) as reader:
            yield from reader.chunks()

    def read_body(self, entry: Entry, check: bool = True) -> bytes:
        """The content of a file entry, whatever its storage (delta images
        rebuild it from the parent stack; the digest is checked either way).
        check=False: a body stored whole, whose digest was checked before
        (llfs --verified-bodies), is decoded on its zstd frame checksums only."""
        if entry.size == 0:
            return b""
        image, e = self.resolve(entry)
        e = image.holder(e)
        if e.storage == Storage.FRAME:
            image.check_memory(e, e.size)
            if e.size > ONE_SHOT_MAX:
                with image.open_body(e) as r:
                    return r.read()
            data = b"".join(image.decode_frame(e, frame, n) for frame, n in image.body_frames(e))
            if check:
                image.check_digest(e, data)
            return data
        return image._rebuild(e)

    def check_memory(self, entry: Entry, need: int) -> None:
        if need > self.memory_limit:
            raise SystemFailure(f"{self.path}: {entry.display()}: rebuilding it needs {need} bytes of memory, "
                                f"more than the limit of {self.memory_limit} (--memory-limit)")

    def check_body(self, entry: Entry) -> None:
        """Check one body this image stores (FRAME or DELTA) against its size and
        digest: a stored body streams in bounded memory whatever its size, a delta
        is rebuilt from the parent stack.  CorruptImage when it does not match."""
        if entry.storage == Storage.FRAME and entry.size > ONE_SHOT_MAX:
            for _ in self.body_chunks(entry):
                pass
        elif entry.storage in (Storage.FRAME, Storage.DELTA):
            self.read_body(entry)

    def body_frames(self, entry: Entry) -> Iterator[tuple[memoryview, int]]:
        """The compressed frames of a FRAME body of at most ONE_SHOT_MAX bytes,
        with their content sizes (one frame unless the image is multi-frame).
        Each frame comes as soon as it has been read: the kernel is asked to
        read a few pieces ahead, and decoding the first frames overlaps reading
        the rest (llfs reads start cold).  Not thread-safe: llfs advances it
        under a lock."""
        length, start = entry.body_length, self.info.body_offset + entry.body_offset
        if not self.info.multi_frame:
            yield memoryview(_pread_exact(self._fd, length, start, self.path)), entry.size
            return
        # Small bodies: the kernel's own readahead of the image (bodies lie in path order)
        # serves a tree walk in ~150 disk reads, not one per file.  Larger ones are asked
        # for a piece at a time, ASKED_AHEAD beyond the read: asked whole, the body was
        # one disk request (up to 4 MiB here) that the first frame waited for, and the
        # asking itself (~0.5 ms per MiB) delayed the first read.
        asked = 0 if length > STREAM_PIECE else length
        buf = memoryview(bytearray(length))
        got = pos = total = 0
        try:
            while pos < length:
                if total == entry.size:  # the content is complete; only empty frames could follow
                    raise ValueError("data after the last frame")
                n = frame_length(buf[pos:got], partial=True)
                if n < 0:
                    if got == length:
                        raise ValueError("truncated frame")
                    while asked < min(length, got + ASKED_AHEAD):
                        os.posix_fadvise(self._fd, start + asked, min(STREAM_PIECE, length - asked),
                                         os.POSIX_FADV_WILLNEED)
                        asked += STREAM_PIECE
                    read = os.preadv(self._fd, [buf[got:min(length, got + STREAM_PIECE)]], start + got)
                    if read <= 0:
                        raise CorruptImage(self.path, "file is truncated")
                    got += read
                    continue
                frame = buf[pos:pos + n]
                declared = declared_size(frame, total, entry.size)
                total += declared
                pos += n
                yield frame, declared
            if total != entry.size:
                raise ValueError(f"frames hold {total} bytes, expected {entry.size}")
        except ValueError as exc:
            raise CorruptImage(self.path, f"{entry.display()}: body does not decompress ({exc})") from None

    def decode_frame(self, entry: Entry, frame: memoryview, size: int) -> bytes:
        """One frame of body_frames, decompressed in one call.  zstd checks the
        frame's checksum; the sha256 digest is check_digest's job, so a reader can
        overlap it with serving the data."""
        try:
            return decode_frame(frame, size)
        except (ValueError, zstandard.ZstdError) as exc:
            raise CorruptImage(self.path, f"{entry.display()}: body does not decompress ({exc})") from None

    def check_digest(self, entry: Entry, data: bytes | memoryview) -> None:
        if sha256(data).digest() != entry.digest:
            raise CorruptImage(self.path, f"{entry.display()}: content digest mismatch")

    def read_delta_payload(self, step: DeltaStep) -> bytes:
        return _pread_exact(self._fd, step.length, self.info.body_offset + step.offset, self.path)

    def _rebuild(self, entry: Entry) -> bytes:
        from ..engine import delta  # the engine is only needed for delta images
        assert self.parent is not None and entry.storage == Storage.DELTA
        source = self.parent.entries[entry.delta_source]
        sizes = [source.size] + [step.size for step in entry.delta_steps]
        self.check_memory(entry, max(a + b for a, b in zip(sizes, sizes[1:])))
        data = self.parent.read_body(source)
        size, digest = source.size, source.digest or b""
        for step in entry.delta_steps:
            data = delta.apply_payload(data, step.method, self.read_delta_payload(step), size, digest,
                                       step.size, step.digest, source=f"{self.path}: {entry.display()}")
            size, digest = step.size, step.digest
        return data


def stored_bodies(image: Image) -> list[Entry]:
    """The entries whose bodies `image` stores itself (not its parents')."""
    return [e for e in image.entries if e.storage in (Storage.FRAME, Storage.DELTA)]


def check_bodies(image: Image, threads: int = 1, checked: Callable[[int], None] | None = None) -> None:
    """Check every body `image` stores itself: what the snapshotter's load and
    the server's upload make sure of before they keep an image.  zstd, sha256
    and the patch kernel release the GIL, so threads help.  `checked` is told
    the size of each body once it passed (from the checking thread)."""
    from ..parallel import run_parallel

    def check(e: Entry) -> None:
        image.check_body(e)
        if checked is not None:
            checked(e.size)
    run_parallel(check, stored_bodies(image), threads)


def _pread_exact(fd: int, n: int, offset: int, source: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise CorruptImage(source, "file is truncated")
    return data


def header_dictionary(parent_tree: bytes | None) -> zstandard.ZstdCompressionDict | None:
    """Delta images compress their header against the parent's tree table: the
    unchanged entries (most of them, each with a 32-byte digest) cost almost
    nothing on a thin link."""
    if parent_tree is None:
        return None
    return zstandard.ZstdCompressionDict(parent_tree, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def _decompress_bounded(blob: bytes, usize: int, source: str, what: str,
                        dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
    try:
        out = read_bounded(blob, usize, across_frames=True, prefix=dictionary)
    except zstandard.ZstdError as exc:
        raise CorruptImage(source, f"{what} does not decompress ({exc})") from None
    if len(out) != usize:
        raise CorruptImage(source, f"{what} does not have its recorded size {usize}")
    return out


def read_info(fd: int, source: str) -> ImageInfo:
    """Read and check the preamble(s) only (cheap: no tables decoded)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, max(DIMG_PREAMBLE.size, CDIMG_PREAMBLE.size), 0)
    if len(head) < 8:
        raise CorruptImage(source, "file too short to be an image")
    magic = head[:8]
    config = config_bytes = config_digest = None
    base = 0
    kind = "dimg"
    if magic == CDIMG_MAGIC:
        kind = "cdimg"
        if len(head) < CDIMG_PREAMBLE.size:
            raise CorruptImage(source, "file is truncated")
        (_, version, flags, reserved, ccsize, cusize, dimg_size,
         config_digest, pre_digest) = CDIMG_PREAMBLE.unpack_from(head)
        if version != CDIMG_VERSION:
            raise UnsupportedVersion(source, version, CDIMG_VERSION)
        if flags or reserved:
            raise CorruptImage(source, "unknown cdimg flags")
        if cusize > MAX_CONFIG_USIZE or ccsize > size:
            raise CorruptImage(source, "config length out of range")
        ccomp = _pread_exact(fd, ccsize, CDIMG_PREAMBLE.size, source)
        if light_sha256(head[:CDIMG_PREAMBLE.size - 32] + ccomp).digest() != pre_digest:
            raise CorruptImage(source, "cdimg preamble digest mismatch")
        config_bytes = _decompress_bounded(ccomp, cusize, source, "config")
        if light_sha256(config_bytes).digest() != config_digest:
            raise CorruptImage(source, "config digest mismatch")
        try:
            config = json.loads(config_bytes)
        except (ValueError, RecursionError):
            raise CorruptImage(source, "config is not JSON") from None
        if not isinstance(config, dict):
            raise CorruptImage(source, "config is not a JSON object")
        base = CDIMG_PREAMBLE.size + ccsize
        if base + dimg_size != size:
            raise CorruptImage(source, "file size does not match the cdimg preamble")
        head = os.pread(fd, DIMG_PREAMBLE.size, base)
        if head[:8] != DIMG_MAGIC:
            raise CorruptImage(source, "cdimg does not contain a dimg")
    elif magic != DIMG_MAGIC:
        raise CorruptImage(source, "not a d4c image (bad magic)")
    if len(head) < DIMG_PREAMBLE.size:
        raise CorruptImage(source, "file is truncated")
    (_, version, flags, reserved, hcsize, husize, body_size,
     image_id, parent_id, header_digest) = DIMG_PREAMBLE.unpack_from(head)
    if version not in (FORMAT_VERSION, DELTA_FORMAT_VERSION):
        raise UnsupportedVersion(source, version, DELTA_FORMAT_VERSION)
    if flags & ~KNOWN_DIMG_FLAGS or reserved:
        raise CorruptImage(source, "unknown dimg flags")
    if bool(flags & FLAG_HAS_PARENT) != (version == DELTA_FORMAT_VERSION):
        raise CorruptImage(source, f"version {version} does not match the delta flag")
    if husize > MAX_HEADER_USIZE:
        raise CorruptImage(source, "header too large")
    dimg_size = DIMG_PREAMBLE.size + hcsize + body_size
    if base + dimg_size != size:
        raise CorruptImage(source, "file size does not match the preamble (truncated or extended)")
    has_parent = bool(flags & FLAG_HAS_PARENT)
    if not has_parent and parent_id != ZERO_ID:
        raise CorruptImage(source, "parent id set without the parent flag")
    return ImageInfo(kind=kind, version=version, image_id=image_id,
                     parent_id=parent_id if has_parent else None, header_digest=header_digest,
                     header_csize=hcsize, header_usize=husize, body_size=body_size,
                     dimg_offset=base, dimg_size=dimg_size, multi_frame=bool(flags & FLAG_MULTI_FRAME),
                     config=config,
                     config_bytes=config_bytes, config_digest=config_digest)


def _read_tables(fd: int, source: str, info: ImageInfo,
                 parent: "Image | None") -> tuple[list[Entry], bytes]:
    base = info.dimg_offset
    pre = _pread_exact(fd, DIMG_PREAMBLE.size, base, source)
    hcomp = _pread_exact(fd, info.header_csize, base + DIMG_PREAMBLE.size, source)
    if light_sha256(pre[:DIMG_PREAMBLE.size - 32] + hcomp).digest() != info.header_digest:
        raise CorruptImage(source, "header digest mismatch")
    header = _decompress_bounded(hcomp, info.header_usize, source, "header",
                                 header_dictionary(parent.tree_table if parent is not None else None))
    entries, tree_len = decode_header(header, source, info.body_size,
                                      parent.entries if parent is not None else None)
    tree = header[:tree_len]
    if image_id_of(tree) != info.image_id:
        raise CorruptImage(source, "image id does not match its tree")
    return entries, tree


class BodyReader:
    """Streams one file body out of its zstd frame and verifies size and digest.

    Memory use is bounded by zstd's window (at most 128 MiB for hostile frames,
    8 MiB for ours) whatever the file size.
    """

    CHUNK = 1 << 20

    def __init__(self, fd: int, offset: int, length: int, size: int, digest: bytes,
                 source: str, entry: Entry, across_frames: bool = False) -> None:
        self._section = _Section(fd, offset, length)
        self._reader = zstandard.ZstdDecompressor(max_window_size=1 << 27).stream_reader(
            self._section, read_size=min(max(length, 1), self.CHUNK), read_across_frames=across_frames,
            closefd=False)
        self._size = size
        self._digest = digest
        self._hash = sha256()
        self._seen = 0
        self._done = False
        self._source = source
        self._entry = entry

    def _fail(self, reason: str) -> None:
        raise CorruptImage(self._source, f"{self._entry.display()}: {reason}")

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        want = self._size - self._seen if n is None or n < 0 else n
        parts = []
        while want > 0:
            try:
                chunk = self._reader.read(min(want, self.CHUNK))
            except zstandard.ZstdError as exc:
                self._fail(f"body does not decompress ({exc})")
            if not chunk:
                self._finish()
                break
            self._seen += len(chunk)
            if self._seen > self._size:
                self._fail("body is larger than its recorded size")
            self._hash.update(chunk)
            parts.append(chunk)
            want -= len(chunk)
        if self._seen == self._size and not self._done:
            # make sure the frame really ends here
            try:
                extra = self._reader.read(1)
            except zstandard.ZstdError as exc:
                self._fail(f"body does not decompress ({exc})")
            if extra:
                self._fail("body is larger than its recorded size")
            self._finish()
        return b"".join(parts)

    def _finish(self) -> None:
        self._done = True
        if self._seen != self._size:
            self._fail(f"body has {self._seen} bytes, expected {self._size}")
        if self._hash.digest() != self._digest:
            self._fail("content digest mismatch")

    def chunks(self) -> Iterable[bytes]:
        while True:
            chunk = self.read(self.CHUNK)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "BodyReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Section:
    """A read-only window of a file descriptor, read with pread (thread-safe)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.pos, self.end = fd, offset, offset + length

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.end - self.pos
        n = min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data


# ---------------------------------------------------------------- writing

def dimg_preamble(header_comp: bytes, header_usize: int, body_size: int,
                  image_id: bytes, parent_id: bytes | None, multi_frame: bool = False) -> bytes:
    flags = (FLAG_HAS_PARENT if parent_id is not None else 0) | (FLAG_MULTI_FRAME if multi_frame else 0)
    version = DELTA_FORMAT_VERSION if parent_id is not None else FORMAT_VERSION
    fields = DIMG_PREAMBLE.pack(DIMG_MAGIC, version, flags, 0, len(header_comp),
                                header_usize, body_size, image_id, parent_id or ZERO_ID, ZERO_ID)
    unsigned = fields[:DIMG_PREAMBLE.size - 32]
    return unsigned + sha256(unsigned + header_comp).digest()


def canonical_config(config: dict[str, Any]) -> bytes:
    """Canonical JSON of an OCI config: sorted keys, no spaces, UTF-8."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cdimg_preamble(config_bytes: bytes, dimg_size: int) -> bytes:
    ccomp = zstandard.ZstdCompressor(level=HEADER_LEVEL, write_content_size=True).compress(config_bytes)
    fields = CDIMG_PREAMBLE.pack(CDIMG_MAGIC, CDIMG_VERSION, 0, 0, len(ccomp), len(config_bytes),
                                 dimg_size, sha256(config_bytes).digest(), ZERO_ID)
    unsigned = fields[:CDIMG_PREAMBLE.size - 32]
    return unsigned + sha256(unsigned + ccomp).digest() + ccomp


def with_layer_id(config: dict[str, Any], image_id: bytes) -> dict[str, Any]:
    """The OCI config as stored in a cdimg: one layer whose diff id is the image id."""
    out = dict(config)
    out["rootfs"] = {"type": "layers", "diff_ids": [format_id(image_id)]}
    return out


def assign_storage(entries: list[Entry], frame_lengths: dict[bytes, int]) -> list[bytes]:
    """Give each file its storage record in canonical order; return the digests
    of the frames in body order.  The first file with a digest holds the frame."""
    holder: dict[bytes, int] = {}
    order: list[bytes] = []
    offset = 0
    for i, e in enumerate(entries):
        if e.type != EntryType.FILE:
            continue
        if e.size == 0:
            e.storage = Storage.EMPTY
            continue
        assert e.digest is not None
        first = holder.get(e.digest)
        if first is None:
            holder[e.digest] = i
            e.storage = Storage.FRAME
            e.body_offset = offset
            e.body_length = frame_lengths[e.digest]
            offset += e.body_length
            order.append(e.digest)
        else:
            e.storage = Storage.SHARED
            e.shared_with = first
            e.body_offset = entries[first].body_offset
            e.body_length = entries[first].body_length
    return order


@dataclass
class EncodedHeader:
    tree: bytes
    compressed: bytes
    usize: int
    body_size: int
    image_id: bytes
    frame_order: list[Any]     # keys of the body blobs, in body order
    multi_frame: bool = False  # some body is larger than FRAME_CHUNK (FLAG_MULTI_FRAME)


def has_multi_frame_bodies(entries: list[Entry]) -> bool:
    """Bodies over FRAME_CHUNK are written as several frames (bodies.BodySpool);
    the flag tells readers (and refuses readers that predate it)."""
    return any(e.storage == Storage.FRAME and e.size > FRAME_CHUNK for e in entries)


def encode_header(entries: list[Entry], frame_lengths: dict[bytes, int]) -> EncodedHeader:
    order = assign_storage(entries, frame_lengths)
    tree = encode_tree(entries)
    table = tree + encode_storage(entries)
    body_size = sum(frame_lengths[d] for d in order)
    # self-check: never write what we would refuse to read
    decode_header(table, "<new image>", body_size)
    comp = zstandard.ZstdCompressor(level=HEADER_LEVEL, write_content_size=True).compress(table)
    return EncodedHeader(tree=tree, compressed=comp, usize=len(table), body_size=body_size,
                         image_id=image_id_of(tree), frame_order=order, multi_frame=has_multi_frame_bodies(entries))


class DeltaHeaderCoder:
    """Compresses a delta's tables against its parent's tree table.

    Loading that dictionary into zstd's match finder is a third of the work
    and needs only the parent, so it starts in a thread (zstd releases the
    GIL) when the coder is made, while the caller is still deciding storage.
    The parameters follow the new tree's size only, so the output depends on
    the inputs alone, never on timing.
    """

    def __init__(self, parent_tree: bytes, tree_size: int) -> None:
        # level 19's window with btopt, the shortest search and a small chain
        # table: measured on the Debian image deltas (bench/image_bench.py)
        # against plain level 19 with search_log 3, 1,710 -> 1,714 bytes for
        # A->B and 39,084 -> 39,379 for a merged A->C, in well under half the
        # time (a merge on the server waits for this)
        self._params = zstandard.ZstdCompressionParameters.from_level(
            HEADER_LEVEL, source_size=tree_size, search_log=1, chain_log=16, strategy=zstandard.STRATEGY_BTOPT,
            write_content_size=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d4c-header")
        self._dictionary = self._pool.submit(self._load, parent_tree)
        self._pool.shutdown(wait=False)

    def _load(self, parent_tree: bytes) -> zstandard.ZstdCompressionDict:
        dictionary = header_dictionary(parent_tree)
        assert dictionary is not None
        dictionary.precompute_compress(compression_params=self._params)
        return dictionary

    def compress(self, table: bytes) -> bytes:
        return zstandard.ZstdCompressor(compression_params=self._params,
                                        dict_data=self._dictionary.result()).compress(table)


def encode_delta_header(entries: list[Entry], parent: "Image", blob_lengths: dict[Any, int],
                        tree: bytes, coder: DeltaHeaderCoder) -> EncodedHeader:
    """The header of a delta image whose storage the caller decided: FRAME
    entries' blobs are keyed by content digest, DELTA steps by `step.key`.
    Bodies are laid out in entry order; the table is compressed against the
    parent's tree table.  `entries` are copies of an image's entries and `tree`
    is that image's tree table, read and checked, so only storage is checked.
    `coder`: made early for this parent and tree."""
    order: list[Any] = []
    offset = 0
    for e in entries:
        if e.type != EntryType.FILE:
            continue
        if e.storage == Storage.FRAME:
            e.body_offset, e.body_length = offset, blob_lengths[e.digest]
            offset += e.body_length
            order.append(e.digest)
        elif e.storage == Storage.DELTA:
            for step in e.delta_steps:
                step.offset, step.length = offset, blob_lengths[step.key]
                offset += step.length
                order.append(step.key)
    for e in entries:
        if e.storage == Storage.SHARED:
            holder = entries[e.shared_with]
            e.body_offset, e.body_length = holder.body_offset, holder.body_length
    storage = encode_storage(entries)
    check_storage(storage, entries, offset, parent.entries, "<new delta image>")  # never write what we would refuse
    table = tree + storage
    comp = coder.compress(table)
    return EncodedHeader(tree=tree, compressed=comp, usize=len(table), body_size=offset,
                         image_id=image_id_of(tree), frame_order=order, multi_frame=has_multi_frame_bodies(entries))


def write_dimg_to(out: BinaryIO, header: EncodedHeader, copy_frames: Any,
                  parent_id: bytes | None = None, image_id: bytes | None = None) -> int:
    """Write a whole dimg at the current position of `out`; returns its size.
    `copy_frames(keys, out)` writes the bodies (BodySpool.copy_frames)."""
    pre = dimg_preamble(header.compressed, header.usize, header.body_size,
                        image_id or header.image_id, parent_id, header.multi_frame)
    out.write(pre)
    out.write(header.compressed)
    copy_frames(header.frame_order, out)
    return len(pre) + len(header.compressed) + header.body_size


def dimg_size_of(header: EncodedHeader) -> int:
    return DIMG_PREAMBLE.size + len(header.compressed) + header.body_size
