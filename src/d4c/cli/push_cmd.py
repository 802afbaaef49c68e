"""ctr-cli push: upload an image or delta to the update server."""

from __future__ import annotations

import argparse


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("push", parents=[common], help="upload a cdimg (base or delta) to the server")
    p.add_argument("--cdimg", required=True, metavar="FILE")
    p.add_argument("--imageTag", metavar="NAME:TAG", help="tag the image the cdimg produces")
    p.add_argument("--serverHost", default="localhost:8081", metavar="HOST:PORT",
                   help="the server (default localhost:8081)")
    from ._common import add_server_auth, add_sign_key
    add_sign_key(p)
    add_server_auth(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..server.store import check_tag
    from ._common import server_client
    if args.imageTag is not None:
        check_tag(args.imageTag)  # before a byte is sent
    envelope = None
    if args.sign_keys:
        from ..image.signing import load_private_keys, sign, statement_of
        envelope = sign(statement_of(args.cdimg), load_private_keys(args.sign_keys))
    doc = server_client(args, args.serverHost).push(args.cdimg, args.imageTag, envelope)
    if not args.quiet:
        print(f"{args.cdimg}: {doc['image']}" + (f" tagged {doc['tag']}" if doc.get("tag") else ""))
    return 0
