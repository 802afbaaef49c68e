"""Crafted images and layers that lie (sizes, owners, device numbers, depth, declared sizes):
each is refused with one line and the right exit code, or handled, and never trusted."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

import zstandard

from crafted import SHA_HELLO, dimg, file_extra, frame, tree, uv
from helpers import ROOT, assert_one_line_error, need, need_root, run_cli
from ocibuild import Layout, M, layer_tar, sha
from test_format import GOLDEN

from d4c.image.reader import Image
from d4c.image.format import cdimg_preamble, dimg_preamble, encode_storage, encode_tree, image_id_of
from d4c.errors import EXIT_CORRUPT, EXIT_IO, EXIT_USAGE
from d4c.image.stack import close_all, open_stack
from d4c.image.tree import Entry, EntryType, Storage

SRC = os.path.join(ROOT, "src")
MINUS_ONE = (1 << 32) - 1  # (uid_t)-1


def run_module(*args: str, limit_as: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m d4c ARGS` in its own process; with `limit_as`, under a prlimit
    address-space cap, so a memory bomb that regresses fails instead of taking
    the machine."""
    cmd = [sys.executable, "-m", "d4c", *args]
    if limit_as is not None:
        cmd = ["prlimit", f"--as={limit_as}", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=SRC))


def delta_dimg(parent_tree: bytes, tree_table: bytes, storage: bytes, body: bytes = b"") -> bytes:
    """A delta dimg on the image whose tree table is `parent_tree` (its header
    coded against that table, as d4c writes them)."""
    table = tree_table + storage
    dictionary = zstandard.ZstdCompressionDict(parent_tree, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    comp = zstandard.ZstdCompressor(dict_data=dictionary, write_content_size=True).compress(table)
    pre = dimg_preamble(comp, len(table), len(body), image_id_of(tree_table), image_id_of(parent_tree))
    return pre + comp + body


def cdimg(dimg_bytes: bytes) -> bytes:
    """A dimg wrapped as a cdimg with an empty config."""
    return cdimg_preamble(b"{}", len(dimg_bytes)) + dimg_bytes


def lying_size_pair(tmp_path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A base whose /b claims 10 bytes under the digest of the 5-byte /a, and a
    delta whose one file, /b, is "content in the parent" (found there by digest)."""
    hello = frame(b"hello")
    t = tree((b"a", 1, {"extra": file_extra(5, SHA_HELLO)}), (b"b", 1, {"extra": file_extra(10, SHA_HELLO)}))
    store = (bytes([1]) + uv(len(hello))) * 2
    base, top = tmp_path / "base.cdimg", tmp_path / "top.cdimg"
    base.write_bytes(cdimg(dimg(t, store, hello + hello)))
    top.write_bytes(cdimg(delta_dimg(t, tree((b"b", 1, {"extra": file_extra(10, SHA_HELLO)})), bytes([3]))))
    return str(base), str(top)


def test_lying_size_is_refused_by_patch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """It patched with exit 0 into an image whose 10-byte file held 5 bytes."""
    base, top = lying_size_pair(tmp_path)
    code, _, err = run_cli("cdimg", "patch", "--baseCdimg", base, "--diffCdimg", top, "--outCdimg",
                           str(tmp_path / "out.cdimg"))
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert "'b': 10 bytes, but an earlier file with its digest has 5" in err
    assert not (tmp_path / "out.cdimg").exists()


def test_lying_size_is_refused_by_mount(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the mount, stat said 10 and cat returned 5 bytes with exit 0."""
    need_root()
    need(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    base, top = lying_size_pair(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_module("mount", "--background", "--cdimg", top, "--base", base, str(mnt), timeout=60)
    try:
        assert p.returncode != 0, "mounted an image whose sizes lie"
        assert "earlier file with its digest has 5" in p.stderr and "Traceback" not in p.stderr
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def image_of(entries: list[Entry], bodies: dict[bytes, bytes] | None = None,
             frames: dict[bytes, bytes] | None = None) -> bytes:
    """A base dimg of these entries (the root first), encoded as d4c encodes
    them but never checked: FILE entries are FRAME-stored with bodies[path]
    (or the ready-made frames[path]), EMPTY when they claim size 0."""
    body = b""
    for e in entries:
        if e.type == EntryType.FILE and e.size == 0:
            e.storage = Storage.EMPTY
        elif e.type == EntryType.FILE:
            data = (frames or {}).get(e.path) or frame((bodies or {})[e.path])
            e.storage, e.body_offset, e.body_length = Storage.FRAME, len(body), len(data)
            body += data
    return dimg(encode_tree(entries), encode_storage(entries), body)


def raw_layout(path: str, layers: list[bytes]) -> str:
    """An OCI layout of one image whose layers are these blobs, as given (tagged t)."""
    layout = Layout(path)
    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layout.blob(b), "size": len(b)}
             for b in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha(b) for b in layers]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": layout.blob(config), "size": len(config)},
                           "layers": descs}).encode()
    layout.tag({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": layout.blob(manifest),
                "size": len(manifest)}, "t")
    layout.save()
    return f"oci:{path}:t"


