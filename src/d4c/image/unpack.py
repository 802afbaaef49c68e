"""Materialising an image as a directory tree, with all metadata.

Safety: entry paths were validated by the reader (no '..', no absolute paths,
every parent a directory of the image), the tree is built inside a fresh
private temp directory next to the output, and every entry is created with
O_EXCL / O_NOFOLLOW semantics relative to a directory fd, so nothing can be
written outside it.  The temp directory is renamed to the output at the end.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile

from .reader import Image
from ..errors import OutputExists, SystemFailure, from_oserror
from ..progress import Progress
from .tree import Entry, EntryType, printable

log = logging.getLogger(__name__)


def _prepare_output(out: str) -> str:
    out = os.path.abspath(out)
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out) or os.listdir(out):
            raise OutputExists(out)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out) + ".", suffix=".tmp")
    except OSError as exc:
        raise from_oserror(exc, "cannot create output") from exc


def unpack(image: Image, out: str, *, same_owner: bool | None = None) -> None:
    """Write the image's tree to `out` (which must not exist or be empty)."""
    if same_owner is None:
        same_owner = os.geteuid() == 0
    tmp = _prepare_output(out)
    ok = False
    try:
        root_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _Materialiser(image, root_fd, same_owner).run()
        finally:
            os.close(root_fd)
        try:
            if os.path.isdir(out) and not os.path.islink(out):
                os.rmdir(out)  # empty (checked above)
            os.rename(tmp, out)
        except OSError as exc:
            raise from_oserror(exc, "cannot move the unpacked tree into place") from exc
        ok = True
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SystemFailure(f"no space left on device while unpacking to {out}") from exc
        raise from_oserror(exc, "cannot unpack") from exc
    finally:
        if not ok:
            _remove_tree(tmp)


def _remove_tree(path: str) -> None:
    """Remove a half-built tree, even where it already has its final (e.g. 0o000)
    modes.  Iterative, and with two descriptors at most, since an image's tree can
    be 2,000 directories deep (os.walk and shutil.rmtree recurse: RecursionError)."""
    try:
        os.chmod(path, 0o700)
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    try:
        stack = [("", _unlink_files(fd))]  # per level: its name, its subdirectories still to remove
        while True:
            name, subdirs = stack[-1]
            if subdirs:
                sub = subdirs.pop()
                os.chmod(sub, 0o700, dir_fd=fd)  # listed as a directory, not a link, in our private tree
                child = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                stack.append((sub, _unlink_files(fd)))
                continue
            stack.pop()
            if not stack:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(name, dir_fd=fd)
    except OSError as exc:
        log.warning("cannot remove the temporary tree %s: %s", path, exc.strerror)
        return
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError as exc:
        log.warning("cannot remove the temporary tree %s: %s", path, exc.strerror)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _unlink_files(fd: int) -> list[str]:
    """Unlink what is not a directory in the directory `fd`; return its subdirectories."""
    subdirs = []
    with os.scandir(fd) as listing:
        for entry in listing:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs


