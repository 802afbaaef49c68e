"""Finding and clearing our mounts, including stale ones.

A FUSE mount whose server process died stays in the mount table, and every
access to it fails with ENOTCONN ("Transport endpoint is not connected"), so
os.path.ismount() and os.path.isdir() say False: the mount table is the truth.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

FSTYPE = "fuse.d4c"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fstype_at(path: str) -> str | None:
    """The file system type mounted exactly at `path` (the last one), or None."""
    path = os.path.abspath(path)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and _unescape(fields[4]) == path:
                    found = right.split()[0] if right else None
    except OSError:
        return "unknown" if os.path.ismount(path) else None
    return found


def is_stale(path: str) -> bool:
    # statfs always reaches the server; stat may be answered from the kernel's
    # attribute cache long after the server died
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the first access says the latter
    return False


def unmount(path: str, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [path]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [path]
    return subprocess.run(cmd, capture_output=True, text=True)


def clear_stale(path: str) -> bool:
    """Detach a dead d4c mount at `path`; True if there was one."""
    if fstype_at(path) == FSTYPE and is_stale(path):
        unmount(path, lazy=True)
        return True
    return False
