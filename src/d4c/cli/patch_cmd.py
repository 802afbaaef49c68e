"""ctr-cli dimg patch / cdimg patch: a delta on its base gives the full new image."""

from __future__ import annotations

import argparse
import os
import tempfile

from ..errors import UsageError
from ..image.deltas import patch_image
from ..image.stack import close_all, open_stack
from ..image.unpack import unpack
from ._common import add_level, add_threads, refuse_output_over_input
from ..args import parse_size


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    for kind, flag in (("dimg", "Dimg"), ("cdimg", "Cdimg")):
        p = groups[kind].add_parser(
            "patch", parents=[common], help=f"apply a delta {kind} to its base",
            description="Checks the base's id first, then rebuilds every file (each checked against "
            "its digest) and the image id. --out writes the full new image (the same bytes convert "
            "writes for it); --outDir writes its tree to a directory instead.")
        p.add_argument(f"--diff{flag}", dest="diff", required=True, metavar="FILE", help="the delta")
        p.add_argument(f"--base{flag}", dest="bases", action="append", metavar="FILE",
                       help="the image the delta applies to; repeat, lowest first, when that is a delta too")
        p.add_argument(f"--out{flag}", dest="out", metavar="FILE", help="write the full new image here")
        p.add_argument("--outDir", metavar="DIR", help="write the new tree to this directory (must not exist or be empty)")
        add_level(p)  # --out: the format and level convert would be given for the same bytes
        p.add_argument("--no-same-owner", action="store_true", help="--outDir: do not restore owners")
        p.add_argument("--memory-limit", type=parse_size, default=None, metavar="SIZE",
                       help="refuse a file whose rebuild from deltas would hold more than this in memory "
                       "(default: the machine's memory, or the address-space limit); files stored whole "
                       "stream in bounded memory")
        add_threads(p)
        p.set_defaults(func=run, kind=kind)


def run(args: argparse.Namespace) -> int:
    if bool(args.out) == bool(args.outDir):
        raise UsageError(f"{args.kind} patch: give one of --out{args.kind.capitalize()} FILE or --outDir DIR")
    bases = args.bases or []
    if args.out:
        refuse_output_over_input(f"--out{args.kind.capitalize()}", args.out, bases + [args.diff])
    stack = open_stack(bases[1:] + [args.diff], bases[0] if bases else None)
    try:
        if args.memory_limit is not None:
            for image in stack:
                image.memory_limit = args.memory_limit
        top = stack[-1]
        top.entries  # a missing base is reported before anything is written
        if args.out:
            patch_image(top, args.out, cdimg=args.kind == "cdimg", image_format=args.image_format, level=args.level,
                        threads=args.threads)
            return 0
        parent = os.path.dirname(os.path.abspath(args.outDir))
        with tempfile.TemporaryDirectory(prefix=".d4c-patch-", dir=parent) as tmp:
            full = os.path.join(tmp, "image.dimg")
            patch_image(top, full, cdimg=False, image_format=1, level=1, threads=args.threads)  # scratch
            close_all(stack)
            stack = open_stack([full])
            unpack(stack[0], args.outDir, same_owner=False if args.no_same_owner else None)
    finally:
        close_all(stack)
    return 0