def root_setuid_files(root: str) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_uid == 0 and st.st_mode & stat.S_ISUID:
                found.append(os.path.join(dirpath, name))
    return found


def test_owner_minus_one_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """uid/gid 4294967295 is what chown reads as "leave unchanged": unpacked as
    root, a 4755 file of that owner became a root setuid binary."""
    need_root()
    su = Entry(b"su", EntryType.FILE, mode=0o4755, uid=MINUS_ONE, gid=MINUS_ONE, size=5, digest=SHA_HELLO)
    path = tmp_path / "minus1.dimg"
    path.write_bytes(image_of([Entry(b"", EntryType.DIR), su], {b"su": b"hello"}))
    code, _, err = run_cli("unpack", "--dimg", str(path), "--out", str(tmp_path / "out"))
    if os.path.exists(tmp_path / "out"):
        assert root_setuid_files(str(tmp_path / "out")) == []
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert "4294967295" in err and not os.path.exists(tmp_path / "out")
    # the same owner in a layer tar, through convert
    layer = layer_tar([M("su", data=b"hello", mode=0o4755, uid=MINUS_ONE, gid=MINUS_ONE)])
    code, _, err = run_cli("convert", "--image", raw_layout(str(tmp_path / "lay"), [layer]), "--output",
                           str(tmp_path / "img"), "--cdimg", "-q")
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert "uid 4294967295 out of range" in err


def flip_body_byte(stack: list[str], name: bytes) -> None:
    """Flip a byte in the middle of what stack[-1] (on the images before it)
    stores for /name: a frame or a delta payload."""
    images = open_stack(stack)
    try:
        image = images[-1]
        e = image.lookup(name)
        start, length = ((e.body_offset, e.body_length) if e.storage == Storage.FRAME
                         else (e.delta_steps[0].offset, e.delta_steps[0].length))
        where = image.info.body_offset + start + length // 2
    finally:
        close_all(images)
    path = stack[-1]
    with open(path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x55]))


