"""The llfuse adapter (d4c.llfs.ops) over a fake ImageFS: no mount, only the translation.

Every handler is called with llfuse's global lock held, as llfuse's workers call them
(open, read and release release it around the model's call).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Iterator

import llfuse
import pytest

from d4c.errors import CorruptImage, UsageError
from d4c.llfs import ops
from d4c.llfs.model import Attrs, FsError

ROOT = Attrs(1, stat.S_IFDIR | 0o755, 3, 0, 0, 4096, 1_000_000_000_000_000_001, 0)
FILE = Attrs(2, stat.S_IFREG | 0o644, 2, 1000, 100, 1025, 1_500_000_000_123_456_789, 0)
LINK = Attrs(3, stat.S_IFLNK | 0o777, 1, 0, 0, 4, 1, 0)
DEV = Attrs(4, stat.S_IFCHR | 0o600, 1, 0, 5, 0, 2, os.makedev(1, 3))
BY_INO = {a.ino: a for a in (ROOT, FILE, LINK, DEV)}
NAMES = {b"file": FILE, b"link": LINK, b"null": DEV}


class FakeFS:
    """The ImageFS methods Operations calls, over a root with three entries.
    `fail[method] = exc` makes that method raise exc; `calls` records each call."""

    def __init__(self) -> None:
        self.fail: dict[str, BaseException] = {}
        self.calls: list[tuple[object, ...]] = []
        self.held: dict[str, bool] = {}  # method -> whether it ran holding the global lock

    def _enter(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def lookup(self, parent: int, name: bytes) -> Attrs:
        self._enter("lookup", parent, name)
        if name not in NAMES:
            raise FsError(errno.ENOENT)
        return NAMES[name]

    def getattr(self, ino: int) -> Attrs:
        self._enter("getattr", ino)
        return BY_INO[ino]

    def readlink(self, ino: int) -> bytes:
        self._enter("readlink", ino)
        return b"file"

    def readdir(self, ino: int, start: int) -> list[tuple[bytes, Attrs, int]]:
        self._enter("readdir", ino, start)
        if ino != ROOT.ino:
            raise FsError(errno.ENOTDIR)
        return [(name, a, n + 1) for n, (name, a) in enumerate(sorted(NAMES.items()))][start:]

    def open(self, ino: int) -> int:
        self.held["open"] = holding_lock()
        self._enter("open", ino)
        return 10 + ino

    def read(self, fh: int, off: int, size: int) -> bytes:
        self.held["read"] = holding_lock()
        self._enter("read", fh, off, size)
        return b"abcdefgh"[off:off + size]

    def release(self, fh: int) -> None:
        self.held["release"] = holding_lock()
        self._enter("release", fh)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._enter("getxattr", ino, name)
        if name != b"user.a":
            raise FsError(errno.ENODATA)
        return b"1"

    def listxattr(self, ino: int) -> list[bytes]:
        self._enter("listxattr", ino)
        return [b"user.a"]

    def statfs(self) -> tuple[int, int]:
        self._enter("statfs")
        return 10_000, 12


def holding_lock() -> bool:
    """Whether this thread holds llfuse's global lock (releasing it is refused otherwise).
    Not a timed acquire from another thread: llfuse truncates the timeout to whole seconds, 0 waits forever."""
    try:
        llfuse.lock.release()
    except RuntimeError:
        return False
    llfuse.lock.acquire()
    return True


@pytest.fixture(autouse=True)
def fuse_lock() -> Iterator[None]:
    with llfuse.lock:
        yield


@pytest.fixture
def fs() -> FakeFS:
    return FakeFS()


@pytest.fixture
def fuse(fs: FakeFS) -> ops.Operations:
    return ops.Operations(fs)


def d4c_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "d4c.llfs"]


# ---------------------------------------------------------------- the guard

def test_fuse_error_passes_through_unlogged(fuse, fs, caplog) -> None:  # type: ignore[no-untyped-def]
    """A FUSEError the model raises is re-raised as it is, with no log line."""
    original = llfuse.FUSEError(errno.EACCES)
    fs.fail["getattr"] = original
    with caplog.at_level(logging.DEBUG, "d4c.llfs"), pytest.raises(llfuse.FUSEError) as info:
        fuse.getattr(2, None)
    assert info.value is original and info.value.errno == errno.EACCES
    assert d4c_records(caplog) == []


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ENOTDIR, errno.EINVAL, errno.EBADF])
def test_fs_error_becomes_its_errno(fuse, fs, caplog, code) -> None:  # type: ignore[no-untyped-def]
    """FsError(errno) is the model's answer, not a failure: that errno, no log line, no chained cause."""
    fs.fail["lookup"] = FsError(code, "why")
    with caplog.at_level(logging.DEBUG, "d4c.llfs"), pytest.raises(llfuse.FUSEError) as info:
        fuse.lookup(1, b"file", None)
    assert info.value.errno == code
    assert info.value.__suppress_context__ and info.value.__cause__ is None
    assert d4c_records(caplog) == []


