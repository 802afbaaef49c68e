"""Starting the FUSE server process of one mount and waiting until it serves.

llfuse allows one mount per process (and must not share a process with a gRPC
server), so every mount is a child process: the same program re-executed with
its SERVER_WORD (server_process.py), in its own session so it outlives its parent (containers
keep reading when the snapshotter restarts).  It reports "mounted" or the
reason it failed through a pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..errors import SystemFailure
from .server_process import FAILED, READY, command_line

def reexec_command() -> list[str]:
    """How to start this program again: the frozen binary, or python -m d4c."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "d4c"]


def spawn_mount(prefix: list[str], paths: list[str], mountpoint: str, *, cache_dir: str | None = None,
                cache_size: int | None = None, workers: int | None = None, log: str | None = None,
                debug: bool = False, verified_bodies: bool = False, suid_dev: bool = False,
                group_cache: int | None = None) -> int:
    """Mount the stack `paths` (base first) at `mountpoint` in a new process started
    with `prefix` + the server's arguments; returns its pid once the mount serves."""
    read_end, write_end = os.pipe()
    cmd = prefix + command_line(paths, mountpoint, write_end, cache_dir=cache_dir, cache_size=cache_size,
                                workers=workers, debug=debug, verified_bodies=verified_bodies, suid_dev=suid_dev,
                                group_cache=group_cache)
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
