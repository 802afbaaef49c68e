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
import threading

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


def _mount_table() -> dict[str, str]:
    """Mount points and the file system type last mounted on each."""
    table = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and right:
                table[_unescape(fields[4])] = right.split()[0]
    return table


def mount_path(path: str) -> str:
    """The mount table's name for `path`: its absolute path or, when that is not
    a mount point, the path with its symlinks resolved (the table holds those).
    The first try touches nothing: a hung server would hang a stat of its mount."""
    absolute = os.path.abspath(path)
    try:
        table = _mount_table()
    except OSError:
        return absolute
    if absolute in table:
        return absolute
    real = os.path.realpath(absolute)
    return real if real in table else absolute


def fstype_at(path: str) -> str | None:
    """The file system type mounted exactly at `path` (the last one), or None."""
    path = mount_path(path)
    try:
        return _mount_table().get(path)
    except OSError:
        return "unknown" if os.path.ismount(path) else None


STALE_AFTER = 5.0  # seconds a mount's server has to answer statfs before it counts as hung


def is_stale(path: str, timeout: float | None = None) -> bool:
    """The mount's server died (ENOTCONN) or does not answer within `timeout`
    (STALE_AFTER): either way only a lazy detach removes the mount.  statfs
    always reaches the server; stat may be answered from the kernel's attribute
    cache long after the server died.  A hung server's statfs is left waiting on
    a daemon thread (it ends when the server does)."""
    answer: list[OSError | None] = []

    def ask() -> None:
        try:
            os.statvfs(path)
            answer.append(None)
        except OSError as exc:
            answer.append(exc)

    asking = threading.Thread(target=ask, name="d4c-statfs", daemon=True)
    asking.start()
    asking.join(STALE_AFTER if timeout is None else timeout)
    if not answer:
        return True
    failure = answer[0]
    return failure is not None and failure.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # first access: the latter


def unmount(path: str, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [path]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [path]
    return subprocess.run(cmd, capture_output=True, text=True)


def clear_stale(path: str) -> bool:
    """Detach a dead or hung d4c mount at `path`; True if there was one."""
    path = mount_path(path)
    if fstype_at(path) == FSTYPE and is_stale(path):
        unmount(path, lazy=True)
        return True
    return False
