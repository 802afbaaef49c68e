"""llfs: the image-stack file system, as a model and through a real FUSE mount."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from conftest import IS_ROOT
from helpers import assert_one_line_error, diff_trees, fuse_server_pids, need, run_cli, snapshot_tree

from d4c.image.reader import Image
from d4c.errors import CorruptImage
from d4c.llfs import model as llfs_model
from d4c.llfs import streams
from d4c.llfs.cache import BodyCache
from d4c.llfs.model import FsError, ImageFS, Options
from d4c.image.stack import open_stack, resolve_stack
from d4c.image.tree import Entry, EntryType, Storage

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def test_resolve_stack(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert resolve_stack(stack[-1]) == stack
    assert resolve_stack(stack[-1], chain=stack[:-1]) == stack
    code, _, err = run_cli("mount", "--cdimg", stack[-1], "--cdimg-dir", str(tmp_path), str(tmp_path))
    assert_one_line_error(code, err, 4)  # no images below it there
    assert "is a delta of image" in err
    code, _, err = run_cli("mount", "--cdimg", stack[-1], "--base", stack[0], "--delta", stack[2], str(tmp_path))
    assert_one_line_error(code, err, 3)  # a link that does not match


def model(stack: list[str], tmp_path, limit: int = 1 << 30) -> ImageFS:  # type: ignore[no-untyped-def]
    return ImageFS(open_stack(stack), Options(str(tmp_path / "cache"), limit))


def listing(fs: ImageFS, ino: int) -> list[tuple[bytes, int]]:
    """A directory's (name, inode) pairs, asked for as the kernel does: from the
    last offset taken until a call gives nothing."""
    out: list[tuple[bytes, int]] = []
    offset = 0
    while page := fs.readdir(ino, offset):
        assert len(page) <= llfs_model.READDIR_BATCH
        out += [(name, attrs.ino) for name, attrs, _ in page]
        offset = page[-1][2]
    return out


def walk(fs: ImageFS, ino: int = 1, prefix: bytes = b"") -> dict[bytes, int]:
    out = {}
    for name, child in listing(fs, ino):
        path = prefix + name
        out[path] = child
        if EntryType.DIR == fs.entry(child).type:
            out.update(walk(fs, child, path + b"/"))
    return out


def test_readdir_pages(stack, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A call gives at most READDIR_BATCH entries; the pages add up to the directory."""
    fs = model(stack, tmp_path)
    try:
        whole = listing(fs, 1)
        monkeypatch.setattr(llfs_model, "READDIR_BATCH", 2)
        assert len(whole) > 4 and listing(fs, 1) == whole
        assert [name for name, _, _ in fs.readdir(1, 3)] == [name for name, _ in whole[3:5]]
    finally:
        fs.close()


