"""The dimg / cdimg container: preamble, header (tree + storage tables) and their codec.

Layout and every field are documented in docs/FORMAT.md; golden tests pin the
bytes.  This module encodes and decodes the container; reading bodies lives in
reader.py, compressing them in bodies.py, building entries from directories or
layers in pack.py and oci/.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO, Collection, Iterable, Iterator, NamedTuple, Sequence

import zstandard

from .. import accel
from ..codec import Cursor, Encoder
from ..errors import CorruptImage, UnsupportedVersion
from .tree import (MAX_NAME, MAX_PATH, MAX_SYMLINK, MAX_XATTR_NAME, MAX_XATTR_VALUE,
                   DeltaStep, Entry, EntryType, Storage, device_problem, path_problem, symlink_problem)
from .bodies import FRAME_CHUNK, MAX_X86_BODY, GroupPlan
from ..zstdframes import read_bounded
from ..digests import light_sha256, sha256

if TYPE_CHECKING:
    from .reader import Image

DIMG_MAGIC = b"D4C-DIMG"
CDIMG_MAGIC = b"D4C-CDIM"
FORMAT_VERSION = 1              # base images (and the cdimg wrapper)
DELTA_FORMAT_VERSION = 2        # delta images: version 1 + parent storage kinds + parent-coded header
CDIMG_VERSION = 1
FLAG_HAS_PARENT = 0x1
FLAG_MULTI_FRAME = 0x2          # bodies of files over FRAME_CHUNK are several zstd frames
FLAG_GROUPED = 0x4              # small bodies are slices of group frames (storage kind 5, a group table)
DELTA_METHODS = (1, 2, 4, 5)    # d4c.engine.delta METHOD_SA, METHOD_PREFIX, METHOD_RECOMPRESS, METHOD_SA_COMPACT
MAX_DELTA_STEPS = 16
FLAG_GROUP_DICT = 0x8           # group frames are coded against a dictionary frame at the body section's end
FLAG_X86_CODE = 0x10           # some bodies are stored x86-branch-converted (storage kinds with KIND_X86)
KNOWN_DIMG_FLAGS = FLAG_HAS_PARENT | FLAG_MULTI_FRAME | FLAG_GROUPED | FLAG_GROUP_DICT | FLAG_X86_CODE
KIND_X86 = 0x80                 # on a FRAME or GROUPED storage kind: the content is stored x86-converted
MAX_GROUP_USIZE = 16 << 20      # a group frame's content: readers hold it whole
MAX_DICT_USIZE = 32 << 20       # a group dictionary's content: readers keep it while the image is open

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


class Group(NamedTuple):
    """A group frame: where it lies in the body section, its length, its content's."""
    offset: int
    csize: int
    usize: int


class GroupTable(list[Group]):
    """The group frames, and the dictionary frame they are coded against (FLAG_GROUP_DICT)."""
    dictionary: Group | None = None


def encode_storage(entries: list[Entry], groups: list[Group] | None = None,
                   dictionary: Group | None = None) -> bytes:
    """The storage table; with `groups` (FLAG_GROUPED), the group table after it,
    ending with the `dictionary`'s sizes (FLAG_GROUP_DICT)."""
    enc = Encoder()
    for e in entries:
        if e.type != EntryType.FILE:
            continue
        enc.u8(int(e.storage) | (KIND_X86 if e.x86 and e.storage in _CONVERTIBLE else 0))
        if e.storage == Storage.FRAME:
            enc.uvarint(e.body_length)
        elif e.storage == Storage.GROUPED:
            enc.uvarint(e.group)
            enc.uvarint(e.body_offset)
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
    if groups is not None:
        enc.uvarint(len(groups))
        for g in groups:
            enc.uvarint(g.csize)
            enc.uvarint(g.usize)
        if dictionary is not None:
            enc.uvarint(dictionary.csize)
            enc.uvarint(dictionary.usize)
    return enc.getvalue()


def decode_header(data: bytes, source: str, body_size: int,
                  parent_entries: list[Entry] | None = None) -> tuple[list[Entry], int]:
    entries, tree_len, _ = decode_tables(data, source, body_size, parent_entries)
    return entries, tree_len


