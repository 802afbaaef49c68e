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

import glob
import json
import os
import re
import threading
import uuid

from .. import paths
from ..containerd import Containerd
from ..image.reader import Image
from ..image.format import format_id
from ..image.stack import read_info_at
from ..errors import Conflict, CorruptImage, D4CError, NotFound, Unavailable, Untrusted, UsageError, from_oserror
from ..fsutil import atomic_output, copy_range
from ..progress import Progress
from ..image.signing import MAX_ENVELOPE, SIG_SUFFIX, TrustedKeys, check_file, read_envelope
from .api.types import descriptor_pb2
from .snapshotter import IMAGE_LABEL, check_progress_path, read_check_progress

SNAPSHOTTER = paths.SNAPSHOTTER_NAME
DEFAULT_SNAPSHOTTER_ROOT = paths.SNAPSHOTTER_ROOT
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
HAND_OVER_CHUNK = 8 << 20  # bytes copied between two progress updates
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
               snapshotter_root: str = DEFAULT_SNAPSHOTTER_ROOT, trust: TrustedKeys | None = None,
               signature: str | None = None) -> str:
    """Load `path` as image `name`; returns the image id.  Loading the same image
    again is a no-op apart from (re)pointing the name at it.  With `trust`, the
    signature (`signature`, default PATH.sig) is checked before the file is
    parsed; a signature there is handed to the snapshotter with the file."""
    check_name(name)
    sig_path = signature or path + SIG_SUFFIX
    if trust is not None:
        check_file(path, read_envelope(sig_path), trust, source=sig_path)
    info = read_info_at(path)
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
                           f"{_how_to_load(ctrd, path, info.parent_id)}")
        with ctrd.leased():
            config_digest = ctrd.write_blob(info.config_bytes,
                                            {f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}": image_id})
            manifest = manifest_for(config_digest, len(info.config_bytes), image_id,
                                    info.dimg_offset + info.dimg_size)
            manifest_digest = ctrd.write_blob(manifest, {"containerd.io/gc.ref.content.config": config_digest})
            if not _snapshot_exists(ctrd, image_id):
                _create_snapshot(ctrd, path, info.image_id.hex(), image_id, incoming_dir, snapshotter_root,
                                 sig_path if os.path.exists(sig_path) else None)
            target = descriptor_pb2.Descriptor(media_type=MANIFEST_TYPE, digest=manifest_digest, size=len(manifest))
            ctrd.put_image(name, target, {IMAGE_LABEL: image_id})
    return image_id


def _snapshot_exists(ctrd: Containerd, name: str) -> bool:
    try:
        return ctrd.snapshot_exists(SNAPSHOTTER, name)
    except Unavailable as exc:
        raise _snapshotter_down(ctrd, exc) from None


def _snapshotter_down(ctrd: Containerd, exc: Unavailable) -> Unavailable:
    """containerd answered the ping before: an unreachable snapshot service is
    the snapshotter behind it, unless containerd itself went away meanwhile."""
    try:
        ctrd.ping()
    except Unavailable:
        return exc
    return Unavailable(f"containerd at {ctrd.address} answers, but the {SNAPSHOTTER} snapshotter behind it does "
                       f"not: is `snapshotter` running, on the socket containerd's proxy_plugins.{SNAPSHOTTER} "
                       "names?")


def _how_to_load(ctrd: Containerd, path: str, base_id: bytes) -> str:
    """The command that loads a delta's base, with its file (a cdimg of that id
    next to `path`, or one directory down as `convert --output DIR` writes it)
    and its name (a containerd image that was loaded from it, when its snapshot
    went) where known."""
    from .api import images_pb2
    folder = os.path.dirname(os.path.abspath(path))
    files = sorted(glob.glob(os.path.join(glob.escape(folder), "*.cdimg"))) + \
        sorted(glob.glob(os.path.join(glob.escape(folder), "*", "*.cdimg")))
    found = next((f for f in files if os.path.isfile(f) and _image_id(f) == base_id), None)
    try:
        listed = ctrd.call(ctrd.images.List, images_pb2.ListImagesRequest(), "list images").images
    except D4CError:
        listed = []
    names = sorted(i.name for i in listed if i.labels.get(IMAGE_LABEL) == format_id(base_id))
    if found is None and not names:
        return f"load that image first (no cdimg of that id is next to {path})"
    return f"load it first: ctr-cli load --image {names[0] if names else 'NAME:TAG'} --cdimg {found or 'BASE.cdimg'}"


def _image_id(path: str) -> bytes | None:
    try:
        return read_info_at(path).image_id
    except D4CError:
        return None  # not an image we can use: ignore it here


def _hand_over(path: str, incoming: str) -> None:
    """Copy the image into the snapshotter's incoming directory, under its final
    name only when complete and on disk."""
    size = os.path.getsize(path)
    try:
        src = open(path, "rb")
    except OSError as exc:
        raise from_oserror(exc, "cannot read the image") from exc
    with src, atomic_output(incoming, 0o600) as dst, \
            Progress(f"handing {os.path.basename(path)} to the snapshotter", total_bytes=size) as progress:
        for offset in range(0, size, HAND_OVER_CHUNK):
            n = min(HAND_OVER_CHUNK, size - offset)
            copy_range(src.fileno(), offset, n, dst)
            progress.advance(n)


def _prepare_checked(ctrd: Containerd, path: str, key: str, image_id: str, incoming: str) -> None:
    """Prepare: the snapshotter checks every body and mounts the image.  On a
    terminal the check's progress is shown (the snapshotter writes it next to
    the incoming file; seconds on a device)."""
    progress = Progress(f"checking {os.path.basename(path)} in the snapshotter")
    done = threading.Event()

    def show() -> None:
        while not done.wait(0.1):
            state = read_check_progress(check_progress_path(incoming))
            if state is not None:
                progress.total_bytes = state[1]
                progress.advance(state[0] - progress.bytes)

    watcher = threading.Thread(target=show, name="d4c-load-progress", daemon=True)
    if progress.enabled:
        watcher.start()
    try:
        ctrd.prepare(SNAPSHOTTER, key, {IMAGE_LABEL: image_id})
    except Unavailable as exc:
        raise _snapshotter_down(ctrd, exc) from None
    except UsageError as exc:
        # our request is well-formed and containerd knows the snapshotter (the
        # Stat before worked): an invalid argument here is the image, which the
        # snapshotter refused after its check (containerd keeps only the code)
        reason = _refusal(str(exc), incoming)
        _, trust_refusal, why = reason.partition("refused: ")
        if trust_refusal:  # its --trust: unsigned, or not by a key it trusts
            raise Untrusted(f"{why} (the {SNAPSHOTTER} snapshotter's --trust)") from None
        raise CorruptImage(path, f"{reason} (refused by the {SNAPSHOTTER} snapshotter)") from None
    finally:
        done.set()
        if watcher.is_alive():
            watcher.join()
        progress.done()


def _refusal(message: str, incoming: str) -> str:
    """The snapshotter's reason, without the names of its private copy and of the
    call, which containerd puts around it: 'prepare snapshot KEY: corrupt image
    INCOMING: REASON: invalid argument'."""
    _, named, reason = message.partition(incoming + ": ")
    reason = reason if named else message
    return reason[:-len(": invalid argument")] if reason.endswith(": invalid argument") else reason


def _create_snapshot(ctrd: Containerd, path: str, hexid: str, image_id: str, incoming_dir: str,
                     root: str, sig_path: str | None) -> None:
    """Hand the file (and its signature) over, then Prepare (the snapshotter
    checks and mounts it) and Commit under the image id.  On failure nothing
    stays behind."""
    stored = os.path.join(root, "images", hexid + ".cdimg")
    incoming = os.path.join(incoming_dir, hexid + ".cdimg")
    if not os.path.isdir(incoming_dir):
        raise NotFound(f"snapshotter state {root} not found: is `snapshotter` running with --root {root}?")
    handed = not os.path.exists(stored)
    key = f"d4c-load-{uuid.uuid4().hex[:12]}"
    try:
        if handed:
            if sig_path is not None:
                with open(sig_path, "rb") as src, atomic_output(incoming + SIG_SUFFIX, 0o600) as dst:
                    dst.write(src.read(MAX_ENVELOPE + 1))
            _hand_over(path, incoming)
        _prepare_checked(ctrd, path, key, image_id, incoming)
        try:
            ctrd.commit(SNAPSHOTTER, image_id, key, {IMAGE_LABEL: image_id})
        except BaseException:
            try:
                ctrd.remove_snapshot(SNAPSHOTTER, key)
            except D4CError:
                pass
            raise
    except BaseException:
        if handed:
            for leftover in (incoming, incoming + SIG_SUFFIX):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        raise


def local_images(address: str, namespace: str) -> set[str]:
    """Ids of the d4c images containerd holds (what `load` labelled)."""
    from .api import images_pb2
    with Containerd(address, namespace) as ctrd:
        listed = ctrd.call(ctrd.images.List, images_pb2.ListImagesRequest(), "list images")
    return {img.labels[IMAGE_LABEL].split(":", 1)[-1] for img in listed.images if IMAGE_LABEL in img.labels}
