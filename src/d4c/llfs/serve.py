"""Serving one mount in this process (llfuse allows one mount per process)."""

from __future__ import annotations

import logging
import os
from typing import Callable

from ..errors import Unsupported, UsageError
from ._impl import IMPORT_ERROR, llfuse
from .model import ImageFS, Options
from ..image.stack import open_stack
from .mounts import clear_stale
from .threads import keep_frame_memory, pin_fuse_workers

log = logging.getLogger("d4c.llfs")


def check_mountpoint(mountpoint: str) -> None:
    if clear_stale(mountpoint):
        log.warning("%s: cleared a stale mount (its server had died)", mountpoint)
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point")
    if os.listdir(mountpoint):
        raise UsageError(f"mount point {mountpoint} is not empty")


def fuse_problem() -> str | None:
    """Why FUSE cannot be used here, or None."""
    if llfuse is None:
        return f"llfuse is not available ({IMPORT_ERROR})"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (is the fuse kernel module loaded?)"
    return None


def serve(paths: list[str], mountpoint: str, options: Options, *,
          ready: Callable[[], None] = lambda: None, workers: int | None = None, suid_dev: bool = False) -> None:
    """Mount the stack `paths` (base first) read-only and serve until unmounted.
    suid_dev: honour the images' setuid programs and device nodes (as root only:
    for containers, under directories only root can enter); by default they are
    inert, as any local user may reach an allow_other mount."""
    problem = fuse_problem()
    if problem:
        raise Unsupported(f"cannot mount: {problem}")
    from .ops import Operations  # subclasses llfuse's class: only importable with llfuse
    keep_frame_memory()  # before the FUSE and pool threads start
    images = open_stack(paths)
    fs = ImageFS(images, options)
    fuse_options = set(llfuse.default_options) | {"fsname=d4c", "subtype=d4c", "ro"}
    if os.geteuid() == 0:  # containerd and the container's users read it
        fuse_options |= {"allow_other"} | ({"suid", "dev"} if suid_dev else {"nosuid", "nodev"})
    try:
        llfuse.init(Operations(fs), mountpoint, sorted(fuse_options))
    except BaseException:
        fs.close()
        raise
    ready()
    pin_fuse_workers()  # the main thread only waits while they serve
    try:
        llfuse.main(workers=workers)
    except BaseException:
        # never unmount after an internal failure: an empty directory in place of an
        # image is worse for a running container than an error on every access
        log.exception("FUSE main loop failed; the mount is left in place")
        llfuse.close(unmount=False)
        fs.close()
        raise
    llfuse.close()
    fs.close()