def decode_tables(data: bytes, source: str, body_size: int, parent_entries: list[Entry] | None = None,
                  grouped: bool = False, dictionary: bool = False,
                  x86: bool = False) -> tuple[list[Entry], int, GroupTable]:
    """Decode and fully validate the tree and storage tables.

    `parent_entries` (delta images only) is the parent image's tree: storage
    that refers to it is checked against it.  Returns the entries and the
    length of the tree table.  Raises CorruptImage on anything malformed,
    unsafe or inconsistent.  `grouped` (FLAG_GROUPED): the group table follows,
    returned last (empty otherwise); `dictionary` (FLAG_GROUP_DICT): it ends with one;
    `x86` (FLAG_X86_CODE): storage kinds may carry KIND_X86.
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
        groups = _decode_storage(cur, entries, body_size, parent_entries, fail, grouped, dictionary, x86)
    return entries, tree_len, groups


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
                  source: str, grouped: bool = False, dictionary: bool = False) -> GroupTable:
    """Decode and validate a storage table against a tree already in hand (it sets
    the entries' storage fields)."""
    def fail(reason: str) -> None:
        raise CorruptImage(source, reason)
    return _decode_storage(Cursor(table, fail), entries, body_size, parent_entries, fail, grouped, dictionary)


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
                    fail: Any, grouped: bool = False, dictionary: bool = False, x86: bool = False) -> GroupTable:
    offset = 0
    sliced: list[Entry] = []  # GROUPED holders, checked against the group table at the end
    parent_files = _files_by_digest(parent_entries) if parent_entries is not None else {}
    # the enum members as locals: this loop runs once per file of every image opened
    file_type, kinds, u8, uvarint = EntryType.FILE, _STORAGE_KINDS, cur.u8, cur.uvarint
    empty, frame, shared, parent, delta, in_group = (Storage.EMPTY, Storage.FRAME, Storage.SHARED,
                                                     Storage.PARENT, Storage.DELTA, Storage.GROUPED)
    sizes: dict[bytes | None, int] = {}  # one content has one size: lookups by digest rely on it
    for index, e in enumerate(entries):
        if e.type is not file_type:
            continue
        if sizes.setdefault(e.digest, e.size) != e.size:
            fail(f"entry {e.path!r}: {e.size} bytes, but an earlier file with its digest has {sizes[e.digest]}")
        raw = u8()
        kind = kinds.get(raw & ~KIND_X86)
        if kind is None:
            fail(f"entry {e.path!r}: unknown storage kind")
        e.storage = kind
        if raw & KIND_X86:
            if not x86 or kind not in _CONVERTIBLE:
                fail(f"entry {e.path!r}: x86-converted storage where there can be none")
            if e.size > MAX_X86_BODY:
                fail(f"entry {e.path!r}: x86-converted body over {MAX_X86_BODY} bytes")
            e.x86 = True
        if parent_entries is None and (kind is parent or kind is delta):
            fail(f"entry {e.path!r}: refers to a parent image, but this is a base image")
        if kind is in_group and not grouped:
            fail(f"entry {e.path!r}: grouped body in an image without groups")
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
        elif kind is in_group:
            e.group, e.body_offset, e.body_length = uvarint(), uvarint(MAX_GROUP_USIZE), e.size
            sliced.append(e)
        elif kind is shared:
            e.shared_with = uvarint(max(index - 1, 0))
            holder = entries[e.shared_with]
            if (holder.type is not file_type or holder.storage not in (frame, delta, in_group)
                    or holder.digest != e.digest or holder.size != e.size or e.shared_with >= index):
                fail(f"entry {e.path!r}: shared body does not match")
            e.body_offset, e.body_length, e.group, e.x86 = holder.body_offset, holder.body_length, holder.group, holder.x86
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
    if dictionary and not grouped:
        fail("a group dictionary in an image without groups")
    groups = _decode_groups(cur, sliced, offset, body_size, fail, dictionary) if grouped else GroupTable()
    if cur.remaining():
        fail("trailing bytes after the storage table")
    last = groups.dictionary or (groups[-1] if groups else None)
    if (last.offset + last.csize if last else offset) != body_size:
        fail("body section size does not match the storage table")
    return groups


