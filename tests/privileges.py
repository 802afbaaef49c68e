"""What an unprivileged local user can do with our mounts: a setuid-root program
and a device node to put in images, a directory such a user can reach, and a
way to run a command as `nobody`."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from typing import Iterator

from helpers import need

NOBODY = 65534
EUID_SOURCE = b'#include <stdio.h>\n#include <unistd.h>\nint main(void) { printf("%d\\n", (int)geteuid()); return 0; }\n'


def setuid_tree(root: str) -> None:
    """`root`/euid: a static program owned by root with mode 4755 that prints its
    effective uid (a script cannot be setuid); `root`/null: the device 1:3."""
    need(shutil.which("gcc") is not None, "gcc is needed to build a setuid test program")
    os.makedirs(root)
    source = os.path.join(root, "..", "euid.c")
    with open(source, "wb") as f:
        f.write(EUID_SOURCE)
    program = os.path.join(root, "euid")
    subprocess.run(["gcc", "-static", "-O2", "-o", program, source], check=True, capture_output=True, timeout=120)
    os.chown(program, 0, 0)
    os.chmod(program, 0o4755)
    os.mknod(os.path.join(root, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))


@contextlib.contextmanager
def reachable_dir() -> Iterator[str]:
    """A directory every local user can enter (pytest's tmp_path is 0700: a test
    there would pass for the wrong reason)."""
    path = tempfile.mkdtemp(prefix="d4c-reach-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    # through a shell: setpriv itself executed a program in a directory only root
    # can enter (its exec came before the capabilities went)
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
                           "/bin/sh", "-c", 'exec "$@"', "sh", *cmd], capture_output=True, text=True, timeout=60)


def mount_options(path: str) -> set[str]:
    """The per-mount options of the mount point `path` (ro, nosuid, nodev, ...)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.abspath(path):
                found = set(fields[5].split(","))  # the last one is on top
    assert found is not None, f"{path} is not a mount point"
    return found