def test_merge_checks_what_it_copies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """merge carried a corrupt delta body over with exit 0 (found only at patch)."""
    text = os.urandom(200_000)
    for n, files in enumerate([{"f": text}, {"f": text[:1000] + b"v2" + text[1000:]},
                               {"f": text[:1000] + b"v3" + text[1000:], "new": os.urandom(50_000)}]):
        root = tmp_path / f"t{n}"
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        code, _, err = run_cli("pack", "--in", str(root), "--out", str(tmp_path / f"{n}.dimg"), "-q")
        assert code == 0, err
    d = [str(tmp_path / f"{n}.dimg") for n in range(3)]
    for a, b in ((0, 1), (1, 2)):
        code, _, err = run_cli("dimg", "diff", "--oldDimg", d[a], "--newDimg", d[b], "--outDimg",
                               str(tmp_path / f"d{a}{b}.dimg"), "-q")
        assert code == 0, err
    d01, d12 = str(tmp_path / "d01.dimg"), str(tmp_path / "d12.dimg")
    merge = ("dimg", "merge", "--baseDimg", d[0], "--lowerDimg", d01, "--upperDimg", d12, "-q", "--outDimg")
    code, _, err = run_cli(*merge, str(tmp_path / "good.dimg"))
    assert code == 0, err  # the chain as made merges
    with Image(d[0]) as base, Image(d01, parent=base) as lower:
        assert lower.lookup(b"f").storage == Storage.DELTA
        with Image(d12, parent=lower) as upper:
            assert upper.lookup(b"new").storage == Storage.FRAME and upper.lookup(b"f").storage == Storage.DELTA
    shutil.copy(d12, tmp_path / "keep.dimg")
    flip_body_byte([d[0], d01, d12], b"new")  # a frame carried over as stored
    # one thread checks before writing; two check while the output is written, renamed only after
    for threads in ("1", "2"):
        code, _, err = run_cli(*merge, str(tmp_path / "m1.dimg"), "--threadNum", threads)
        assert_one_line_error(code, err, EXIT_CORRUPT)
        assert "/new" in err and not (tmp_path / "m1.dimg").exists()
    shutil.copy(tmp_path / "keep.dimg", d12)
    flip_body_byte([d[0], d01], b"f")  # a delta step carried over into the merged chain
    for threads in ("1", "2"):
        code, _, err = run_cli(*merge, str(tmp_path / "m2.dimg"), "--threadNum", threads)
        assert_one_line_error(code, err, EXIT_CORRUPT)
        assert "/f" in err and not (tmp_path / "m2.dimg").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temp output left either


def test_output_that_is_an_input_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`cdimg diff --oldCdimg A --outCdimg A` replaced the base with a delta of itself."""
    a, other = tmp_path / "a.cdimg", tmp_path / "other-name.cdimg"
    shutil.copy(GOLDEN, a)
    os.link(a, other)  # the same inode under another name
    before = a.read_bytes()
    d = str(tmp_path / "d.cdimg")
    code, _, err = run_cli("cdimg", "diff", "--oldCdimg", str(a), "--newCdimg", GOLDEN, "--outCdimg", d, "-q")
    assert code == 0, err
    for args in (("cdimg", "diff", "--oldCdimg", str(a), "--newCdimg", GOLDEN, "--outCdimg", str(a)),
                 ("cdimg", "diff", "--oldCdimg", GOLDEN, "--newCdimg", str(a), "--outCdimg", str(other)),
                 ("cdimg", "patch", "--baseCdimg", str(a), "--diffCdimg", d, "--outCdimg", str(other)),
                 ("cdimg", "patch", "--baseCdimg", str(a), "--diffCdimg", d, "--outCdimg", d),
                 ("cdimg", "merge", "--baseCdimg", str(a), "--cdimgs", f"{d},{d}", "--outCdimg", d),
                 ("util", "diff", "--old", str(a), "--new", GOLDEN, "--diff", str(other)),
                 ("util", "patch", "--old", str(a), "--diff", d, "--new", str(a))):
        code, _, err = run_cli(*args, "-q")
        assert_one_line_error(code, err, EXIT_USAGE)
        assert "is the input" in err
        assert a.read_bytes() == before


def test_show_escapes_control_characters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A name with a newline printed raw faked a line of `show --entries`; an
    escape sequence reached the terminal."""
    fake = b"x\n-rwsr-xr-x     0     0          5 2020-01-01 00:00 fake"
    names = [fake, b"y\x1b[2Jz", b"z\xe2\x80\xaeevil", b"zz\\x0a"]
    entries = [Entry(b"", EntryType.DIR)] + sorted(
        [Entry(n, EntryType.DIR) for n in names] + [Entry(b"zzz", EntryType.SYMLINK, target=b"t\r\nfake")],
        key=lambda e: e.path)
    path = tmp_path / "names.cdimg"
    path.write_bytes(cdimg(image_of(entries)))
    code, out, err = run_cli("cdimg", "show", "--entries", "--cdimg", str(path))
    assert code == 0, err
    listed = out.split("\n\n")[-1].splitlines()
    assert len(listed) == len(entries), listed  # one line per entry, none faked
    assert not any(line.startswith("-rwsr") for line in listed)
    assert all(ord(c) >= 0x20 and c not in "\x7f\u202e" for c in out.replace("\n", ""))
    assert "/x\\x0a-rwsr" in out and "/y\\x1b[2Jz" in out and "/z\\u202eevil" in out
    assert "/zz\\\\x0a" in out and "-> t\\x0d\\x0afake" in out  # a literal backslash stays distinct


