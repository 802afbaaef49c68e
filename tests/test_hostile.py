"""Crafted images and layers that lie (sizes, owners, device numbers, depth, declared sizes):
each is refused with one line and the right exit code, or handled, and never trusted."""

from __future__ import annotations

import os
import subprocess
import sys

import zstandard

from crafted import SHA_HELLO, dimg, file_extra, frame, tree, uv
from helpers import assert_one_line_error, need, need_root, run_cli

from d4c.dimg import cdimg_preamble, dimg_preamble, image_id_of
from d4c.errors import EXIT_CORRUPT

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


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
