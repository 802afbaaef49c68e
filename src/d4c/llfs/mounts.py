"""Finding and clearing our mounts, including stale ones.

A FUSE mount whose server process died stays in the mount table, and every
access to it fails with ENOTCONN ("Transport endpoint is not connected"), so
os.path.ismount() and os.path.isdir() say False: the mount table is the truth.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
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


def _resolve(path: str, table: dict[str, str]) -> str:
    """`path` (absolute) with the symlinks along it resolved, stopping at a
    mount point: realpath would lstat it, and a hung server hangs that."""
    for _ in range(40):  # symlink hops, as the kernel allows
        if path in table:
            return path
        parent, name = os.path.split(path)
        path = os.path.join(os.path.realpath(parent), name)
        if path in table:
            return path
        try:
            target = os.readlink(path)  # a name in the parent directory: no lookup below it
        except OSError:
            return path
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return path


def mounted_at(path: str) -> tuple[str, str | None]:
    """The mount table's name for `path`, which may be reached through symlinks
    (the table holds resolved paths), and the file system type mounted there
    last; (the absolute path, None) when nothing is."""
    absolute = os.path.abspath(path)
    try:
        table = _mount_table()
    except OSError:
        return absolute, "unknown" if os.path.ismount(absolute) else None
    resolved = _resolve(absolute, table)
    return (resolved, table[resolved]) if resolved in table else (absolute, None)


def fstype_at(path: str) -> str | None:
    """The file system type mounted at `path` (through symlinks), or None."""
    return mounted_at(path)[1]


ANSWER_WITHIN = 5.0  # seconds a mount's server has to answer statfs before it counts as silent
LIVE, DEAD, SILENT = "live", "dead", "silent"


def server_state(path: str, timeout: float | None = None) -> str:
    """Whether the server of the mount at `path` answers statfs (LIVE), has died
    (DEAD: ENOTCONN, only a lazy detach removes the mount) or gave no answer
    within `timeout` (SILENT: hung, or busy on every worker thread; only the
    caller knows which it may assume).  statfs always reaches the server; stat
    may be answered from the kernel's attribute cache long after it died.  An
    unanswered statfs is left waiting on a daemon thread."""
    answer: list[OSError | None] = []

    def ask() -> None:
        try:
            os.statvfs(path)
            answer.append(None)
        except OSError as exc:
            answer.append(exc)

    asking = threading.Thread(target=ask, name="d4c-statfs", daemon=True)
    asking.start()
    asking.join(ANSWER_WITHIN if timeout is None else timeout)
    if not answer:
        return SILENT
    failure = answer[0]
    dead = failure is not None and failure.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # first access: the latter
    return DEAD if dead else LIVE


def is_stale(path: str) -> bool:
    """The mount's server has died."""
    return server_state(path) == DEAD


def unmount(path: str, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    import shutil
    import subprocess  # here: a mount's server process imports this module and rarely unmounts
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [path]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [path]
    return subprocess.run(cmd, capture_output=True, text=True)


def detach(path: str, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    """Unmount `path` (a mount point as the table names it), lazily when asked,
    when its server died, or when a silent server keeps it busy."""
    state = LIVE if lazy else server_state(path)
    p = unmount(path, lazy=lazy or state == DEAD)
    if p.returncode and state == SILENT:
        p = unmount(path, lazy=True)
    return p


def clear_stale(path: str) -> bool:
    """Detach a d4c mount at `path` whose server died; True if there was one.
    A server that does not answer may only be busy: that is an error here."""
    path, fstype = mounted_at(path)
    if fstype != FSTYPE:
        return False
    state = server_state(path)
    if state == SILENT:
        raise UsageError(f"{path} is a d4c mount whose server does not answer; unmount it first "
                         "(ctr-cli umount, or --lazy)")
    if state == DEAD:
        unmount(path, lazy=True)
        return True
    return False