def _decode_groups(cur: Cursor, sliced: list[Entry], start: int, body_size: int, fail: Any,
                   dictionary: bool = False) -> GroupTable:
    """The group table; every group's content must be exactly its bodies, back to
    back from 0 (no gap, no overlap, nothing past its end); the dictionary frame
    follows the last group frame."""
    count = cur.uvarint(max(len(sliced), 1))
    groups, offset = GroupTable(), start
    for _ in range(count):
        csize, usize = cur.uvarint(body_size), cur.uvarint(MAX_GROUP_USIZE)
        if csize == 0 or usize == 0 or offset + csize > body_size:
            fail("a group frame lies outside the body section")
        groups.append(Group(offset, csize, usize))
        offset += csize
    if dictionary:
        csize, usize = cur.uvarint(body_size), cur.uvarint(MAX_DICT_USIZE)
        if csize == 0 or usize == 0 or offset + csize > body_size:
            fail("the group dictionary lies outside the body section")
        groups.dictionary = Group(offset, csize, usize)
    filled = [0] * count
    for e in sorted(sliced, key=lambda e: (e.group, e.body_offset)):
        if e.group >= count:
            fail(f"entry {e.path!r}: in group {e.group}, of {count}")
        if e.body_offset != filled[e.group]:
            fail(f"entry {e.path!r}: its body overlaps another or leaves a gap in its group")
        filled[e.group] += e.size
        if filled[e.group] > groups[e.group].usize:
            fail(f"entry {e.path!r}: its body ends past its group")
    if any(f != g.usize for f, g in zip(filled, groups)):
        fail("a group's bodies do not fill it")
    return groups


EMPTY_DIGEST = light_sha256(b"").digest()
_ENTRY_TYPES = {int(t): t for t in EntryType}
_STORAGE_KINDS = {int(k): k for k in Storage}
_CONVERTIBLE = (Storage.FRAME, Storage.GROUPED)


# ---------------------------------------------------------------- reading

class ImageInfo(NamedTuple):
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
    grouped: bool = False      # FLAG_GROUPED: small bodies are slices of group frames
    group_dict: bool = False   # FLAG_GROUP_DICT: ... coded against a dictionary frame
    x86_code: bool = False     # FLAG_X86_CODE: some bodies are stored x86-converted

    @property
    def body_offset(self) -> int:
        return self.dimg_offset + DIMG_PREAMBLE.size + self.header_csize



def pread_exact(fd: int, n: int, offset: int, source: str) -> bytes:
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
        ccomp = pread_exact(fd, ccsize, CDIMG_PREAMBLE.size, source)
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
                     config=config, config_bytes=config_bytes, config_digest=config_digest,
                     grouped=bool(flags & FLAG_GROUPED), group_dict=bool(flags & FLAG_GROUP_DICT),
                     x86_code=bool(flags & FLAG_X86_CODE))


def read_tables(fd: int, source: str, info: ImageInfo,
                parent: "Image | None") -> tuple[list[Entry], bytes, list[Group]]:
    """The entries and tree table of the image at `fd`, checked (a delta's need its parent)."""
    base = info.dimg_offset
    pre = pread_exact(fd, DIMG_PREAMBLE.size, base, source)
    hcomp = pread_exact(fd, info.header_csize, base + DIMG_PREAMBLE.size, source)
    if light_sha256(pre[:DIMG_PREAMBLE.size - 32] + hcomp).digest() != info.header_digest:
        raise CorruptImage(source, "header digest mismatch")
    header = _decompress_bounded(hcomp, info.header_usize, source, "header",
                                 header_dictionary(parent.tree_table if parent is not None else None))
    entries, tree_len, groups = decode_tables(header, source, info.body_size,
                                              parent.entries if parent is not None else None, info.grouped,
                                              info.group_dict, info.x86_code)
    tree = header[:tree_len]
    if image_id_of(tree) != info.image_id:
        raise CorruptImage(source, "image id does not match its tree")
    return entries, tree, groups



# ---------------------------------------------------------------- writing

def dimg_preamble(header_comp: bytes, header_usize: int, body_size: int,
                  image_id: bytes, parent_id: bytes | None, multi_frame: bool = False, grouped: bool = False,
                  group_dict: bool = False, x86_code: bool = False) -> bytes:
    flags = (FLAG_HAS_PARENT if parent_id is not None else 0) | (FLAG_MULTI_FRAME if multi_frame else 0) \
        | (FLAG_GROUPED if grouped else 0) | (FLAG_GROUP_DICT if group_dict else 0) \
        | (FLAG_X86_CODE if x86_code else 0)
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


