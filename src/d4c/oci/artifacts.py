"""d4c artifacts beside an image in an OCI registry (docs/REGISTRY.md).

A cdimg, full or a delta from an older version, is an OCI 1.1 artifact: an
image manifest with an `artifactType`, the empty config, the cdimg as its one
layer, and the image's platform manifest as its `subject`.  Its annotations
say what it is (ANNOTATION_*), so a device chooses one from the referrers list
alone.  Registries with the referrers API list them; on the others (Debian's
docker-registry, distribution 2.x) the publisher also keeps the list in the
referrers tag schema's index, tag `sha256-<hex of the subject digest>`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..digests import file_sha256, path_sha256, sha256
from ..errors import BadInput, NotFound, Unavailable
from .registry import INDEX_TYPE, Registry, index_descriptors

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
IMAGE_ARTIFACT = "application/vnd.d4c.image.v1"      # a full cdimg of the subject
DELTA_ARTIFACT = "application/vnd.d4c.delta.v1"      # a delta cdimg: an older image -> the subject
ARTIFACT_TYPES = (IMAGE_ARTIFACT, DELTA_ARTIFACT)
CDIMG_LAYER = "application/vnd.d4c.cdimg.v1"
SIGNATURE_ARTIFACT = "application/vnd.d4c.signature.v1"  # a referrer of an artifact: its DSSE envelope
ENVELOPE_LAYER = "application/vnd.dsse.envelope.v1+json"
MAX_SIGNATURE_REFERRERS = 8   # signature artifacts of one artifact a device reads
EMPTY_CONFIG = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
EMPTY_CONFIG_BYTES = b"{}"

ANNOTATION_IMAGE_ID = "io.d4c.image.id"               # the image id the artifact makes (sha256:...)
ANNOTATION_BASE_ID = "io.d4c.base.id"                 # deltas: the image id they apply to
ANNOTATION_BASE_MANIFEST = "io.d4c.base.manifest"     # deltas: the base image's platform manifest digest
ANNOTATION_SIZE = "io.d4c.size"                       # bytes of the cdimg layer
ANNOTATION_IMAGE_SIZE = "io.d4c.image.size"           # bytes of the full cdimg of the subject
ANNOTATION_SIGNERS = "io.d4c.signers"                 # signature artifacts: the key ids, comma-separated


@dataclass
class Artifact:
    """One d4c referrer of a manifest, as its descriptor says."""
    digest: str                 # of the artifact's manifest
    artifact_type: str
    annotations: dict[str, str]

    @property
    def is_delta(self) -> bool:
        return self.artifact_type == DELTA_ARTIFACT

    @property
    def image_id(self) -> str:
        return self.annotations.get(ANNOTATION_IMAGE_ID, "")

    @property
    def base_id(self) -> str:
        return self.annotations.get(ANNOTATION_BASE_ID, "")

    @property
    def size(self) -> int:
        value = self.annotations.get(ANNOTATION_SIZE, "")
        return int(value) if value.isdigit() else -1


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: `<alg>-<hex>`."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"[:128]


def subject_descriptor(registry: Registry, digest: str) -> dict[str, Any]:
    """The descriptor of the manifest `digest` in `registry` (it must be there)."""
    media, data = registry.manifest(digest)
    if "sha256:" + sha256(data).hexdigest() != digest:
        raise BadInput(f"{registry.ref.host}: manifest {digest} does not match its digest")
    return {"mediaType": media or MANIFEST_TYPE, "digest": digest, "size": len(data)}


def artifact_manifest(subject: dict[str, Any], artifact_type: str, layer_digest: str, layer_size: int,
                      annotations: dict[str, str], layer_type: str = CDIMG_LAYER,
                      title: str = "image.cdimg") -> bytes:
    """The artifact's manifest, canonical JSON: the same inputs give the same digest,
    which is what makes publishing twice push nothing new."""
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": artifact_type,
           "config": EMPTY_CONFIG,
           "layers": [{"mediaType": layer_type, "digest": layer_digest, "size": layer_size,
                       "annotations": {"org.opencontainers.image.title": title}}],
           "subject": subject, "annotations": dict(sorted(annotations.items()))}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _referrers(registry: Registry, subject_digest: str, referrers_timeout: float | None) -> list[dict[str, Any]]:
    """The descriptors of the manifests whose subject is `subject_digest`: by
    the referrers API, else from the tag schema's index (none: empty)."""
    if referrers_timeout is None:
        found = registry.referrers(subject_digest)
    else:
        timeout, registry.timeout = registry.timeout, referrers_timeout
        try:
            found = registry.referrers(subject_digest)
        except Unavailable:
            found = None
        finally:
            registry.timeout = timeout
    if found is None:
        try:
            _, data = registry.manifest(fallback_tag(subject_digest))
        except NotFound:
            return []
        found = index_descriptors(data, f"{registry.ref.host}: the referrers index")
    return found