def test_missing_name_is_enoent(fuse) -> None:  # type: ignore[no-untyped-def]
    """The fake's own FsError for an unknown name reaches the kernel as ENOENT."""
    with pytest.raises(llfuse.FUSEError) as info:
        fuse.lookup(1, b"nope", None)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("exc, text", [
    (CorruptImage("/img/top.cdimg", "etc/passwd: bad frame"),
     "read: corrupt image /img/top.cdimg: etc/passwd: bad frame"),
    (UsageError("something refused"), "read: something refused"),
])
def test_d4c_error_is_eio_with_one_line(fuse, fs, caplog, exc, text) -> None:  # type: ignore[no-untyped-def]
    """A D4CError (a corrupt image...) is EIO for the reader and one error line, no traceback."""
    fh = fuse.open(2, os.O_RDONLY, None)
    fs.fail["read"] = exc
    with caplog.at_level(logging.DEBUG, "d4c.llfs"), pytest.raises(llfuse.FUSEError) as info:
        fuse.read(fh, 0, 4)
    assert info.value.errno == errno.EIO
    records = d4c_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.ERROR, text)]
    assert records[0].exc_info is None


@pytest.mark.parametrize("exc, code, text", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC, "open: [Errno 28] No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied"), errno.EACCES, "open: [Errno 13] Permission denied"),
    (OSError("no errno at all"), errno.EIO, "open: no errno at all"),
])
def test_oserror_keeps_its_errno(fuse, fs, caplog, exc, code, text) -> None:  # type: ignore[no-untyped-def]
    """An OSError is its own errno (EIO when it has none) and one error line."""
    fs.fail["open"] = exc
    with caplog.at_level(logging.DEBUG, "d4c.llfs"), pytest.raises(llfuse.FUSEError) as info:
        fuse.open(2, os.O_RDONLY, None)
    assert info.value.errno == code
    records = d4c_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.ERROR, text)]
    assert records[0].exc_info is None


@pytest.mark.parametrize("exc", [KeyError("ino"), ZeroDivisionError("division by zero"), TypeError("bad")])
def test_bug_is_eio_with_traceback_and_serving_goes_on(fuse, fs, caplog, exc) -> None:  # type: ignore[no-untyped-def]
    """Any other exception (a bug) is EIO with a logged traceback, and the next request is answered."""
    fs.fail["getattr"] = exc
    with caplog.at_level(logging.DEBUG, "d4c.llfs"), pytest.raises(llfuse.FUSEError) as info:
        fuse.getattr(2, None)
    assert info.value.errno == errno.EIO
    records = d4c_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.ERROR, "getattr failed")]
    assert records[0].exc_info is not None and records[0].exc_info[1] is exc
    assert "Traceback" in caplog.text and type(exc).__name__ in caplog.text
    del fs.fail["getattr"]
    assert fuse.getattr(2, None).st_ino == 2


