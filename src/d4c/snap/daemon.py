"""`snapshotter`: the di3fs proxy snapshotter daemon.

    snapshotter [--address SOCK] [--root DIR] [--cache-size SIZE] [--debug]

On start it restores every image mount before it answers containerd; while it
runs it watches the mount servers and mounts an image again when its server
died (new containers start; the log names the ones on the dead mount); on
SIGTERM/SIGINT it stops serving and leaves the mounts to running containers
(the next start adopts them).  Each mount's FUSE server is this program
started again (d4c.llfs.server_process).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures

from .. import __version__, errors, paths
from ..daemons import record_signals, run_daemon, wait_for_signal

DEFAULT_ADDRESS = paths.SNAPSHOTTER_ADDRESS
DEFAULT_ROOT = paths.SNAPSHOTTER_ROOT
PROG = "snapshotter"


def build_parser() -> argparse.ArgumentParser:
    from ..args import ArgumentParser, parse_size
    p = ArgumentParser(prog=PROG, description="The di3fs containerd proxy snapshotter: containers on "
                       "base + delta images, mounted read-only through FUSE.")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"unix socket to serve (default {DEFAULT_ADDRESS})")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--cache-size", type=parse_size, default=2 << 30, metavar="SIZE",
                   help="per mount: upper bound of the cache of files rebuilt from deltas (default 2G)")
    p.add_argument("--group-cache", type=parse_size, default=None, metavar="SIZE",
                   help="per mounted image: decoded group frames of format-2 images kept in memory "
                   "(default 32M, as `ctr-cli mount`)")
    p.add_argument("--no-remote", action="store_true",
                   help="never fetch d4c artifacts from registries when containerd (CRI) pulls an image")
    p.add_argument("--plain-http-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="a registry spoken to over plain HTTP when fetching artifacts (repeatable)")
    p.add_argument("--hosts-dir", default="/etc/containerd/certs.d", metavar="DIR",
                   help="containerd's registry hosts config (DIR/HOST/hosts.toml: mirrors, plain HTTP, "
                   "skip_verify) used when fetching artifacts; 'none' to ignore (default %(default)s)")
    p.add_argument("--delta-server", metavar="HOST:PORT",
                   help="a d4c server asked first for the update to an image CRI pulls (its tag: the image "
                   "reference, e.g. `ctr-cli push --image REG/REPO:TAG`), then the registry; "
                   "https://HOST:PORT for a server with --tls-cert")
    p.add_argument("--delta-server-token-file", metavar="FILE",
                   help="the read token the delta server asks for (the file's first line; docs/API.md)")
    p.add_argument("--delta-server-ca-cert", metavar="PEM",
                   help="the CA that signed an https:// delta server's certificate (default: the system's)")
    p.add_argument("--remote-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long a registry may take to answer before containerd pulls the layers (default 5)")
    p.add_argument("--trust", action="append", default=[], metavar="KEYFILE|DIR",
                   help="store only images and deltas signed by these public keys (a .pub file or a directory "
                   "of them; repeatable): `load` must hand over FILE.sig, and artifacts of registries and the "
                   "delta server without a trusted signature are not fetched (containerd pulls the layers)")
    p.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_daemon(PROG, build_parser(), argv, serve)


def serve(args: argparse.Namespace) -> int:
    import grpc

    from ..llfs.process import reexec_command
    from .api import snapshots_pb2_grpc
    from .service import SnapshotsService
    from .remote import DeltaServerAuth, RegistryImages
    from ..server.client import read_token
    from .snapshotter import LlfsFileSystem, Snapshotter
    from ..image.signing import TrustedKeys

    if os.geteuid() != 0:
        raise errors.Unsupported("the snapshotter needs root (FUSE and overlay mounts)")
    # before the socket exists: a Ctrl-C from then on is a clean stop, never a traceback
    signals = record_signals(signal.SIGTERM, signal.SIGINT)
    address = os.path.abspath(args.address)
    os.makedirs(os.path.dirname(address), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(address), 0o700)
    if os.path.exists(address):
        os.unlink(address)  # a previous run's socket: nobody listens on it
    trust = TrustedKeys.load(args.trust) if args.trust else None
    token = read_token(args.delta_server_token_file) if args.delta_server_token_file else None
    remote = None if args.no_remote else RegistryImages(
        frozenset(args.plain_http_registry), args.remote_timeout, None if args.hosts_dir == "none" else args.hosts_dir,
        args.delta_server, trust, DeltaServerAuth(token, args.delta_server_ca_cert))
    core = Snapshotter(args.root, LlfsFileSystem(reexec_command(), args.cache_size, args.group_cache), remote, trust)
    core.restore()  # before containerd gets an answer
    stop_watching = threading.Event()
    watcher = threading.Thread(target=core.watch, args=(stop_watching,), name="d4c-watch", daemon=True)
    watcher.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="snap"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(core), server)
    if not server.add_insecure_port(f"unix://{address}"):
        raise errors.SystemFailure(f"cannot listen on {address}")
    if os.path.exists(address):
        os.chmod(address, 0o600)
    server.start()
    logging.getLogger("d4c.snap").info("serving on %s (root %s)", address, os.path.abspath(args.root))
    wait_for_signal(signals)
    server.stop(grace=5).wait()
    stop_watching.set()
    watcher.join()
    core.meta.close()
    try:
        os.unlink(address)
    except FileNotFoundError:
        pass
    logging.getLogger("d4c.snap").info("stopped; image mounts stay for running containers")
    return 0
