"""Options and helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from .. import paths
from ..args import link_rate, positive_int
from ..errors import UsageError

if TYPE_CHECKING:
    from ..oci.source import Platform, RemoteOptions
    from ..image.signing import TrustedKeys
    from ..server.client import Client



def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and debug logs")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                   help="no progress display, errors only")
    return p


def finish_args(args: argparse.Namespace) -> None:
    for name in ("debug", "quiet"):
        if not hasattr(args, name):
            setattr(args, name, False)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threadNum", "--thread-num", dest="threads", type=positive_int,
                   default=os.cpu_count() or 1, metavar="N",
                   help="worker threads (default: number of CPUs)")


def add_link_rate(p: argparse.ArgumentParser) -> None:
    from ..engine import DEFAULT_LINK_MBIT
    p.add_argument("--link-mbit", type=link_rate, default=DEFAULT_LINK_MBIT, metavar="MBIT",
                   help="the devices' link, in Mbit/s: the slow context-mixing coder is used only where the bytes "
                   f"it saves take longer to cross it than to decode (default {DEFAULT_LINK_MBIT:g}; 0: the "
                   "smallest delta, whatever it costs to patch)")


IMAGE_FORMATS = (1, 2)
DEFAULT_IMAGE_FORMAT = 2  # image.bodies.DEFAULT_FORMAT, not imported here: every command loads this module


def add_level(p: argparse.ArgumentParser) -> None:
    """--level and --format of a base image (1: a frame per file, 2: small files grouped)."""
    p.add_argument("--level", type=int, default=None, metavar="L",
                   help="zstd level for file bodies, 1..22 (default 19 for format 2, 3 for format 1)")
    p.add_argument("--format", type=int, choices=IMAGE_FORMATS, default=DEFAULT_IMAGE_FORMAT, dest="image_format",
                   help="image format: 2 (small files grouped in 128 KiB frames against a shared dictionary, "
                        "x86 programs branch-converted: the smallest first install) or 1 (one zstd frame per file: "
                        f"for readers that predate format 2); default {DEFAULT_IMAGE_FORMAT}")


def body_level(args: argparse.Namespace) -> int:
    """--level, or the default of the image format asked for."""
    from ..image.bodies import base_level  # not at import: every command loads this module
    return base_level(args.image_format, args.level)



def add_sign_key(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--sign-key", dest="sign_keys", action="append", default=[], required=required, metavar="KEY",
                   help="sign with this private key (`ctr-cli keygen`); repeat to sign with two keys during a "
                   "key rotation")


def add_server_auth(p: argparse.ArgumentParser) -> None:
    """How to reach a server with --auth-tokens and TLS (docs/API.md)."""
    p.add_argument("--token-file", metavar="FILE", default=os.environ.get("D4C_TOKEN_FILE"),
                   help="the bearer token the server asks for, on the file's first line (never on the command "
                   "line, where ps shows it; default $D4C_TOKEN_FILE)")
    p.add_argument("--ca-cert", metavar="PEM", help="for an https:// server: the CA that signed its certificate "
                   "(default: the system's)")


def server_client(args: argparse.Namespace, host: str, **kwargs: Any) -> "Client":
    """The client of the server at `host` with add_server_auth's options."""
    from ..server.client import Client as ServerClient, read_token
    token = read_token(args.token_file) if args.token_file else None
    return ServerClient(host, token=token, ca_cert=args.ca_cert, **kwargs)


def add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", action="append", default=[], metavar="KEYFILE|DIR",
                   help="accept only images and deltas signed by these public keys (a .pub file, or a "
                   "directory of them; repeatable); anything else is refused before it is parsed")


def trusted_keys(args: argparse.Namespace) -> "TrustedKeys | None":
    """--trust's keys, loaded; None without --trust."""
    if not getattr(args, "trust", None):
        return None
    from ..image.signing import TrustedKeys as Keys
    return Keys.load(args.trust)


def add_platform_flags(p: argparse.ArgumentParser) -> None:
    """Which image of an index (a multi-platform tag)."""
    p.add_argument("--os", default=None, help="platform OS to pick from an index (default linux)")
    p.add_argument("--arch", default=None, help="platform architecture (default: this machine's)")
    p.add_argument("--variant", default=None, help="platform variant")


def add_registry_flags(p: argparse.ArgumentParser) -> None:
    """How to talk to an OCI registry."""
    p.add_argument("--user", metavar="USER:PASSWORD", help="registry credentials")
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry (local registries)")
    p.add_argument("--insecure", action="store_true", help="do not verify the registry's TLS certificate")


def add_source_flags(p: argparse.ArgumentParser) -> None:
    """Where an image comes from: its platform in an index, containerd, registries."""
    add_platform_flags(p)
    p.add_argument("--address", default=paths.CONTAINERD_ADDRESS, help="containerd socket")
    p.add_argument("--namespace", "-n", default=paths.CONTAINERD_NAMESPACE, help="containerd namespace")
    add_registry_flags(p)
    p.add_argument("--blob-cache", metavar="DIR", default=None,
                   help="keep downloaded layers here, so the next version fetches only new ones "
                   "(default: $XDG_CACHE_HOME/d4c/blobs or ~/.cache/d4c/blobs; 'none' to disable)")


def platform_of(args: argparse.Namespace) -> "Platform":
    from ..oci.source import Platform
    default = Platform.default()
    return Platform(args.os or default.os, args.arch or default.architecture,
                    args.variant if args.variant is not None else (default.variant if not args.arch else ""))


def credentials_of(args: argparse.Namespace) -> tuple[str, str] | None:
    if not args.user:
        return None
    user, sep, password = args.user.partition(":")
    if not sep:
        raise UsageError("--user takes USER:PASSWORD")
    return user, password


def remote_options(args: argparse.Namespace) -> "RemoteOptions":
    """add_source_flags' (or add_registry_flags') values as the sources take them."""
    from ..oci.source import RemoteOptions
    cache = getattr(args, "blob_cache", None) or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                            "d4c", "blobs")
    return RemoteOptions(address=args.address, namespace=args.namespace, plain_http=args.plain_http,
                         insecure=args.insecure, credentials=credentials_of(args),
                         cache_dir=None if cache == "none" else cache)


def refuse_output_over_input(flag: str, out: str, inputs: list[str]) -> None:
    """An output that is one of the inputs (the same inode, whatever the name)
    would replace the input it is made from, e.g. a base by a delta of itself."""
    try:
        st = os.stat(out)
    except OSError:
        return  # not there yet: the output's own errors come when it is written
    for path in inputs:
        try:
            other = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            raise UsageError(f"{flag} {out} is the input {path}: write the output elsewhere")



def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
    """Left-aligned columns; in tables with a header, numbers are right-aligned."""
    all_rows = ([header] if header else []) + rows
    if not all_rows:
        return
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    for r in all_rows:
        cells = []
        for i, cell in enumerate(r):
            numeric = cell.replace(",", "").replace(".", "").replace(" ", "").rstrip("BKMGTi%").isdigit()
            cells.append(cell.rjust(widths[i]) if numeric and i and header else cell.ljust(widths[i]))
        print("  ".join(cells).rstrip())
