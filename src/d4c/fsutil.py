"""Small filesystem helpers: atomic outputs and efficient copies."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import BinaryIO, Iterator

from .errors import D4CError, NotFound, SystemFailure, from_oserror

COPY_CHUNK = 1 << 20


def exclusive_temp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file of mode 0600 under a random name (tempfile.mkstemp without
    importing tempfile, which costs 5 ms of every patch's start)."""
    for _ in range(100):
        path = os.path.join(directory, prefix + os.urandom(6).hex() + suffix)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", directory)


def fsync_dir(directory: str) -> None:
    """Make a rename or a new name in `directory` survive a power loss (the
    file's own fsync does not cover the directory entry)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write `path` through a temp file in the same directory; rename on success.

    A failure (or Ctrl-C) removes the temp file, so no half-written output is
    ever left under the final name.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = exclusive_temp(directory, "." + os.path.basename(path) + ".", ".tmp")
    except OSError as exc:
        raise from_oserror(exc, "cannot create output") from exc
    ok = False
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_UMASK)
        os.replace(tmp, path)
        ok = True
        fsync_dir(directory)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SystemFailure(f"no space left on device while writing {path}") from exc
        raise from_oserror(exc, f"cannot write {path}") from exc
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask() is process-wide, not thread-safe



def copy_range(src_fd: int, src_offset: int, length: int, dst: BinaryIO) -> None:
    """Copy `length` bytes from src_fd@src_offset to the current position of dst."""
    dst.flush()
    dst_fd = dst.fileno()
    remaining = length
    offset = src_offset
    use_cfr = hasattr(os, "copy_file_range")
    while remaining > 0:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, remaining, offset)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    use_cfr = False
                    # the kernel may have moved the fd: put the file object there
                    dst.seek(os.lseek(dst_fd, 0, os.SEEK_CUR))
                    continue
                raise
        else:
            data = os.pread(src_fd, min(COPY_CHUNK, remaining), offset)
            n = len(data)
            if n:
                dst.write(data)
                dst.flush()
        if n == 0:
            raise D4CError("unexpected end of data while copying")
        offset += n
        remaining -= n
    # copy_file_range advanced the fd offset; keep the Python file object in step
    dst.seek(os.lseek(dst_fd, 0, os.SEEK_CUR))


def open_input(path: str) -> BinaryIO:
    """`path` opened for reading; a missing file is NotFound (exit 4), any other
    refusal a one-line system error."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except OSError as exc:
        raise from_oserror(exc, "cannot read") from exc
