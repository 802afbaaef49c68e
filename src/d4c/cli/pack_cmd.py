"""ctr-cli pack: a directory -> dimg (or cdimg), or dimg + config -> cdimg."""

from __future__ import annotations

import argparse
import json
import os

from ..image.bodies import BodySpool
from ..image.reader import Image
from ..image.format import canonical_config, cdimg_preamble, format_id, with_layer_id
from ..errors import BadInput, NotFound, UsageError
from ..fsutil import atomic_output, copy_range
from ..image.pack import pack_dir
from ..image.writer import save_image
from ._common import add_level, add_threads, body_level


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    for parent, name in ((sub, "pack"), (groups["dimg"], "pack")):
        p = parent.add_parser(name, parents=[common], help="pack a directory into a dimg, or wrap a dimg "
                              "and an OCI config into a cdimg",
                              description="`pack --in DIR --out X.dimg` packs a directory; "
                              "`pack --config config.json --dimg X.dimg --out X.cdimg` wraps a dimg; "
                              "`pack --in DIR --config config.json --out X.cdimg` does both.")
        p.add_argument("--in", dest="indir", metavar="DIR", help="directory to pack")
        p.add_argument("--config", metavar="FILE", help="OCI image config (JSON) for a cdimg")
        p.add_argument("--dimg", metavar="FILE", help="existing dimg to wrap into a cdimg")
        p.add_argument("--out", required=True, metavar="FILE", help="output file")
        add_threads(p)
        add_level(p)
        p.set_defaults(func=run)


def load_config(path: str) -> dict:  # type: ignore[type-arg]
    try:
        with open(path, "rb") as f:
            data = f.read(16 << 20)
    except FileNotFoundError:
        raise NotFound(f"no such config file: {path}") from None
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        raise BadInput(f"{path}: not a JSON document") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: not a JSON object")
    return config


def run(args: argparse.Namespace) -> int:
    if bool(args.indir) == bool(args.dimg):
        raise UsageError("pack: give either --in DIR or --dimg FILE")
    if args.dimg and not args.config:
        raise UsageError("pack: --dimg needs --config to make a cdimg")
    config = load_config(args.config) if args.config else None
    if args.indir:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        with BodySpool(out_dir, body_level(args), grouped=args.image_format == 2) as spool:
            entries = pack_dir(args.indir, spool, args.threads)
            image_id = save_image(entries, spool, dimg_path=None if config else args.out,
                                  cdimg_path=args.out if config else None, config=config, threads=args.threads)
        print(format_id(image_id))
        return 0
    with Image(args.dimg) as image:
        if image.info.kind != "dimg":
            raise BadInput(f"{args.dimg}: is a {image.info.kind}, not a dimg")
        assert config is not None
        config_bytes = canonical_config(with_layer_id(config, image.info.image_id))
        with atomic_output(args.out) as out:
            out.write(cdimg_preamble(config_bytes, image.info.dimg_size))
            copy_range(image.fd, 0, image.info.dimg_size, out)
        print(format_id(image.info.image_id))
    return 0
