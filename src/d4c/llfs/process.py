"""Starting the FUSE server process of one mount and waiting until it serves.

llfuse allows one mount per process (and must not share a process with a gRPC
server), so every mount is a child process: the same program re-executed with
its `mount` command, in its own session so it outlives its parent (containers
keep reading when the snapshotter restarts).  It reports "mounted" or the
reason it failed through a pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..errors import SystemFailure

READY, FAILED = b"\0", b"\1"


def reexec_command(module: str) -> list[str]:
    """How to start this program again: the frozen binary, or python -m MODULE."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", module]


def bundle_is_temporary() -> bool:
    """True in a one-file binary: its modules were unpacked to a directory that
    goes away with the process that unpacked it."""
    meipass = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or meipass is None:
        return False
    return not os.path.abspath(meipass).startswith(os.path.dirname(os.path.realpath(sys.executable)) + os.sep)


def spawn_mount(prefix: list[str], paths: list[str], mountpoint: str, *, cache_dir: str | None = None,
                cache_size: int | None = None, workers: int | None = None, log: str | None = None,
                debug: bool = False, verified_bodies: bool = False, suid_dev: bool = False) -> int:
    """Mount the stack `paths` (base first) at `mountpoint` in a new process started
    with `prefix` + mount arguments; returns its pid once the mount serves."""
    read_end, write_end = os.pipe()
    cmd = prefix + ["--debug" if debug else "-q", "mount", "--cdimg", os.path.abspath(paths[-1])]
    if len(paths) > 1:  # the images below the top, named: no directory search
        cmd += ["--base", os.path.abspath(paths[0])]
        for p in paths[1:-1]:
            cmd += ["--delta", os.path.abspath(p)]
    if cache_dir:
        cmd += ["--cache-dir", os.path.abspath(cache_dir)]
    if cache_size:
        cmd += ["--cache-size", str(cache_size)]
    if workers:
        cmd += ["--workers", str(workers)]
    if verified_bodies:
        cmd += ["--verified-bodies"]
    if suid_dev:
        cmd += ["--allow-suid-dev"]
    cmd += ["--ready-fd", str(write_end), os.path.abspath(mountpoint)]
    try:
        with open(os.devnull, "rb") as null_in, open(log or os.devnull, "ab") as out:
            child = subprocess.Popen(cmd, stdin=null_in, stdout=out, stderr=out, pass_fds=(write_end,),
                                     start_new_session=True, cwd="/")
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    if answer[:1] == READY:
        return child.pid
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
    reason = answer[1:].decode(errors="replace") if answer[:1] == FAILED else f"exit status {child.returncode}"
    raise SystemFailure(f"mount of {paths[-1]} at {mountpoint} failed: {reason}")
