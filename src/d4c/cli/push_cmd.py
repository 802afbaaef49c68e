"""ctr-cli push: upload an image or delta to the update server."""

from __future__ import annotations

import argparse


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("push", parents=[common], help="upload a cdimg (base or delta) to the server")
    p.add_argument("--cdimg", required=True, metavar="FILE")
    p.add_argument("--imageTag", metavar="NAME:TAG", help="tag the image the cdimg produces")
    p.add_argument("--serverHost", default="localhost:8081", metavar="HOST:PORT",
                   help="the server (default localhost:8081)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..server.store import check_tag
    from ..server.client import Client
    if args.imageTag is not None:
        check_tag(args.imageTag)  # before a byte is sent
    doc = Client(args.serverHost).push(args.cdimg, args.imageTag)
    if not args.quiet:
        print(f"{args.cdimg}: {doc['image']}" + (f" tagged {doc['tag']}" if doc.get("tag") else ""))
    return 0
