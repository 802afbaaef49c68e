"""What the two daemons (`snapshotter`, `server`) share: argument errors and
failures as one line with an exit code, logs on stderr, --debug for tracebacks."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Callable

from . import errors


def run_daemon(prog: str, parser: argparse.ArgumentParser, argv: list[str],
               body: Callable[[argparse.Namespace], int]) -> int:
    try:
        args = parser.parse_args(argv)
    except errors.UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format=f"{prog}: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return body(args)
    except errors.D4CError as exc:
        if args.debug:
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if args.debug:
            raise
        print(f"{prog}: {errors.from_oserror(exc, 'system error')}", file=sys.stderr)
        return errors.EXIT_IO


def record_signals(*signums: int) -> list[int]:
    """Handlers for `signums` that only append to the returned list.  A handler
    runs in the main thread between two bytecodes: one that took a lock (an
    Event.set) while the main thread held it (inside Event.wait) deadlocked the
    snapshotter for good when Ctrl-C came twice at once, from the terminal and
    forwarded by the one-file bootloader."""
    received: list[int] = []
    for signum in signums:
        signal.signal(signum, lambda got, _frame: received.append(got))
    return received


def wait_for_signal(received: list[int]) -> None:
    while not received:
        time.sleep(0.2)
