"""Packing a directory tree into image entries and compressed bodies."""

from __future__ import annotations

import errno
import logging
import os
import stat

from .bodies import BodySpool
from ..errors import BadInput, NotFound, from_oserror
from ..parallel import run_parallel
from ..progress import Progress
from .tree import Entry, EntryType, canonicalize, path_problem, symlink_problem, xattr_problem

log = logging.getLogger(__name__)


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue
            raise
        key = name.encode("utf-8", "surrogateescape")
        problem = xattr_problem(key, value)
        if problem:
            raise BadInput(f"{os.fsdecode(path)}: {problem}")
        out[key] = value
    return out


def _entry_from_stat(rel: bytes, full: bytes, st: os.stat_result) -> Entry | None:
    mode = st.st_mode
    base = dict(path=rel, mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid,
                mtime_ns=st.st_mtime_ns, xattrs=read_xattrs(full))
    if stat.S_ISREG(mode):
        e = Entry(type=EntryType.FILE, size=st.st_size, **base)
    elif stat.S_ISDIR(mode):
        return Entry(type=EntryType.DIR, **base)
    elif stat.S_ISLNK(mode):
        e = Entry(type=EntryType.SYMLINK, target=os.readlink(full), **base)
        problem = symlink_problem(rel, e.target)
        if problem:
            raise BadInput(f"{os.fsdecode(full)}: {problem}")
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        e = Entry(type=EntryType.CHARDEV if stat.S_ISCHR(mode) else EntryType.BLOCKDEV,
                  rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), **base)
    elif stat.S_ISFIFO(mode):
        e = Entry(type=EntryType.FIFO, **base)
    else:
        log.warning("skipping %s: sockets cannot be stored in an image", os.fsdecode(full))
        return None
    if st.st_nlink > 1:
        e.inode = (st.st_dev, st.st_ino)
    return e


def scan_dir(root: str) -> tuple[list[Entry], dict[bytes, bytes]]:
    """Walk `root` without following symlinks; returns entries and, for
    regular files, the full path to read each body from."""
    broot = os.fsencode(os.path.abspath(root))
    try:
        st = os.lstat(broot)
    except FileNotFoundError:
        raise NotFound(f"no such directory: {root}") from None
    except OSError as exc:
        raise from_oserror(exc, "cannot read input") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"not a directory: {root}")
    root_entry = _entry_from_stat(b"", broot, st)
    assert root_entry is not None
    root_entry.inode = None
    entries = [root_entry]
    sources: dict[bytes, bytes] = {}
    stack = [b""]
    try:
        while stack:
            rel_dir = stack.pop()
            full_dir = broot + (b"/" + rel_dir if rel_dir else b"")
            with os.scandir(full_dir) as it:
                for d in it:
                    rel = rel_dir + b"/" + d.name if rel_dir else d.name
                    problem = path_problem(rel)
                    if problem:
                        raise BadInput(f"{os.fsdecode(d.path)}: {problem}")
                    e = _entry_from_stat(rel, d.path, d.stat(follow_symlinks=False))
                    if e is None:
                        continue
                    entries.append(e)
                    if e.type == EntryType.DIR:
                        stack.append(rel)
                    elif e.type == EntryType.FILE:
                        sources[rel] = d.path
    except OSError as exc:
        raise from_oserror(exc, "cannot read input") from exc
    return entries, sources


def pack_dir(root: str, spool: BodySpool, threads: int = 1) -> list[Entry]:
    """Scan `root` and compress every distinct body into `spool`."""
    entries, sources = scan_dir(root)
    entries = canonicalize(entries)
    files = [e for e in entries if e.type == EntryType.FILE]
    total = sum(e.size for e in files)

    with Progress("packing", total_bytes=total, total_items=len(files)) as progress:
        def one(e: Entry) -> None:
            full = sources[e.path]
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise from_oserror(exc, "cannot read input") from exc
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise BadInput(f"{os.fsdecode(full)}: changed type while packing")
                body = spool.add_file(f, e.size, os.fsdecode(full))
            e.digest = body.digest
            progress.advance(e.size, 1)

        run_parallel(one, files, threads)
    return entries