def leftovers(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_deep_tree_failure_cleans_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 1,200-deep chain of directories, then a body that fails its digest: the
    cleanup recursed (RecursionError, exit 1, the .out.*.tmp tree left)."""
    chain = [b"/".join([b"d"] * n) for n in range(1, 1201)]
    entries = [Entry(b"", EntryType.DIR)] + [Entry(p, EntryType.DIR, mode=0o500) for p in chain]
    entries.append(Entry(b"e", EntryType.FILE, size=5, digest=bytes(32)))  # after the chain, a wrong digest
    path = tmp_path / "deep.dimg"
    path.write_bytes(image_of(entries, {b"e": b"hello"}))
    code, _, err = run_cli("unpack", "--dimg", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert "digest mismatch" in err
    assert leftovers(str(tmp_path)) == [] and not os.path.exists(tmp_path / "out")


def test_device_numbers_linux_cannot_hold_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A device number >= 2^31 raised OverflowError in unpack (a traceback); majors
    >= 4096 showed as 0 in the mount and made their directory EIO."""
    for major, minor in ((1 << 31, 3), (4096, 0), (1, 1 << 20), (MINUS_ONE, MINUS_ONE)):
        dev = Entry(b"dev", EntryType.CHARDEV, mode=0o600, rdev=(major, minor))
        path = tmp_path / "dev.dimg"
        path.write_bytes(image_of([Entry(b"", EntryType.DIR), dev]))
        code, _, err = run_cli("unpack", "--dimg", str(path), "--out", str(tmp_path / "out"))
        assert_one_line_error(code, err, EXIT_CORRUPT)
        assert "out of range" in err and not os.path.exists(tmp_path / "out")
        assert leftovers(str(tmp_path)) == []
    layer = layer_tar([M("dev", "char", dev=(4096, 1))])
    code, _, err = run_cli("convert", "--image", raw_layout(str(tmp_path / "lay"), [layer]), "--output",
                           str(tmp_path / "img"), "-q")
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert "device number 4096,1 out of range" in err
    # the largest numbers Linux has still work
    dev = Entry(b"dev", EntryType.CHARDEV, mode=0o600, rdev=(4095, (1 << 20) - 1))
    path.write_bytes(image_of([Entry(b"", EntryType.DIR), dev]))
    code, _, err = run_cli("unpack", "--dimg", str(path), "--out", str(tmp_path / "out"))
    assert code == 0, err
    if os.geteuid() == 0:
        st = os.lstat(tmp_path / "out" / "dev")
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4095, (1 << 20) - 1)


def test_xattr_too_large_for_the_file_system(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ext4 refuses a 64 KiB xattr value with ENOSPC: it was reported as 'no space
    left on device'."""
    f = Entry(b"f", EntryType.FILE, mode=0o644, size=5, digest=SHA_HELLO, xattrs={b"user.big": b"x" * 65536})
    path = tmp_path / "xattr.dimg"
    path.write_bytes(image_of([Entry(b"", EntryType.DIR), f], {b"f": b"hello"}))
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, b"user.big", b"x" * 65536)
        need(False, "this file system takes 64 KiB xattrs (the test needs one that refuses them, e.g. ext4)")
    except OSError as exc:
        need(exc.errno in (errno.ENOSPC, errno.E2BIG), f"xattrs refused otherwise here: {exc}")
    code, _, err = run_cli("unpack", "--dimg", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, EXIT_IO)
    assert "/f: xattr user.big of 65536 bytes is too large for this file system" in err
    assert "no space" not in err and leftovers(str(tmp_path)) == [] and not os.path.exists(tmp_path / "out")


