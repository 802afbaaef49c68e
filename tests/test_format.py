"""The container format: golden bytes, determinism, ids, streaming bodies."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from helpers import make_tree, run_cli

from d4c.bodies import BodySpool
from d4c.dimg import (DIMG_MAGIC, DIMG_PREAMBLE, Image, encode_storage, encode_tree, format_id,
                      image_id_of)
from d4c.tree import Entry, EntryType, canonicalize
from d4c.writer import save_image

DATA = os.path.join(os.path.dirname(__file__), "data")
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
        from d4c.dimg import encode_header
        header = encode_header(entries, spool.frame_lengths())
    assert hashlib.sha256(header.tree).hexdigest() == GOLDEN_TREE_SHA256
    assert format_id(header.image_id) == GOLDEN_ID
    assert header.image_id == image_id_of(encode_tree(entries))
    assert encode_storage(entries)  # storage table present


def test_golden_file_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "g.cdimg")
    image_id = write_golden(out)
    assert format_id(image_id) == GOLDEN_ID
    with open(out, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_FILE_SHA256
    with open(GOLDEN, "rb") as f:
        assert f.read() == data, "tests/data/golden-v1.cdimg differs from what this d4c writes"


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
    code, stdout, err = run_cli("pack", "--in", src, "--out", out, "--threadNum", str(threads),
                                "--level", str(level))
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
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
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