def test_every_handler_is_guarded(fuse, fs) -> None:  # type: ignore[no-untyped-def]
    """No handler that reaches the model lets a bug out as anything but FUSEError(EIO)."""
    calls = {
        "lookup": lambda: fuse.lookup(1, b"file", None),
        "getattr": lambda: fuse.getattr(2, None),
        "readlink": lambda: fuse.readlink(3, None),
        "readdir": lambda: fuse.readdir(1, 0),
        "open": lambda: fuse.open(2, os.O_RDONLY, None),
        "read": lambda: fuse.read(12, 0, 4),
        "release": lambda: fuse.release(12),
        "getxattr": lambda: fuse.getxattr(2, b"user.a", None),
        "listxattr": lambda: fuse.listxattr(2, None),
        "statfs": lambda: fuse.statfs(None),
    }
    for name, call in calls.items():
        fs.fail = {name: RuntimeError(f"bug in {name}")}
        with pytest.raises(llfuse.FUSEError) as info:
            call()
        assert info.value.errno == errno.EIO, name
    fs.fail = {"readdir": RuntimeError("bug in opendir's check")}
    with pytest.raises(llfuse.FUSEError) as info:
        fuse.opendir(1, None)
    assert info.value.errno == errno.EIO


# ---------------------------------------------------------------- the handlers

def test_entry_attributes_fields() -> None:
    """Every EntryAttributes field comes from the Attrs (times all mtime, 512-byte blocks rounded up)."""
    out = ops.entry_attributes(FILE)
    assert (out.st_ino, out.st_mode, out.st_nlink, out.st_uid, out.st_gid, out.st_size, out.st_rdev) == \
        (2, stat.S_IFREG | 0o644, 2, 1000, 100, 1025, 0)
    assert out.generation == 0
    assert out.entry_timeout == out.attr_timeout == ops.TIMEOUT
    assert out.st_blksize == 4096 and out.st_blocks == 3
    assert out.st_atime_ns == out.st_mtime_ns == out.st_ctime_ns == 1_500_000_000_123_456_789
    dev = ops.entry_attributes(DEV)
    assert dev.st_rdev == os.makedev(1, 3) and stat.S_ISCHR(dev.st_mode) and dev.st_blocks == 0 and dev.st_gid == 5
    assert ops.entry_attributes(Attrs(9, stat.S_IFREG, 1, 0, 0, 512, 0, 0)).st_blocks == 1
    assert ops.entry_attributes(Attrs(9, stat.S_IFREG, 1, 0, 0, 513, 0, 0)).st_blocks == 2


def test_lookup_and_getattr_convert(fuse, fs) -> None:  # type: ignore[no-untyped-def]
    """lookup and getattr hand the model's Attrs over as EntryAttributes of the right inode."""
    found = fuse.lookup(1, b"link", None)
    assert isinstance(found, llfuse.EntryAttributes)
    assert found.st_ino == 3 and stat.S_ISLNK(found.st_mode) and found.st_size == 4
    assert fuse.getattr(1).st_ino == 1 and stat.S_ISDIR(fuse.getattr(1, None).st_mode)
    assert ("lookup", 1, b"link") in fs.calls and ("getattr", 1) in fs.calls


def test_readdir_is_a_list_of_converted_entries(fuse, fs) -> None:  # type: ignore[no-untyped-def]
    """readdir answers a list of (name, EntryAttributes, next offset) from the given offset."""
    out = fuse.readdir(1, 0)
    assert type(out) is list
    assert [(name, attrs.st_ino, off) for name, attrs, off in out] == \
        [(b"file", 2, 1), (b"link", 3, 2), (b"null", 4, 3)]
    assert all(isinstance(attrs, llfuse.EntryAttributes) for _, attrs, _ in out)
    assert [name for name, _, _ in fuse.readdir(1, 2)] == [b"null"]
    assert fs.calls[-1] == ("readdir", 1, 2)


def test_readdir_errors_surface_inside_the_guard(fuse, fs, caplog) -> None:  # type: ignore[no-untyped-def]
    """A model that fails while its entries are produced fails the readdir call itself (a generator
    handed to llfuse would raise outside the guard and end the main loop)."""
    def failing(ino: int, start: int) -> Iterator[tuple[bytes, Attrs, int]]:
        yield b"file", FILE, 1
        raise CorruptImage("/img/top.cdimg", "tree")
    fs.readdir = failing  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, "d4c.llfs"), pytest.raises(llfuse.FUSEError) as info:
        fuse.readdir(1, 0)
    assert info.value.errno == errno.EIO
    assert [r.getMessage() for r in d4c_records(caplog)] == ["readdir: corrupt image /img/top.cdimg: tree"]