def find_artifacts(registry: Registry, subject_digest: str, referrers_timeout: float | None = None) -> list[Artifact]:
    """The d4c artifacts whose subject is `subject_digest`: by the referrers
    API, else from the tag schema's index (none: an empty list).  With
    `referrers_timeout`, a referrers call that takes longer counts as no API
    (registries have taken 10-20 s to answer it with a 404)."""
    found = _referrers(registry, subject_digest, referrers_timeout)
    out = []
    for desc in found:
        kind, digest, notes = desc.get("artifactType"), desc.get("digest"), desc.get("annotations") or {}
        if kind in ARTIFACT_TYPES and isinstance(digest, str) and isinstance(notes, dict):
            out.append(Artifact(digest, str(kind), {str(k): str(v) for k, v in notes.items()}))
    return out


def layer_of(registry: Registry, artifact: Artifact) -> tuple[str, int]:
    """(digest, size) of the cdimg an artifact carries."""
    _, data = registry.manifest(artifact.digest)
    if "sha256:" + sha256(data).hexdigest() != artifact.digest:
        raise BadInput(f"{registry.ref.host}: artifact {artifact.digest} does not match its digest")
    try:
        layer = json.loads(data)["layers"][0]
        return str(layer["digest"]), int(layer["size"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadInput(f"{registry.ref.host}: artifact {artifact.digest} has no cdimg layer") from None


def _hex(image_id: str) -> str:
    return image_id.split(":", 1)[-1]


def cheapest(found: list[Artifact], have: set[str]) -> Artifact | None:
    """What a device that holds the images `have` (ids in hex) fetches: the
    smallest of the deltas from one of them and the full image; None when
    nothing is usable."""
    usable = [a for a in found if a.size >= 0 and (not a.is_delta or _hex(a.base_id) in have)]
    return min(usable, key=lambda a: (a.size, a.is_delta is False, a.digest), default=None)


def fetch_layer(registry: Registry, artifact: Artifact, dest: str,
                progress: Callable[[int], None] | None = None) -> int:
    """Download the cdimg an artifact carries to `dest`, checked against its
    digest.  An interrupted download stays in DEST.partial and the next call
    resumes it with Range; returns the bytes this call downloaded."""
    digest, size = layer_of(registry, artifact)
    partial = dest + ".partial"
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    if have > size:
        os.unlink(partial)
        have = 0
    got = 0
    if have < size:
        with registry.download(digest, have) as src, open(partial, "ab") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
                got += len(chunk)
                if progress is not None:
                    progress(have + got)
            out.flush()
            os.fsync(out.fileno())
    with open(partial, "rb") as f:
        if "sha256:" + file_sha256(f).hexdigest() != digest:
            os.unlink(partial)  # a resumed download that does not add up starts again next time
            raise BadInput(f"{registry.ref.host}: artifact {artifact.digest}: its cdimg does not match its digest")
    os.rename(partial, dest)
    return got


def push_artifact(registry: Registry, subject: dict[str, Any], artifact_type: str, path: str,
                  annotations: dict[str, str], progress: Callable[[int], None] | None = None) -> tuple[str, bool]:
    """Push the cdimg at `path` as an artifact of `subject`; (manifest digest,
    whether anything was new)."""
    layer_digest, size = "sha256:" + path_sha256(path).hexdigest(), os.path.getsize(path)
    notes = dict(annotations, **{ANNOTATION_SIZE: str(size)})
    manifest = artifact_manifest(subject, artifact_type, layer_digest, size, notes)
    new = registry.push_blob(path, layer_digest, progress)
    digest, indexed = _push_referrer(registry, subject, artifact_type, manifest, notes, new)
    return digest, new or indexed


def _push_referrer(registry: Registry, subject: dict[str, Any], artifact_type: str, manifest: bytes,
                   notes: dict[str, str], new: bool) -> tuple[str, bool]:
    """Put a referrer's manifest (its layer is pushed) and index it: the
    registry's referrers API does when the manifest's answer says so
    (OCI-Subject); otherwise the tag schema's index gains its descriptor."""
    digest = "sha256:" + sha256(manifest).hexdigest()
    registry.push_blob(EMPTY_CONFIG_BYTES, str(EMPTY_CONFIG["digest"]))
    indexed_by_api = False
    if new or not registry.has_manifest(digest):
        resp = registry.put_manifest(digest, manifest, MANIFEST_TYPE)
        indexed_by_api = bool(resp.getheader("OCI-Subject"))
        new = True
    if not indexed_by_api and registry.referrers(subject["digest"]) is None:
        new = _add_to_fallback_index(registry, subject["digest"], {
            "mediaType": MANIFEST_TYPE, "digest": digest, "size": len(manifest), "artifactType": artifact_type,
            "annotations": dict(sorted(notes.items()))}) or new
    return digest, new


def artifact_descriptor(registry: Registry, artifact: Artifact) -> dict[str, Any]:
    """The descriptor of an artifact's manifest, as a signature's subject."""
    return subject_descriptor(registry, artifact.digest)


def push_signature(registry: Registry, artifact_subject: dict[str, Any], envelope: bytes,
                   signers: list[str]) -> tuple[str, bool]:
    """Push a DSSE envelope as a referrer of the artifact `artifact_subject`."""
    envelope_digest = "sha256:" + sha256(envelope).hexdigest()
    notes = {ANNOTATION_SIGNERS: ",".join(signers)}
    manifest = artifact_manifest(artifact_subject, SIGNATURE_ARTIFACT, envelope_digest, len(envelope), notes,
                                 layer_type=ENVELOPE_LAYER, title="image.cdimg.sig")
    new = registry.push_blob(envelope, envelope_digest)
    return _push_referrer(registry, artifact_subject, SIGNATURE_ARTIFACT, manifest, notes, new)


def find_signatures(registry: Registry, artifact: Artifact, max_size: int,
                    referrers_timeout: float | None = None) -> list[bytes]:
    """The DSSE envelopes of the artifact's signature referrers (unverified)."""
    out = []
    found = [d for d in _referrers(registry, artifact.digest, referrers_timeout)
             if d.get("artifactType") == SIGNATURE_ARTIFACT and isinstance(d.get("digest"), str)]
    for desc in found[:MAX_SIGNATURE_REFERRERS]:
        _, data = registry.manifest(str(desc["digest"]))
        if "sha256:" + sha256(data).hexdigest() != desc["digest"]:
            raise BadInput(f"{registry.ref.host}: signature {desc['digest']} does not match its digest")
        try:
            layer = json.loads(data)["layers"][0]
            digest = str(layer["digest"])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        blob = registry.blob(digest, max_size)
        if "sha256:" + sha256(blob).hexdigest() == digest:
            out.append(blob)
    return out


def _add_to_fallback_index(registry: Registry, subject_digest: str, descriptor: dict[str, Any]) -> bool:
    """Add `descriptor` to the tag schema's index of `subject_digest`; False when it is there already.
    (Read, add, write: two publishers of one subject at once may lose an entry; publish again.)"""
    tag = fallback_tag(subject_digest)
    try:
        _, data = registry.manifest(tag)
        entries = index_descriptors(data, f"{registry.ref.host}: the referrers index")
    except NotFound:
        entries = []
    if any(e.get("digest") == descriptor["digest"] for e in entries):
        return False
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries + [descriptor]}
    registry.put_manifest(tag, json.dumps(index, sort_keys=True, separators=(",", ":")).encode(), INDEX_TYPE)
    return True