def many_dirs(n: int, extra: list[bytes] = []) -> list[Entry]:  # noqa: B006 (never changed)
    return [Entry(b"", EntryType.DIR)] + [Entry(p, EntryType.DIR) for p in
                                          sorted([b"%06d" % i for i in range(n)] + extra)]


def terminate_when(args: list[str], started) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Run `python -m d4c ARGS`; SIGTERM it once started() is true."""
    p = subprocess.Popen([sys.executable, "-m", "d4c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=SRC))
    deadline = time.monotonic() + 60
    while not started() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert p.poll() is None, "finished before it could be stopped: make the input larger"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM left the .OUT.*.tmp trees of unpack and patch, and convert's empty output directory."""
    base = tmp_path / "base.dimg"
    base.write_bytes(image_of(many_dirs(50_000)))
    work = tmp_path / "work"
    work.mkdir()

    def temp_in_work() -> bool:
        return any(n.startswith(".") for n in os.listdir(work))

    for args in (["unpack", "--dimg", str(base), "--out", str(work / "out")],
                 ["dimg", "patch", "--baseDimg", str(base), "--diffDimg", str(tmp_path / "top.dimg"),
                  "--outDir", str(work / "out")]):
        if args[0] == "dimg":
            (tmp_path / "top.dimg").write_bytes(delta_dimg(encode_tree(many_dirs(50_000)),
                                                           encode_tree(many_dirs(50_000, [b"new"])), b""))
        p = terminate_when(args, temp_in_work)
        assert os.listdir(work) == []
        assert p.returncode == 143, p.stderr
        assert p.stderr.strip() == "ctr-cli: terminated"
    layer = layer_tar([M(f"{i:06d}", "dir", mode=0o755) for i in range(50_000)])
    ref = raw_layout(str(tmp_path / "lay"), [layer])
    p = terminate_when(["convert", "--image", ref, "--output", str(work / "img"), "--blob-cache", "none"],
                       lambda: os.path.exists(work / "img"))
    assert os.listdir(work) == []
    assert p.returncode == 143, p.stderr


def test_excluding_the_root_is_a_usage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ref = raw_layout(str(tmp_path / "lay"), [layer_tar([M("a", data=b"a")])])
    code, _, err = run_cli("convert", "--image", ref, "--output", str(tmp_path / "img"), "--excludes", "/", "-q")
    assert_one_line_error(code, err, EXIT_USAGE)
    assert "cannot exclude the root" in err and not os.path.exists(tmp_path / "img")


CAP = 700 << 20  # address space for a d4c process in the bomb tests: ~250 MiB is what a small convert needs


def zstd_stream(*parts: bytes | tuple[int, int]) -> bytes:
    """zstd of the parts in order; (n, byte) stands for n copies of byte, fed a MiB
    at a time, so gigabytes of it cost the test little memory."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as w:
        for part in parts:
            if isinstance(part, tuple):
                n, byte = part
                chunk = bytes([byte]) * (1 << 20)
                for _ in range(n >> 20):
                    w.write(chunk)
                w.write(chunk[:n & ((1 << 20) - 1)])
            else:
                w.write(part)
    return out.getvalue()


def tar_header(name: str, kind: bytes, size: int, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = kind, size
    return ti.tobuf(fmt)


def test_huge_tar_headers_are_refused_before_they_are_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An 80 KB layout whose pax or GNU long-name header declares 2 GiB made convert use 4.3 GB."""
    for kind in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
        size = 1 << 30
        layer = zstd_stream(tar_header("././@Header", kind, size, tarfile.GNU_FORMAT), (size, 0x41))
        assert len(layer) < 100_000
        ref = raw_layout(str(tmp_path / f"lay{kind!r}"), [layer])
        p = run_module("convert", "--image", ref, "--output", str(tmp_path / "img"), "--blob-cache", "none", "-q",
                       limit_as=CAP)
        assert_one_line_error(p.returncode, p.stderr, EXIT_CORRUPT)
        assert f"header of {size} bytes" in p.stderr


