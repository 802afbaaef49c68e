"""ctr-cli sign: a signature beside a cdimg (FILE.sig), for images and deltas carried offline."""

from __future__ import annotations

import argparse


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    from ._common import add_sign_key
    p = sub.add_parser("sign", parents=[common], help="sign a cdimg (base or delta): writes FILE.sig",
                       description="Signs a statement of what the file is (the image it gives, its base, its "
                       "sha256 and size) and writes it beside the file as FILE.sig; `load`, `pull` and the "
                       "snapshotter with --trust accept the file only with it (docs/SIGNING.md).")
    p.add_argument("--cdimg", required=True, metavar="FILE")
    p.add_argument("--manifest", metavar="sha256:DIGEST", help="the image's platform manifest in its registry")
    add_sign_key(p, required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..image.signing import SIG_SUFFIX, load_private_keys, sign_file, unverified_statement
    envelope = sign_file(args.cdimg, load_private_keys(args.sign_keys), args.manifest)
    if not args.quiet:
        stmt = unverified_statement(envelope, args.cdimg + SIG_SUFFIX)
        print(f"{args.cdimg}{SIG_SUFFIX}: {stmt.image}" + (f" from {stmt.base}" if stmt.base else ""))
    return 0
