"""ctr-cli mount / umount: serve an image stack read-only through FUSE."""

from __future__ import annotations

import argparse
import shutil
import tempfile

from ..errors import SystemFailure, UsageError
from ..args import parse_size, positive_int


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser(
        "mount", parents=[common], help="mount an image (and the stack below it) read-only",
        description="Mounts TOP (a base or a delta image) with every image below it as one read-only "
        "tree. The images below are found by id in TOP's directory (or --cdimg-dir), or given with "
        "--base and --delta (lowest first). Unchanged files are read from the image that stores them; "
        "files that need deltas are rebuilt on first read, checked, and kept in an on-disk cache.")
    p.add_argument("--cdimg", "--dimg", dest="top", required=True, metavar="FILE", help="the top image")
    p.add_argument("--cdimg-dir", metavar="DIR", help="where to look for the images below TOP")
    p.add_argument("--base", metavar="FILE", help="the base image of the stack")
    p.add_argument("--delta", action="append", default=[], metavar="FILE",
                   help="a delta between the base and TOP (repeat, lowest first)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep rebuilt files here, also across mounts (default: a private directory "
                   "under /var/tmp, removed at unmount)")
    p.add_argument("--cache-size", type=parse_size, default=2 << 30, metavar="SIZE",
                   help="upper bound of the cache (default 2G); least recently used files go first")
    p.add_argument("--group-cache", type=parse_size, default=None, metavar="SIZE",
                   help="decoded group frames of format-2 images kept in memory, per image (default 32M): "
                   "a tree walk then decodes each group about once")
    p.add_argument("--background", action="store_true",
                   help="return once mounted; a server process keeps the mount (one per mount)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="FUSE worker threads (default: llfuse's, 30)")
    p.add_argument("--verified-bodies", action="store_true",
                   help="the images' bodies were checked against their digests when they were stored (the "
                   "di3fs snapshotter does so at load): unchanged files are served on zstd's frame checksums "
                   "without hashing them again; files rebuilt from deltas are always checked")
    p.add_argument("--allow-suid-dev", "--suid", action="store_true",
                   help="as root: let the image's setuid programs and device nodes work (default nosuid,nodev, "
                   "since every local user can reach the mount); the di3fs snapshotter's mounts, in "
                   "directories only root can enter, keep them for its containers")
    p.add_argument("--log", metavar="FILE", help="--background: append the server's log lines (e.g. "
                   "files that failed their digest) to FILE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=run_mount)

    p = sub.add_parser("umount", parents=[common], help="unmount an image mounted with `mount`")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now even if busy")
    p.set_defaults(func=run_umount)


def run_mount(args: argparse.Namespace) -> int:
    from ..llfs.model import Options
    from ..image.stack import resolve_stack
    from ..llfs.serve import check_mountpoint, fuse_problem, serve
    if args.base is None and args.delta:
        raise UsageError("mount: --delta needs --base")
    chain = ([args.base] + args.delta) if args.base else None
    paths = resolve_stack(args.top, image_dir=args.cdimg_dir, chain=chain)  # errors before mounting
    check_mountpoint(args.mountpoint)
    problem = fuse_problem()
    if problem:
        raise UsageError(f"mount: {problem}")
    if args.background:
        from ..image.stack import open_stack
        from ..llfs.process import reexec_command, spawn_mount
        # a damaged header here, not in the server: its failure would reach us as
        # 'mount failed' (exit 5), not as a corrupt image (exit 3)
        for image in open_stack(paths):
            image.close()
        spawn_mount(reexec_command(), paths, args.mountpoint, cache_dir=args.cache_dir,
                    cache_size=args.cache_size, workers=args.workers, log=args.log, debug=args.debug,
                    verified_bodies=args.verified_bodies, suid_dev=args.allow_suid_dev,
                    group_cache=args.group_cache)
        return 0
    private = args.cache_dir is None
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="d4c-llfs-", dir="/var/tmp")
    try:
        serve(paths, args.mountpoint, Options.of(cache_dir, args.cache_size, args.verified_bodies, args.group_cache),
              workers=args.workers, suid_dev=args.allow_suid_dev)
    finally:
        if private:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


def run_umount(args: argparse.Namespace) -> int:
    from ..llfs.mounts import detach, mounted_at
    mountpoint, fstype = mounted_at(args.mountpoint)
    if fstype is None:
        raise UsageError(f"{mountpoint} is not mounted")
    # a dead server leaves a stale mount that only a lazy detach removes; so may a hung one
    p = detach(mountpoint, lazy=args.lazy)
    if p.returncode:
        raise SystemFailure(f"cannot unmount {mountpoint}: {p.stderr.strip() or 'exit ' + str(p.returncode)}")
    return 0
