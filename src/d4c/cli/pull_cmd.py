"""ctr-cli pull: fetch the cheapest update to NAME:TAG and load it (or save it)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    from ..paths import CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE, SNAPSHOTTER_ROOT
    from ..server.client import RETRY_TIME
    p = sub.add_parser(
        "pull", parents=[common], help="download the update to an image and load it",
        description="Asks the server for the smallest update from the images this machine holds "
        "(in containerd, or named with --have) to NAME:TAG, downloads it (retrying and resuming "
        "for as long as the link makes progress; an interrupted download is kept in FILE.partial "
        "and resumed by the next pull), checks it, and loads it; with --output only saves it.")
    from ._common import add_platform_flags, add_registry_flags
    p.add_argument("--image", required=True, metavar="NAME:TAG",
                   help="a tag of the server, or docker://REG/REPO:TAG: an image whose d4c artifacts "
                   "are in its registry (`ctr-cli publish`; no d4c server involved)")
    p.add_argument("--host", "--serverHost", dest="host", default="localhost:8081", metavar="HOST:PORT")
    p.add_argument("--output", metavar="FILE", help="only download, to FILE (carry it to the device, then load)")
    p.add_argument("--have", action="append", default=[], metavar="ID|CDIMG",
                   help="an image the device holds (repeatable); default: ask containerd")
    p.add_argument("--retry-time", type=float, default=RETRY_TIME, metavar="SECONDS",
                   help=f"give up after this long without progress (default {RETRY_TIME:g}); "
                   "every connection that moves data starts it again")
    p.add_argument("--expectedDimgsNum", type=int, default=0, metavar="N",
                   help="fail unless the server used exactly N stored images (tests)")
    p.add_argument("--address", default=CONTAINERD_ADDRESS)
    p.add_argument("--namespace", "-n", default=CONTAINERD_NAMESPACE)
    p.add_argument("--snapshotter-root", default=SNAPSHOTTER_ROOT, metavar="DIR")
    add_platform_flags(p)
    add_registry_flags(p)
    from ._common import add_server_auth, add_trust
    add_trust(p)
    add_server_auth(p)
    p.set_defaults(func=run)


def pull_cache_dir() -> str:
    """Where a pull that loads keeps its download until loaded (and a partial
    one for the next run): the user's cache, not a temp dir that dies with us."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "d4c", "pulls")


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..server.store import check_tag
    from ..server.client import check_update, have_files, plan_envelopes
    from ..image.signing import SIG_SUFFIX, check_file, trusted_envelope
    from ..snap.load import local_images
    from ._common import server_client, trusted_keys
    if args.retry_time < 0:
        raise UsageError("--retry-time must not be negative")
    if not args.image.startswith("docker://"):
        check_tag(args.image)
    files = have_files(args.have) if args.have or args.output else dict.fromkeys(
        local_images(args.address, args.namespace), "")
    if args.image.startswith("docker://"):
        return _from_registry(args, files)
    client = server_client(args, args.host, retry_time=args.retry_time)
    known = {k: v for k, v in files.items() if v}
    trust = trusted_keys(args)
    signature: list[bytes] = []

    def approve(plan: dict) -> None:  # type: ignore[type-arg]
        """With --trust, a plan for an image no trusted key signed is refused before its download."""
        envelopes = plan_envelopes(plan)
        if trust is not None:
            envelopes = [trusted_envelope(envelopes, trust, plan["to"], f"the server's {args.image} ({plan['to']})")[0]]
        signature[:] = envelopes[:1]

    def check(path: str, plan: dict) -> None:  # type: ignore[type-arg]
        if trust is not None:  # the signed artifact, or a merge that must give the signed image
            check_file(path, signature[0], trust, expect_image=plan["to"], source=f"the server's {args.image}")
        check_update(path, plan, known)

    if args.output:
        plan, wire = client.fetch_update(args.image, set(files), args.output, args.expectedDimgsNum, check, approve)
        _keep_signature(args.output, signature)
    else:
        from ..snap.load import load_image
        cache = pull_cache_dir()
        os.makedirs(cache, mode=0o700, exist_ok=True)
        path = os.path.join(cache, f"{args.image.replace('/', '_')}.cdimg")
        plan, wire = client.fetch_update(args.image, set(files), path, args.expectedDimgsNum, approve=approve)
        if not plan.get("upToDate"):
            try:
                _keep_signature(path, signature)
                load_image(path, args.image, address=args.address, namespace=args.namespace,
                           snapshotter_root=args.snapshotter_root, trust=trust)
            finally:
                for leftover in (path, path + SIG_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
    if plan.get("upToDate"):
        if not args.quiet:
            print(f"{args.image}: up to date ({plan['to']})")
        return 0
    if not args.quiet:
        print(f"{args.image}: {plan['to']} from {plan['from'] or 'nothing'}: {plan['size']} bytes "
              f"({plan['dimgs']} stored images merged), {wire} bytes downloaded")
    return 0


def _signatures_if_any(registry: Any, chosen: Any, max_size: int) -> list[bytes]:
    """Signatures kept beside an untrusted pull for a later `load --trust`: a broken
    referrer costs only the signature, never the pull that did not ask for one."""
    from ..errors import D4CError
    from ..oci import artifacts
    try:
        return artifacts.find_signatures(registry, chosen, max_size)
    except D4CError as exc:
        log.warning("%s: signatures not kept: %s", registry.ref.host, exc)
        return []


def _keep_signature(path: str, signature: list[bytes]) -> None:
    """The update's signature beside it (FILE.sig), so `load --trust` takes it
    on a device the file is carried to; none when the server had none."""
    from ..image.signing import SIG_SUFFIX, write_envelope
    if signature and os.path.exists(path):
        write_envelope(path + SIG_SUFFIX, signature[0])


def _from_registry(args: argparse.Namespace, files: dict[str, str]) -> int:
    """The cheapest d4c artifact of the image's manifest (docs/REGISTRY.md), checked, then loaded or saved."""
    from ..errors import CorruptImage, NotFound
    from ..image.stack import read_info_at
    from ..oci import artifacts
    from ..oci.registry import Registry, parse_reference
    from ..oci.source import RegistrySource
    from ..progress import Progress
    from ..server.client import check_update
    from ._common import platform_of, remote_options
    ref, options = parse_reference(args.image[len("docker://"):]), remote_options(args)
    registry = Registry(ref, plain_http=options.plain_http, insecure=options.insecure,
                        credentials=options.credentials)
    manifest = RegistrySource(str(ref), platform_of(args), options).resolve().manifest_digest
    found = artifacts.find_artifacts(registry, manifest)
    if not found:
        raise NotFound(f"{ref}: no d4c artifacts for manifest {manifest} (publish them with `ctr-cli publish`)")
    target = found[0].image_id.split(":", 1)[-1]
    if target in files:
        if not args.quiet:
            print(f"{ref}: up to date (sha256:{target})")
        return 0
    chosen = artifacts.cheapest(found, set(files))
    if chosen is None:
        raise NotFound(f"{ref}: no artifact usable from the images here (only deltas from others)")
    from ..image.signing import MAX_ENVELOPE, SIG_SUFFIX, check_file, trusted_envelope
    from ._common import trusted_keys
    trust = trusted_keys(args)
    what = f"{ref}'s artifact {chosen.digest[:19]}"
    if trust is not None:  # refused before a byte of it is downloaded
        envelopes = artifacts.find_signatures(registry, chosen, MAX_ENVELOPE)
        envelopes = [trusted_envelope(envelopes, trust, chosen.image_id, what)[0]]
    else:
        envelopes = _signatures_if_any(registry, chosen, MAX_ENVELOPE)
    if args.output:
        path = args.output
    else:
        cache = pull_cache_dir()
        os.makedirs(cache, mode=0o700, exist_ok=True)
        path = os.path.join(cache, f"{manifest.replace(':', '-')}.cdimg")
    with Progress(f"pull {ref}", total_bytes=max(chosen.size, 0)) as progress:
        wire = artifacts.fetch_layer(registry, chosen, path, lambda n: progress.advance(n - progress.bytes))
    try:
        if trust is not None:
            check_file(path, envelopes[0], trust, expect_image=chosen.image_id, source=what)
        _keep_signature(path, envelopes)
        got = read_info_at(path).image_id.hex()
        if got != chosen.image_id.split(":", 1)[-1]:
            raise CorruptImage(path, f"gives image sha256:{got}, the artifact says {chosen.image_id}")
        base = chosen.base_id if chosen.is_delta else ""
        check_update(path, {"from": base or None, "tag": str(ref)}, {k: v for k, v in files.items() if v})
        if not args.output:
            from ..snap.load import load_image
            load_image(path, f"{ref.host}/{ref.repository}:{ref.reference}", address=args.address,
                       namespace=args.namespace, snapshotter_root=args.snapshotter_root, trust=trust)
    except BaseException:
        for leftover in (path, path + SIG_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)  # checked and refused (or loading failed): not kept under its name
        raise
    if not args.output:
        for leftover in (path, path + SIG_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    if not args.quiet:
        kind = f"delta from {chosen.base_id}" if chosen.is_delta else "full image"
        print(f"{ref}: {chosen.image_id} as a {kind}: {chosen.size} bytes, {wire} bytes downloaded")
    return 0
