"""`ctr-cli`: one argparse tree built from one module per command.

`main()` is the single place that turns exceptions into exit codes: a D4CError
prints one line (`ctr-cli: ...`) and exits with its code; an OSError becomes a
one-line system error; anything else is a bug and prints a traceback.
`--debug` shows tracebacks for everything.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import traceback

from .. import errors
from ..progress import set_quiet
from ..args import ArgumentParser
from ._common import common_parser, finish_args

PROG = "ctr-cli"
COMMANDS = ("version_cmd", "convert_cmd", "pack_cmd", "unpack_cmd", "show_cmd", "diff_cmd", "patch_cmd",
            "merge_cmd", "mount_cmd", "load_cmd", "push_cmd", "pull_cmd", "publish_cmd", "stat_cmd", "util_cmd",
            "keygen_cmd", "sign_cmd")
# the modules that register the commands under a line's first word: a call imports
# only its own command's module (`ctr-cli version` and every FUSE mount server,
# which is `ctr-cli mount`, load none of the others' dependencies)
MODULES_BY_WORD = {
    "version": ("version_cmd",), "convert": ("convert_cmd",), "pack": ("pack_cmd",),
    "unpack": ("unpack_cmd",), "mount": ("mount_cmd",), "umount": ("mount_cmd",), "load": ("load_cmd",),
    "push": ("push_cmd",), "pull": ("pull_cmd",), "publish": ("publish_cmd",), "stat": ("stat_cmd",),
    "util": ("util_cmd",), "keygen": ("keygen_cmd",), "sign": ("sign_cmd",),
    "dimg": ("show_cmd", "diff_cmd", "patch_cmd", "merge_cmd", "pack_cmd"),
    "cdimg": ("show_cmd", "diff_cmd", "patch_cmd", "merge_cmd"),
}


def command_modules(argv: list[str] | None) -> tuple[str, ...]:
    """The command modules a line needs: its first word's, or all (help, a typo)."""
    words = [w for w in argv or [] if w not in ("--debug", "--quiet", "-q")]
    if words and words[0] in MODULES_BY_WORD:
        return MODULES_BY_WORD[words[0]]
    return COMMANDS


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    common = common_parser()
    parser = ArgumentParser(prog=PROG, parents=[common],
                            description="d4c: delta updates for container images")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    groups = {
        "dimg": sub.add_parser("dimg", parents=[common], help="work with dimg files"),
        "cdimg": sub.add_parser("cdimg", parents=[common], help="work with cdimg files"),
        "util": sub.add_parser("util", parents=[common], help="single-file delta tools"),
    }
    group_subs = {}
    for name, p in groups.items():
        gs = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=ArgumentParser)
        gs.required = True
        group_subs[name] = gs
    for name in command_modules(argv):
        importlib.import_module(f"{__name__}.{name}").register(sub, group_subs, common)
    return parser


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr)
    # the messages of warnings are written for users: no "WARNING:" noise
    logging.getLogger().handlers[0].setFormatter(_Formatter())


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{PROG}: " if record.levelno < logging.ERROR else f"{PROG}: error: "
        if record.levelno == logging.WARNING:
            prefix = f"{PROG}: warning: "
        return prefix + record.getMessage()


class Terminated(KeyboardInterrupt):
    """SIGTERM unwinds like Ctrl-C, so every cleanup of a half-written output runs
    (the default action ends the process where it stands)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser(argv).parse_args(argv)
    except errors.UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help, or argparse's own usage errors
        return int(exc.code or 0)
    finish_args(args)
    set_quiet(args.quiet)
    _setup_logging(args.debug, args.quiet)
    try:
        return int(args.func(args) or 0)
    except errors.D4CError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return errors.EXIT_TERMINATED if terminated else errors.EXIT_INTERRUPTED
    except BrokenPipeError:
        # `ctr-cli ... | head`: the reader left; say nothing, like other tools
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return errors.EXIT_BROKEN_PIPE
    except OSError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: {errors.from_oserror(exc, 'system error')}", file=sys.stderr)
        return errors.EXIT_IO
    except MemoryError:  # the system refused: a limit on this process or the machine
        print(f"{PROG}: out of memory", file=sys.stderr)
        return errors.EXIT_IO