def _tar_number(n: int) -> bytes:
    """A 12-byte tar number field: octal, or GNU's base-256 when it does not fit."""
    return b"%011o\0" % n if n < 8 ** 11 else bytes([0x80]) + n.to_bytes(11, "big")


def gnu_sparse_header(name: str, real_size: int, chunks: list[tuple[int, int]]) -> bytes:
    """An old-GNU sparse member's header ('S'): up to four (offset, length) chunks in the header."""
    stored = sum(n for _, n in chunks)
    buf = bytearray(tar_header(name, tarfile.GNUTYPE_SPARSE, stored, tarfile.GNU_FORMAT))
    for i, (offset, n) in enumerate(chunks):
        buf[386 + 24 * i:386 + 24 * i + 24] = _tar_number(offset) + _tar_number(n)
    buf[483:495] = _tar_number(real_size)
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf)


def test_sparse_member_of_holes_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 13 KB GNU sparse member declaring 64 GiB took 102 s (every hole read, hashed, compressed)."""
    real = 64 << 30
    data = b"x" * 1024
    raw = gnu_sparse_header("holes", real, [(real - 1024, 1024)]) + data + bytes(1024)
    ref = raw_layout(str(tmp_path / "lay"), [raw])
    p = run_module("convert", "--image", ref, "--output", str(tmp_path / "img"), "--blob-cache", "none", "-q",
                   limit_as=CAP, timeout=30)
    assert_one_line_error(p.returncode, p.stderr, EXIT_CORRUPT)
    assert "a sparse file of 68719476736 bytes with only 1024 bytes of data" in p.stderr
    # a sparse file with a plausible share of data still converts
    raw = gnu_sparse_header("some", 8 << 20, [(0, 4096), (4 << 20, 4096)]) + b"a" * 4096 + b"b" * 4096 + bytes(1024)
    ref = raw_layout(str(tmp_path / "ok"), [raw])
    p = run_module("convert", "--image", ref, "--output", str(tmp_path / "img2"), "--blob-cache", "none", "-q",
                   limit_as=CAP)
    assert p.returncode == 0, p.stderr


def zeros_digest(n: int) -> bytes:
    h = hashlib.sha256()
    chunk = bytes(1 << 20)
    for _ in range(n >> 20):
        h.update(chunk)
    return h.digest()


GIB = 1 << 30


def small_old_image(tmp_path) -> str:  # type: ignore[no-untyped-def]
    old = tmp_path / "old.dimg"
    old.write_bytes(image_of([Entry(b"", EntryType.DIR), Entry(b"big", EntryType.FILE, size=1,
                                                                 digest=hashlib.sha256(b"x").digest())],
                             {b"big": b"x"}))
    return str(old)


def test_diff_memory_is_bounded_by_the_limit_not_by_declared_sizes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An 850 KB image declaring a 16 GiB file made `cdimg diff --memory-limit 256M`
    reach 5.7 GB: the whole file was read to diff it.  Here 1 GiB of zeros (a
    1 MB image) under a 700 MiB address-space cap."""
    old = small_old_image(tmp_path)
    new = tmp_path / "new.dimg"
    big = Entry(b"big", EntryType.FILE, size=GIB, digest=zeros_digest(GIB))
    new.write_bytes(image_of([Entry(b"", EntryType.DIR), big], frames={b"big": zstd_stream((GIB, 0))}))
    assert new.stat().st_size < 1_000_000
    out = str(tmp_path / "d.dimg")
    p = run_module("dimg", "diff", "--oldDimg", old, "--newDimg", str(new), "--outDimg", out, "--memory-limit",
                   "256M", "--level", "1", "-q", limit_as=CAP)
    assert p.returncode == 0, p.stderr
    with Image(old) as base, Image(out, parent=base) as delta:
        assert delta.lookup(b"big").storage == Storage.FRAME  # stored whole: too big to diff in 256M
    # and back: patch streams what is stored whole
    p = run_module("dimg", "patch", "--baseDimg", old, "--diffDimg", out, "--outDimg", str(tmp_path / "p.dimg"),
                   "--level", "1", "-q", limit_as=CAP)
    assert p.returncode == 0, p.stderr
    with Image(str(tmp_path / "p.dimg")) as patched:
        assert patched.info.image_id == Image(str(new)).info.image_id


