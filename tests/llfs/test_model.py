"""llfs: the file-system model of an image stack (no FUSE): trees, reads, rebuilt files."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from test_mount import damaged_copy, stored_body
from helpers import assert_one_line_error, run_cli

from d4c.image.reader import Image
from d4c.errors import CorruptImage
from d4c.llfs import model as llfs_model
from d4c.llfs import streams
from d4c.llfs.model import FsError, ImageFS, Options
from d4c.image.stack import open_stack, resolve_stack
from d4c.image.tree import EntryType, Storage


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
