"""Options and helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from ..errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are D4CErrors (one line, exit code 2), and a
    flag the command does not know is named with its command, before anything
    else is said of the line (`ctr-cli cdimg diff: unknown flag --oldImage`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self._where()}{message} (see --help)")

    def _where(self) -> str:
        words = self.prog.split(" ", 1)
        return f"{words[1]}: " if len(words) > 1 else ""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        words = list(sys.argv[1:] if args is None else args)
        if self._subparsers is not None:  # a group: its flags are those before the command word
            self._refuse_unknown(words[:next((i for i, w in enumerate(words) if not w.startswith("-")), len(words))])
            return super().parse_known_args(words, namespace)
        try:
            parsed, extras = super().parse_known_args(words, namespace)
        except UsageError:
            self._refuse_unknown(words)
            raise
        self._refuse_unknown(extras)
        return parsed, extras

    def _refuse_unknown(self, words: list[str]) -> None:
        known = list(self._option_string_actions)
        for word in words:
            if word == "--":
                return
            if not word.startswith("-") or word == "-" or self._negative_number_matcher.match(word):
                continue
            flag = word.split("=", 1)[0]
            if flag in known or (flag.startswith("--") and any(k.startswith(flag) for k in known)):
                continue
            raise UsageError(f"{self._where()}unknown flag {flag} (see --help)")


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and debug logs")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                   help="no progress display, errors only")
    return p


def finish_args(args: argparse.Namespace) -> None:
    for name in ("debug", "quiet"):
        if not hasattr(args, name):
            setattr(args, name, False)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threadNum", "--thread-num", dest="threads", type=positive_int,
                   default=os.cpu_count() or 1, metavar="N",
                   help="worker threads (default: number of CPUs)")


def add_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=int, default=3, metavar="L",
                   help="zstd level for file bodies, 1..22 (default 3)")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    try:
        if t and t[-1] in units:
            value = int(float(t[:-1]) * units[t[-1]])
        else:
            value = int(t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    if not 0 < value < (1 << 62):
        raise argparse.ArgumentTypeError(f"size out of range: {text!r}")
    return value


def refuse_output_over_input(flag: str, out: str, inputs: list[str]) -> None:
    """An output that is one of the inputs (the same inode, whatever the name)
    would replace the input it is made from, e.g. a base by a delta of itself."""
    try:
        st = os.stat(out)
    except OSError:
        return  # not there yet: the output's own errors come when it is written
    for path in inputs:
        try:
            other = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            raise UsageError(f"{flag} {out} is the input {path}: write the output elsewhere")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
    """Left-aligned columns; in tables with a header, numbers are right-aligned."""
    all_rows = ([header] if header else []) + rows
    if not all_rows:
        return
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    for r in all_rows:
        cells = []
        for i, cell in enumerate(r):
            numeric = cell.replace(",", "").replace(".", "").replace(" ", "").rstrip("BKMGTi%").isdigit()
            cells.append(cell.rjust(widths[i]) if numeric and i and header else cell.ljust(widths[i]))
        print("  ".join(cells).rstrip())
