"""ctr-cli convert: an OCI/Docker image -> DIR/image.cdimg (and image.dimg)."""

from __future__ import annotations

import argparse
import logging
import os

from ..image.format import format_id
from ..errors import UsageError
from ..fsutil import atomic_output
from ..oci.convert import convert_image
from ..oci.source import Platform
from ._common import add_level, add_sign_key, add_source_flags, add_threads, body_level, platform_of, remote_options

log = logging.getLogger(__name__)

REF_HELP = """image to convert:
  oci:DIR[:TAG]              OCI image layout directory
  oci-archive:FILE[:TAG]     tar of an OCI layout (skopeo oci-archive:, `ctr images export`)
  docker-archive:FILE[:REF]  `docker save` tar
  DIR or FILE                the same, recognised from the path
  docker://[HOST/]NAME[:TAG|@DIGEST]
                             an OCI distribution registry (anonymous tokens,
                             --user or ~/.docker/config.json credentials)
  containerd:NAME            the containerd image store (--address, --namespace)
  NAME[:TAG]                 containerd first, then its registry (Docker Hub
                             for short names such as nginx:1.23.1)"""


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("convert", parents=[common], help="convert an OCI/Docker image into a cdimg",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Flattens the image's layers as a container runtime would "
                       "and writes DIR/image.cdimg (with --dimg also DIR/image.dimg) and "
                       "DIR/config.json.\n\n" + REF_HELP)
    p.add_argument("--image", required=True, metavar="REF", help="image reference (see above)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--cdimg", action="store_true", help="write image.cdimg (the default)")
    p.add_argument("--dimg", action="store_true", help="write image.dimg")
    p.add_argument("--excludes", action="append", default=[], metavar="PATH",
                   help="drop PATH (relative to the image root) from the tree; repeat or comma-separate")
    add_source_flags(p)
    add_threads(p)
    add_level(p)
    add_sign_key(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plat = platform_of(args)
    excludes = [x for item in args.excludes for x in item.split(",") if x.strip()]
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} exists and is not a directory")
    created = not os.path.exists(args.output)
    try:
        return _convert(args, plat, excludes)
    except BaseException:
        if created and os.path.isdir(args.output) and not os.listdir(args.output):
            os.rmdir(args.output)
        raise


def _convert(args: argparse.Namespace, plat: Platform, excludes: list[str]) -> int:
    want_cdimg = args.cdimg or not args.dimg
    keys = []
    if args.sign_keys:
        from ..image.signing import load_private_keys
        if not want_cdimg:
            raise UsageError("--sign-key signs the cdimg: not with --dimg alone")
        keys = load_private_keys(args.sign_keys)  # a bad key is said before minutes of converting
    options = remote_options(args)
    image_id, resolved = convert_image(args.image, plat, options, args.output, level=body_level(args),
                                       grouped=args.image_format == 2, threads=args.threads, cdimg=want_cdimg, dimg=args.dimg,
                                       excludes=tuple(excludes))
    with atomic_output(os.path.join(args.output, "config.json")) as f:
        f.write(resolved.config_bytes)
    if args.sign_keys:
        from ..image.signing import sign_file
        sign_file(os.path.join(args.output, "image.cdimg"), keys, resolved.manifest_digest or None)
    print(format_id(image_id))
    return 0
