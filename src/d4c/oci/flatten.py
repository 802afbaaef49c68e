"""Flattening OCI layers into one tree, as a container runtime applies them.

Each layer tar is read once, as a stream (gzip, zstd or plain; detected from
its first bytes), and file bodies go straight into the body spool: no layer is
held in memory or extracted to disk.  Rules (OCI image spec, "Applying
Changesets"):
- `.wh.NAME` deletes NAME from lower layers; `.wh..wh..opq` hides every lower
  child of its directory; other `.wh..wh.*` entries are ignored.
- A directory entry over a directory updates its metadata and keeps children;
  any other entry replaces what was there.
- Parent components are resolved inside the root, following symlinks the way
  runtimes do (`lib -> usr/lib` then `lib/x` lands in `usr/lib/x`).
- Hard links name a path already present; they share its inode, also across
  layers.
Bodies of files that a later layer removes were compressed for nothing; the
image writer simply does not copy them.
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import BinaryIO

import zstandard

from ..image.bodies import BodySpool
from ..image.format import MAX_ENTRIES
from ..errors import BadInput, UsageError
from ..progress import Progress
from ..image.tree import MAX_PATH, Entry, EntryType, canonicalize, device_problem, symlink_problem, xattr_problem
from .source import HashingReader, Layer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
MAX_ID = (1 << 32) - 1
INLINE_LIMIT = 4 << 20  # bodies up to this size are compressed on worker threads
HANDOFF_MIN = 512      # bodies up to this size are compressed on the reading thread
MAX_TAR_HEADER = 1 << 20  # pax and GNU long-name headers are read whole: real ones are a few KiB
SPARSE_MAX_RATIO = 1024  # a sparse member may declare this many times its data (plus SPARSE_SLACK)
SPARSE_SLACK = 64 << 20


class _Inode:
    __slots__ = ("type", "mode", "uid", "gid", "mtime_ns", "xattrs", "size", "digest",
                 "target", "rdev", "pending")

    def __init__(self, etype: EntryType) -> None:
        self.type = etype
        self.mode = 0o755
        self.uid = self.gid = 0
        self.mtime_ns = 0
        self.xattrs: dict[bytes, bytes] = {}
        self.size = 0
        self.digest: bytes | None = None
        self.target = b""
        self.rdev = (0, 0)
        self.pending: Future | None = None


class _Node:
    __slots__ = ("inode", "layer", "children")

    def __init__(self, inode: _Inode, layer: int) -> None:
        self.inode = inode
        self.layer = layer
        self.children: dict[bytes, _Node] | None = {} if inode.type == EntryType.DIR else None


def _split(name: str) -> list[bytes]:
    if len(name) > MAX_PATH:
        raise BadInput(f"layer entry {name[:64]!r}...: path too long")
    parts = []
    for part in name.encode("utf-8", "surrogateescape").split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            raise BadInput(f"layer entry {name!r} climbs out of the root")
        if b"\0" in part or len(part) > 255:
            raise BadInput(f"layer entry {name!r} has a bad name")
        parts.append(part)
    return parts


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    try:
        ns = int(Decimal(text) * 1_000_000_000) if text is not None else int(member.mtime) * 1_000_000_000
    except (ArithmeticError, ValueError, TypeError):
        raise BadInput(f"layer entry {member.name!r}: bad mtime {text!r}") from None
    if not -(1 << 63) <= ns < (1 << 63):
        raise BadInput(f"layer entry {member.name!r}: mtime out of range")
    return ns


def _xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = key[len("LIBARCHIVE.xattr."):].encode("utf-8", "surrogateescape")
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                raise BadInput(f"layer entry {member.name!r}: bad xattr encoding") from None
        else:
            continue
        problem = xattr_problem(name, data)
        if problem:
            raise BadInput(f"layer entry {member.name!r}: {problem}")
        out[name] = data
    return out


class _LayerTarInfo(tarfile.TarInfo):
    """tarfile's member header, but the headers it reads whole into memory (pax,
    GNU long names) are refused beyond MAX_TAR_HEADER before they are read: a
    compressed layer of 80 KB could declare and hold a 2 GiB one."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _WHOLE_HEADERS and self.size > MAX_TAR_HEADER:
            raise BadInput(f"layer entry header of {self.size} bytes (type {self.type!r}): over the "
                           f"{MAX_TAR_HEADER >> 20} MiB a tar header may take")
        return super()._proc_member(tf)  # type: ignore[misc]


