"""ctr-cli keygen: an Ed25519 key pair for signing images and deltas (docs/SIGNING.md)."""

from __future__ import annotations

import argparse
import os


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("keygen", parents=[common], help="make a key pair for signing images and deltas",
                       description="Writes NAME.key (the private key, PKCS#8 PEM, mode 0600: keep it on the "
                       "publishing side) and NAME.pub (the public key, PEM: give it to devices for --trust).")
    p.add_argument("--output", required=True, metavar="NAME", help="writes NAME.key and NAME.pub")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..fsutil import atomic_output
    from ..image.signing import generate_key, key_id, load_public_key
    private_path, public_path = args.output + ".key", args.output + ".pub"
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise UsageError(f"{path} exists: keygen does not replace a key")
    private, public = generate_key()
    with atomic_output(public_path, 0o644) as f:
        f.write(public)
    try:
        with atomic_output(private_path, 0o600) as f:
            f.write(private)
    except BaseException:
        os.unlink(public_path)
        raise
    if not args.quiet:
        print(f"{private_path}, {public_path}: key {key_id(load_public_key(public_path))}")
    return 0
