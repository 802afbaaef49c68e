"""ctr-cli util diff / util patch: the delta engine on single files."""

from __future__ import annotations

import argparse
import os

from ..engine import delta
from ..progress import human_bytes
from ._common import add_link_rate, add_threads, refuse_output_over_input
from ..args import parse_size


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    util = groups["util"]
    p = util.add_parser("diff", parents=[common], help="binary delta between two files")
    p.add_argument("--old", required=True, metavar="FILE")
    p.add_argument("--new", required=True, metavar="FILE")
    p.add_argument("--diff", required=True, metavar="FILE", help="output delta")
    p.add_argument("--level", type=int, default=None, metavar="L",
                   help=f"zstd level of the delta streams (default {delta.DEFAULT_LEVEL}, fast mode {delta.FAST_LEVEL})")
    p.add_argument("--fast", action="store_true", help="zstd prefix mode: faster diff, usually larger delta")
    p.add_argument("--memory-limit", type=parse_size, default=delta.DEFAULT_MEMORY_LIMIT, metavar="SIZE",
                   help="cap on diff memory; larger files are diffed in windows (default 2G)")
    p.add_argument("--compressionMode", choices=("bzip2", "zstd"), default="zstd",
                   help="accepted for compatibility with the original; d4c always uses zstd")
    add_link_rate(p)
    add_threads(p)
    p.set_defaults(func=run_diff)

    p = util.add_parser("patch", parents=[common], help="apply a binary delta to a file")
    p.add_argument("--old", required=True, metavar="FILE")
    p.add_argument("--diff", required=True, metavar="FILE", help="the delta")
    p.add_argument("--new", required=True, metavar="FILE", help="output file")
    p.add_argument("--max-size", type=parse_size, default=None, metavar="SIZE",
                   help="refuse deltas that declare a larger result (default: 64 x the inputs, at least 1G)")
    p.set_defaults(func=run_patch)


def run_diff(args: argparse.Namespace) -> int:
    refuse_output_over_input("--diff", args.diff, [args.old, args.new])
    level = args.level if args.level is not None else (delta.FAST_LEVEL if args.fast else delta.DEFAULT_LEVEL)
    size = delta.diff_files(args.old, args.new, args.diff, level=level, threads=args.threads,
                            memory_limit=args.memory_limit, fast=args.fast, link_mbit=args.link_mbit)
    if not args.quiet:
        new_size = os.path.getsize(args.new)
        print(f"{args.diff}: {human_bytes(size)} ({100.0 * size / max(new_size, 1):.2f}% of the new file)")
    return 0


def run_patch(args: argparse.Namespace) -> int:
    refuse_output_over_input("--new", args.new, [args.old, args.diff])
    delta.apply_files(args.old, args.diff, args.new, max_size=args.max_size)
    return 0
