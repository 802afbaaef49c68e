"""ctr-cli publish: an image's cdimg and its deltas from older versions, pushed
as OCI artifacts next to the image in its own registry (docs/REGISTRY.md)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile

from ..errors import NotFound, UsageError
from ..image.deltas import DiffOptions, diff_images
from ..image.format import format_id
from ..image.reader import Image
from ..oci import artifacts
from ..oci.convert import convert_image
from ..oci.registry import Reference, Registry, parse_reference
from ..oci.source import Platform, RegistrySource, RemoteOptions, open_source
from ..progress import Progress, human_bytes
from ._common import (add_level, add_sign_key, add_source_flags, add_threads, body_level, platform_of, print_table,
                      remote_options)


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser(
        "publish", parents=[common], help="push an image's cdimg and deltas to its registry as OCI artifacts",
        description="Converts the image and pushes its cdimg, and one delta from each older version named, "
        "to the image's repository as OCI artifacts whose subject is the image's manifest; a device's di3fs "
        "snapshotter finds them when containerd pulls the image.  Publishing again pushes nothing new.")
    p.add_argument("--image", required=True, metavar="REF",
                   help="the new image: docker://REG/REPO:TAG, or a local source (oci:, archives) with --to")
    p.add_argument("--to", metavar="docker://REG/REPO:TAG",
                   help="where the image already is in a registry, when --image is a local copy of it")
    p.add_argument("--from", dest="bases", action="append", default=[], metavar="TAG",
                   help="an older tag of the repository to publish a delta from (repeatable)")
    p.add_argument("--previous", type=int, default=0, metavar="N",
                   help="also deltas from the N tags before the image's: the registry's tags sorted as "
                   "versions (1.9 before 1.10), or --tags' order")
    p.add_argument("--tags", metavar="T1,T2,...", help="the version order for --previous (oldest first)")
    add_source_flags(p)
    add_threads(p)
    add_level(p)
    add_sign_key(p)
    p.set_defaults(func=run)


def _registry_ref(ref: str, flag: str) -> Reference:
    if not ref.startswith("docker://"):
        raise UsageError(f"{flag} must be docker://REG/REPO:TAG")
    return parse_reference(ref[len("docker://"):])


def _base_tags(args: argparse.Namespace, registry: Registry, tag: str) -> list[str]:
    bases = list(args.bases)
    if args.previous:
        order = [t for t in args.tags.split(",") if t] if args.tags else \
            sorted((t for t in registry.tags() if not t.startswith("sha256-")), key=version_key)
        if tag not in order:
            raise UsageError(f"--previous: tag {tag} is not in the tag order ({', '.join(order[:8])} ...)")
        at = order.index(tag)
        bases += order[max(0, at - args.previous):at]
    return list(dict.fromkeys(b for b in bases if b != tag))


def version_key(tag: str) -> list[tuple[int, int | str]]:
    """Tags as versions (1.9 before 1.10): registries list tags in no defined
    order (distribution listed 3, 2, 1 for tags pushed as 1, 2, 3)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", tag) if part]


def _manifest_of(ref: Reference, platform: Platform, options: RemoteOptions) -> str:
    """The platform manifest digest of a registry image (without converting it)."""
    return RegistrySource(str(ref), platform, options).resolve().manifest_digest


def run(args: argparse.Namespace) -> int:
    platform, options = platform_of(args), remote_options(args)
    if args.image.startswith("docker://"):
        dest = _registry_ref(args.to or args.image, "--to")
    elif args.to:
        dest = _registry_ref(args.to, "--to")
    else:
        raise UsageError("publish --image with a local source needs --to docker://REG/REPO:TAG (where it is pushed)")
    if args.previous < 0:
        raise UsageError("--previous takes a count >= 0")
    keys = []
    if args.sign_keys:
        from ..image.signing import load_private_keys
        keys = load_private_keys(args.sign_keys)  # a bad key is said before any network
    local = ""
    if not args.image.startswith("docker://"):  # a missing or bad local image is said before any network
        with open_source(args.image, platform, options) as source:
            local = source.resolve().manifest_digest
    registry = Registry(dest, plain_http=options.plain_http, insecure=options.insecure,
                        credentials=options.credentials)
    subject_digest = _manifest_of(dest, platform, options)
    if not args.image.startswith("docker://"):
        if local != subject_digest:
            raise UsageError(f"--image {args.image} is not the image at --to (manifest {local or 'unknown'}, "
                             f"the registry has {subject_digest})")
    existing = artifacts.find_artifacts(registry, subject_digest)
    have_full = any(not a.is_delta for a in existing)
    have_bases = {a.annotations.get(artifacts.ANNOTATION_BASE_MANIFEST) for a in existing if a.is_delta}
    todo = []
    for tag in _base_tags(args, registry, dest.reference):
        base = Reference(dest.host, dest.repository, tag)
        try:
            digest = _manifest_of(base, platform, options)
        except NotFound:
            raise NotFound(f"--from {tag}: no such tag in {dest.host}/{dest.repository}") from None
        if digest != subject_digest and digest not in have_bases:
            todo.append((tag, base, digest))
    rows: list[tuple[str, ...]] = [(("delta from " + a.annotations.get(artifacts.ANNOTATION_BASE_ID, "?")[:19])
                                    if a.is_delta else "image", human_bytes(max(a.size, 0)), a.digest[:19],
                                    "already there") for a in existing]
    if not have_full or todo:
        work = tempfile.mkdtemp(prefix="d4c-publish-")
        try:
            rows = _publish(args, registry, subject_digest, have_full, todo, work, platform, options) + rows
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if keys:
        rows += _sign_all(registry, subject_digest, keys)
    print_table(rows, ("artifact", "size", "manifest", "pushed"))
    return 0


