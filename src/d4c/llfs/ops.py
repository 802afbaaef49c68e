"""The llfuse adapter: translates between llfuse's Operations interface and
the model (inode numbers and EntryAttributes in and out, FsError -> FUSEError).

llfuse ends its main loop -- and every container on the mount loses its
root -- on any exception other than FUSEError, so every handler goes through
one guard: domain errors become their errno, corruption becomes EIO with a
log line, and a bug becomes EIO with a traceback in the log; the mount stays up.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any, Callable, TypeVar

from ..errors import D4CError
from ._impl import llfuse
from .model import Attrs, FsError, ImageFS
from .threads import FreeMemoryReturner, keep_large_blocks

log = logging.getLogger("d4c.llfs")
TIMEOUT = 300.0  # contents never change under a mount: let the kernel cache
F = TypeVar("F", bound=Callable[..., Any])


returner = FreeMemoryReturner()


def guarded(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        returner.served()
        try:
            return fn(*args, **kwargs)
        except llfuse.FUSEError:
            raise
        except FsError as exc:
            raise llfuse.FUSEError(exc.errno) from None
        except D4CError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise llfuse.FUSEError(errno.EIO) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise llfuse.FUSEError(exc.errno or errno.EIO) from None
        except Exception:  # a bug: keep serving the other files
            log.exception("%s failed", fn.__name__)
            raise llfuse.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


def entry_attributes(a: Attrs) -> "llfuse.EntryAttributes":
    out = llfuse.EntryAttributes()
    out.st_ino = a.ino
    out.generation = 0
    out.entry_timeout = TIMEOUT
    out.attr_timeout = TIMEOUT
    out.st_mode = a.mode
    out.st_nlink = a.nlink
    out.st_uid = a.uid
    out.st_gid = a.gid
    out.st_rdev = a.rdev
    out.st_size = a.size
    out.st_blksize = 4096
    out.st_blocks = (a.size + 511) // 512
    out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = a.mtime_ns
    return out


class Operations(llfuse.Operations):  # type: ignore[misc,name-defined]
    def __init__(self, fs: ImageFS) -> None:
        super().__init__()
        self.fs = fs

    def init(self) -> None:  # llfuse calls it when serving starts
        keep_large_blocks()
        returner.start()

    @guarded
    def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        return entry_attributes(self.fs.lookup(parent_inode, name))

    @guarded
    def getattr(self, inode: int, ctx: Any = None) -> Any:
        return entry_attributes(self.fs.getattr(inode))

    @guarded
    def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @guarded
    def opendir(self, inode: int, ctx: Any) -> int:
        self.fs.readdir(inode, 1 << 62)  # checks it is a directory
        return inode

    @guarded
    def readdir(self, fh: int, off: int) -> Any:
        # a list, not a generator: errors must surface inside the guard
        return [(name, entry_attributes(attrs), next_off) for name, attrs, next_off in self.fs.readdir(fh, off)]

    @guarded
    def releasedir(self, fh: int) -> None:
        return None

    @guarded
    def open(self, inode: int, flags: int, ctx: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        with llfuse.lock_released:  # a delta rebuild must not stall other requests
            return self.fs.open(inode)

    @guarded
    def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # llfuse takes any buffer
        with llfuse.lock_released:
            return self.fs.read(fh, off, size)

    @guarded
    def release(self, fh: int) -> None:
        with llfuse.lock_released:  # stopping a stream's producer must not stall other requests
            self.fs.release(fh)

    @guarded
    def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return self.fs.getxattr(inode, name)
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                raise llfuse.FUSEError(llfuse.ENOATTR) from None
            raise

    @guarded
    def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.fs.listxattr(inode)

    @guarded
    def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            return False
        return True

    @guarded
    def statfs(self, ctx: Any) -> Any:
        total, files = self.fs.statfs()
        st = llfuse.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = (total + 4095) // 4096
        st.f_bfree = st.f_bavail = 0
        st.f_files = files
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        return None  # inodes live as long as the mount
