"""The di3fs snapshotter core: containerd's snapshot model, without gRPC.

Ordinary snapshots behave like containerd's overlay snapshotter (a directory
per snapshot; active ones get an overlay of their parents).  A snapshot
prepared with the image label (`ctr-cli load` does it through containerd) is
backed by a read-only llfs mount of the image stack instead: its `fs`
directory *is* the mount, so containers get overlay(upper = their own dir,
lower = the mount), and every container of that image shares the one mount.

State lives in sqlite; each mount runs in its own process (FileSystem), which
outlives a restart of the snapshotter, so running containers keep reading.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..image.reader import Image, check_bodies, stored_bodies
from ..image.format import format_id
from ..image.stack import close_all, open_stack, read_info_at, walk_chain
from ..errors import AlreadyExists, Conflict, CorruptImage, D4CError, NotFound, Untrusted, UsageError
from ..fsutil import fsync_dir
from ..llfs import mounts
from ..image.signing import SIG_SUFFIX, TrustedKeys, check_file, read_envelope
from .metadata import KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, Metadata, Snapshot, StoredImage
from .remote import CRI_IMAGE_REF, CRI_MANIFEST, REF_LABEL, REMOTE_LABEL, RegistryImages

log = logging.getLogger("d4c.snap")

IMAGE_LABEL = "containerd.io/snapshot/di3fs.image"     # "sha256:<id>": mount this image here
MOUNT_LABEL = "containerd.io/snapshot/di3fs.mount"     # set by us: where the image is mounted
VERIFY_THREADS = min(4, os.cpu_count() or 1)  # bodies checked at once when an image is loaded
WATCH_INTERVAL = 2.0  # seconds between two checks of the mount servers (one statfs each)
RETRY_AFTER = 30  # seconds before a mount that failed to come back is tried again


@dataclass
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


class FileSystem(Protocol):
    """Mounts image stacks (one server process per mount)."""

    def mount(self, paths: list[str], mountpoint: str, cache_dir: str, log_path: str) -> None: ...
    def unmount(self, mountpoint: str) -> None: ...
    def alive(self, mountpoint: str) -> bool: ...
    def mounted(self, mountpoint: str) -> bool: ...  # alive or stale


def parse_image_label(value: str) -> str:
    hexid = value[len("sha256:"):] if value.startswith("sha256:") else ""
    if len(hexid) != 64 or any(c not in "0123456789abcdef" for c in hexid):
        raise UsageError(f"bad {IMAGE_LABEL} label {value!r}: expected sha256:<64 hex digits>")
    return hexid


class Snapshotter:
    def __init__(self, root: str, fs: FileSystem, remote: RegistryImages | None = None,
                 trust: TrustedKeys | None = None) -> None:
        self.root = os.path.abspath(root)
        self.fs = fs
        self.remote = remote  # fetches d4c artifacts when containerd unpacks an image (remote.py)
        self.trust = trust    # --trust: only images signed by these keys enter the store
        # only root may enter: the image mounts honour setuid bits and device
        # nodes (containers need them) and serve every user (allow_other)
        for sub in ("", "snapshots", "images", "incoming", "cache", "logs"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
            os.chmod(os.path.join(self.root, sub), 0o700)  # also when an older version made it
        self.meta = Metadata(os.path.join(self.root, "metadata.db"))
        self._lock = threading.RLock()
        self._retry_at: dict[int, float] = {}  # snapshot id -> when to try a failed remount again

    # ------------------------------------------------------------ paths
    def _dir(self, snap: Snapshot) -> str:
        return os.path.join(self.root, "snapshots", str(snap.id))

    def fs_dir(self, snap: Snapshot) -> str:
        return os.path.join(self._dir(snap), "fs")

    def image_path(self, hexid: str) -> str:
        return os.path.join(self.root, "images", hexid + ".cdimg")

    def incoming_path(self, hexid: str) -> str:
        """Where `load` puts an image for the next Prepare that names it."""
        return os.path.join(self.root, "incoming", hexid + ".cdimg")

    # ------------------------------------------------------------ queries
    def stat(self, key: str) -> Snapshot:
        snap = self.meta.get(key)
        if snap is None:
            raise NotFound(f"snapshot {key} does not exist")
        return snap

    def list(self) -> list[Snapshot]:
        return self.meta.all()

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self.stat(key))

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.stat(key)
        if snap.image:
            stored = self.meta.image(snap.image)
            return (stored.size if stored else 0), 1
        size = inodes = 0
        for dirpath, dirnames, filenames in os.walk(self.fs_dir(snap)):
            for name in dirnames + filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                inodes += 1
                size += st.st_blocks * 512
        return size, inodes

    # ------------------------------------------------------------ changes
    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        if self.remote is not None and REF_LABEL in labels and CRI_MANIFEST in labels and IMAGE_LABEL not in labels:
            if self._remote_layer(key, parent, labels):
                raise AlreadyExists(f"snapshot {labels[REF_LABEL]} already exists")
        return self._create(key, parent, labels, KIND_ACTIVE)

    def _remote_layer(self, key: str, parent: str, labels: dict[str, str]) -> bool:
        """Make the layer containerd is about to unpack from the image's d4c
        artifact instead (remote.py); False: unpack it as usual."""
        ref, manifest = labels[REF_LABEL], labels[CRI_MANIFEST]
        # the ref label stays: containerd 1.6 adopts only a committed snapshot that carries it
        # (and the parent it asked for), from List
        keep = dict(labels, **{REMOTE_LABEL: manifest})
        with self._lock:
            if self.meta.get(ref) is not None:
                return True
            below = self.meta.get(parent) if parent else None
            if below is not None and below.labels.get(REMOTE_LABEL) == manifest:
                # a layer above the image's mount: an empty one (the mount holds the whole tree)
                return self._adopt(f"{key} d4c-remote", parent, {}, ref, keep)
        # the first layer containerd does not have: lower ones it holds already (an update
        # sharing its base layers) stay below, shadowed by the image's whole tree (_mounts)
        assert self.remote is not None
        held = {img.id for img in self.meta.images()}
        hexid = self.remote.fetch(labels.get(CRI_IMAGE_REF, ""), manifest, held, self.incoming_path)
        if hexid is None:
            return False
        try:
            return self._adopt(f"{key} d4c-remote", parent, {IMAGE_LABEL: "sha256:" + hexid}, ref, keep)
        except D4CError as exc:  # refused by the load check: the layers are the way
            log.warning("%s: the fetched image sha256:%s is refused (%s): containerd pulls the layers",
                        labels.get(CRI_IMAGE_REF, manifest), hexid, exc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.incoming_path(hexid))
            return False

    def _adopt(self, tmp: str, parent: str, labels: dict[str, str], name: str, keep: dict[str, str]) -> bool:
        """A committed snapshot `name` made from an active one: an image mount,
        or an empty layer above one."""
        self._create(tmp, parent, labels, KIND_ACTIVE, image_over_parent=True)
        try:
            self.commit(name, tmp, keep)
        except AlreadyExists:  # a concurrent Prepare of the same layer won
            self.remove(tmp)
        return True

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, labels, KIND_VIEW)

    def _create(self, key: str, parent: str, labels: dict[str, str], kind: int,
                image_over_parent: bool = False) -> list[Mount]:
        with self._lock:
            if self.meta.get(key) is not None:
                raise AlreadyExists(f"snapshot {key} already exists")
            if parent:
                p = self.stat(parent)
                if p.kind != KIND_COMMITTED:
                    raise UsageError(f"parent {parent} is not a committed snapshot")
            image = ""
            if IMAGE_LABEL in labels:
                if (parent and not image_over_parent) or kind != KIND_ACTIVE:
                    raise UsageError("an image snapshot is prepared without a parent")
                image = parse_image_label(labels[IMAGE_LABEL])
                paths = self._take_image(image)
            with self.meta.transaction() as db:
                snap = self.meta.insert(db, key, parent, kind, dict(labels), image)
                base = self._dir(snap)
                tmp = os.path.join(self.root, "snapshots", f"new-{snap.id}")
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(os.path.join(tmp, "fs"))
                os.makedirs(os.path.join(tmp, "work"))
                if parent:
                    st = os.stat(self.fs_dir(self.stat(parent)))
                    os.chown(os.path.join(tmp, "fs"), st.st_uid, st.st_gid)
                try:
                    os.rename(tmp, base)
                    if image:
                        self.fs.mount(paths, self.fs_dir(snap), self._cache_dir(snap), self._log(snap))
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    self._remove_dir(snap)
                    raise
            if image:
                self._gc_images()  # the incoming copy is in the store now
            return self._mounts(snap)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        with self._lock:
            snap = self.stat(key)
            if snap.kind != KIND_ACTIVE:
                raise UsageError(f"snapshot {key} is not active")
            if self.meta.get(name) is not None:
                raise AlreadyExists(f"snapshot {name} already exists")
            labels = dict(labels or snap.labels)
            if snap.image:
                labels[MOUNT_LABEL] = self.fs_dir(snap)
            with self.meta.transaction() as db:
                self.meta.commit(db, snap, name, labels)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        with self._lock:
            snap = self.stat(key)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    name = path[len("labels."):]
                    if name in labels:
                        new[name] = labels[name]
                    else:
                        new.pop(name, None)
                else:
                    raise UsageError(f"cannot update field {path!r}")
            with self.meta.transaction() as db:
                snap.updated_ns = self.meta.set_labels(db, snap, new)
            snap.labels = new
            return snap

    def remove(self, key: str) -> None:
        with self._lock:
            snap = self.stat(key)
            if self.meta.children(key):
                raise Conflict(f"snapshot {key} has children")
            with self.meta.transaction() as db:
                self.meta.delete(db, snap)
            self._remove_dir(snap)
            if snap.image:
                self._gc_images()

    def cleanup(self) -> None:
        """Remove what no snapshot owns (a crash between steps can leave it)."""
        with self._lock:
            known = {str(s.id) for s in self.meta.all()}
            folder = os.path.join(self.root, "snapshots")
            for name in os.listdir(folder):
                if name not in known:
                    path = os.path.join(folder, name)
                    self._unmount_if_mounted(os.path.join(path, "fs"))
                    shutil.rmtree(path, ignore_errors=True)
            for name in os.listdir(os.path.join(self.root, "cache")):
                if name not in known:
                    shutil.rmtree(os.path.join(self.root, "cache", name), ignore_errors=True)
            self._gc_images()

    def restore(self) -> None:
        """At start: clear stale mounts and mount every image snapshot that is not
        served, before containerd is answered."""
        with self._lock:
            for snap in self.meta.all():
                if snap.image and not self.fs.alive(self.fs_dir(snap)):
                    self._remount(snap, "was not served when the snapshotter started")
            self.cleanup()

    def watch(self, stop: threading.Event, interval: float = WATCH_INTERVAL) -> None:
        """Until `stop` is set: every `interval` seconds, remount the image
        snapshots whose server died (kill -9, the OOM killer) or whose mount went,
        so that new containers of the image start again.  Containers already on a
        dead mount keep failing (their overlay holds it): the log names them."""
        while not stop.wait(interval):
            try:
                self.check_mounts()
            except Exception:  # a bug must not end the watch
                log.exception("checking the image mounts failed")

    def check_mounts(self) -> list[str]:
        """Remount every image snapshot whose mount is not served; their keys.
        The servers are asked outside the lock (a busy one may take seconds to
        answer statfs, and counts as alive): gRPC calls go on meanwhile."""
        suspects = [s for s in self.meta.all() if s.image and not self.fs.alive(self.fs_dir(s))]
        remounted = []
        for suspect in suspects:
            if self._retry_at.get(suspect.id, 0.0) > time.monotonic():
                continue
            with self._lock:
                snap = next((s for s in self.meta.all() if s.id == suspect.id), None)
                if snap is None or self.fs.alive(self.fs_dir(snap)):
                    continue  # removed, or remounted, meanwhile
                why = "lost its mount server" if self.fs.mounted(self.fs_dir(snap)) else "lost its mount (unmounted)"
                if self._remount(snap, why):
                    remounted.append(snap.key)
        return remounted

    def _remount(self, snap: Snapshot, why: str) -> bool:
        """Mount an image snapshot's stack again at its path (a stale mount there
        is detached first) and log which containers were on the old mount."""
        target = self.fs_dir(snap)
        users = self._users(snap)
        try:
            self._unmount_if_mounted(target)
            self.fs.mount(self._stack(snap.image), target, self._cache_dir(snap), self._log(snap))
        except D4CError as exc:
            self._retry_at[snap.id] = time.monotonic() + RETRY_AFTER
            log.error("cannot mount image sha256:%s of snapshot %s again (%s; next try in %d s): %s",
                      snap.image, snap.key, why, RETRY_AFTER, exc)
            return False
        self._retry_at.pop(snap.id, None)
        log.warning("image sha256:%s of snapshot %s %s: mounted again at %s; %s", snap.image, snap.key, why,
                    target, "containers on the old mount, failing until they restart: " + ", ".join(users)
                    if users else "no container was on it")
        return True

    def _users(self, snap: Snapshot) -> list[str]:
        """Keys of the active snapshots (containers) on top of `snap`'s tree."""
        below: dict[str, list[Snapshot]] = {}
        for s in self.meta.all():
            below.setdefault(s.parent, []).append(s)
        found, todo = [], list(below.get(snap.key, []))
        while todo:
            s = todo.pop()
            if s.kind == KIND_ACTIVE:
                found.append(s.key)
            todo.extend(below.get(s.key, []))
        return sorted(found)

    # ------------------------------------------------------------ images
    def _take_image(self, hexid: str) -> list[str]:
        """Move an incoming image into the store (checked first) and return its
        stack, base first.  A delta needs its parent in the store."""
        final = self.image_path(hexid)
        if not os.path.exists(final):
            incoming = self.incoming_path(hexid)
            if not os.path.exists(incoming):
                raise NotFound(f"image sha256:{hexid} was not handed to the snapshotter (use ctr-cli load)")
            signer = self._check_signature(incoming, hexid)
            info = read_info_at(incoming)
            if info.image_id.hex() != hexid:
                self._drop_incoming(incoming)
                raise CorruptImage(incoming, f"is image {format_id(info.image_id)}, not sha256:{hexid}")
            parent = info.parent_id.hex() if info.parent_id else ""
            if parent and self.meta.image(parent) is None:
                raise Conflict(f"image sha256:{hexid} is a delta of sha256:{parent}, which is not loaded: "
                               "load that image first")
            self._verify(incoming, parent)
            if os.path.exists(incoming + SIG_SUFFIX):
                os.rename(incoming + SIG_SUFFIX, final + SIG_SUFFIX)
            os.rename(incoming, final)
            fsync_dir(os.path.dirname(final))  # before the index names it (ext4 happens to order it; not all do)
            with self.meta.transaction() as db:
                self.meta.add_image(db, StoredImage(hexid, parent, os.path.getsize(final), signer))
        elif self.meta.image(hexid) is None:
            raise CorruptImage(final, "is in the image store but not in its index")
        return self._stack(hexid)

    def _check_signature(self, incoming: str, hexid: str) -> str:
        """With --trust: the id of the trusted key that signed the incoming image,
        checked before the image is parsed; refused (and dropped) otherwise.
        The signature may be for another artifact of the same image (a merged
        delta): the image's full check below then proves its result."""
        if self.trust is None:
            return ""
        if not os.path.exists(incoming + SIG_SUFFIX):
            self._drop_incoming(incoming)
            raise Untrusted(f"image sha256:{hexid} is not signed (no FILE.sig was handed over with it)")
        try:
            verified = check_file(incoming, read_envelope(incoming + SIG_SUFFIX), self.trust,
                                  expect_image="sha256:" + hexid, source=f"image sha256:{hexid}")
        except D4CError:
            self._drop_incoming(incoming)
            raise
        return verified.key_id

    @staticmethod
    def _drop_incoming(incoming: str) -> None:
        for path in (incoming, incoming + SIG_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _verify(self, path: str, parent: str) -> None:
        """Check a whole image before it is stored: the header (ids, the tree
        against its parent) and every body it stores, rebuilt from its deltas
        where it has them and checked against its digest.  A corrupt image is
        refused at load time, not discovered by a container later."""
        stack = [self.image_path(h) for h in self._chain(parent)] if parent else []
        images = open_stack(stack + [path])
        try:
            top = images[-1]
            # a load on a thin link's device is mostly this check: `load` shows its progress
            with _CheckProgress(check_progress_path(path), top) as progress:
                check_bodies(top, VERIFY_THREADS, checked=progress.add)
        finally:
            close_all(images)

    def _chain(self, hexid: str) -> list[str]:
        def parent_of(key: str) -> str:
            stored = self.meta.image(key)
            if stored is None:
                raise Conflict(f"image sha256:{key} is missing from the store")
            return stored.parent
        return walk_chain(hexid, parent_of, "store")

    def _stack(self, hexid: str) -> list[str]:
        return [self.image_path(h) for h in self._chain(hexid)]

    def _gc_images(self) -> None:
        """Delete stored images no snapshot's stack needs, and stale incoming files."""
        needed: set[str] = set()
        for snap in self.meta.all():
            if snap.image:
                needed.update(self._chain(snap.image))
        for stored in self.meta.images():
            if stored.id not in needed:
                with self.meta.transaction() as db:
                    self.meta.delete_image(db, stored.id)
                for path in (self.image_path(stored.id), self.image_path(stored.id) + SIG_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        folder = os.path.join(self.root, "incoming")
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            try:
                if time.time() - os.path.getmtime(path) > 3600:  # a load that never came back
                    os.unlink(path)
            except OSError:
                pass

    # ------------------------------------------------------------ internals
    def _cache_dir(self, snap: Snapshot) -> str:
        return os.path.join(self.root, "cache", str(snap.id))

    def _log(self, snap: Snapshot) -> str:
        return os.path.join(self.root, "logs", f"{snap.id}.log")

    def _unmount_if_mounted(self, path: str) -> None:
        if self.fs.mounted(path):
            self.fs.unmount(path)

    def _remove_dir(self, snap: Snapshot) -> None:
        self._unmount_if_mounted(self.fs_dir(snap))
        shutil.rmtree(self._dir(snap), ignore_errors=True)
        shutil.rmtree(self._cache_dir(snap), ignore_errors=True)
        try:
            os.unlink(self._log(snap))
        except FileNotFoundError:
            pass

    def _parents(self, snap: Snapshot) -> list[Snapshot]:
        out = []
        key = snap.parent
        while key:
            p = self.stat(key)
            out.append(p)
            key = p.parent
        return out

    def _lower(self, snap: Snapshot) -> list[Snapshot]:
        """The parents a mount of `snap` stacks: down to the first image snapshot,
        whose mount is a whole tree (what is below it is shadowed)."""
        out = []
        for p in self._parents(snap):
            out.append(p)
            if p.image:
                break
        return out

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        parents = self._lower(snap)
        if snap.kind == KIND_ACTIVE and snap.image:
            return [Mount("bind", self.fs_dir(snap), ["ro", "rbind"])]
        if not parents:
            mode = "rw" if snap.kind == KIND_ACTIVE else "ro"
            return [Mount("bind", self.fs_dir(snap), [mode, "rbind"])]
        lower = ":".join(self.fs_dir(p) for p in parents)
        if snap.kind == KIND_ACTIVE:
            work = os.path.join(self._dir(snap), "work")
            return [Mount("overlay", "overlay", [f"workdir={work}", f"upperdir={self.fs_dir(snap)}",
                                                 f"lowerdir={lower}"])]
        if len(parents) == 1:
            return [Mount("bind", self.fs_dir(parents[0]), ["ro", "rbind"])]
        return [Mount("overlay", "overlay", [f"lowerdir={lower}"])]


def check_progress_path(incoming: str) -> str:
    """Where the check of an incoming image tells `load` how far it is."""
    return incoming + ".checked"


def read_check_progress(path: str) -> tuple[int, int] | None:
    """(bytes checked, bytes to check), or None before the check starts."""
    try:
        with open(path) as f:
            done, total = f.read().split()
        return int(done), int(total)
    except (OSError, ValueError):
        return None


class _CheckProgress:
    """Bytes of an image's bodies checked so far, in a file `load` reads: written
    whole and renamed, at most 5 times a second, removed at the end."""

    def __init__(self, path: str, image: Image) -> None:
        self.path = path
        self.total = sum(e.size for e in stored_bodies(image))
        self.done = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if time.monotonic() - self._last >= 0.2:
                self._last = time.monotonic()
                self._write()

    def _write(self) -> None:
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{self.done} {self.total}\n")
            os.replace(tmp, self.path)
        except OSError as exc:  # only the display suffers
            log.debug("cannot write the check progress %s: %s", self.path, exc)

    def __enter__(self) -> "_CheckProgress":
        with self._lock:
            self._write()
        return self

    def __exit__(self, *exc: object) -> None:
        for name in (self.path, self.path + ".tmp"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


class LlfsFileSystem:
    """FileSystem through llfs server processes (this program, re-executed)."""

    def __init__(self, command: list[str], cache_size: int = 2 << 30, group_cache: int | None = None) -> None:
        self.command = command
        self.cache_size = cache_size
        self.group_cache = group_cache  # None: llfs' default

    def mount(self, paths: list[str], mountpoint: str, cache_dir: str, log_path: str) -> None:
        from ..llfs.process import spawn_mount
        # every body of a stored image was checked at load (_verify): reads need not hash it again;
        # containers need their image's setuid programs and devices, and only root can enter
        # the directories of these mounts (0700)
        spawn_mount(self.command, paths, mountpoint, cache_dir=cache_dir, cache_size=self.cache_size,
                    log=log_path, verified_bodies=True, suid_dev=True, group_cache=self.group_cache)

    def unmount(self, mountpoint: str) -> None:
        p = mounts.detach(mountpoint)
        if p.returncode and mounts.fstype_at(mountpoint) is not None:
            mounts.unmount(mountpoint, lazy=True)

    def alive(self, mountpoint: str) -> bool:
        return mounts.fstype_at(mountpoint) == mounts.FSTYPE and not mounts.is_stale(mountpoint)

    def mounted(self, mountpoint: str) -> bool:
        return mounts.fstype_at(mountpoint) is not None
