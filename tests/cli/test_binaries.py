"""The frozen PyInstaller binaries run with no Python around (offline edge installs)."""

from __future__ import annotations

import os

from helpers import run_binary
from test_format import GOLDEN, GOLDEN_ID
from test_mount import fuse_ok

from d4c.image.reader import Image


def test_ctr_cli_version_without_python() -> None:
    p = run_binary("ctr-cli", "version", env={})  # env -i: no PATH, no PYTHONPATH
    assert p.returncode == 0, p.stderr
    assert "ctr-cli 0.1.0" in p.stdout
    assert "kernels: compiled (Cython)" in p.stdout
    assert "(frozen)" in p.stdout


def test_ctr_cli_binary_reads_and_writes_images(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = run_binary("ctr-cli", "cdimg", "show", "--cdimg", GOLDEN, "--json")
    assert p.returncode == 0, p.stderr
    assert GOLDEN_ID in p.stdout
    out = str(tmp_path / "out")
    p = run_binary("ctr-cli", "unpack", "--cdimg", GOLDEN, "--out", out)
    assert p.returncode == 0, p.stderr
    with open(os.path.join(out, "bin", "sh"), "rb") as f:
        assert f.read() == b"hello, d4c\n"
    p = run_binary("ctr-cli", "pack", "--in", out, "--out", str(tmp_path / "x.dimg"), "--quiet")
    assert p.returncode == 0, p.stderr


def test_binary_errors_are_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = run_binary("ctr-cli", "unpack", "--cdimg", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert p.returncode == 4
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr


def test_daemon_binaries_exist_and_answer() -> None:
    for name in ("snapshotter", "server"):
        p = run_binary(name, "--version")
        assert p.returncode == 0 and name in p.stdout, p.stderr


def test_binary_diffs_patches_and_mounts(stack, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The frozen ctr-cli makes and applies image deltas, and its FUSE server
    process (the binary re-executing itself) serves a delta stack."""
    d = str(tmp_path / "d34.cdimg")
    p = run_binary("ctr-cli", "-q", "cdimg", "diff", "--oldCdimg", images[2], "--newCdimg", images[3],
                   "--outCdimg", d)
    assert p.returncode == 0, p.stderr
    out = str(tmp_path / "v4.cdimg")
    p = run_binary("ctr-cli", "-q", "cdimg", "patch", "--diffCdimg", d, "--baseCdimg", images[2], "--outCdimg", out)
    assert p.returncode == 0, p.stderr
    with open(out, "rb") as f1, open(images[3], "rb") as f2:
        assert f1.read() == f2.read()
    fuse_ok()
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    p = run_binary("ctr-cli", "mount", "--background", "--cdimg", stack[-1], mnt)
    assert p.returncode == 0, p.stderr
    try:
        with open(os.path.join(mnt, "bin", "tool"), "rb") as f, Image(images[3]) as want:
            assert f.read() == want.read_body(want.lookup(b"bin/tool"))
    finally:
        p = run_binary("ctr-cli", "umount", mnt)
        assert p.returncode == 0, p.stderr
    assert not os.path.ismount(mnt)