_WHOLE_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                  tarfile.SOLARIS_XHDTYPE)


def _next_member(tf: tarfile.TarFile, previous: tarfile.TarInfo | None) -> tarfile.TarInfo | None:
    """The next member of a streamed layer, or None at its end.  A layer may end
    right after its last member's data, without the padding to 512 bytes and the
    end-of-archive blocks (umoci insert writes such layers, and containerd takes
    them); one that ends inside a member's data is still damaged."""
    stream = tf.fileobj
    if previous is not None and tf.offset > stream.tell():  # the previous member's padding is ahead
        stream.seek(tf.offset)  # a stream reads forward and stops at its end
        reached = stream.tell()
        if reached < tf.offset:
            if previous.isreg() and reached < previous.offset_data + _stored_size(previous):
                raise tarfile.ReadError("unexpected end of data")
            return None
    member = tf.next()
    tf.members.clear()  # a streamed layer is read once: 1e6 kept members took gigabytes
    return member


def _stored_size(member: tarfile.TarInfo) -> int:
    """The bytes a member's data takes in the archive (a sparse member's size is its file's)."""
    return sum(n for _, n in member.sparse) if member.sparse is not None else member.size


def open_layer_stream(raw: BinaryIO) -> BinaryIO:
    """Wrap a raw layer blob in the right decompressor (by magic bytes)."""
    head = raw.read(4)
    rest = _Prefixed(head, raw)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=rest, mode="rb")  # type: ignore[return-value]
    if head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(rest, read_across_frames=True)  # type: ignore[return-value]
    return rest  # type: ignore[return-value]


