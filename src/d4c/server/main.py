"""`server`: stores images and deltas, answers updates with the cheapest merged delta.

    server [--port 8081] [--host 127.0.0.1] [--root DIR] [--cache-size 8G] [--threadNum N]
           [--workers 64] [--idle-timeout 60] [--pin-time 600]
"""

from __future__ import annotations

import sys

from .. import __version__
from ..daemons import run_daemon

PROG = "server"


def main(argv: list[str] | None = None) -> int:
    from ..args import ArgumentParser, parse_size
    from .pool import IDLE_TIMEOUT, WORKERS
    from .updates import PIN_TIME
    p = ArgumentParser(prog=PROG, description="The d4c update server (HTTP API: docs/API.md).")
    p.add_argument("--port", type=int, default=8081, help="port (default 8081)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface: with --auth-tokens "
                   "and TLS)")
    p.add_argument("--root", default="/var/lib/d4c-server", help="store directory (default /var/lib/d4c-server)")
    p.add_argument("--cache-size", type=parse_size, default=8 << 30, metavar="SIZE",
                   help="bound of the merged-delta cache (default 8G)")
    p.add_argument("--threadNum", "--thread-num", dest="threads", type=int, default=2, metavar="N",
                   help="worker threads of one merge")
    p.add_argument("--workers", type=int, default=WORKERS, metavar="N",
                   help=f"threads serving requests (default {WORKERS}); connections beyond them wait, "
                   "idle ones cost no thread")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="SECONDS",
                   help=f"close a connection silent for this long, before or inside a request "
                   f"(default {IDLE_TIMEOUT:g})")
    p.add_argument("--pin-time", type=float, default=PIN_TIME, metavar="SECONDS",
                   help=f"keep a planned merge cached this long for its download (default {PIN_TIME:g})")
    p.add_argument("--storage", metavar="registry://HOST[:PORT]/REPO",
                   help="keep artifacts and tags in an OCI registry shared by several servers "
                   "(default: only in --root)")
    p.add_argument("--storage-plain-http", action="store_true", help="talk HTTP to the storage registry")
    p.add_argument("--auth-tokens", metavar="FILE",
                   help="push and tag need a bearer token from FILE (lines `push TOKEN` / `read TOKEN`; with a "
                   "read line, pulls need one too); read again when it changes")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return run_daemon(PROG, p, sys.argv[1:] if argv is None else argv, _serve)


def _serve(args) -> int:  # type: ignore[no-untyped-def]
    from .app import serve
    if args.workers < 1 or args.idle_timeout <= 0 or args.pin_time < 0:
        from ..errors import UsageError
        raise UsageError("--workers must be at least 1, --idle-timeout above 0, --pin-time not negative")
    if bool(args.tls_cert) != bool(args.tls_key):
        from ..errors import UsageError
        raise UsageError("--tls-cert and --tls-key go together")
    serve(args.root, args.host, args.port, args.cache_size, args.threads, args.storage,
          args.storage_plain_http, args.workers, args.idle_timeout, args.pin_time, args.auth_tokens,
          (args.tls_cert, args.tls_key) if args.tls_cert else None)
    return 0
