"""ctr-cli dimg diff / cdimg diff: the delta image between two images."""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

from .. import engine
from ..image.reader import Image
from ..image.deltas import DEFAULT_FRAME_LEVEL, ENCODINGS, MODES, Decision, DiffOptions, diff_images
from ..progress import human_bytes
from ._common import add_link_rate, add_threads, print_json, print_table, refuse_output_over_input
from ..args import parse_size


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    for kind, flag in (("dimg", "Dimg"), ("cdimg", "Cdimg")):
        p = groups[kind].add_parser(
            "diff", parents=[common], help=f"make a delta {kind} from two images",
            description="For every file of the new image: nothing when the old image has the same "
            "content anywhere (moved and renamed files too), a binary delta against the most similar "
            "old file, or the whole file, whichever is smallest. The delta holds the complete new tree, "
            "so metadata-only changes cost only metadata.")
        p.add_argument(f"--old{flag}", dest="old", required=True, metavar="FILE", help="the old (base) image")
        p.add_argument(f"--new{flag}", dest="new", required=True, metavar="FILE", help="the new image")
        p.add_argument(f"--out{flag}", dest="out", required=True, metavar="FILE", help="the delta to write")
        p.add_argument("--mode", choices=MODES, default="binary-diff",
                       help="binary-diff (default): per-file deltas; file-diff: changed files stored whole")
        p.add_argument("--deltaEncoding", choices=sorted(ENCODINGS), default="d4c",
                       help="d4c (default; bsdiffx is an alias): suffix-array deltas, smallest; fast "
                       "(xdelta3 is an alias): zstd prefix deltas, faster; mixed: fast above 512 MiB")
        p.add_argument("--compressionMode", choices=("bzip2", "zstd", "auto"), default="auto",
                       help="accepted for compatibility with the original: d4c picks the smallest "
                       "coding per delta stream itself")
        p.add_argument("--threadSchedMode", choices=("none", "size-ordered"), default="size-ordered",
                       help="accepted for compatibility: files are always diffed largest first")
        p.add_argument("--level", type=int, default=DEFAULT_FRAME_LEVEL, metavar="L",
                       help=f"zstd level for files stored whole (default {DEFAULT_FRAME_LEVEL})")
        p.add_argument("--memory-limit", type=parse_size, default=engine.DEFAULT_MEMORY_LIMIT, metavar="SIZE",
                       help="cap on diff memory over all threads; larger files are diffed in windows, and a file whose "
                       "old and new versions together exceed it is stored whole (default 2G)")
        p.add_argument("--json", action="store_true", help="print the per-file decisions as JSON")
        add_link_rate(p)
        add_threads(p)
        p.set_defaults(func=run, kind=kind)


def decision_rows(decisions: list[Decision]) -> list[tuple[str, ...]]:
    """One row per decision kind: files, content bytes, stored bytes."""
    agg: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for d in decisions:
        a = agg[d.kind]
        a[0] += 1
        a[1] += d.size
        a[2] += d.stored
    order = ["parent", "shared", "empty", "delta", "frame"]
    return [(k, str(agg[k][0]), human_bytes(agg[k][1]), human_bytes(agg[k][2]))
            for k in order if k in agg]


def run(args: argparse.Namespace) -> int:
    refuse_output_over_input(f"--out{args.kind.capitalize()}", args.out, [args.old, args.new])
    options = DiffOptions(mode=args.mode, encoding=args.deltaEncoding, level=args.level,
                          threads=args.threads, memory_limit=args.memory_limit, link_mbit=args.link_mbit)
    with Image(args.old) as old, Image(args.new) as new:
        decisions = diff_images(old, new, args.out, cdimg=args.kind == "cdimg", options=options)
        new_size = os.path.getsize(args.new)
    if args.json:
        print_json([vars(d) for d in decisions])
    elif not args.quiet:
        size = os.path.getsize(args.out)
        print_table(decision_rows(decisions), ("files", "count", "content", "stored"))
        print(f"{args.out}: {human_bytes(size)} ({100.0 * size / max(new_size, 1):.2f}% of the new image)")
    return 0