def assign_storage(entries: list[Entry], frame_lengths: dict[Any, int], plans: Sequence[GroupPlan] = (),
                   dictionary: GroupPlan | None = None,
                   x86: Collection[bytes] = ()) -> tuple[list[Any], GroupTable]:
    """Give each file its storage record in canonical order; return the keys of
    the blobs in body order (frames, then group frames, then the groups'
    dictionary) and the groups.  The first file with a digest holds the frame or the
    slice; contents whose digest is in `x86` were stored x86-converted."""
    sliced = {d: (g, at) for g, plan in enumerate(plans) for d, at in zip(plan.digests, plan.offsets)}
    holder: dict[bytes, int] = {}
    order: list[Any] = []
    offset = 0
    for i, e in enumerate(entries):
        if e.type != EntryType.FILE:
            continue
        if e.size == 0:
            e.storage = Storage.EMPTY
            continue
        assert e.digest is not None
        first = holder.get(e.digest)
        e.x86 = e.digest in x86
        if first is None:
            holder[e.digest] = i
            if e.digest in sliced:
                e.storage = Storage.GROUPED
                e.group, e.body_offset = sliced[e.digest]
                e.body_length = e.size
                continue
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
            e.group = entries[first].group
    groups = GroupTable()
    for plan in plans:
        groups.append(Group(offset, frame_lengths[plan.key], plan.usize))
        offset += frame_lengths[plan.key]
        order.append(plan.key)
    if dictionary is not None:
        groups.dictionary = Group(offset, frame_lengths[dictionary.key], dictionary.usize)
        order.append(dictionary.key)
    return order, groups


class EncodedHeader(NamedTuple):
    tree: bytes
    compressed: bytes
    usize: int
    body_size: int
    image_id: bytes
    frame_order: list[Any]     # keys of the body blobs, in body order
    multi_frame: bool = False  # some body is larger than FRAME_CHUNK (FLAG_MULTI_FRAME)
    grouped: bool = False      # FLAG_GROUPED
    group_dict: bool = False   # FLAG_GROUP_DICT
    x86_code: bool = False     # FLAG_X86_CODE


def has_multi_frame_bodies(entries: list[Entry]) -> bool:
    """Bodies over FRAME_CHUNK are written as several frames (bodies.BodySpool);
    the flag tells readers (and refuses readers that predate it)."""
    return any(e.storage == Storage.FRAME and e.size > FRAME_CHUNK for e in entries)


def encode_header(entries: list[Entry], frame_lengths: dict[Any, int], plans: Sequence[GroupPlan] = (),
                  dictionary: GroupPlan | None = None, x86: Collection[bytes] = ()) -> EncodedHeader:
    """A base image's header; with group `plans` (BodySpool.group_bodies) format 2,
    their frames coded against `dictionary` if given; the contents in `x86` stored converted."""
    order, groups = assign_storage(entries, frame_lengths, plans, dictionary, x86)
    x86_code = any(e.x86 for e in entries)
    tree = encode_tree(entries)
    table = tree + encode_storage(entries, groups if plans else None, groups.dictionary)
    body_size = sum(frame_lengths[d] for d in order)
    # self-check: never write what we would refuse to read
    decode_tables(table, "<new image>", body_size, grouped=bool(plans), dictionary=dictionary is not None,
                  x86=x86_code)
    comp = zstandard.ZstdCompressor(level=HEADER_LEVEL, write_content_size=True).compress(table)
    return EncodedHeader(tree=tree, compressed=comp, usize=len(table), body_size=body_size,
                         image_id=image_id_of(tree), frame_order=order, multi_frame=has_multi_frame_bodies(entries),
                         grouped=bool(plans), group_dict=dictionary is not None, x86_code=x86_code)


class DeltaHeaderCoder:
    """Compresses a delta's tables against its parent's tree table.

    Loading that dictionary into zstd's match finder is a third of the work
    and needs only the parent, so it starts in a thread when the coder is made,
    while the caller is still deciding storage: the thread's compressor codes a
    byte, which loads the dictionary with the GIL released (precompute_compress
    held it for its ~20 ms), and keeps it loaded for the table.
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
        self._compressor = self._pool.submit(self._load, parent_tree)
        self._pool.shutdown(wait=False)

    def _load(self, parent_tree: bytes) -> zstandard.ZstdCompressor:
        dictionary = header_dictionary(parent_tree)
        assert dictionary is not None
        compressor = zstandard.ZstdCompressor(compression_params=self._params, dict_data=dictionary)
        compressor.compress(b"\0")
        return compressor

    def compress(self, table: bytes) -> bytes:
        return self._compressor.result().compress(table)


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
                        image_id or header.image_id, parent_id, header.multi_frame, header.grouped,
                        header.group_dict, header.x86_code)
    out.write(pre)
    out.write(header.compressed)
    copy_frames(header.frame_order, out)
    return len(pre) + len(header.compressed) + header.body_size


def dimg_size_of(header: EncodedHeader) -> int:
    return DIMG_PREAMBLE.size + len(header.compressed) + header.body_size