def test_patch_refuses_a_rebuild_beyond_its_memory_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 270 KB delta whose step declares 8 GiB made patch run out of memory."""
    old = small_old_image(tmp_path)
    with Image(old) as base:
        parent_tree = base.tree_table
    payload = zstd_stream((GIB, 0))  # a prefix-method payload that really makes 1 GiB
    t = encode_tree([Entry(b"", EntryType.DIR), Entry(b"big", EntryType.FILE, size=GIB, digest=bytes(32))])
    storage = bytes([4]) + uv(1) + uv(1) + bytes([2]) + uv(len(payload))
    top = tmp_path / "top.dimg"
    top.write_bytes(delta_dimg(parent_tree, t, storage, payload))
    for limit, flags in ((CAP, []), (256 << 20, ["--memory-limit", "256M"])):  # by default, the rlimit's
        p = run_module("dimg", "patch", "--baseDimg", old, "--diffDimg", str(top), "--outDimg",
                       str(tmp_path / "p.dimg"), *flags, "-q", limit_as=CAP)
        assert_one_line_error(p.returncode, p.stderr, EXIT_IO)
        assert f"/big: rebuilding it needs 1073741825 bytes of memory, more than the limit of {limit}" in p.stderr
        assert not (tmp_path / "p.dimg").exists()


def test_holes_are_found_by_bytes_comparison() -> None:
    """unpack finds the holes of a sparse file by comparing each chunk with zeros:
    against a memoryview that compared byte by byte (a 16 GiB file of holes with
    a wrong digest took 47 s to refuse; 2 GiB: 7.7 s, now 2.6 s)."""
    from d4c.image.unpack import _zeros
    for n in (1, 4096, 1 << 20, (1 << 20) + 1):
        zeros = _zeros(n)
        assert type(zeros) is bytes and zeros == bytes(n)


def test_mount_refuses_device_numbers_linux_cannot_hold(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the mount, a major >= 4096 showed as 0 and made its directory EIO."""
    need_root()
    need(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    d = Entry(b"d", EntryType.DIR)
    dev = Entry(b"d/dev", EntryType.CHARDEV, mode=0o600, rdev=(4096, 1))
    path = tmp_path / "dev.cdimg"
    path.write_bytes(cdimg(image_of([Entry(b"", EntryType.DIR), d, dev])))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_module("mount", "--background", "--cdimg", str(path), str(mnt), timeout=60)
    try:
        assert p.returncode != 0, "mounted an image whose device number Linux cannot hold"
        assert "device number 4096,1 out of range" in p.stderr and "Traceback" not in p.stderr
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_layers_of_more_entries_than_an_image_holds(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A 9 MB layer of 1e6 entries took 2.8 GB and 129 s before the image writer's
    self-check refused it as 'corrupt image <new image>'; the layers' members are
    counted as they are read (the cap lowered here, so the layer stays small)."""
    import d4c.oci.flatten
    monkeypatch.setattr(d4c.oci.flatten, "MAX_ENTRIES", 500)
    lay = Layout(str(tmp_path / "lay"))
    lay.tag(lay.image([([M("d/", "dir")] + [M(f"d/f{i}", data=b"") for i in range(300)], "gzip"),
                       ([M(f"g{i}", data=b"") for i in range(300)], "gzip")]), "t")
    lay.save()
    out = str(tmp_path / "out")
    code, _, err = run_cli("-q", "convert", "--image", f"oci:{lay.path}:t", "--output", out)
    assert_one_line_error(code, err, 3)
    assert "layer 2/2: the layers hold more than 500 entries" in err
    assert not os.path.exists(out)
    monkeypatch.setattr(d4c.oci.flatten, "MAX_ENTRIES", 602)  # 601 members: at the cap is fine
    code, _, err = run_cli("-q", "convert", "--image", f"oci:{lay.path}:t", "--output", out)
    assert code == 0, err
