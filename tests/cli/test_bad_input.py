"""Hostile and damaged input: clear errors, no tracebacks, no writes outside the target."""

from __future__ import annotations

import os
import struct
import subprocess

import pytest
import zstandard

from crafted import SHA_HELLO, blob, dimg, file_extra, frame, tree, uv
from helpers import assert_one_line_error, make_tree, need_root, run_cli
from test_format import GOLDEN

from d4c.image.format import FORMAT_VERSION
from d4c.image.reader import Image
from d4c.errors import (EXIT_CORRUPT, EXIT_NOT_FOUND, EXIT_USAGE, CorruptImage, D4CError,
                        UnsupportedVersion)


def golden_bytes() -> bytes:
    with open(GOLDEN, "rb") as f:
        return f.read()


def read_everything(path: str) -> None:
    with Image(path) as image:
        for e in image.entries:
            if e.size:
                image.read_body(e)


def expect_corrupt(tmp_path, data: bytes, match: str | None = None) -> str:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "bad.dimg")
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises((CorruptImage, UnsupportedVersion)) as info:
        read_everything(path)
    if match:
        assert match in str(info.value), str(info.value)
    code, _, err = run_cli("unpack", "--dimg", path, "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert not os.path.exists(tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out")] == []
    return str(info.value)


def test_every_truncation_is_detected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = golden_bytes()
    for cut in sorted({0, 4, 8, 50, 103, 104, 200, 239, 240, 241, len(data) // 2, len(data) - 1}):
        expect_corrupt(tmp_path, data[:cut])
    expect_corrupt(tmp_path, data + b"\0", "size")


def test_every_flipped_byte_is_detected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = golden_bytes()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x41
        path = str(tmp_path / "flip.cdimg")
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(D4CError):
            read_everything(path)


def test_wrong_magic_and_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = golden_bytes()
    expect_corrupt(tmp_path, b"NOTD4C!!" + data[8:], "bad magic")
    bumped = data[:8] + struct.pack("<H", FORMAT_VERSION + 1) + data[10:]
    msg = expect_corrupt(tmp_path, bumped, "format version 2 is not supported")
    assert "reads version 1" in msg


def test_absurd_lengths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ok = tree((b"a", 1, {"extra": file_extra(5, SHA_HELLO)}))
    store = bytes([1]) + uv(len(frame(b"hello")))
    read = dimg(ok, store, frame(b"hello"))
    path = tmp_path / "ok.dimg"
    path.write_bytes(read)
    read_everything(str(path))  # the crafting itself is sound
    # a header that claims to be huge
    expect_corrupt(tmp_path, dimg(ok, store, frame(b"hello"), usize=1 << 40), "header too large")
    # a count of 2^60 entries
    expect_corrupt(tmp_path, dimg(uv(1 << 60) + ok[1:]), "out of range")
    # a path length far beyond the data
    expect_corrupt(tmp_path, dimg(uv(2) + blob(b"") + bytes([2]) + uv(0o755) + bytes([0, 0, 0, 0]) + uv(1 << 50)),
                   "limit")
    # an xattr value of 1 GiB
    bad = tree((b"a", 2, {"xattrs": []}))[:-1] + uv(1) + blob(b"user.x") + uv(1 << 30)
    expect_corrupt(tmp_path, dimg(bad), "limit")
    # a frame holding more than the file's recorded size (never decompressed beyond it)
    big = tree((b"a", 1, {"extra": file_extra(3, SHA_HELLO)}))
    expect_corrupt(tmp_path, dimg(big, store, frame(b"hello")), "declares 5 bytes, expected 3")


@pytest.mark.parametrize("name,reason", [
    (b"..", "bad path component"),
    (b"../escape", "bad path component"),
    (b"/abs", "absolute path"),
    (b"a\0b", "NUL"),
    (b"a//b", "bad path component"),
    (b"./a", "bad path component"),
    (b"x" * 300, "name too long"),
])
def test_hostile_names(tmp_path, name: bytes, reason: str) -> None:  # type: ignore[no-untyped-def]
    expect_corrupt(tmp_path, dimg(tree((name, 2, {})), b""), reason)


def test_structure_violations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # duplicates and disorder
    expect_corrupt(tmp_path, dimg(tree((b"a", 2, {}), (b"a", 2, {}))), "out of order or duplicated")
    expect_corrupt(tmp_path, dimg(tree((b"b", 2, {}), (b"a", 2, {}))), "out of order")
    # a child whose parent is missing, or a symlink (writes through it would escape)
    expect_corrupt(tmp_path, dimg(tree((b"a/b", 2, {}))), "parent is not a directory")
    link = {"extra": blob(b"/etc")}
    expect_corrupt(tmp_path, dimg(tree((b"a", 3, link), (b"a/passwd", 2, {}))), "parent is not a directory")
    # symlink climbing out of the root
    expect_corrupt(tmp_path, dimg(tree((b"a", 3, {"extra": blob(b"../../etc")}))), "escapes")
    expect_corrupt(tmp_path, dimg(tree((b"d", 2, {}), (b"d/l", 3, {"extra": blob(b"../..")}))), "escapes")
    # hard links to a directory, or forward
    expect_corrupt(tmp_path, dimg(tree((b"d", 2, {}), (b"l", 4, {"extra": uv(1)}))), "hard link")
    expect_corrupt(tmp_path, dimg(tree((b"l", 4, {"extra": uv(1)}))), "hard link to a non-linkable or later entry")
    # unknown type, mode bits beyond 0o7777
    expect_corrupt(tmp_path, dimg(tree((b"a", 9, {}))), "unknown entry type")
    expect_corrupt(tmp_path, dimg(tree((b"a", 2, {"mode": 0o17777}))), "out of range")
    # first entry not the root
    expect_corrupt(tmp_path, dimg(uv(1) + blob(b"a") + bytes([2, 0o755 & 0x7F | 0x80, 3, 0, 0, 0, 0])),
                   "root")


def test_body_bombs_and_lies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a frame that expands to 64 MiB for a file recorded as 5 bytes
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    t = tree((b"a", 1, {"extra": file_extra(5, SHA_HELLO)}))
    expect_corrupt(tmp_path, dimg(t, bytes([1]) + uv(len(bomb)), bomb), "declares 67108864 bytes, expected 5")
    # the same without a declared size: never expanded beyond the recorded 5 bytes
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(64 << 20))
    expect_corrupt(tmp_path, dimg(t, bytes([1]) + uv(len(bomb)), bomb), "does not decompress")
    # right size, wrong digest
    t2 = tree((b"a", 1, {"extra": file_extra(5, bytes(32))}))
    f = frame(b"hello")
    expect_corrupt(tmp_path, dimg(t2, bytes([1]) + uv(len(f)), f), "digest mismatch")
    # storage pointing past the body section
    expect_corrupt(tmp_path, dimg(t, bytes([1]) + uv(len(f) + 10), f), "out of range")
    # a header bomb: 1 GiB of zeros declared as 100 bytes
    hb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))
    expect_corrupt(tmp_path, dimg(t, usize=100, comp=hb), "recorded size")