class _Materialiser:
    def __init__(self, image: Image, root_fd: int, same_owner: bool) -> None:
        self.image = image
        self.root_fd = root_fd
        self.same_owner = same_owner
        self.is_root = os.geteuid() == 0
        self.warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", message)

    def run(self) -> None:
        entries = self.image.entries
        files = [e for e in entries if e.type == EntryType.FILE]
        with Progress("unpacking", total_bytes=sum(e.size for e in files),
                      total_items=len(entries)) as progress:
            for e in entries[1:]:
                self.create(e, progress)
                progress.advance(items=1)
            # directories last, deepest first: their mtimes and modes must not
            # be disturbed by creating children
            for e in reversed(entries):
                if e.type == EntryType.DIR:
                    self.finish_dir(e)

    def create(self, e: Entry, progress: Progress) -> None:
        fd_root = self.root_fd
        t = e.type
        if t == EntryType.DIR:
            os.mkdir(e.path, 0o700, dir_fd=fd_root)
            return
        if t == EntryType.FILE:
            fd = os.open(e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=fd_root)
            try:
                if e.size:
                    for chunk in self.image.stored_chunks(e):
                        if chunk == _zeros(len(chunk)):
                            os.lseek(fd, len(chunk), os.SEEK_CUR)  # leave a hole: sparse output
                        else:
                            _write_all(fd, chunk)
                        progress.advance(len(chunk))
                    os.ftruncate(fd, e.size)
                self.apply_meta_fd(fd, e)
            finally:
                os.close(fd)
            os.utime(e.path, ns=(e.mtime_ns, e.mtime_ns), dir_fd=fd_root, follow_symlinks=False)
            return
        if t == EntryType.HARDLINK:
            primary = self.image.entries[e.link]
            if primary.type in (EntryType.CHARDEV, EntryType.BLOCKDEV) and not self.is_root:
                return
            target = primary.path
            os.link(target, e.path, src_dir_fd=fd_root, dst_dir_fd=fd_root, follow_symlinks=False)
            return
        if t == EntryType.SYMLINK:
            os.symlink(e.target, e.path, dir_fd=fd_root)
        elif t == EntryType.FIFO:
            os.mkfifo(e.path, 0o600, dir_fd=fd_root)
        elif t in (EntryType.CHARDEV, EntryType.BLOCKDEV):
            if not self.is_root:
                self.warn_once("dev", "not root: device nodes are skipped")
                return
            kind = stat.S_IFCHR if t == EntryType.CHARDEV else stat.S_IFBLK
            os.mknod(e.path, kind | 0o600, os.makedev(*e.rdev), dir_fd=fd_root)
        self.apply_meta_path(e)

    def apply_meta_fd(self, fd: int, e: Entry) -> None:
        # order matters: chown clears setuid bits and security.capability
        if self.same_owner:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
        for name, value in e.xattrs.items():
            self.set_xattr(fd, name, value, e)

    def apply_meta_path(self, e: Entry) -> None:
        fd_root = self.root_fd
        if self.same_owner:
            os.chown(e.path, e.uid, e.gid, dir_fd=fd_root, follow_symlinks=False)
        if e.type != EntryType.SYMLINK:
            self._chmod_nofollow(e)
        if e.xattrs:
            # xattr calls take no dir_fd: go through /proc with the root fd
            proc = b"/proc/self/fd/%d/" % fd_root + e.path
            for name, value in e.xattrs.items():
                self.set_xattr(proc, name, value, e)
        os.utime(e.path, ns=(e.mtime_ns, e.mtime_ns), dir_fd=fd_root, follow_symlinks=False)

    def _chmod_nofollow(self, e: Entry) -> None:
        # fifos and devices: open O_PATH and chmod through /proc (no lchmod on Linux)
        fd = os.open(e.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            os.chmod(f"/proc/self/fd/{fd}", e.mode)
        finally:
            os.close(fd)

    def finish_dir(self, e: Entry) -> None:
        fd = os.open(e.path or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self.root_fd)
        try:
            self.apply_meta_fd(fd, e)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)

    def set_xattr(self, target: int | bytes, name: bytes, value: bytes, e: Entry) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as exc:
            shown = printable(name)
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EINVAL):
                self.warn_once("xattr:" + shown, f"cannot set xattr {shown} (first on {e.display()}): {exc.strerror}")
                return
            if exc.errno == errno.E2BIG or (exc.errno == errno.ENOSPC and self._has_room(len(value))):
                # ext4 says ENOSPC for a value larger than its xattr space (a block), not for a full disk
                raise SystemFailure(f"{e.display()}: xattr {shown} of {len(value)} bytes is too large for "
                                    "this file system") from exc
            raise

    def _has_room(self, need: int) -> bool:
        try:
            st = os.fstatvfs(self.root_fd)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize > need + (1 << 20)


_ZERO_CHUNK = bytes(1 << 20)


def _zeros(n: int) -> bytes:
    """n zero bytes to compare a chunk with: bytes, since bytes == memoryview compares
    element by element (a 16 GiB file of holes took 47 s, 5.6 of 7.4 s per 2 GiB)."""
    return _ZERO_CHUNK if n == len(_ZERO_CHUNK) else bytes(n)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