class _Prefixed(io.RawIOBase):
    """Puts back bytes that were peeked from a stream."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head = head
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        if self.head:
            n = min(len(buf), len(self.head))
            buf[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.raw.read(len(buf))
        buf[:len(data)] = data
        return len(data)


class Flattener:
    def __init__(self, spool: BodySpool, threads: int = 1) -> None:
        self.spool = spool
        self.root = _Node(_Inode(EntryType.DIR), -1)
        self.pool = ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="d4c")
        self.inflight = threading.BoundedSemaphore(max(threads, 1) * 2)
        self.layer = 0
        self.members = 0  # of every layer so far

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- tree navigation ---------------------------------------------
    def _resolve_dir(self, parts: list[bytes], name: str, create: bool = True) -> _Node | None:
        """The directory node for `parts`, following symlinks inside the root."""
        node = self.root
        stack = list(reversed(parts))
        trail: list[_Node] = []
        names: list[bytes] = []   # the resolved path of `node`, for callers that need it
        self.resolved_path = b""
        hops = 0
        while stack:
            part = stack.pop()
            if part == b"..":  # only from symlink targets: _split rejects '..' in names
                node = trail.pop() if trail else self.root
                if names:
                    names.pop()
                continue
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = _Node(_Inode(EntryType.DIR), self.layer)
                node.children[part] = child
            if child.inode.type == EntryType.SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise BadInput(f"layer entry {name!r}: too many symlinks in its path")
                target = child.inode.target
                if target.startswith(b"/"):
                    node, trail, names = self.root, [], []
                for tpart in reversed(target.split(b"/")):
                    if tpart == b"..":
                        stack.append(b"..")
                    elif tpart not in (b"", b"."):
                        stack.append(tpart)
                continue
            if child.inode.type != EntryType.DIR:
                raise BadInput(f"layer entry {name!r}: a parent is not a directory")
            trail.append(node)
            names.append(part)
            node = child
        self.resolved_path = b"/".join(names)
        return node

    def _apply_member(self, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        name = member.name
        parts = _split(name)
        if not parts:
            if member.isdir():
                self._set_meta(self.root.inode, member)
            return
        base = parts[-1].decode("utf-8", "surrogateescape")
        if base.startswith(WHITEOUT):
            parent = self._resolve_dir(parts[:-1], name, create=False)
            if parent is None:
                return
            if base == OPAQUE:
                self._prune_lower(parent)
            elif not base.startswith(WHITEOUT + "." + WHITEOUT[1:]):  # ".wh..wh." internals
                victim = base[len(WHITEOUT):].encode("utf-8", "surrogateescape")
                assert parent.children is not None
                old = parent.children.get(victim)
                if old is not None and old.layer < self.layer:
                    del parent.children[victim]
            return
        parent = self._resolve_dir(parts[:-1], name)
        assert parent is not None and parent.children is not None
        leaf = parts[-1]
        existing = parent.children.get(leaf)
        if member.isdir():
            if existing is not None and existing.inode.type == EntryType.DIR:
                self._set_meta(existing.inode, member)
                existing.layer = self.layer
                return
            inode = _Inode(EntryType.DIR)
            self._set_meta(inode, member)
            parent.children[leaf] = _Node(inode, self.layer)
            return
        if member.islnk():
            tparts = _split(member.linkname)
            if not tparts:
                raise BadInput(f"layer entry {name!r}: hard link to the root")
            tparent = self._resolve_dir(tparts[:-1], member.linkname, create=False)
            target = tparent.children.get(tparts[-1]) if tparent and tparent.children is not None else None
            if target is None:
                raise BadInput(f"layer entry {name!r}: hard link target {member.linkname!r} is missing")
            if target.inode.type == EntryType.DIR:
                raise BadInput(f"layer entry {name!r}: hard link to a directory")
            if target is existing:
                return
            parent.children[leaf] = _Node(target.inode, self.layer)
            return
        if member.isreg():
            if not 0 <= member.size < (1 << 63):
                raise BadInput(f"layer entry {name!r}: size out of range")
            stored = _stored_size(member)
            if member.sparse is not None and member.size > stored * SPARSE_MAX_RATIO + SPARSE_SLACK:
                # every byte of its holes would be read, hashed and compressed (64 GiB: 102 s)
                raise BadInput(f"layer entry {name!r}: a sparse file of {member.size} bytes with only "
                               f"{stored} bytes of data")
            inode = _Inode(EntryType.FILE)
            inode.size = member.size
            self._set_meta(inode, member)
            self._take_body(inode, member, tf)
        elif member.issym():
            inode = _Inode(EntryType.SYMLINK)
            inode.target = member.linkname.encode("utf-8", "surrogateescape")
            # judge the target from where the link really lands (parents may be symlinks)
            rel = (self.resolved_path + b"/" if self.resolved_path else b"") + parts[-1]
            problem = symlink_problem(rel, inode.target)
            if problem:
                raise BadInput(f"layer entry {name!r}: {problem}")
            self._set_meta(inode, member)
        elif member.ischr() or member.isblk():
            problem = device_problem(member.devmajor, member.devminor)
            if problem:
                raise BadInput(f"layer entry {name!r}: {problem}")
            inode = _Inode(EntryType.CHARDEV if member.ischr() else EntryType.BLOCKDEV)
            inode.rdev = (member.devmajor, member.devminor)
            self._set_meta(inode, member)
        elif member.isfifo():
            inode = _Inode(EntryType.FIFO)
            self._set_meta(inode, member)
        else:
            raise BadInput(f"layer entry {name!r}: unsupported tar entry type {member.type!r}")
        parent.children[leaf] = _Node(inode, self.layer)

    def _prune_lower(self, node: _Node) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            assert current.children is not None
            for key in list(current.children):
                child = current.children[key]
                if child.layer < self.layer:
                    del current.children[key]
                elif child.children is not None:
                    stack.append(child)

    @staticmethod
    def _set_meta(inode: _Inode, member: tarfile.TarInfo) -> None:
        for value, what in ((member.uid, "uid"), (member.gid, "gid")):
            # MAX_ID is (uid_t)-1: chown leaves such an owner unchanged (root, when unpacked as root)
            if not isinstance(value, int) or not 0 <= value < MAX_ID:
                raise BadInput(f"layer entry {member.name!r}: {what} {value!r} out of range")
        inode.mode = member.mode & 0o7777
        inode.uid, inode.gid = member.uid, member.gid
        inode.mtime_ns = _mtime_ns(member)
        inode.xattrs = _xattrs(member)

    def _take_body(self, inode: _Inode, member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        f = tf.extractfile(member)
        assert f is not None
        what = f"layer {self.layer + 1}: {member.name}"
        if member.size <= HANDOFF_MIN:
            # a thread handoff costs more than hashing and compressing this: a layer
            # of 200k empty files spent 15 of its 33 s in pool submits and semaphores
            inode.digest = self.spool.add_bytes(f.read(), what).digest
            self.progress.advance(member.size, 1)
        elif member.size <= INLINE_LIMIT:
            data = f.read()
            self.inflight.acquire()

            def work() -> bytes:
                try:
                    return self.spool.add_bytes(data, what).digest
                finally:
                    self.inflight.release()
            inode.pending = self.pool.submit(work)
            self.progress.advance(member.size, 1)
        else:
            inode.digest = self.spool.add_chunks(_progress_chunks(f, self.progress), member.size, what).digest
            self.progress.advance(0, 1)
        inode.size = member.size

    # -- layers --------------------------------------------------------
    def apply_layer(self, layer: Layer, index: int, label: str) -> None:
        self.layer = index
        raw = HashingReader(layer.open(), layer.digest, f"{label} blob")
        try:
            stream = HashingReader(open_layer_stream(raw), layer.diff_id, f"{label} content")
            try:
                tf = tarfile.open(fileobj=stream, mode="r|", tarinfo=_LayerTarInfo)  # type: ignore[call-overload]
                member = None
                while (member := _next_member(tf, member)) is not None:
                    self.members += 1
                    if self.members > MAX_ENTRIES:  # refused now, not after all of them were made
                        raise BadInput(f"{label}: the layers hold more than {MAX_ENTRIES:,} entries, "
                                       "the most an image may hold")
                    self._apply_member(member, tf)
                stream.verify()
                raw.verify()
            except (tarfile.TarError, EOFError, zstandard.ZstdError, gzip.BadGzipFile, zlib.error) as exc:
                raise BadInput(f"{label}: damaged layer ({exc})") from None
        finally:
            close = getattr(raw.raw, "close", None)
            if close:
                close()

    def flatten(self, layers: list[Layer], what: str) -> None:
        with Progress(f"flattening {what}") as self.progress:
            for i, layer in enumerate(layers):
                self.apply_layer(layer, i, f"layer {i + 1}/{len(layers)}")
            self._settle(self.root)

    def _settle(self, node: _Node) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            if current.inode.pending is not None:
                current.inode.digest = current.inode.pending.result()
                current.inode.pending = None
            stack.extend((current.children or {}).values())

    def remove(self, path: str) -> bool:
        parts = _split(path)
        if not parts:
            raise UsageError(f"--excludes {path}: cannot exclude the root")
        node: _Node | None = self.root
        for part in parts[:-1]:
            node = node.children.get(part) if node and node.children is not None else None
        if node is None or node.children is None or parts[-1] not in node.children:
            return False
        del node.children[parts[-1]]
        return True

    def entries(self) -> list[Entry]:
        """The flattened tree as image entries.  The tree is taken apart on the way
        (a node goes once its entry is made): with a million entries, holding both
        is what the memory goes to.  Call it last."""
        out: list[Entry] = []

        stack: list[tuple[_Node, bytes]] = [(self.root, b"")]
        while stack:
            node, path = stack.pop()
            i = node.inode
            e = Entry(path=path, type=i.type, mode=i.mode, uid=i.uid, gid=i.gid,
                      mtime_ns=i.mtime_ns, xattrs=dict(i.xattrs))
            if i.type == EntryType.FILE:
                e.size, e.digest = i.size, i.digest
            elif i.type == EntryType.SYMLINK:
                e.target = i.target
            elif i.type in (EntryType.CHARDEV, EntryType.BLOCKDEV):
                e.rdev = i.rdev
            if i.type != EntryType.DIR:
                e.inode = i
            if len(path) > MAX_PATH:
                raise BadInput(f"{path[:64]!r}...: path too long (through symlinked directories)")
            out.append(e)
            children, node.children = node.children, None
            for name, child in (children or {}).items():
                stack.append((child, path + b"/" + name if path else name))
        return canonicalize(out)


def _progress_chunks(f: BinaryIO, progress: Progress):  # type: ignore[no-untyped-def]
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return
        progress.advance(len(chunk))
        yield chunk
