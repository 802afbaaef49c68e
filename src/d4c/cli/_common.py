"""Options and helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..args import positive_int
from ..errors import UsageError



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