def test_opendir_checks_it_is_a_directory(fuse, fs) -> None:  # type: ignore[no-untyped-def]
    """opendir answers the inode as handle for a directory and ENOTDIR otherwise."""
    assert fuse.opendir(1, None) == 1
    with pytest.raises(llfuse.FUSEError) as info:
        fuse.opendir(2, None)
    assert info.value.errno == errno.ENOTDIR
    assert fuse.releasedir(1) is None


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND,
                                   os.O_WRONLY | os.O_CREAT | os.O_TRUNC])
def test_open_for_writing_is_erofs(fuse, fs, flags) -> None:  # type: ignore[no-untyped-def]
    """An open that could change the file is EROFS, and the model is not asked."""
    with pytest.raises(llfuse.FUSEError) as info:
        fuse.open(2, flags, None)
    assert info.value.errno == errno.EROFS
    assert not [c for c in fs.calls if c[0] == "open"]


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK])
def test_open_read_release(fuse, fs, flags) -> None:  # type: ignore[no-untyped-def]
    """A read-only open answers the model's handle; read and release pass it on."""
    fh = fuse.open(2, flags, None)
    assert fh == 12
    assert bytes(fuse.read(fh, 2, 3)) == b"cde"
    assert fuse.release(fh) is None
    assert fs.calls == [("open", 2), ("read", 12, 2, 3), ("release", 12)]


def test_model_calls_run_without_the_global_lock(fuse, fs) -> None:  # type: ignore[no-untyped-def]
    """open, read and release let other requests in meanwhile (a delta rebuild takes seconds)."""
    assert holding_lock()  # the fixture holds it, as llfuse does around a handler
    fh = fuse.open(2, os.O_RDONLY, None)
    fuse.read(fh, 0, 1)
    fuse.release(fh)
    assert fs.held == {"open": False, "read": False, "release": False}
    assert holding_lock()  # taken back after each call


def test_getxattr_enodata_is_enoattr(fuse, fs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A missing attribute is llfuse.ENOATTR (ENODATA on Linux: patched here to tell the two apart);
    other errnos and values pass as they are."""
    monkeypatch.setattr(llfuse, "ENOATTR", 93)  # macOS's value
    assert fuse.getxattr(2, b"user.a", None) == b"1"
    with pytest.raises(llfuse.FUSEError) as info:
        fuse.getxattr(2, b"user.missing", None)
    assert info.value.errno == 93
    fs.fail["getxattr"] = FsError(errno.ENOENT)
    with pytest.raises(llfuse.FUSEError) as info:
        fuse.getxattr(2, b"user.a", None)
    assert info.value.errno == errno.ENOENT


def test_readlink_and_listxattr_pass_through(fuse, fs) -> None:  # type: ignore[no-untyped-def]
    """readlink and listxattr answer what the model answers."""
    assert fuse.readlink(3, None) == b"file"
    assert fuse.listxattr(2, None) == [b"user.a"]
    assert fs.calls == [("readlink", 3), ("listxattr", 2)]


@pytest.mark.parametrize("mode, allowed", [
    (os.F_OK, True), (os.R_OK, True), (os.X_OK, True), (os.R_OK | os.X_OK, True),
    (os.W_OK, False), (os.R_OK | os.W_OK, False), (os.R_OK | os.W_OK | os.X_OK, False),
])
def test_access_refuses_writing(fuse, mode, allowed) -> None:  # type: ignore[no-untyped-def]
    """access answers False whenever W_OK is asked, True otherwise."""
    assert fuse.access(2, mode, None) is allowed


def test_statfs_reports_a_full_read_only_fs(fuse) -> None:  # type: ignore[no-untyped-def]
    """statfs: the bytes in 4 KiB blocks rounded up, the file count, nothing free."""
    st = fuse.statfs(None)
    assert isinstance(st, llfuse.StatvfsData)
    assert st.f_bsize == st.f_frsize == 4096
    assert st.f_blocks == 3 and st.f_files == 12
    assert st.f_bfree == st.f_bavail == st.f_ffree == st.f_favail == 0
    assert st.f_namemax == 255


def test_forget_keeps_inodes(fuse, fs) -> None:  # type: ignore[no-untyped-def]
    """forget does nothing: inodes live as long as the mount."""
    assert fuse.forget([(2, 1), (3, 5)]) is None
    assert fs.calls == []
