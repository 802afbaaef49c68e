"""ctr-cli pull: fetch the cheapest update to NAME:TAG and load it (or save it)."""

from __future__ import annotations

import argparse
import os
import tempfile


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    from ..paths import CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE, SNAPSHOTTER_ROOT
    p = sub.add_parser(
        "pull", parents=[common], help="download the update to an image and load it",
        description="Asks the server for the smallest update from the images this machine holds "
        "(in containerd, or named with --have) to NAME:TAG, downloads it (resuming after a dropped "
        "connection), checks it, and loads it; with --output only saves it.")
    p.add_argument("--image", required=True, metavar="NAME:TAG")
    p.add_argument("--host", "--serverHost", dest="host", default="localhost:8081", metavar="HOST:PORT")
    p.add_argument("--output", metavar="FILE", help="only download, to FILE (carry it to the device, then load)")
    p.add_argument("--have", action="append", default=[], metavar="ID|CDIMG",
                   help="an image the device holds (repeatable); default: ask containerd")
    p.add_argument("--expectedDimgsNum", type=int, default=0, metavar="N",
                   help="fail unless the server used exactly N stored images (tests)")
    p.add_argument("--address", default=CONTAINERD_ADDRESS)
    p.add_argument("--namespace", "-n", default=CONTAINERD_NAMESPACE)
    p.add_argument("--snapshotter-root", default=SNAPSHOTTER_ROOT, metavar="DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import Conflict
    from ..server.store import check_tag
    from ..transfer import Client, have_ids, local_images
    check_tag(args.image)
    have = have_ids(args.have) if args.have or args.output else local_images(args.address, args.namespace)
    client = Client(args.host)
    query = "&".join([f"tag={args.image}"] + [f"have=sha256:{h}" for h in sorted(have)])
    plan = client.get_json(f"/v1/update?{query}", f"update to {args.image}")
    if plan.get("upToDate"):
        if not args.quiet:
            print(f"{args.image}: up to date ({plan['to']})")
        return 0
    if args.expectedDimgsNum and plan["dimgs"] != args.expectedDimgsNum:
        raise Conflict(f"the server used {plan['dimgs']} stored images, expected {args.expectedDimgsNum}")
    if args.output:
        wire = client.download(plan["url"], plan["sha256"], plan["size"], args.output)
    else:
        from ..load import load_image
        with tempfile.TemporaryDirectory(prefix="d4c-pull-") as tmp:
            path = os.path.join(tmp, "update.cdimg")
            wire = client.download(plan["url"], plan["sha256"], plan["size"], path)
            load_image(path, args.image, address=args.address, namespace=args.namespace,
                       snapshotter_root=args.snapshotter_root)
    if not args.quiet:
        print(f"{args.image}: {plan['to']} from {plan['from'] or 'nothing'}: {plan['size']} bytes "
              f"({plan['dimgs']} stored images merged), {wire} bytes downloaded")
    return 0
