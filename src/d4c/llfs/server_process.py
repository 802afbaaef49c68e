"""The FUSE server process of one mount, both ends of its command line.

    PROGRAM llfs-server [--debug] [--cache-dir DIR] [--cache-size N] [--workers N]
                        [--verified-bodies] [--suid-dev] --ready-fd FD MOUNTPOINT IMAGE...

Every d4c program (`ctr-cli`, `snapshotter`, the installed bundle) becomes this
process when its first argument is SERVER_WORD: `spawn_mount` (process.py)
writes the line with `command_line`, and `main` reads it.  A device runs one
such process per mounted image, so it imports what serving needs and nothing
of the command line tree."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .. import errors

SERVER_WORD = "llfs-server"
READY, FAILED = b"\0", b"\1"  # the first byte on the ready pipe


def bundle_is_temporary() -> bool:
    """True in a one-file binary: its modules were unpacked to a directory that
    goes away with the process that unpacked it."""
    meipass = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or meipass is None:
        return False
    return not os.path.abspath(meipass).startswith(os.path.dirname(os.path.realpath(sys.executable)) + os.sep)


def command_line(paths: list[str], mountpoint: str, ready_fd: int, *, cache_dir: str | None = None,
                 cache_size: int | None = None, workers: int | None = None, debug: bool = False,
                 verified_bodies: bool = False, suid_dev: bool = False) -> list[str]:
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
    if verified_bodies:
        line.append("--verified-bodies")
    if suid_dev:
        line.append("--suid-dev")
    return line + ["--ready-fd", str(ready_fd), os.path.abspath(mountpoint)] + [os.path.abspath(p) for p in paths]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=SERVER_WORD, description="(internal) the FUSE server of one mount")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--cache-dir")
    p.add_argument("--cache-size", type=int, default=2 << 30)
    p.add_argument("--workers", type=int)
    p.add_argument("--verified-bodies", action="store_true")
    p.add_argument("--suid-dev", action="store_true")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("mountpoint")
    p.add_argument("images", nargs="+")
    return p


def main(argv: list[str]) -> int:
    """Serve until unmounted; report "mounted" or the failure on the ready pipe."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s d4c mount {args.mountpoint}: %(levelname)s: %(message)s")
    private = args.cache_dir is None
    if private:
        import tempfile
        cache_dir = tempfile.mkdtemp(prefix="d4c-llfs-", dir="/var/tmp")
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
            importlib.import_module("d4c.engine.delta")
            importlib.import_module("d4c.accel").check()  # the kernels load at first use too
        report(READY)

    from .model import Options
    from .serve import serve
    try:
        serve(args.images, args.mountpoint, Options(cache_dir, args.cache_size, args.verified_bodies), ready=ready,
              workers=args.workers, suid_dev=args.suid_dev)
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
