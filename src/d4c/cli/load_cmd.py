"""ctr-cli load: register a cdimg (base or delta) as an image in containerd."""

from __future__ import annotations

import argparse


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    from ..paths import CONTAINERD_ADDRESS as DEFAULT_ADDRESS
    from ..paths import CONTAINERD_NAMESPACE as DEFAULT_NAMESPACE
    from ..paths import SNAPSHOTTER_ROOT as DEFAULT_SNAPSHOTTER_ROOT
    p = sub.add_parser(
        "load", parents=[common], help="make a cdimg an image containerd runs with the di3fs snapshotter",
        description="Writes the image's config and manifest to containerd and creates its snapshot "
        "through containerd; the di3fs snapshotter checks the cdimg and mounts it (a delta on top of "
        "its already loaded base). Loading the same image again only re-points NAME. Then: "
        "ctr run --snapshotter=di3fs NAME ID ...")
    p.add_argument("--image", required=True, metavar="NAME[:TAG]", help="image name (registry-style names too)")
    p.add_argument("--cdimg", required=True, metavar="FILE", help="the image or delta to load")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"containerd socket (default {DEFAULT_ADDRESS})")
    p.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE,
                   help=f"containerd namespace (default {DEFAULT_NAMESPACE})")
    p.add_argument("--snapshotter-root", default=DEFAULT_SNAPSHOTTER_ROOT, metavar="DIR",
                   help=f"the snapshotter's --root (default {DEFAULT_SNAPSHOTTER_ROOT})")
    from ._common import add_trust
    add_trust(p)
    p.add_argument("--signature", metavar="FILE", help="the cdimg's signature (default: FILE.sig beside it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..snap.load import load_image
    from ._common import trusted_keys
    image_id = load_image(args.cdimg, args.image, address=args.address, namespace=args.namespace,
                          snapshotter_root=args.snapshotter_root, trust=trusted_keys(args), signature=args.signature)
    if not args.quiet:
        print(f"{args.image}: {image_id}")
    return 0
