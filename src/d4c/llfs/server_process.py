"""The FUSE server process of one mount, both ends of its command line.

    PROGRAM llfs-server [--debug] [--cache-dir DIR] [--cache-size N] [--workers N]
                        [--verified-bodies] [--suid-dev] --ready-fd FD MOUNTPOINT IMAGE...

Every d4c program (`ctr-cli`, `snapshotter`, the installed bundle) becomes this
process when its first argument is SERVER_WORD: `spawn_mount` (process.py)
writes the line with `command_line`, and `main` reads it.  A device runs one
such process per mounted image, so it imports what serving needs and nothing
of the command line tree: not even argparse, whose help formatter and messages
(shutil, gettext, locale) held ~1.5 MiB of an idle server.  The line is written
only by `command_line`, so `parse_line` reads exactly that grammar."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from .. import errors

SERVER_WORD = "llfs-server"
READY, FAILED = b"\0", b"\1"  # the first byte on the ready pipe


# what a mount server imports only when it needs it: the engine (the first delta
# file), OpenSSL's sha256 (the first body hashed: d4c.digests), shutil (the
# private cache's removal at exit)
LOADED_LATER = ("d4c.engine.delta", "hashlib", "shutil")


def bundle_is_temporary() -> bool:
    """True in a one-file binary: its modules were unpacked to a directory that
    goes away with the process that unpacked it."""
    meipass = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or meipass is None:
        return False
    return not os.path.abspath(meipass).startswith(os.path.dirname(os.path.realpath(sys.executable)) + os.sep)


def command_line(paths: list[str], mountpoint: str, ready_fd: int, *, cache_dir: str | None = None,
                 cache_size: int | None = None, workers: int | None = None, debug: bool = False,
                 verified_bodies: bool = False, suid_dev: bool = False, group_cache: int | None = None) -> list[str]:
    """The arguments after the program: serve the stack `paths` (base first) at `mountpoint`."""
    line = [SERVER_WORD]
    if debug:
        line.append("--debug")
    if cache_dir:
        line += ["--cache-dir", os.path.abspath(cache_dir)]
    if cache_size:
        line += ["--cache-size", str(cache_size)]
    if workers:
        line += ["--workers", str(workers)]
    if group_cache is not None:
        line += ["--group-cache", str(group_cache)]
    if verified_bodies:
        line.append("--verified-bodies")
    if suid_dev:
        line.append("--suid-dev")
    return line + ["--ready-fd", str(ready_fd), os.path.abspath(mountpoint)] + [os.path.abspath(p) for p in paths]


class ServerArgs:
    """What `command_line` wrote."""

    def __init__(self) -> None:
        self.debug = self.verified_bodies = self.suid_dev = False
        self.cache_dir: str | None = None
        self.cache_size = 2 << 30
        self.workers: int | None = None
        self.group_cache: int | None = None
        self.ready_fd = -1
        self.mountpoint = ""
        self.images: list[str] = []


_SWITCHES = {"--debug": "debug", "--verified-bodies": "verified_bodies", "--suid-dev": "suid_dev"}
_VALUES = {"--cache-dir": ("cache_dir", str), "--cache-size": ("cache_size", int), "--workers": ("workers", int),
           "--ready-fd": ("ready_fd", int), "--group-cache": ("group_cache", int)}


def parse_line(argv: list[str]) -> ServerArgs:
    """The arguments after SERVER_WORD; UsageError for anything `command_line` does not write."""
    args, rest = ServerArgs(), list(argv)
    while rest and rest[0].startswith("--"):
        flag = rest.pop(0)
        if flag in _SWITCHES:
            setattr(args, _SWITCHES[flag], True)
        elif flag in _VALUES and rest:
            name, kind = _VALUES[flag]
            try:
                setattr(args, name, kind(rest.pop(0)))
            except ValueError:
                raise errors.UsageError(f"{SERVER_WORD}: bad value for {flag}") from None
        else:
            raise errors.UsageError(f"{SERVER_WORD}: unknown or incomplete flag {flag}")
    if args.ready_fd < 0 or len(rest) < 2:
        raise errors.UsageError(f"usage: {SERVER_WORD} [flags] --ready-fd FD MOUNTPOINT IMAGE...")
    args.mountpoint, args.images = rest[0], rest[1:]
    return args


def _private_dir(parent: str, prefix: str) -> str:
    """tempfile.mkdtemp's contract (a new directory only this user can enter)
    without tempfile, which brings shutil and random (~1 MiB of an idle server)."""
    while True:
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def main(argv: list[str]) -> int:
    """Serve until unmounted; report "mounted" or the failure on the ready pipe."""
    try:
        args = parse_line(argv)
    except errors.UsageError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s d4c mount {args.mountpoint}: %(levelname)s: %(message)s")
    private = args.cache_dir is None
    if private:
        cache_dir = _private_dir("/var/tmp", "d4c-llfs-")
    else:
        cache_dir = args.cache_dir
    reported = []

    def report(answer: bytes) -> None:
        if not reported:
            reported.append(answer)
            os.write(args.ready_fd, answer)
            os.close(args.ready_fd)

    def ready() -> None:
        # A one-file program's worker runs from its parent's unpacked bundle
        # (PyInstaller passes it on: no second extraction), which the parent removes
        # when it exits: everything a read may need later is loaded now.  Installed
        # (one-dir) and from source, the engine loads at the first delta file.
        if bundle_is_temporary():
            for name in LOADED_LATER:
                importlib.import_module(name)
            importlib.import_module("d4c.accel").check()  # the kernels load at first use too
        report(READY)

    from .model import Options
    from .serve import serve
    try:
        serve(args.images, args.mountpoint, Options.of(cache_dir, args.cache_size, args.verified_bodies,
                                                       args.group_cache), ready=ready, workers=args.workers,
              suid_dev=args.suid_dev)
    except errors.D4CError as exc:
        logging.getLogger("d4c.llfs").debug("mount failed", exc_info=True)
        report(FAILED + str(exc).encode(errors="replace")[:4000])
        return exc.exit_code
    except OSError as exc:
        report(FAILED + str(errors.from_oserror(exc, "mount")).encode(errors="replace")[:4000])
        return errors.EXIT_IO
    finally:
        if private:
            import shutil
            shutil.rmtree(cache_dir, ignore_errors=True)
    return 0
