"""The container format: golden bytes, determinism, ids, streaming bodies."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import zstandard

from helpers import ROOT, TESTS, assert_pinned, make_tree, run_cli

from d4c.image.bodies import BodySpool
from d4c.image.format import DIMG_MAGIC, DIMG_PREAMBLE, encode_storage, encode_tree, format_id, image_id_of
from d4c.image.reader import Image
from d4c.image.tree import Entry, EntryType, canonicalize
from d4c.image.writer import save_image

DATA = os.path.join(TESTS, "data")
GOLDEN = os.path.join(DATA, "golden-v1.cdimg")


def golden_entries(spool: BodySpool) -> list[Entry]:
    """A fixed tree built without touching the filesystem (no uid/umask/time drift)."""
    hello = spool.add_bytes(b"hello, d4c\n")
    big = spool.add_bytes(bytes(range(256)) * 1000)
    t = 1_700_000_000_000_000_000
    entries = [
        Entry(b"", EntryType.DIR, mode=0o755, mtime_ns=t),
        Entry(b"bin", EntryType.DIR, mode=0o755, mtime_ns=t + 1),
        Entry(b"bin/sh", EntryType.FILE, mode=0o4755, uid=0, gid=0, mtime_ns=t + 2,
              size=hello.size, digest=hello.digest, inode="sh",
              xattrs={b"security.capability": bytes.fromhex("0000000200040000000000000000000000000000")}),
        Entry(b"bin/sh-link", EntryType.FILE, mode=0o4755, mtime_ns=t + 2, size=hello.size,
              digest=hello.digest, inode="sh"),
        Entry(b"bin/copy", EntryType.FILE, mode=0o644, uid=1000, gid=100, mtime_ns=-1,
              size=hello.size, digest=hello.digest),
        Entry(b"data", EntryType.FILE, mode=0o600, mtime_ns=t, size=big.size, digest=big.digest),
        Entry(b"empty", EntryType.FILE, mode=0o644, mtime_ns=t, size=0, digest=hashlib.sha256().digest()),
        Entry(b"dev", EntryType.DIR, mode=0o755, mtime_ns=t),
        Entry(b"dev/null", EntryType.CHARDEV, mode=0o666, rdev=(1, 3), mtime_ns=t),
        Entry(b"dev/sda", EntryType.BLOCKDEV, mode=0o660, gid=6, rdev=(8, 0), mtime_ns=t),
        Entry(b"fifo", EntryType.FIFO, mode=0o644, mtime_ns=t),
        Entry(b"tmp", EntryType.DIR, mode=0o1777, mtime_ns=t),
        Entry(b"usr", EntryType.DIR, mode=0o755, mtime_ns=t, xattrs={b"user.a": b"1", b"trusted.b": b""}),
        Entry(b"usr/bin", EntryType.SYMLINK, target=b"../bin", mode=0o777, mtime_ns=t),
        Entry(b"etc-link", EntryType.SYMLINK, target=b"/etc", mode=0o777, mtime_ns=t),
    ]
    return canonicalize(entries)


GOLDEN_CONFIG = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                 "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}


def write_golden(path: str) -> bytes:
    with BodySpool(os.path.dirname(path), level=3) as spool:
        entries = golden_entries(spool)
        return save_image(entries, spool, cdimg_path=path, config=GOLDEN_CONFIG)


# Changing any of these means the format changed: bump FORMAT_VERSION, document it,
# keep a reader for the old version, and regenerate tests/data/golden-v1.cdimg.
GOLDEN_TREE_SHA256 = "da91849b6f8d476eebc1a968c5e9116bffed066e41f71892fc725d62da8d10a5"
GOLDEN_ID = "sha256:3618a6051e835da1eac3e1c278668e84bbd1d41106cc6c69c3b5a7aa3784bc39"
GOLDEN_FILE_SHA256 = "3ba630d97c94e21160ab4707ae9866c612186beee21dd8a411daf1d40f757d59"


def test_golden_tree_table_and_id() -> None:
    with BodySpool(level=3) as spool:
        entries = golden_entries(spool)
        from d4c.image.format import encode_header
        header = encode_header(entries, spool.frame_lengths())
    assert hashlib.sha256(header.tree).hexdigest() == GOLDEN_TREE_SHA256
    assert format_id(header.image_id) == GOLDEN_ID
    assert header.image_id == image_id_of(encode_tree(entries))
    assert encode_storage(entries)  # storage table present


def test_golden_file_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "g.cdimg")
    image_id = write_golden(out)
    assert format_id(image_id) == GOLDEN_ID
    assert_pinned(out, GOLDEN, GOLDEN_FILE_SHA256)


def test_golden_file_reads_back() -> None:
    with Image(GOLDEN) as image:
        assert image.info.kind == "cdimg"
        assert format_id(image.info.image_id) == GOLDEN_ID
        assert image.info.config["rootfs"]["diff_ids"] == [GOLDEN_ID]
        sh = image.lookup(b"bin/sh")
        assert sh.mode == 0o4755 and b"security.capability" in sh.xattrs
        assert image.read_body(sh) == b"hello, d4c\n"
        link = image.lookup(b"bin/sh-link")
        assert link.type == EntryType.HARDLINK and image.entries[link.link].path == b"bin/sh"
        copy = image.lookup(b"bin/copy")
        assert copy.mtime_ns == -1 and copy.uid == 1000 and copy.storage.name == "FRAME"
        assert sh.storage.name == "SHARED" and image.entries[sh.shared_with] is copy
        assert image.read_body(image.lookup(b"data")) == bytes(range(256)) * 1000
        assert image.lookup(b"dev/sda").rdev == (8, 0)
        assert image.lookup(b"tmp").mode == 0o1777
        assert image.lookup(b"usr").xattrs == {b"trusted.b": b"", b"user.a": b"1"}


def _pack(src: str, out: str, threads: int, level: int = 3) -> str:
    """Format 1, whose per-file frames these tests look at."""
    code, stdout, err = run_cli("pack", "--in", src, "--out", out, "--threadNum", str(threads),
                                "--level", str(level), "--format", "1")
    assert code == 0, err
    return stdout.strip()


def test_pack_is_deterministic_across_threads_and_disk_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = str(tmp_path / "a")
    make_tree(a)
    id1 = _pack(a, str(tmp_path / "1.dimg"), 1)
    id2 = _pack(a, str(tmp_path / "2.dimg"), 4)
    assert id1 == id2
    with open(tmp_path / "1.dimg", "rb") as f1, open(tmp_path / "2.dimg", "rb") as f2:
        assert f1.read() == f2.read()
    # compression level changes bytes but not the id
    id3 = _pack(a, str(tmp_path / "3.dimg"), 2, level=9)
    assert id3 == id1


def test_id_ignores_order_of_creation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ids = []
    for n, order in enumerate((list(range(30)), random.Random(1).sample(range(30), 30))):
        root = tmp_path / f"t{n}"
        root.mkdir()
        for i in order:
            p = root / f"f{i:02d}"
            p.write_bytes(b"x" * i)
            os.utime(p, ns=(0, 0))
        os.utime(root, ns=(0, 0))
        ids.append(_pack(str(root), str(tmp_path / f"{n}.dimg"), 3))
    assert ids[0] == ids[1]


def test_one_body_streams_without_reading_the_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(1 << 20))
    (src / "b").write_bytes(b"needle" * 1000)
    _pack(str(src), str(tmp_path / "x.dimg"), 1)
    with Image(str(tmp_path / "x.dimg")) as image:
        e = image.lookup(b"b")
        # damage a's body: reading b must still work (it never touches a's bytes)
        a = image.lookup(b"a")
        fd = os.open(tmp_path / "x.dimg", os.O_RDWR)
        os.pwrite(fd, b"\xff" * 64, image.info.body_offset + a.body_offset + 100)
        os.close(fd)
        with image.open_body(e) as r:
            assert r.read(6) == b"needle"
            assert len(r.read()) == 6000 - 6


def test_preamble_layout() -> None:
    assert DIMG_PREAMBLE.size == 136
    with open(GOLDEN, "rb") as f:
        data = f.read()
    assert data[:8] == b"D4C-CDIM"
    assert DIMG_MAGIC in data


@pytest.mark.slow
def test_large_file_streams_in_bounded_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 4 GiB (sparse) file packs and unpacks with RSS far below its size."""
    import subprocess
    import sys
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate(4 << 30)
        f.seek(3 << 30)
        f.write(os.urandom(1 << 20))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec from the
    # (possibly large) pytest process
    code = (
        "import sys, re; from d4c.cli import main; "
        "rc = main(sys.argv[1:]); "
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    for args in (["pack", "--in", str(src), "--out", str(tmp_path / "h.dimg"), "--threadNum", "2"],
                 ["unpack", "--dimg", str(tmp_path / "h.dimg"), "--out", str(tmp_path / "out")]):
        p = subprocess.run([sys.executable, "-c", code, "-q", *args], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        rss_kib = int(p.stdout.strip().splitlines()[-1])
        assert rss_kib < 300 * 1024, f"{args[0]} used {rss_kib} KiB"
    assert os.path.getsize(tmp_path / "out" / "huge") == 4 << 30
    with open(src / "huge", "rb") as a, open(tmp_path / "out" / "huge", "rb") as b:
        a.seek(3 << 30)
        b.seek(3 << 30)
        assert a.read(1 << 20) == b.read(1 << 20)
    # zero runs came back as holes
    assert os.stat(tmp_path / "out" / "huge").st_blocks * 512 < 64 << 20


def _frames_of(image: Image, path: bytes) -> list[int]:
    """Content sizes of the zstd frames holding one file's body."""
    from d4c.zstdframes import frame_length
    e = image.lookup(path)
    with open(image.path, "rb") as f:
        f.seek(image.info.body_offset + e.body_offset)
        body = f.read(e.body_length)
    sizes, pos = [], 0
    while pos < len(body):
        n = frame_length(body[pos:])
        sizes.append(zstandard.frame_content_size(body[pos:pos + n]))
        pos += n
    return sizes


def test_a_frame_header_zstd_refuses_is_a_value_error() -> None:
    """body_frames names ValueErrors as corruption; zstd's own error for a
    window descriptor out of range reached a rebuild's caller as a bug."""
    from d4c.zstdframes import declared_size
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 1000)
    bad = frame[:4] + bytes([0x00, 0xFF]) + frame[6:]  # no content size, the largest window descriptor
    with pytest.raises(ValueError, match="bad frame header"):
        declared_size(memoryview(bad), 0, 1000)


def test_large_bodies_are_several_frames(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Bodies over FRAME_CHUNK are one frame per FRAME_CHUNK of content (readers
    decompress them in parallel) and the image says so in its flags; images
    without such files keep the single-frame layout, byte for byte."""
    from d4c.image import reader
    from d4c.image.bodies import FRAME_CHUNK
    from d4c.image.format import FLAG_MULTI_FRAME, read_info
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(FRAME_CHUNK // 2) * 5 + b"tail"
    (src / "big").write_bytes(big)
    (src / "small").write_bytes(b"s" * FRAME_CHUNK)
    _pack(str(src), str(tmp_path / "x.dimg"), 2)
    with Image(str(tmp_path / "x.dimg")) as image:
        assert image.info.multi_frame
        assert _frames_of(image, b"big") == [FRAME_CHUNK, FRAME_CHUNK, FRAME_CHUNK // 2 + 4]
        assert _frames_of(image, b"small") == [FRAME_CHUNK]
        assert image.read_body(image.lookup(b"big")) == big
        with image.open_body(image.lookup(b"big")) as r:  # the streaming reader too
            assert r.read() == big
        # the frames are found while the body is read in pieces (pieces smaller
        # than a frame make the reader go on mid-frame and mid-header)
        e = image.lookup(b"big")
        with open(image.path, "rb") as f:
            f.seek(image.info.body_offset + e.body_offset)
            body = f.read(e.body_length)
        for piece in (7, 4096, 1 << 20):
            monkeypatch.setattr(reader, "STREAM_PIECE", piece)
            frames = list(image.body_frames(e))
            assert [n for _, n in frames] == _frames_of(image, b"big")
            assert b"".join(bytes(f) for f, _ in frames) == body
    with open(tmp_path / "x.dimg", "rb") as f:
        flags = DIMG_PREAMBLE.unpack_from(f.read(DIMG_PREAMBLE.size))[2]
    assert flags & FLAG_MULTI_FRAME
    code, _, err = run_cli("unpack", "--dimg", str(tmp_path / "x.dimg"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "big").read_bytes() == big
    (src / "big").unlink()
    _pack(str(src), str(tmp_path / "y.dimg"), 2)
    assert not read_info(os.open(tmp_path / "y.dimg", os.O_RDONLY), "y").multi_frame


def test_bad_multi_frame_bodies(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A damaged middle frame, and several frames in an image without the flag,
    are corruption, never silently short or long content."""
    from d4c.image import bodies, format as dimg
    from d4c.errors import CorruptImage
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3 * bodies.FRAME_CHUNK)
    (src / "big").write_bytes(big)
    _pack(str(src), str(tmp_path / "x.dimg"), 1)
    with Image(str(tmp_path / "x.dimg")) as image:
        e = image.lookup(b"big")
        fd = os.open(tmp_path / "x.dimg", os.O_RDWR)
        os.pwrite(fd, b"\x00" * 16, image.info.body_offset + e.body_offset + e.body_length // 2)
        os.close(fd)
        with pytest.raises(CorruptImage):
            image.read_body(e)
        with pytest.raises(CorruptImage), image.open_body(e) as r:
            r.read()
        with pytest.raises(CorruptImage):  # llfs's reader: frames as they are read, then decoded
            for frame, n in image.body_frames(e):
                image.decode_frame(e, frame, n)
    # frames after the content (an empty one: a non-empty one overflows the size)
    cctx = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True)
    content, empty = cctx.compress(b"0123456789"), cctx.compress(b"")
    tail = content + empty
    with Image(str(tmp_path / "x.dimg")) as image:
        e = image.lookup(b"big")
        fd = os.open(tmp_path / "x.dimg", os.O_RDWR)
        os.pwrite(fd, tail, image.info.body_offset + e.body_offset)  # over the start of the (damaged) body
        os.close(fd)
        e = e.replace(body_length=len(tail), size=10)
        assert [n for _, n in image.body_frames(e.replace(body_length=len(content)))] == [10]
        with pytest.raises(CorruptImage, match="data after the last frame"):
            list(image.body_frames(e))
    # the same body in a writer that does not set the flag: a reader must refuse it
    monkeypatch.setattr(dimg, "FRAME_CHUNK", 1 << 40)
    _pack(str(src), str(tmp_path / "noflag.dimg"), 1)
    with Image(str(tmp_path / "noflag.dimg")) as image:
        assert not image.info.multi_frame
        with pytest.raises(CorruptImage):
            image.read_body(image.lookup(b"big"))


def test_single_frame_large_bodies_still_read(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Images written before multi-frame bodies (one frame per file, no flag) read as before."""
    from d4c.image import bodies, format as dimg
    monkeypatch.setattr(bodies, "FRAME_CHUNK", 1 << 40)
    monkeypatch.setattr(dimg, "FRAME_CHUNK", 1 << 40)
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3 << 20)
    (src / "big").write_bytes(big)
    _pack(str(src), str(tmp_path / "old.dimg"), 1)
    with Image(str(tmp_path / "old.dimg")) as image:
        assert not image.info.multi_frame and _frames_of(image, b"big") == [3 << 20]
        assert image.read_body(image.lookup(b"big")) == big


def test_frame_length_of_a_partly_read_frame() -> None:
    """llfs splits a body into frames as it reads it: every prefix of a frame
    asks for more, the whole frame gives its length, garbage is an error."""
    from d4c.zstdframes import frame_length
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(300_000) + b"z" * 300_000)
    assert all(frame_length(frame[:k], partial=True) == -1 for k in range(len(frame)))
    assert frame_length(frame + b"next", partial=True) == len(frame)
    with pytest.raises(ValueError):
        frame_length(frame[:-1])
    with pytest.raises(ValueError):
        frame_length(b"not zstd", partial=True)
