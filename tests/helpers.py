"""Test helpers: requirements that must hold in CI, trees, tree comparison, CLI runs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
from typing import Any

import pytest

from conftest import IN_CI, IS_ROOT
from daemons import pids_naming

from d4c.cli import main

TESTS = os.path.dirname(os.path.abspath(__file__))  # files of the tests refer to tests/ and the repo by these
ROOT = os.path.dirname(TESTS)
BINARIES = os.environ.get("D4C_BINARIES", "")


def need(condition: bool, reason: str) -> None:
    """Skip when a capability is missing -- but in CI a missing capability fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(IS_ROOT, "needs root (device nodes, ownership, security.* xattrs)")


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ctr-cli in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def binary(name: str) -> str | None:
    """The built one-file binary `name` when the run names them (D4C_BINARIES), else None."""
    path = os.path.join(BINARIES, name)
    return path if BINARIES and os.access(path, os.X_OK) else None


def need_binary(name: str) -> str:
    path = binary(name)
    need(path is not None, f"no {name} binary (run `make all`, set D4C_BINARIES)")
    assert path is not None
    return path


def run_binary(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_binary(name), *args], capture_output=True, text=True, env=env if env is not None else {},
                          timeout=120)


def assert_one_line_error(code: int, err: str, expected_code: int | None = None) -> None:
    assert code != 0
    if expected_code is not None:
        assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("ctr-cli: ")


FIXED_NS = 1_600_000_000_123_456_789


def assert_pinned(written: str, golden: str, sha256: str | None = None) -> None:
    """A golden test's check: what this d4c wrote is byte for byte the file kept in
    tests/data (and, where the test pins it too, has that sha256)."""
    with open(written, "rb") as f:
        data = f.read()
    if sha256 is not None:
        assert hashlib.sha256(data).hexdigest() == sha256
    with open(golden, "rb") as f:
        assert f.read() == data, f"tests/data/{os.path.basename(golden)} differs from what this d4c writes"


def make_tree(root: str, *, devices: bool = True) -> None:
    """A tree with every entry type and the metadata images carry."""
    os.makedirs(root)
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    os.makedirs(j("dir", "sub"))
    os.makedirs(j("empty"))
    with open(j("dir", "file.txt"), "wb") as f:
        f.write(b"hello world\n" * 100)
    with open(j("empty-file"), "wb"):
        pass
    with open(j("dup-a"), "wb") as f:
        f.write(b"same content")
    with open(j("dup-b"), "wb") as f:
        f.write(b"same content")
    with open(j("dir", "sub", "big.bin"), "wb") as f:
        f.write(os.urandom(3 << 20) + bytes(1 << 20))
    with open(j("setuid"), "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chmod(j("setuid"), 0o4755)
    os.chmod(j("empty"), 0o1777)
    with open(j("setgid"), "wb") as f:
        f.write(b"x")
    os.chmod(j("setgid"), 0o2711)
    os.link(j("dir", "file.txt"), j("hardlink"))
    os.link(j("dir", "file.txt"), j("dir", "sub", "hardlink2"))
    os.symlink("dir/file.txt", j("symlink"))
    os.symlink("/etc/passwd", j("dir", "abs-symlink"))
    os.symlink("../..", j("dir", "sub", "up"))
    os.mkfifo(j("fifo"), 0o640)
    os.setxattr(j("dir", "file.txt"), b"user.comment", b"\x00binary\xff")
    os.chmod(j("dir", "file.txt"), 0o640)
    if devices and IS_ROOT:
        os.mknod(j("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(j("loop9"), stat.S_IFBLK | 0o660, os.makedev(7, 9))
        os.chown(j("setuid"), 1000, 1001)
        os.chmod(j("setuid"), 0o4755)
        os.chown(j("dir", "sub"), 33, 33)
        # CAP_NET_BIND_SERVICE, version 2 capability blob
        cap = bytes.fromhex("0000000200040000000000000000000000000000")
        os.setxattr(j("setgid"), b"security.capability", cap)
    times = [j(p) for p in ("dir", "dir/sub", "empty", "setuid", "dup-a")]
    for i, p in enumerate(times):
        os.utime(p, ns=(FIXED_NS + i, FIXED_NS + i))
    os.utime(j("symlink"), ns=(FIXED_NS, -5_000_000_123), follow_symlinks=False)


def snapshot_tree(root: str, *, mtimes: bool = True, dir_mtimes: bool = True) -> dict[str, Any]:
    """Every attribute of every entry (hardlink groups by first path)."""
    out: dict[str, Any] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames) + ([""] if dirpath == root else []):
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            info: dict[str, Any] = {"mode": stat.filemode(st.st_mode) + oct(stat.S_IMODE(st.st_mode)),
                                    "uid": st.st_uid, "gid": st.st_gid}
            if mtimes and (dir_mtimes or not stat.S_ISDIR(st.st_mode)):
                info["mtime"] = st.st_mtime_ns
            try:
                info["xattrs"] = {n: os.getxattr(full, n, follow_symlinks=False)
                                  for n in sorted(os.listxattr(full, follow_symlinks=False))}
            except OSError:
                info["xattrs"] = {}
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    import hashlib
                    info["sha256"] = hashlib.sha256(f.read()).hexdigest()
                info["size"] = st.st_size
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    info["linkgroup"] = inodes.setdefault(key, rel)
                info["nlink"] = st.st_nlink
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = info
    return out


def diff_trees(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    problems = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            problems.append(f"only in second: {key}")
        elif key not in b:
            problems.append(f"only in first: {key}")
        elif a[key] != b[key]:
            problems.append(f"{key}: {a[key]} != {b[key]}")
    return problems



def convert_tags(layout: str, tags: list[str], out_dir: str) -> list[str]:
    """`convert` each tag of an OCI layout; the cdimg paths, in order."""
    out = []
    for tag in tags:
        code, _, err = run_cli("convert", "--image", f"oci:{layout}:{tag}", "--output",
                               os.path.join(out_dir, tag), "--cdimg", "-q")
        assert code == 0, err
        out.append(os.path.join(out_dir, tag, "image.cdimg"))
    return out


def diff_chain(full: list[str], out_dir: str) -> list[str]:
    """The first image, then the deltas between consecutive ones (1->2, 2->3, ...)."""
    out = [full[0]]
    for i in range(len(full) - 1):
        out.append(os.path.join(out_dir, f"diff_{i + 1}-{i + 2}.cdimg"))
        code, _, err = run_cli("cdimg", "diff", "--oldCdimg", full[i], "--newCdimg", full[i + 1],
                               "--outCdimg", out[-1], "-q")
        assert code == 0, err
    return out


def fuse_server_pids(under: str) -> list[int]:
    """FUSE server processes (ours: started with --ready-fd) that name a path under `under`."""
    return pids_naming(under, flag=b"--ready-fd")


def as_format(cdimg: str, out: str, tmp: str, image_format: int) -> str:
    """The same image written in `image_format` (unpacked, packed again with its config)."""
    tree = os.path.join(tmp, os.path.basename(out) + ".tree")
    code, _, err = run_cli("unpack", "--cdimg", cdimg, "--out", tree)
    assert code == 0, err
    from d4c.image.reader import Image
    with Image(cdimg) as image:
        config = dict(image.info.config or {})
    with open(tree + ".json", "w") as f:
        json.dump(config, f)
    code, _, err = run_cli("pack", "--in", tree, "--config", tree + ".json", "--out", out,
                           "--format", str(image_format), "-q")
    assert code == 0, err
    return out