def test_model_equals_the_top_image(stack, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fs = model(stack, tmp_path)
    try:
        with Image(images[3]) as want:
            paths = walk(fs)
            assert sorted(paths) == sorted(e.path for e in want.entries[1:])
            for e in want.entries[1:]:
                ino = paths[e.path]
                a = fs.getattr(ino)
                mode = 0o777 if e.type == EntryType.SYMLINK else e.mode
                assert (a.uid, a.gid, a.mtime_ns, a.mode & 0o7777) == (e.uid, e.gid, e.mtime_ns, mode)
                if e.type == EntryType.FILE:
                    fh = fs.open(ino)
                    data = b"".join(fs.read(fh, off, 7000) for off in range(0, max(e.size, 1), 7000))
                    fs.release(fh)
                    assert data == want.read_body(e), e.path
                elif e.type == EntryType.SYMLINK:
                    assert fs.readlink(ino) == e.target
            # hard links share an inode and count their names
            hl = [e for e in want.entries if e.type == EntryType.HARDLINK]
            for e in hl:
                assert paths[e.path] == paths[want.entries[e.link].path]
                assert fs.getattr(paths[e.path]).nlink >= 2
        # stable: a second mount numbers the same
        assert walk(model(stack, tmp_path / "again")) == paths
        with pytest.raises(FsError) as info:
            fs.lookup(1, b"no-such-file")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(FsError) as info:
            fs.readdir(paths[b"etc/conf"], 0)
        assert info.value.errno == errno.ENOTDIR
    finally:
        fs.close()


def test_out_of_order_reads_stay_streamed(stack, images, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Several FUSE workers hand the kernel's readahead requests over slightly
    out of order: a large unchanged file serves them from the stream, and only
    a real jump back (before what the stream keeps) goes to the cache."""
    monkeypatch.setattr(llfs_model, "KEEP_BEHIND", 1 << 20)  # the test file is 2.4 MB
    fs = model(stack, tmp_path)
    try:
        ino = walk(fs)[b"lib/libbig.so"]
        with Image(images[3]) as want:
            body = want.read_body(want.lookup(b"lib/libbig.so"))
        step = 128 << 10
        offsets = list(range(0, len(body), step))
        for i in range(0, len(offsets) - 1, 2):  # pairs swapped: 128K, 0, 384K, 256K, ...
            offsets[i], offsets[i + 1] = offsets[i + 1], offsets[i]
        fh = fs.open(ino)
        got = {off: fs.read(fh, off, step) for off in offsets}
        assert b"".join(got[off] for off in sorted(got)) == body
        assert os.listdir(tmp_path / "cache") == []  # nothing went to the cache
        assert fs.read(fh, 0, 10) == body[:10]  # 2.4 MB later, offset 0 is behind the stream
        assert len(os.listdir(tmp_path / "cache")) == 1
        fs.release(fh)
    finally:
        fs.close()


def test_random_access_streams_a_large_body_to_the_cache(stack, images, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A jump back in a body over ONE_SHOT_MAX sends it to the cache in chunks:
    read whole, a body of several GiB was twice its size in memory."""
    monkeypatch.setattr(llfs_model, "KEEP_BEHIND", 1 << 20)
    monkeypatch.setattr(llfs_model, "ONE_SHOT_MAX", 1 << 20)  # the test file is 2.4 MB
    monkeypatch.setattr(streams, "ONE_SHOT_MAX", 1 << 20)

    def whole(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a large body was read into memory whole")

    with Image(images[3]) as want:
        body = want.read_body(want.lookup(b"lib/libbig.so"))
    monkeypatch.setattr(Image, "read_body", whole)
    fs = model(stack, tmp_path)
    try:
        fh = fs.open(walk(fs)[b"lib/libbig.so"])
        assert b"".join(fs.read(fh, off, 128 << 10) for off in range(0, len(body), 128 << 10)) == body
        assert fs.read(fh, 4096, 10) == body[4096:4106]  # behind the stream: the cache
        assert len(os.listdir(tmp_path / "cache")) == 1
        fs.release(fh)
    finally:
        fs.close()


def read_all(fs: ImageFS, ino: int, pause: float = 0.0) -> bytes:
    fh = fs.open(ino)
    parts, off = [], 0
    while chunk := fs.read(fh, off, 128 << 10):
        parts.append(bytes(chunk))
        off += len(chunk)
        time.sleep(pause)
    fs.release(fh)
    return b"".join(parts)


@pytest.mark.parametrize("verified", [False, True])
def test_frames_decoded_by_reader_and_helper(stack, images, tmp_path, monkeypatch, verified) -> None:  # type: ignore[no-untyped-def]
    """A large body's frames are shared between the reading thread and one pool
    helper: both decode, and many readers at once each get the file's bytes."""
    decoders: list[str] = []
    decode = Image.decode_frame
    helper_decodes = threading.Event()

    def counted(self, *args):  # type: ignore[no-untyped-def]
        name = threading.current_thread().name
        decoders.append(name)
        if name.startswith("d4c-decode"):
            helper_decodes.set()
        elif len(decoders) == 1:  # the reader's first frame waits for the helper to start on another
            helper_decodes.wait(10)  # (a loaded machine started the helper after the reader was done)
        return decode(self, *args)

    with Image(images[3]) as want:
        body = want.read_body(want.lookup(b"lib/libbig.so"))
    monkeypatch.setattr(Image, "decode_frame", counted)
    fs = ImageFS(open_stack(stack), Options(str(tmp_path / "cache"), verified_bodies=verified))
    try:
        ino = walk(fs)[b"lib/libbig.so"]
        assert read_all(fs, ino) == body
        helped = [name for name in decoders if name.startswith("d4c-decode")]
        assert helped and len(helped) < len(decoders)  # both hands decoded
        results: list[bool] = []
        readers = [threading.Thread(target=lambda n=n: results.append(read_all(fs, ino, n % 3 * 0.002) == body),
                                    daemon=True) for n in range(12)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(30)
        assert results == [True] * 12
        assert os.listdir(tmp_path / "cache") == []  # all streamed
    finally:
        fs.close()


class FramedBody:
    """A stand-in image for llfs's frame reader: frame i is FRAME bytes of i,
    "decoded" as is, after delay[i] seconds, failing where told."""

    FRAME = 64 << 10
    path = "fake.cdimg"

    def __init__(self, count: int, delay: dict[int, float] | None = None, bad: tuple[int, ...] = (),
                 unreadable_at: int | None = None, extra: bool = False, empty: tuple[int, ...] = ()) -> None:
        import hashlib
        import types
        self.count, self.delay, self.bad = count, delay or {}, bad
        self.unreadable_at, self.extra, self.empty = unreadable_at, extra, empty
        self.body = b"".join(bytes([i]) * self.FRAME for i in range(count) if i not in empty)
        self.stored = types.SimpleNamespace(size=len(self.body), digest=hashlib.sha256(self.body).digest(),
                                            display=lambda: "big")
        self.decoded_by: list[str] = []

    def body_frames(self, stored):  # type: ignore[no-untyped-def]
        for i in range(self.count + self.extra):
            if i == self.unreadable_at:
                raise CorruptImage(self.path, "file is truncated")
            if i == self.count:  # as Image.body_frames: data after the content
                raise CorruptImage(self.path, "data after the last frame")
            yield memoryview(bytes([i]) * self.FRAME), 0 if i in self.empty else self.FRAME

    def decode_frame(self, stored, frame, size):  # type: ignore[no-untyped-def]
        i = frame[0]
        self.decoded_by.append(threading.current_thread().name)
        time.sleep(self.delay.get(i, 0))
        if i in self.bad:
            raise CorruptImage(self.path, f"frame {i} is damaged")
        return b"" if i in self.empty else bytes(frame)


def read_frames(reader, pause: float = 0.0, timeout: float = 20.0,  # type: ignore[no-untyped-def]
                size: int = FramedBody.FRAME) -> tuple[bytes, BaseException | None]:
    """Read a frame reader to its end or first error, on a daemon thread: a hang
    fails the test instead of hanging pytest."""
    out: list[bytes] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            while chunk := reader.read(size):
                out.append(bytes(chunk))
                if pause:
                    time.sleep(pause)
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the reader hangs"
    return b"".join(out), (error[0] if error else None)


@pytest.mark.parametrize("case", ["decode fails", "read fails", "frames past the size"])
def test_frames_fail_while_the_other_hand_decodes(monkeypatch, case) -> None:  # type: ignore[no-untyped-def]
    """A frame fails while the other hand still decodes the one before it: the
    frames before it are served, then the failure, for good; nothing hangs."""
    monkeypatch.setattr(streams, "AHEAD", 4)
    slow = {i: 0.05 for i in range(8)}  # every hand is busy long enough for the other to claim
    image = {"decode fails": FramedBody(8, slow, bad=(3,)),
             "read fails": FramedBody(8, slow, unreadable_at=3),
             "frames past the size": FramedBody(8, slow, extra=True)}[case]
    reader = streams.Frames(image, image.stored, True)  # type: ignore[arg-type]
    got, error = read_frames(reader)
    assert isinstance(error, CorruptImage)
    # frames past the size fail the read of the last frame: no read would ever meet them
    served = 7 if case == "frames past the size" else 3
    assert got == image.body[:served * FramedBody.FRAME]
    with pytest.raises(CorruptImage):
        reader.read(1)
    reader.close()


@pytest.mark.parametrize("verified", [False, True])
def test_frames_helper_leaves_a_slow_reader(monkeypatch, verified) -> None:  # type: ignore[no-untyped-def]
    """A helper leaves a reader that stops reading and is called back when it
    reads on: the body comes out whole and in order, decoded by both hands."""
    monkeypatch.setattr(streams, "HELPER_PATIENCE", 0.002)
    calls: list[int] = []
    help_ = streams.Frames._help
    monkeypatch.setattr(streams.Frames, "_help", lambda self: (calls.append(1), help_(self))[1])
    image = FramedBody(16)
    got, error = read_frames(streams.Frames(image, image.stored, verified), pause=0.02)  # type: ignore[arg-type]
    assert error is None and got == image.body
    assert len(calls) >= 2  # called back after leaving
    assert any(name.startswith("d4c-decode") for name in image.decoded_by)


@pytest.mark.parametrize("verified", [False, True])
def test_frames_past_an_empty_frame(verified) -> None:  # type: ignore[no-untyped-def]
    """An empty frame inside a body (valid, though our writer makes none) is not
    the end of the file: the rest is served, and checked unless verified."""
    image = FramedBody(5, empty=(1, 2))
    got, error = read_frames(streams.Frames(image, image.stored, verified))  # type: ignore[arg-type]
    assert error is None and got == image.body


def test_read_after_release_is_ebadf(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A read that found its handle just before the release fails; it does not
    open a new stream that nothing would close."""
    fs = model(stack, tmp_path)
    try:
        fh = fs.open(walk(fs)[b"lib/libbig.so"])
        handle = fs._handles[fh]
        assert len(fs.read(fh, 0, 4096)) == 4096
        fs.release(fh)
        with pytest.raises(FsError) as info:
            handle.read(4096, 4096)
        assert info.value.errno == errno.EBADF and handle.reader is None
    finally:
        fs.close()


def test_frames_two_hands_stress() -> None:
    """Random disk and decode delays, damaged frames and early closes around the
    two hands' hand-offs: every body comes out whole, or up to its damaged frame
    and then the error, and no reader hangs."""
    rnd = random.Random(4)

    class Jittery(FramedBody):
        def body_frames(self, stored):  # type: ignore[no-untyped-def]
            for item in super().body_frames(stored):
                time.sleep(rnd.choice((0, 0, 0.0005, 0.002)))
                yield item

        def decode_frame(self, stored, frame, size):  # type: ignore[no-untyped-def]
            time.sleep(rnd.choice((0, 0, 0.0002, 0.001)))
            return super().decode_frame(stored, frame, size)

    for _ in range(500):
        count = rnd.randint(1, 6)
        bad = (rnd.randrange(count),) if rnd.random() < 0.2 else ()
        image = Jittery(count, bad=bad)
        reader = streams.Frames(image, image.stored, rnd.random() < 0.5)  # type: ignore[arg-type]
        if rnd.random() < 0.1 and not bad:  # released after its first read
            assert bytes(reader.read(100)) == image.body[:100]
            reader.close()
            continue
        got, error = read_frames(reader, timeout=10, size=7000)
        assert got == image.body[:(bad[0] if bad else count) * FramedBody.FRAME]
        assert isinstance(error, CorruptImage) == bool(bad)
        reader.close()


def test_frames_closed_while_helping(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A helper waiting for its reader to catch up leaves when the reader is
    closed: the decode pool is free for the next files at once."""
    monkeypatch.setattr(streams, "HELPER_PATIENCE", 30.0)  # only the close may end the wait
    monkeypatch.setattr(streams, "AHEAD", 0)  # a helper decodes one frame, then waits
    for _ in range(streams.DECODERS):  # a waiting helper on every pool thread
        image = FramedBody(4)
        reader = streams.Frames(image, image.stored, True)  # type: ignore[arg-type]
        assert bytes(reader.read(10)) == image.body[:10]
        deadline = time.monotonic() + 10
        while 1 not in reader._decoded and time.monotonic() < deadline:  # the helper has its frame
            time.sleep(0.001)
        assert 1 in reader._decoded
        reader.close()
    streams._pool("decode", streams.DECODERS).submit(lambda: None).result(timeout=5)


def test_rebuilt_once_and_cache_bounded(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fs = model(stack, tmp_path, limit=150_000)
    try:
        tool = fs.lookup(fs.lookup(1, b"bin").ino, b"tool")
        e = fs.entry(tool.ino)
        image, stored = fs.top.resolve(e)
        assert image.holder(stored).storage == Storage.DELTA  # needs the delta chain
        builds = []
        real = image.read_body

        def counting(entry):  # type: ignore[no-untyped-def]
            builds.append(1)
            time.sleep(0.05)
            return real(entry)
        image.read_body = counting  # type: ignore[method-assign]
        handles: list[int] = []
        threads = [threading.Thread(target=lambda: handles.append(fs.open(tool.ino))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(builds) == 1 and len(handles) == 6
        for fh in handles:
            fs.release(fh)
        assert fs.cache.used <= 150_000
        # a second rebuilt file pushes the first out (limit ~1.5 files of this size)
        lib = fs.lookup(fs.lookup(1, b"lib").ino, b"libfoo.so.1.3")
        fs.release(fs.open(lib.ino))
        assert fs.cache.used <= 150_000
        assert not os.path.exists(fs.cache.path(e.digest or b""))
    finally:
        fs.close()


def test_cache_refuses_wrong_bodies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = BodyCache(str(tmp_path / "c"), 1 << 20)
    with pytest.raises(CorruptImage):
        cache.open(b"\1" * 32, 6, lambda: b"hello")
    assert os.listdir(tmp_path / "c") == []


def cached_body(cache: BodyCache, data: bytes, built: list[bytes]) -> bytes:
    """The content the cache serves for `data`, noting each time it had to build it."""
    digest = hashlib.sha256(data).digest()
    fd = cache.open(digest, len(data), lambda: built.append(data) or data)
    try:
        return os.pread(fd, len(data) + 1, 0)
    finally:
        os.close(fd)


def test_cache_checks_bodies_of_an_earlier_mount(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good, torn = b"kept intact " * 1000, b"torn by a crash " * 1000
    built: list[bytes] = []
    first = BodyCache(str(tmp_path / "c"), 1 << 20)
    assert cached_body(first, good, built) == good and cached_body(first, torn, built) == torn
    assert len(built) == 2
    path = first.path(hashlib.sha256(torn).digest())
    with open(path, "r+b") as f:  # same size, other bytes: only the digest can tell
        f.write(b"\0" * 4096)
    later = BodyCache(str(tmp_path / "c"), 1 << 20)  # the next mount on this cache directory
    assert cached_body(later, good, built) == good and len(built) == 2  # reused, not rebuilt
    assert cached_body(later, torn, built) == torn and len(built) == 3  # rebuilt, not served torn
    with open(path, "rb") as f:
        assert f.read() == torn
    assert cached_body(later, torn, built) == torn and len(built) == 3
    assert [n for n in os.listdir(tmp_path / "c") if n.startswith(".tmp-")] == []


def test_cache_body_evicted_at_once_is_still_served(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Another thread's eviction may unlink a body the moment it is written: the
    caller reads it all the same (an fd opened before the rename)."""
    rename = os.rename

    def rename_then_evicted(src: str, dst: str) -> None:
        rename(src, dst)
        os.unlink(dst)

    monkeypatch.setattr(llfs_model.os, "rename", rename_then_evicted)
    body = b"evicted before its reader opened it " * 100
    assert cached_body(BodyCache(str(tmp_path / "c"), 1 << 20), body, []) == body


def test_cache_makes_room_on_a_full_disk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    need(IS_ROOT, "a small tmpfs for a full disk needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        cache = BodyCache(str(small / "c"), 1 << 30)  # the disk fills long before the limit
        built: list[bytes] = []
        one, two = os.urandom(150_000), os.urandom(150_000)
        assert cached_body(cache, one, built) == one
        assert cached_body(cache, two, built) == two  # the disk was full: the first body made room
        assert not os.path.exists(cache.path(hashlib.sha256(one).digest()))
        with pytest.raises(OSError) as info:  # more than eviction could free: a clear error ...
            cached_body(cache, os.urandom(300_000), built)
        assert info.value.errno == errno.ENOSPC and "body cache" in str(info.value)
        assert os.path.exists(cache.path(hashlib.sha256(two).digest()))  # ... and the cache kept
        assert [n for n in os.listdir(small / "c") if n.startswith(".tmp-")] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---------------------------------------------------------------- real mounts

def fuse_ok() -> None:
    need(IS_ROOT, "mounting needs root (allow_other, device nodes)")
    need(os.path.exists("/dev/fuse"), "/dev/fuse is missing")


def mount(top: str, mnt: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "d4c", "mount", "--background", "--cdimg", top, *extra, mnt],
                          capture_output=True, text=True, env=env, timeout=60)


class Mounted:
    def __init__(self, top: str, mnt: str, *extra: str) -> None:
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        p = mount(top, mnt, *extra)
        assert p.returncode == 0, p.stderr
        assert os.path.ismount(mnt)

    def __enter__(self) -> str:
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        if os.path.ismount(self.mnt):
            code, _, err = run_cli("umount", self.mnt)
            if code:
                subprocess.run(["fusermount3", "-u", "-z", self.mnt])
        for _ in range(50):
            if not os.path.ismount(self.mnt):
                break
            time.sleep(0.1)
        assert not os.path.ismount(self.mnt)


@pytest.mark.parametrize("extra", [[], ["--verified-bodies"]])
def test_mounted_tree_equals_unpack(stack, images, tmp_path, extra) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    code, _, err = run_cli("unpack", "--cdimg", images[3], "--out", str(tmp_path / "want"))
    assert code == 0, err
    with Mounted(stack[-1], str(tmp_path / "mnt"), *extra) as mnt:
        got = snapshot_tree(mnt)
        assert diff_trees(got, snapshot_tree(str(tmp_path / "want"))) == []
        st = os.stat(os.path.join(mnt, "bin/tool"))
        assert st.st_nlink == 1 and os.stat(mnt).st_ino == 1
        with pytest.raises(OSError) as info:
            open(os.path.join(mnt, "bin/tool"), "wb")
        assert info.value.errno in (errno.EROFS, errno.EACCES)


def stored_body(stack: list[str], path: bytes) -> tuple[str, int, int, Entry]:
    """Where the stack stores the body of `path`: (image, file offset, length, stored entry)."""
    imgs = open_stack(stack)
    try:
        image, stored = imgs[-1].resolve(imgs[-1].lookup(path))
        stored = image.holder(stored)
        return image.path, image.info.body_offset + stored.body_offset, stored.body_length, stored
    finally:
        for i in imgs:
            i.close()


def damaged_copy(stack: list[str], folder: str, damage: dict[str, list[int]]) -> str:
    """The stack's images copied into `folder`, with the bytes at the given
    offsets of the given images inverted; returns the copy of the top image."""
    os.makedirs(folder)
    for p in stack:
        with open(p, "rb") as f:
            data = bytearray(f.read())
        for at in damage.get(p, []):
            data[at] ^= 0xFF
        with open(os.path.join(folder, os.path.basename(p)), "wb") as f:
            f.write(data)
    return os.path.join(folder, os.path.basename(stack[-1]))


def test_corrupt_body_is_eio_and_mount_survives(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    # damage the payload of bin/tool's delta in the top image (header intact)
    imgs = open_stack(stack)
    try:
        top = imgs[-1]
        e = next(x for x in top.entries if x.path == b"bin/tool")
        assert e.storage == Storage.DELTA
        where = top.info.body_offset + e.delta_steps[0].offset + e.delta_steps[0].length // 2
    finally:
        for i in imgs:
            i.close()
    top_copy = damaged_copy(stack, str(tmp_path / "images"), {stack[-1]: [where]})
    log = str(tmp_path / "fs.log")
    with Mounted(top_copy, str(tmp_path / "mnt"), "--log", log) as mnt:
        with pytest.raises(OSError) as info:
            with open(os.path.join(mnt, "bin/tool"), "rb") as f:
                f.read()
        assert info.value.errno == errno.EIO
        with open(os.path.join(mnt, "etc/conf"), "rb") as f:  # the rest is still served
            assert f.read() == b"conf=1\n"
        assert os.path.ismount(mnt)
    with open(log) as f:
        assert "bin/tool" in f.read()


@pytest.mark.parametrize("extra", [[], ["--verified-bodies"]])
def test_damaged_frames_are_eio(stack, tmp_path, extra) -> None:  # type: ignore[no-untyped-def]
    """A damaged frame of a large unchanged file is EIO, never a short file (the
    kernel's readahead may meet the error first), and so is a file rebuilt from
    a damaged delta.  --verified-bodies (how di3fs mounts: it checked every body
    at load) skips the second sha256 pass over unchanged files, not zstd's frame
    checksums."""
    fuse_ok()
    holder, start, length, big = stored_body(stack, b"lib/libbig.so")
    assert big.storage == Storage.FRAME and big.size > (2 << 20)  # several frames, read ahead
    frame_at = start + length * 3 // 4
    imgs = open_stack(stack)
    try:
        tool = next(x for x in imgs[-1].entries if x.path == b"bin/tool")
        delta_at = imgs[-1].info.body_offset + tool.delta_steps[0].offset + tool.delta_steps[0].length // 2
    finally:
        for i in imgs:
            i.close()
    damage: dict[str, list[int]] = {holder: [frame_at]}
    damage.setdefault(stack[-1], []).append(delta_at)
    top_copy = damaged_copy(stack, str(tmp_path / "images"), damage)
    with Mounted(top_copy, str(tmp_path / "mnt"), *extra) as mnt:
        for name in ("lib/libbig.so", "bin/tool"):
            with pytest.raises(OSError) as info:
                with open(os.path.join(mnt, name), "rb") as f:
                    f.read()
            assert info.value.errno == errno.EIO, name
        with open(os.path.join(mnt, "etc/conf"), "rb") as f:
            assert f.read() == b"conf=1\n"


def test_umount_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("umount", str(tmp_path))
    assert_one_line_error(code, err, 2)


@pytest.mark.parametrize("workers", ["0", "-2", "many"])
def test_mount_refuses_bad_worker_counts(stack, tmp_path, workers) -> None:  # type: ignore[no-untyped-def]
    """Refused before mounting: llfuse raised on them after the mount was up (a
    traceback, and a dead mount left behind; --background even exited 0)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for background in ([], ["--background"]):
        code, _, err = run_cli("mount", *background, "--workers", workers, "--cdimg", stack[-1], str(mnt))
        assert_one_line_error(code, err, 2)
        assert "--workers" in err and not os.path.ismount(mnt)


def test_overlay_on_the_mount(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The mount as an overlay lower layer: writes and copy-ups land in the upper
    dir, the lower never changes, programs run and setuid bits are kept."""
    fuse_ok()
    with Mounted(stack[-1], str(tmp_path / "mnt"), "--allow-suid-dev") as mnt:
        before = snapshot_tree(mnt)
        upper, work, merged = (str(tmp_path / n) for n in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            os.makedirs(d)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={mnt},upperdir={upper},workdir={work}", merged], check=True)
        try:
            with open(os.path.join(merged, "etc/conf"), "rb") as f:
                assert f.read() == b"conf=1\n"
            with open(os.path.join(merged, "written"), "w") as f:
                f.write("a new file")
            with open(os.path.join(merged, "etc/conf"), "ab") as f:  # copy-up of a lower file
                f.write(b"more=2\n")
            os.unlink(os.path.join(merged, "empty"))  # a whiteout in the upper dir
            assert os.path.exists(os.path.join(upper, "written"))
            with open(os.path.join(upper, "etc/conf"), "rb") as f:
                assert f.read() == b"conf=1\nmore=2\n"
            out = subprocess.run([os.path.join(merged, "bin/hello")], capture_output=True, text=True, check=True)
            assert out.stdout == "hello from the image\n"
            assert os.stat(os.path.join(merged, "bin/su-tool")).st_mode & 0o7777 == 0o4755
            assert os.stat(os.path.join(merged, "dev/null")).st_rdev == os.makedev(1, 3)
            assert os.getxattr(os.path.join(merged, "noted"), "user.note") == b"hi"
        finally:
            subprocess.run(["umount", merged], check=True)
        assert snapshot_tree(mnt) == before  # the lower never changed
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if f" {os.path.abspath(mnt)} " in x)
        assert "nosuid" not in line.split(" - ")[0] and "nodev" not in line.split(" - ")[0]


def test_stale_mount_is_cleaned(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    from d4c.llfs.mounts import fstype_at
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    for cleaner in ("umount", "mount"):
        p = mount(stack[-1], mnt)
        assert p.returncode == 0, p.stderr
        os.kill(fuse_server_pids(mnt)[0], 9)
        for _ in range(50):
            try:
                os.stat(mnt)
            except OSError as exc:
                assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
                break
            time.sleep(0.1)
        assert fstype_at(mnt) == "fuse.d4c"  # stale: still in the mount table
        if cleaner == "umount":
            code, _, err = run_cli("umount", mnt)
            assert code == 0, err
            assert fstype_at(mnt) is None
        else:
            p = mount(stack[-1], mnt)  # the next mount clears it first
            assert p.returncode == 0, p.stderr
            with open(os.path.join(mnt, "etc/conf"), "rb") as f:
                assert f.read() == b"conf=1\n"
            code, _, err = run_cli("umount", mnt)
            assert code == 0, err
    assert fstype_at(mnt) is None


def vmhwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])


def test_random_read_of_a_huge_file_keeps_memory_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A read near the end of a file over ONE_SHOT_MAX, through a real mount:
    the server streams the body to its cache instead of holding it (twice)."""
    fuse_ok()
    from helpers import convert_tags
    from ocibuild import Layout, M
    line = b"a line of a large log file, compressible " * 24 + b"\n"
    huge = line * ((llfs_model.ONE_SHOT_MAX + (16 << 20)) // len(line))
    lay = Layout(str(tmp_path / "layout"))
    lay.tag(lay.image([([M("./", "dir"), M("huge.log", data=huge)], "gzip")]), "v1")
    lay.save()
    [top] = convert_tags(lay.path, ["v1"], str(tmp_path))
    with Mounted(top, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache")) as mnt:
        [server] = fuse_server_pids(mnt)
        before = vmhwm_kib(server)
        with open(os.path.join(mnt, "huge.log"), "rb", buffering=0) as f:
            f.seek(len(huge) - 5000)
            assert f.read(5000) == huge[-5000:]
        grown = vmhwm_kib(server) - before
        assert grown < 48 << 10, f"the server grew by {grown} KiB reading a {len(huge) >> 20} MiB file"
        assert os.path.getsize(tmp_path / "cache" / hashlib.sha256(huge).hexdigest()) == len(huge)


def test_large_directory_through_a_mount(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A directory of several readdir batches lists whole, once each, in the
    image's (sorted) order."""
    fuse_ok()
    from helpers import convert_tags
    from ocibuild import Layout, M
    names = [f"f{i:05d}" for i in range(3 * llfs_model.READDIR_BATCH + 7)]
    lay = Layout(str(tmp_path / "layout"))
    lay.tag(lay.image([([M("./", "dir"), M("d/", "dir")] + [M(f"d/{n}", data=n.encode()) for n in names],
                        "gzip")]), "v1")
    lay.save()
    [top] = convert_tags(lay.path, ["v1"], str(tmp_path))
    with Mounted(top, str(tmp_path / "mnt")) as mnt:
        with os.scandir(os.path.join(mnt, "d")) as it:
            assert [e.name for e in it] == names
        with open(os.path.join(mnt, "d", names[-1]), "rb") as f:
            assert f.read() == names[-1].encode()


def test_hung_server_mount(stack, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A server that is alive but does not answer (stopped here) hung `umount` and
    the next `mount` on its path in their first statfs.  `umount` detaches it;
    `mount` refuses with one line (the server may only be busy), then mounts
    once it is gone."""
    fuse_ok()
    import signal
    from d4c.llfs import mounts
    monkeypatch.setattr(mounts, "ANSWER_WITHIN", 0.5)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    p = mount(stack[-1], mnt)
    assert p.returncode == 0, p.stderr
    [server] = fuse_server_pids(mnt)
    os.kill(server, signal.SIGSTOP)
    try:
        assert mounts.server_state(mnt) == mounts.SILENT and not mounts.is_stale(mnt)
        code, _, err = run_cli("mount", "--background", "--cdimg", stack[-1], mnt)
        assert_one_line_error(code, err, 2)
        assert "does not answer" in err
        code, _, err = run_cli("umount", mnt)
        assert code == 0, err
        assert mounts.fstype_at(mnt) is None
        p = mount(stack[-1], mnt)
        assert p.returncode == 0, p.stderr
        with open(os.path.join(mnt, "etc/conf"), "rb") as f:
            assert f.read() == b"conf=1\n"
        assert mounts.server_state(mnt) == mounts.LIVE
        code, _, err = run_cli("umount", mnt)
        assert code == 0, err
    finally:
        os.kill(server, signal.SIGKILL)  # also ends the statfs calls left waiting on it


def test_umount_through_a_symlink(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fuse_ok()
    from d4c.llfs.mounts import fstype_at
    os.makedirs(tmp_path / "mnt")
    os.symlink("mnt", tmp_path / "link")
    p = mount(stack[-1], str(tmp_path / "link"))
    assert p.returncode == 0, p.stderr
    assert fstype_at(str(tmp_path / "link")) == "fuse.d4c"
    code, _, err = run_cli("umount", str(tmp_path / "link"))
    assert code == 0, err
    assert fstype_at(str(tmp_path / "mnt")) is None


class _FakeBody:
    def __init__(self, data: bytes, fail_at: int = -1) -> None:
        self.data, self.pos, self.fail_at, self.closed = data, 0, fail_at, False

    def read(self, n: int) -> bytes:
        if 0 <= self.fail_at <= self.pos:
            raise CorruptImage("fake", "content digest mismatch")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


def test_prefetcher() -> None:
    from d4c.llfs.streams import Prefetcher
    data = os.urandom(5 * Prefetcher.CHUNK + 123)
    p = Prefetcher.streaming(_FakeBody(data))
    got, sizes = [], [1, 7, 131072, 3 << 20, 999_999, 1 << 22]
    while True:
        chunk = p.read(sizes[len(got) % len(sizes)])
        if not chunk:
            break
        got.append(chunk)
    p.close()
    assert b"".join(got) == data
    # a failing body: the error reaches the reader
    p = Prefetcher.streaming(_FakeBody(data, fail_at=2 * Prefetcher.CHUNK))
    with pytest.raises(CorruptImage):
        while p.read(1 << 20):
            pass
    with pytest.raises(CorruptImage):  # and every read after it: never a short file
        p.read(1 << 20)
    p.close()
    # closing while the producer waits on a full queue (a put with no timeout) ends it
    body = _FakeBody(data * 4)
    p = Prefetcher.streaming(body)
    for _ in range(500):
        if p._queue.full():
            break
        time.sleep(0.01)
    assert p._queue.full()
    closing = threading.Thread(target=p.close, daemon=True)
    closing.start()
    closing.join(20)
    assert not closing.is_alive() and body.closed


@pytest.mark.parametrize("verified", [False, True])
def test_verified_bodies_skip_only_the_sha256_pass(stack, tmp_path, verified) -> None:  # type: ignore[no-untyped-def]
    """Options.verified_bodies (`--verified-bodies`) trusts the sha256 check done
    when the images were stored: a body whose digest no longer matches -- what a
    second pass would catch -- is an error without it and served with it.  zstd's
    frame checksums stay on either way (test_damaged_frames_are_eio)."""
    fs = ImageFS(open_stack(stack), Options(str(tmp_path / "cache"), verified_bodies=verified))
    try:
        inos = walk(fs)
        small = next(p for p, ino in inos.items() if fs.entry(ino).type == EntryType.FILE
                     and 0 < fs.entry(ino).size < (64 << 10) and fs.top.holder(fs.top.resolve(fs.entry(ino))[1])
                     .storage == Storage.FRAME)
        for path in (b"lib/libbig.so", small):  # streamed in frames / read whole
            image, stored = fs.top.resolve(fs.entry(inos[path]))
            stored = image.holder(stored)
            want = image.read_body(stored)
            stored.digest = bytes(32)  # as if the stored body had changed since it was checked
            fh = fs.open(inos[path])
            got, off = [], 0

            def read_all() -> None:
                nonlocal off
                while chunk := fs.read(fh, off, 128 << 10):
                    got.append(chunk)
                    off += len(chunk)
            if verified:
                read_all()
                assert b"".join(got) == want, path
            else:
                with pytest.raises(CorruptImage, match="digest"):
                    read_all()
            fs.release(fh)
    finally:
        fs.close()


def test_verified_frames_fail_for_good(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A damaged frame of a verified body fails the read that meets it and every
    read after it: the frames decoded ahead must never be served in its place."""
    holder, start, length, big = stored_body(stack, b"lib/libbig.so")
    top = damaged_copy(stack, str(tmp_path / "images"), {holder: [start + length // 2]})
    fs = ImageFS(open_stack(resolve_stack(top)), Options(str(tmp_path / "cache"), verified_bodies=True))
    try:
        fh = fs.open(walk(fs)[b"lib/libbig.so"])
        off = 0
        with pytest.raises(CorruptImage):
            while chunk := fs.read(fh, off, 128 << 10):
                off += len(chunk)
        assert 0 < off < big.size
        for at in (off, off + (128 << 10), off + (1 << 20)):
            with pytest.raises(CorruptImage):
                fs.read(fh, at, 128 << 10)
        fs.release(fh)
    finally:
        fs.close()


def test_frame_memory_is_kept() -> None:
    """The FUSE server asks glibc (this machine's libc) for shared arenas that keep
    freed frames, so first-frame decodes do not fault in fresh pages."""
    from d4c.llfs.threads import keep_frame_memory
    assert keep_frame_memory()
    # touched once (zero-filled: bytes(n) may get calloc pages never touched), freed ...
    buffers = [bytearray(1 << 20) for _ in range(4)]
    del buffers
    import resource
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    again = [bytearray(1 << 20) for _ in range(4)]  # ... and reused without page faults
    assert resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before < 256 and len(again) == 4


def test_helper_wakes_on_another_cpu() -> None:
    """A helper the reader calls before it decodes a frame itself starts on
    another CPU and may run anywhere afterwards.  Linux's own choice (the busy
    caller's CPU, in the FUSE server) is forced here by pinning the sleeping
    pool threads to the caller's CPU: a plain submit runs them there."""
    need(len(os.sched_getaffinity(0)) >= 2, "needs 2 CPUs: the helper is to run on another one")
    from d4c.llfs.threads import WakePool, current_cpu
    pool = WakePool("test-wake", 2)
    allowed = os.sched_getaffinity(0)
    both = threading.Barrier(3)
    started = [pool.submit(both.wait, 5) for _ in range(2)]
    both.wait(5)  # both threads exist, and sleep once these return
    for future in started:
        future.result(timeout=5)
    busy_tid: list[int] = []

    def start(submit) -> tuple[int, int, set[int]]:  # type: ignore[no-untyped-def]
        mine = current_cpu()
        os.sched_setaffinity(0, {mine})
        try:
            for tid in pool._threads - set(busy_tid):
                os.sched_setaffinity(tid, {mine})
            seen: list[tuple[int, set[int]]] = []
            future = submit(lambda: seen.append((current_cpu(), os.sched_getaffinity(0))))
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                pass  # the caller keeps its CPU busy
            future.result(timeout=5)
            return mine, *seen[0]
        finally:
            os.sched_setaffinity(0, allowed)

    mine, ran_on, may_run_on = start(pool.submit)
    assert ran_on == mine  # the pinning stands in for the scheduler's choice
    for _ in range(5):
        mine, ran_on, may_run_on = start(pool.submit_elsewhere)
        assert ran_on != mine and may_run_on == allowed
    release = threading.Event()
    busy = pool.submit_elsewhere(lambda: (busy_tid.append(threading.get_native_id()), release.wait(5)))
    while not busy_tid:
        time.sleep(0.001)
    try:  # a busy thread keeps running anywhere while the idle one is woken away
        mine, ran_on, may_run_on = start(pool.submit_elsewhere)
        assert ran_on != mine and os.sched_getaffinity(busy_tid[0]) == allowed
    finally:
        release.set()
    busy.result(timeout=5)
    assert pool.submit_elsewhere(lambda x: x * 2, 21).result(timeout=5) == 42
    with pytest.raises(ZeroDivisionError):
        pool.submit_elsewhere(lambda: 1 // 0).result(timeout=5)


def test_mount_is_nosuid_nodev_unless_asked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`ctr-cli mount` as root served every local user (allow_other) with the
    image's setuid bits and devices: `nobody` ran a setuid-root program from it
    with euid 0.  Now nosuid,nodev by default; --allow-suid-dev keeps them."""
    fuse_ok()
    from privileges import NOBODY, as_nobody, mount_options, reachable_dir, setuid_tree
    setuid_tree(str(tmp_path / "tree"))
    image = str(tmp_path / "suid.dimg")
    code, _, err = run_cli("pack", "--in", str(tmp_path / "tree"), "--out", image, "-q")
    assert code == 0, err
    with reachable_dir() as public:
        for extra, euid in (([], NOBODY), (["--allow-suid-dev"], 0)):
            with Mounted(image, os.path.join(public, "mnt"), *extra) as mnt:
                p = as_nobody(os.path.join(mnt, "euid"))
                assert p.returncode == 0, p.stderr
                assert int(p.stdout) == euid
                assert {"nosuid", "nodev"} <= mount_options(mnt) if not extra else \
                    not {"nosuid", "nodev"} & mount_options(mnt)
                assert "ro" in mount_options(mnt)
                if extra:
                    with open(os.path.join(mnt, "null"), "rb") as f:
                        assert f.read() == b""
                else:
                    with pytest.raises(PermissionError):
                        open(os.path.join(mnt, "null"), "rb")


@pytest.mark.parametrize("background", [True, False])
def test_corrupt_image_at_mount_exits_3(stack, tmp_path, background) -> None:  # type: ignore[no-untyped-def]
    """A damaged header (past the preamble that resolving the stack reads) is a
    corrupt input, exit 3 as the README says; with --background it came back
    from the server process as 'mount ... failed', exit 5."""
    fuse_ok()
    from d4c.image.format import DIMG_PREAMBLE, read_info
    fd = os.open(stack[-1], os.O_RDONLY)
    try:
        header_at = read_info(fd, stack[-1]).dimg_offset + DIMG_PREAMBLE.size
    finally:
        os.close(fd)
    bad = damaged_copy(stack, str(tmp_path / "bad"), {stack[-1]: [header_at + 10]})
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.run([sys.executable, "-m", "d4c", "mount", *(["--background"] if background else []),
                        "--cdimg", bad, mnt], capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(p.returncode, p.stderr, 3)
    assert "corrupt image" in p.stderr and not os.path.ismount(mnt)
