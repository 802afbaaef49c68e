"""`ctr-cli load`: make a cdimg (base or delta) an image containerd can run.

containerd gets the config and a manifest whose single layer is named by the
image id (so chain id == diff id == image id), and a committed snapshot of
that name in the di3fs snapshotter, created *through containerd* so its
garbage collector knows it.  The cdimg itself goes to the snapshotter's
store: `load` hands it over by id in the snapshotter's private `incoming`
directory (never a path in a label), and the snapshotter checks it before
mounting.  GC wiring: image -> manifest -> config -> snapshot, so
`ctr images rm --sync` frees the snapshot once no container uses it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid

from . import paths
from .containerd import Containerd
from .dimg import Image, format_id, read_info
from .errors import Conflict, D4CError, NotFound, Unavailable, UsageError, from_oserror
from .snap.api.types import descriptor_pb2
from .snap.snapshotter import IMAGE_LABEL

SNAPSHOTTER = paths.SNAPSHOTTER_NAME
DEFAULT_SNAPSHOTTER_ROOT = paths.SNAPSHOTTER_ROOT
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
IMAGE_REF_LABEL = "containerd.io/snapshot/di3fs.image"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@]*$")


def check_name(name: str) -> None:
    """containerd accepts any non-empty name; refuse only what cannot be a
    reference (registry-style names with a port are fine: host:5000/ns/app:1)."""
    if not name or len(name) > 4096 or not _NAME.match(name):
        raise UsageError(f"bad image name {name!r} (e.g. d4c-nginx:1 or registry:5000/ns/nginx:1)")


def manifest_for(config_digest: str, config_size: int, image_id: str, size: int) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER_TYPE, "digest": image_id, "size": size}],
    }, sort_keys=True, separators=(",", ":")).encode()


def load_image(path: str, name: str, *, address: str, namespace: str,
               snapshotter_root: str = DEFAULT_SNAPSHOTTER_ROOT) -> str:
    """Load `path` as image `name`; returns the image id.  Loading the same image
    again is a no-op apart from (re)pointing the name at it."""
    check_name(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no such image file: {path}") from None
    try:
        info = read_info(fd, path)
    finally:
        os.close(fd)
    if info.config_bytes is None:
        raise UsageError(f"{path} is a dimg: load needs a cdimg (it carries the image config)")
    if info.parent_id is None:
        with Image(path) as image:  # the whole header: ids and every entry checked
            image.entries
    image_id = format_id(info.image_id)
    incoming_dir = os.path.join(snapshotter_root, "incoming")
    with Containerd(address, namespace) as ctrd:
        ctrd.ping()  # containerd down: say so before anything else
        if info.parent_id is not None and not _snapshot_exists(ctrd, format_id(info.parent_id)):
            raise Conflict(f"{path} is a delta of image {format_id(info.parent_id)}, which is not loaded: "
                           "load that image first")
        with ctrd.leased():
            config_digest = ctrd.write_blob(info.config_bytes,
                                            {f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}": image_id})
            manifest = manifest_for(config_digest, len(info.config_bytes), image_id,
                                    info.dimg_offset + info.dimg_size)
            manifest_digest = ctrd.write_blob(manifest, {"containerd.io/gc.ref.content.config": config_digest})
            if not _snapshot_exists(ctrd, image_id):
                _create_snapshot(ctrd, path, info.image_id.hex(), image_id, incoming_dir, snapshotter_root)
            target = descriptor_pb2.Descriptor(media_type=MANIFEST_TYPE, digest=manifest_digest, size=len(manifest))
            ctrd.put_image(name, target, {IMAGE_REF_LABEL: image_id})
    return image_id


def _snapshot_exists(ctrd: Containerd, name: str) -> bool:
    try:
        return ctrd.snapshot_exists(SNAPSHOTTER, name)
    except Unavailable as exc:
        raise _snapshotter_down(exc) from None


def _snapshotter_down(exc: D4CError) -> D4CError:
    return Unavailable(f"the {SNAPSHOTTER} snapshotter does not answer (is `snapshotter` running?): {exc}")


def _create_snapshot(ctrd: Containerd, path: str, hexid: str, image_id: str, incoming_dir: str,
                     root: str) -> None:
    """Hand the file over, then Prepare (the snapshotter checks and mounts it) and
    Commit under the image id.  On failure nothing stays behind."""
    stored = os.path.join(root, "images", hexid + ".cdimg")
    incoming = os.path.join(incoming_dir, hexid + ".cdimg")
    if not os.path.isdir(incoming_dir):
        raise NotFound(f"snapshotter state {root} not found: is `snapshotter` running with --root {root}?")
    handed = False
    if not os.path.exists(stored):
        tmp = f"{incoming}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(tmp, incoming)
        except OSError as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise from_oserror(exc, "cannot hand the image to the snapshotter") from exc
        handed = True
    key = f"d4c-load-{uuid.uuid4().hex[:12]}"
    try:
        try:
            ctrd.prepare(SNAPSHOTTER, key, {IMAGE_LABEL: image_id})
        except Unavailable as exc:
            raise _snapshotter_down(exc) from None
        try:
            ctrd.commit(SNAPSHOTTER, image_id, key, {IMAGE_LABEL: image_id})
        except BaseException:
            try:
                ctrd.remove_snapshot(SNAPSHOTTER, key)
            except D4CError:
                pass
            raise
    except BaseException:
        if handed and os.path.exists(incoming):
            os.unlink(incoming)
        raise