def test_unpack_refuses_a_non_empty_output(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    code, _, err = run_cli("unpack", "--cdimg", GOLDEN, "--out", str(out))
    assert_one_line_error(code, err, EXIT_USAGE)
    assert (out / "keep").read_text() == "mine"


def test_unpack_failure_leaves_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A body found corrupt half-way: no output, no temp dir."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"first" * 1000)
    (src / "z").write_bytes(os.urandom(100000))
    code, _, err = run_cli("pack", "--in", str(src), "--out", str(tmp_path / "x.dimg"))
    assert code == 0, err
    with Image(str(tmp_path / "x.dimg")) as image:
        z = image.lookup(b"z")
        where = image.info.body_offset + z.body_offset + z.body_length // 2
    with open(tmp_path / "x.dimg", "r+b") as f:
        f.seek(where)
        f.write(b"\0" * 32)
    code, _, err = run_cli("unpack", "--dimg", str(tmp_path / "x.dimg"), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert sorted(os.listdir(tmp_path)) == ["src", "x.dimg"]


def test_cli_errors_are_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("unpack", "--cdimg", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, EXIT_NOT_FOUND)
    code, _, err = run_cli("pack", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, EXIT_USAGE)
    code, _, err = run_cli("nosuchcommand")
    assert_one_line_error(code, err, EXIT_USAGE)
    code, _, err = run_cli("pack", "--in", str(tmp_path), "--out", str(tmp_path / "x"), "--threadNum", "0")
    assert_one_line_error(code, err, EXIT_USAGE)
    code, _, err = run_cli("convert", "--image", "oci:" + str(tmp_path / "nolayout"), "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err)
    code, _, err = run_cli("cdimg", "show", "--cdimg", str(tmp_path / "missing"))
    assert_one_line_error(code, err, EXIT_NOT_FOUND)
    # --debug shows the traceback
    code, _, err = run_cli("--debug", "cdimg", "show", "--cdimg", str(tmp_path / "missing"))
    assert code == EXIT_NOT_FOUND and "Traceback" in err


def test_pack_rejects_escaping_symlinks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("../../outside", src / "bad")
    code, _, err = run_cli("pack", "--in", str(src), "--out", str(tmp_path / "x.dimg"))
    assert_one_line_error(code, err)
    assert "escapes" in err
    assert not (tmp_path / "x.dimg").exists()


def test_full_disk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        src = tmp_path / "src"
        make_tree(str(src))
        code, _, err = run_cli("pack", "--in", str(src), "--out", str(mnt / "x.dimg"))
        assert_one_line_error(code, err)
        assert "no space" in err.lower()
        assert os.listdir(mnt) == []
        code, _, err = run_cli("unpack", "--cdimg", GOLDEN, "--out", str(mnt / "out"))
        assert code == 0, err  # small enough
        big = tmp_path / "big.dimg"
        code, _, err = run_cli("pack", "--in", str(src), "--out", str(big), "--level", "1")
        assert code == 0, err
        code, _, err = run_cli("unpack", "--dimg", str(big), "--out", str(mnt / "out2"))
        assert_one_line_error(code, err)
        assert "no space" in err.lower()
        assert sorted(os.listdir(mnt)) == ["out"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_hostile_config_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A validly signed cdimg whose config is absurdly nested, or of the wrong shape."""
    from d4c.image.bodies import BodySpool
    from d4c.image.format import cdimg_preamble, encode_header, write_dimg_to
    from d4c.image.tree import Entry, EntryType
    with BodySpool(str(tmp_path), 3) as spool:
        header = encode_header([Entry(b"", EntryType.DIR)], spool.frame_lengths())
        for name, config in (("deep", b"[" * 100000 + b"]" * 100000), ("shape", b'{"config": "x", "os": 5}')):
            path = tmp_path / f"{name}.cdimg"
            with open(path, "wb") as f:
                f.write(cdimg_preamble(config, len(header.compressed) + 136))
                write_dimg_to(f, header, spool.copy_frames)
            code, out, err = run_cli("cdimg", "show", "--cdimg", str(path))
            if name == "deep":
                assert_one_line_error(code, err, EXIT_CORRUPT)
            else:
                assert code == 0, err