def _sign_all(registry: Registry, subject_digest: str, keys: list[object]) -> list[tuple[str, ...]]:
    """Sign every d4c artifact of the subject that the keys have not signed yet
    (docs/SIGNING.md): the statement comes from its annotations and its layer."""
    from ..image.signing import MAX_ENVELOPE, Statement, key_id, sign, signer_ids
    wanted = {key_id(k.public_key()) for k in keys}  # type: ignore[attr-defined]
    rows = []
    for art in artifacts.find_artifacts(registry, subject_digest):
        envelopes = artifacts.find_signatures(registry, art, MAX_ENVELOPE)
        if any(wanted <= set(signer_ids(e, art.digest)) for e in envelopes):
            rows.append((f"signature of {art.digest[:19]}", "", "", "already there"))
            continue
        layer_digest, size = artifacts.layer_of(registry, art)
        statement = Statement(image=art.image_id, base=art.base_id or None, artifact=layer_digest, size=size,
                              manifest=subject_digest)
        envelope = sign(statement, keys)
        digest, new = artifacts.push_signature(registry, artifacts.artifact_descriptor(registry, art), envelope,
                                               sorted(wanted))
        rows.append((f"signature of {art.digest[:19]}", human_bytes(len(envelope)), digest[:19],
                     "yes" if new else "already there"))
    return rows


SCRATCH_LEVEL = 1


def _publish(args: argparse.Namespace, registry: Registry, subject_digest: str, have_full: bool,
             todo: list[tuple[str, Reference, str]], work: str, platform: Platform,
             options: RemoteOptions) -> list[tuple[str, ...]]:
    new_dir = os.path.join(work, "new")
    image_id, resolved = convert_image(args.image, platform, options, new_dir, level=body_level(args),
                                       grouped=args.image_format == 2, threads=args.threads)
    if resolved.manifest_digest != subject_digest:  # the tag moved since it was resolved
        raise UsageError(f"{args.image} changed while it was published: publish again")
    new_path = os.path.join(new_dir, "image.cdimg")
    image_size = os.path.getsize(new_path)
    subject = artifacts.subject_descriptor(registry, subject_digest)
    common = {artifacts.ANNOTATION_IMAGE_ID: format_id(image_id), artifacts.ANNOTATION_IMAGE_SIZE: str(image_size)}
    rows = []
    for tag, base, base_manifest in todo:
        base_dir = os.path.join(work, "base-" + str(len(rows)))
        # the base is only diffed against, then deleted: its bodies' level does not reach the delta
        base_id, _ = convert_image("docker://" + str(base), platform, options, base_dir, level=SCRATCH_LEVEL,
                                   threads=args.threads)
        delta_path = os.path.join(work, f"delta-{len(rows)}.cdimg")
        with Image(os.path.join(base_dir, "image.cdimg")) as old, Image(new_path) as new:
            diff_images(old, new, delta_path, cdimg=True, options=DiffOptions(threads=args.threads))
        shutil.rmtree(base_dir, ignore_errors=True)
        notes = dict(common, **{artifacts.ANNOTATION_BASE_ID: format_id(base_id),
                                artifacts.ANNOTATION_BASE_MANIFEST: base_manifest})
        rows.append(_push(registry, subject, artifacts.DELTA_ARTIFACT, delta_path, notes, f"delta from {tag}"))
    if not have_full:
        rows.append(_push(registry, subject, artifacts.IMAGE_ARTIFACT, new_path, common, "image"))
    return rows


def _push(registry: Registry, subject: dict[str, object], kind: str, path: str, notes: dict[str, str],
          label: str) -> tuple[str, ...]:
    size = os.path.getsize(path)
    with Progress(f"push {label}", total_bytes=size) as progress:
        done = [0]

        def advance(offset: int) -> None:
            progress.advance(offset - done[0])
            done[0] = offset
        digest, new = artifacts.push_artifact(registry, subject, kind, path, notes, advance)
    return label, human_bytes(size), digest[:19], "yes" if new else "already there"
