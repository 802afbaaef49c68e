"""ctr-cli dimg merge / cdimg merge: consecutive deltas into one."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from ..image.deltas import DEFAULT_FRAME_LEVEL, merge_bisect, merge_stack, patch_image
from ..image.stack import close_all, open_stack
from ..progress import human_bytes
from ._common import add_threads, print_json, print_table, refuse_output_over_input
from ..args import positive_int
from .diff_cmd import decision_rows


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    for kind, flag in (("dimg", "Dimg"), ("cdimg", "Cdimg")):
        order = "upper first (as the original)" if kind == "dimg" else "lowest first"
        p = groups[kind].add_parser(
            "merge", parents=[common], help=f"merge consecutive delta {kind}s into one",
            description="Merges A->B, B->C, ... into A->C: files stored in a delta are carried over, "
            "deltas of deltas are chained (--rediff diffs them afresh against A: smaller, slower); "
            "whatever is carried over is checked first (a chain by applying it to A's file). "
            "Reading the deltas' trees needs A's tree, so "
            "give A with --base when the lowest input is a delta. If the lowest input is a full "
            "image, the result is the full top image.")
        p.add_argument(f"--lower{flag}", dest="lower", metavar="FILE", help="the lower delta (two-input form)")
        p.add_argument(f"--upper{flag}", dest="upper", metavar="FILE", help="the upper delta (two-input form)")
        p.add_argument(f"--{kind}s", dest="chain", metavar="A,B,...", help=f"comma-separated list, {order}")
        p.add_argument(f"--base{flag}", dest="bases", action="append", metavar="FILE",
                       help="the image the lowest delta applies to; repeat, lowest first, when that is a delta too")
        p.add_argument(f"--out{flag}", dest="out", required=True, metavar="FILE", help="the merged output")
        p.add_argument("--mergeMode", choices=("linear", "bisect"), default="linear",
                       help="linear: one pass over the whole chain (default); bisect: merge halves "
                       "in parallel, then the results (as the original)")
        p.add_argument("--mergeDimgConcurrentNum", type=positive_int, default=2, metavar="N",
                       help="accepted for compatibility: bisect merges sibling halves two at a time")
        p.add_argument("--rediff", action="store_true",
                       help="diff chained files afresh against the base (reads the base's bodies)")
        p.add_argument("--level", type=int, default=DEFAULT_FRAME_LEVEL, metavar="L",
                       help=f"zstd level for files stored whole (default {DEFAULT_FRAME_LEVEL})")
        p.add_argument("--json", action="store_true", help="print the per-file decisions as JSON")
        add_threads(p)
        p.set_defaults(func=run, kind=kind)


def inputs(args: argparse.Namespace) -> list[str]:
    if args.chain:
        if args.lower or args.upper:
            raise UsageError(f"{args.kind} merge: give --{args.kind}s or --lower/--upper, not both")
        paths = [p for p in args.chain.split(",") if p]
        if args.kind == "dimg":
            paths.reverse()  # the original's --dimgs lists the upper first
    elif args.lower and args.upper:
        paths = [args.lower, args.upper]
    else:
        raise UsageError(f"{args.kind} merge: give --lower{args.kind.capitalize()} and "
                         f"--upper{args.kind.capitalize()}, or --{args.kind}s")
    if len(paths) < 2 and not args.bases:
        raise UsageError(f"{args.kind} merge: needs at least two images")
    return paths


def run(args: argparse.Namespace) -> int:
    paths = inputs(args)
    bases = args.bases or []
    refuse_output_over_input(f"--out{args.kind.capitalize()}", args.out, bases + paths)
    stack = open_stack(bases[1:] + paths, bases[0] if bases else None, preload=True)
    cdimg = args.kind == "cdimg"
    try:
        for image in stack:
            image.entries  # a missing base is reported before anything is written
        if not stack[0].is_delta and not bases:
            # the lowest input is a full image: the merge is the full top image
            patch_image(stack[-1], args.out, cdimg=cdimg, threads=args.threads)
            return 0
        chain = stack[len(bases) - 1:]  # the merge's base, then the deltas to merge onto it
        if args.mergeMode == "bisect":
            decisions = merge_bisect(chain, args.out, cdimg=cdimg, threads=args.threads, level=args.level)
        else:
            decisions = merge_stack(chain, args.out, cdimg=cdimg, threads=args.threads, level=args.level,
                                    rediff=args.rediff)
    finally:
        close_all(stack)
    if args.json:
        print_json([vars(d) for d in decisions])
    elif not args.quiet:
        print_table(decision_rows(decisions), ("files", "count", "content", "stored"))
        print(f"{args.out}: {human_bytes(os.path.getsize(args.out))}")
    return 0
