"""ctr-cli unpack: materialise an image as a directory tree."""

from __future__ import annotations

import argparse

from ..image.reader import Image
from ..errors import UsageError
from ..image.unpack import unpack


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("unpack", parents=[common], help="write an image's tree to a directory",
                       description="Writes the complete tree of a base image, with modes, owners "
                       "(as root), times, xattrs, links and device nodes. OUT must not exist or be empty.")
    p.add_argument("--cdimg", metavar="FILE", help="the image to unpack")
    p.add_argument("--dimg", metavar="FILE", help="the image to unpack (a dimg)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--no-same-owner", action="store_true", help="do not restore owners (default as non-root)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.cdimg or args.dimg
    if not path or (args.cdimg and args.dimg):
        raise UsageError("unpack: give one of --cdimg FILE or --dimg FILE")
    with Image(path) as image:
        if image.info.parent_id is not None:
            raise UsageError(f"{path} is a delta image; patch it onto its base first")
        unpack(image, args.out, same_owner=False if args.no_same_owner else None)
    return 0
