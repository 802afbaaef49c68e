"""The file-tree model shared by every image: entry types, entries, name rules.

Paths are `bytes`, relative to the image root, '/'-separated, with the root
itself as b"" (so that the root directory's own metadata is kept).  Entries of
an image are sorted by path bytes; a parent is a prefix of its children and so
always comes first, which lets readers and unpackers work in one pass.
"""

from __future__ import annotations

import enum
import re
import stat

from ..records import Record

MAX_PATH = 4096
MAX_NAME = 255
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_SYMLINK = 4096


class EntryType(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    HARDLINK = 4
    CHARDEV = 5
    BLOCKDEV = 6
    FIFO = 7


# Types a hard link may point at (never a directory, never another link).
LINKABLE = frozenset({EntryType.FILE, EntryType.SYMLINK, EntryType.CHARDEV,
                      EntryType.BLOCKDEV, EntryType.FIFO})

S_IFMT_OF = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHARDEV: stat.S_IFCHR,
    EntryType.BLOCKDEV: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


class Storage(enum.IntEnum):
    """How a file body is held in an image (the storage table of FORMAT.md)."""

    EMPTY = 0      # size 0, no body
    FRAME = 1      # a zstd frame in this image's body section
    SHARED = 2     # the same body as an earlier entry (dedup by digest)
    PARENT = 3     # delta images: a file of the parent image has this content
    DELTA = 4      # delta images: binary delta(s) against a file of the parent image
    GROUPED = 5    # a slice of a group frame: small bodies compressed together (FLAG_GROUPED)


class DeltaStep(Record):
    """One binary delta of a DELTA entry's chain (a merge of deltas chains them)."""

    __slots__ = ("method", "length", "size", "digest", "offset", "key")

    def __init__(self, method: int, length: int, size: int = 0, digest: bytes = b"", offset: int = 0,
                 key: object = None) -> None:
        self.method = method    # d4c.engine.delta METHOD_* (the payload is a delta file minus its preamble)
        self.length = length    # payload bytes in the body section
        self.size = size        # size and sha256 of the content this step produces
        self.digest = digest
        self.offset = offset    # in the body section (implied by the layout)
        self.key = key          # writers only: which spooled blob holds the payload


class Entry(Record):
    __slots__ = ("path", "type", "mode", "uid", "gid", "mtime_ns", "xattrs", "size", "digest", "target", "link",
                 "rdev", "storage", "body_offset", "body_length", "shared_with", "delta_source", "delta_steps",
                 "group", "x86", "inode")

    def __init__(self, path: bytes, type: EntryType, mode: int = 0o755, uid: int = 0, gid: int = 0,
                 mtime_ns: int = 0, xattrs: dict[bytes, bytes] | None = None, size: int = 0,
                 digest: bytes | None = None, target: bytes = b"", link: int = -1, rdev: tuple[int, int] = (0, 0),
                 storage: Storage = Storage.EMPTY, body_offset: int = 0, body_length: int = 0,
                 shared_with: int = -1, delta_source: int = -1, delta_steps: list[DeltaStep] | None = None,
                 group: int = -1, x86: bool = False, inode: object = None) -> None:
        self.path = path
        self.type = type
        self.mode = mode            # permission bits incl. setuid/setgid/sticky (0o7777)
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.xattrs: dict[bytes, bytes] = {} if xattrs is None else xattrs
        self.size = size            # FILE: content length
        self.digest = digest        # FILE: sha256 of content
        self.target = target        # SYMLINK: link target
        self.link = link            # HARDLINK: index of the entry it shares an inode with
        self.rdev = rdev            # CHARDEV/BLOCKDEV: (major, minor)
        # storage (not part of the image id)
        self.storage = storage
        self.body_offset = body_offset  # FRAME: offset in the body section; GROUPED: in the group's content
        self.body_length = body_length  # FRAME: length of the frame
        self.shared_with = shared_with  # SHARED: index of the entry holding the frame
        self.delta_source = delta_source  # DELTA: index of the source file in the parent image
        self.delta_steps: list[DeltaStep] = [] if delta_steps is None else delta_steps  # DELTA: applied in order
        self.group = group          # GROUPED: index of the group frame
        self.x86 = x86              # FRAME/GROUPED: the content is stored x86-converted (FLAG_X86_CODE)
        # producers only: entries with the same inode key become one hard-link group
        self.inode = inode

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parent(self) -> bytes:
        return self.path.rsplit(b"/", 1)[0] if b"/" in self.path else b""

    def display(self) -> str:
        return "/" + printable(self.path)


# what a name must not put raw on a terminal or in a one-line error: C0/C1 controls and DEL
# (a newline fakes a line), Unicode line separators and bidi overrides; backslash, so the
# escapes are unambiguous; bytes that are not UTF-8 (surrogateescape's lone surrogates)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def _escape(match: re.Match[str]) -> str:
    c = ord(match.group())
    if c == 0x5C:
        return "\\\\"
    if 0xDC80 <= c <= 0xDCFF:
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x80 else f"\\u{c:04x}"


def printable(raw: bytes) -> str:
    """A name or link target for people: UTF-8 as it is, everything that could
    fake a line or hide text escaped (\\xNN, \\uNNNN, \\\\), never raw."""
    text = raw.decode("utf-8", "surrogateescape")
    return _UNPRINTABLE.sub(_escape, text) if _UNPRINTABLE.search(text) else text


def path_problem(path: bytes) -> str | None:
    """Why `path` is not a safe entry path, or None.  The root is b""."""
    if path == b"":
        return None
    if len(path) > MAX_PATH:
        return "path too long"
    if b"\0" in path:
        return "NUL in name"
    if path.startswith(b"/"):
        return "absolute path"
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            return f"bad path component {part!r}"
        if len(part) > MAX_NAME:
            return "name too long"
    return None


def symlink_problem(link_path: bytes, target: bytes) -> str | None:
    """Why a symlink target is unsafe, or None.

    Absolute targets are normal in images (they resolve inside the container
    root).  A relative target may not climb above the image root.
    """
    if not target:
        return "empty symlink target"
    if len(target) > MAX_SYMLINK:
        return "symlink target too long"
    if b"\0" in target:
        return "NUL in symlink target"
    if target.startswith(b"/"):
        return None
    depth = link_path.count(b"/")  # components of the directory holding the link
    for part in target.split(b"/"):
        if part == b"..":
            depth -= 1
            if depth < 0:
                return "symlink target escapes the image root"
        elif part not in (b"", b"."):
            depth += 1
    return None


# what Linux can make a device node of (its dev_t has 12 bits of major, 20 of minor)
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1


def device_problem(major: int, minor: int) -> str | None:
    if not (0 <= major <= MAX_MAJOR and 0 <= minor <= MAX_MINOR):
        return f"device number {major},{minor} out of range (Linux: major < 4096, minor < 2^20)"
    return None


def xattr_problem(name: bytes, value: bytes) -> str | None:
    if not name or len(name) > MAX_XATTR_NAME or b"\0" in name:
        return "bad xattr name"
    if len(value) > MAX_XATTR_VALUE:
        return "xattr value too large"
    return None


def canonicalize(entries: list[Entry]) -> list[Entry]:
    """Sort entries by path and turn hard-link groups into HARDLINK entries.

    Producers (pack, convert) give every path of a hard-link group the full
    metadata and the same `inode` key; the smallest path of a group becomes its
    primary so the result does not depend on the order files were found in.
    """
    entries = sorted(entries, key=lambda e: e.path)
    first: dict[object, int] = {}
    out: list[Entry] = []
    for e in entries:
        if e.inode is not None and e.type in LINKABLE:
            index = first.get(e.inode)
            if index is not None:
                out.append(Entry(path=e.path, type=EntryType.HARDLINK, mode=e.mode, uid=e.uid,
                                 gid=e.gid, mtime_ns=e.mtime_ns, xattrs=dict(e.xattrs), link=index))
                continue
            first[e.inode] = len(out)
        e.inode = None
        out.append(e)
    return out
