"""ctr-cli convert: an OCI/Docker image -> DIR/image.cdimg (and image.dimg)."""

from __future__ import annotations

import argparse
import logging
import os

from .. import paths
from ..image.bodies import BodySpool
from ..image.format import format_id
from ..errors import UsageError
from ..fsutil import atomic_output
from ..oci.flatten import Flattener
from ..oci.source import Platform, RemoteOptions, open_source
from ..image.writer import save_image
from ._common import add_level, add_threads

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
    p.add_argument("--os", default=None, help="platform OS to pick from an index (default linux)")
    p.add_argument("--arch", default=None, help="platform architecture (default: this machine's)")
    p.add_argument("--variant", default=None, help="platform variant")
    p.add_argument("--address", default=paths.CONTAINERD_ADDRESS, help="containerd socket")
    p.add_argument("--namespace", "-n", default=paths.CONTAINERD_NAMESPACE, help="containerd namespace")
    p.add_argument("--user", metavar="USER:PASSWORD", help="registry credentials")
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry (local registries)")
    p.add_argument("--insecure", action="store_true", help="do not verify the registry's TLS certificate")
    p.add_argument("--blob-cache", metavar="DIR", default=None,
                   help="keep downloaded layers here, so the next version fetches only new ones "
                   "(default: $XDG_CACHE_HOME/d4c/blobs or ~/.cache/d4c/blobs; 'none' to disable)")
    add_threads(p)
    add_level(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    default = Platform.default()
    plat = Platform(args.os or default.os, args.arch or default.architecture,
                    args.variant if args.variant is not None else (default.variant if not args.arch else ""))
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
    credentials = None
    if args.user:
        user, sep, password = args.user.partition(":")
        if not sep:
            raise UsageError("--user takes USER:PASSWORD")
        credentials = (user, password)
    cache = args.blob_cache or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                            "d4c", "blobs")
    options = RemoteOptions(address=args.address, namespace=args.namespace, plain_http=args.plain_http,
                            insecure=args.insecure, credentials=credentials,
                            cache_dir=None if cache == "none" else cache)
    with open_source(args.image, plat, options) as source:
        resolved = source.resolve()
        os.makedirs(args.output, exist_ok=True)
        with BodySpool(args.output, args.level) as spool:
            flat = Flattener(spool, args.threads)
            try:
                flat.flatten(resolved.layers, args.image)
            finally:
                flat.close()
            for path in excludes:
                if not flat.remove(path):
                    log.warning("--excludes %s: not in the image", path)
            entries = flat.entries()
            image_id = save_image(
                entries, spool,
                dimg_path=os.path.join(args.output, "image.dimg") if args.dimg else None,
                cdimg_path=os.path.join(args.output, "image.cdimg") if want_cdimg else None,
                config=resolved.config)
    with atomic_output(os.path.join(args.output, "config.json")) as f:
        f.write(resolved.config_bytes)
    print(format_id(image_id))
    return 0
