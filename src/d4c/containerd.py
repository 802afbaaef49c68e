"""A thin client for the containerd services `load` uses (content, images,
leases, snapshots), over its unix socket with gRPC.

Errors come back as our error tree: containerd down -> Unavailable, and its
NOT_FOUND / ALREADY_EXISTS / FAILED_PRECONDITION -> NotFound / AlreadyExists /
Conflict, with containerd's own message.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Iterator

import grpc
from google.protobuf import field_mask_pb2

from . import paths
from .errors import AlreadyExists, Conflict, D4CError, NotFound, Unavailable, UsageError
from .snap.api import content_pb2, content_pb2_grpc, images_pb2, images_pb2_grpc, leases_pb2, leases_pb2_grpc
from .snap.api import snapshots_pb2, snapshots_pb2_grpc
from .snap.api.types import descriptor_pb2
from .digests import sha256

DEFAULT_ADDRESS = paths.CONTAINERD_ADDRESS
DEFAULT_NAMESPACE = paths.CONTAINERD_NAMESPACE
WRITE_CHUNK = 1 << 20


class Containerd:
    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
                 timeout: float = 120.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.lease: str | None = None
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Containerd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # plumbing
    def metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return md

    def call(self, method: Any, request: Any, what: str) -> Any:
        try:
            return method(request, metadata=self.metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc, what) from None

    def error(self, exc: grpc.RpcError, what: str) -> D4CError:
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"containerd is not reachable at {self.address} ({what}): {detail}")
        kinds = {grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
                 grpc.StatusCode.FAILED_PRECONDITION: Conflict, grpc.StatusCode.INVALID_ARGUMENT: UsageError}
        return kinds.get(code, D4CError)(f"{what}: {detail}")  # type: ignore[arg-type]

    def ping(self) -> None:
        self.call(self.leases.List, leases_pb2.ListRequest(), "connect")

    # leases
    @contextlib.contextmanager
    def leased(self, expire_s: int = 3600) -> Iterator[str]:
        """A lease for the duration of a load: what is created under it survives
        GC until the image refers to it; deleted in every case."""
        lease_id = f"d4c-load-{uuid.uuid4().hex[:12]}"
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expire_s))
        self.call(self.leases.Create, leases_pb2.CreateRequest(
            id=lease_id, labels={"containerd.io/gc.expire": expire}), "create lease")
        self.lease = lease_id
        try:
            yield lease_id
        finally:
            self.lease = None
            try:
                self.call(self.leases.Delete, leases_pb2.DeleteRequest(id=lease_id), "delete lease")
            except D4CError:
                pass  # it expires by itself

    # content
    def write_blob(self, data: bytes, labels: dict[str, str]) -> str:
        """Store `data` (idempotent: an existing blob only gets the labels)."""
        digest = "sha256:" + sha256(data).hexdigest()
        ref = f"d4c-{digest[7:23]}-{uuid.uuid4().hex[:8]}"

        def requests() -> Iterator[Any]:
            for off in range(0, len(data), WRITE_CHUNK):
                yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, total=len(data),
                                                      expected=digest, offset=off,
                                                      data=data[off:off + WRITE_CHUNK])
            # the commit must carry offset = total, or the server truncates
            yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=len(data),
                                                  expected=digest, offset=len(data), labels=labels)
        try:
            for _ in self.content.Write(requests(), metadata=self.metadata(), timeout=self.timeout):
                pass
        except grpc.RpcError as exc:
            err = self.error(exc, f"write blob {digest}")
            if not isinstance(err, AlreadyExists):
                raise err from None
            if labels:  # the blob was there already: its labels are not ours yet
                self.label_blob(digest, labels)
        return digest

    def open_blob(self, digest: str) -> "_ContentReader":
        return _ContentReader(self, digest)

    def read_blob(self, digest: str, limit: int) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise UsageError(f"blob {digest} is larger than {limit} bytes")
        return data

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self.call(self.content.Update, content_pb2.UpdateRequest(info=info, update_mask=mask),
                  f"label blob {digest}")

    # images
    def get_image(self, name: str) -> Any | None:
        try:
            return self.call(self.images.Get, images_pb2.GetImageRequest(name=name), f"get image {name}").image
        except NotFound:
            return None

    def put_image(self, name: str, target: descriptor_pb2.Descriptor, labels: dict[str, str]) -> None:
        image = images_pb2.Image(name=name, target=target, labels=labels)
        try:
            self.call(self.images.Create, images_pb2.CreateImageRequest(image=image), f"create image {name}")
        except AlreadyExists:
            mask = field_mask_pb2.FieldMask(paths=["target"] + [f"labels.{k}" for k in labels])
            self.call(self.images.Update, images_pb2.UpdateImageRequest(image=image, update_mask=mask),
                      f"update image {name}")

    # snapshots (through containerd, so its metadata and GC know them)
    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            self.call(self.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                      f"stat snapshot {key}")
            return True
        except NotFound:
            return False

    def prepare(self, snapshotter: str, key: str, labels: dict[str, str]) -> None:
        self.call(self.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent="", labels=labels), f"prepare snapshot {key}")

    def commit(self, snapshotter: str, name: str, key: str, labels: dict[str, str]) -> None:
        self.call(self.snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=labels), f"commit snapshot {name}")

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self.call(self.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                  f"remove snapshot {key}")


class _ContentReader:
    """A blob of containerd's content store as a file (read streams it)."""

    def __init__(self, ctrd: Containerd, digest: str) -> None:
        self.ctrd, self.digest = ctrd, digest
        self._stream = ctrd.content.Read(content_pb2.ReadContentRequest(digest=digest),
                                         metadata=ctrd.metadata(), timeout=ctrd.timeout)
        self._buf = b""
        self._done = False

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n is None or n < 0 or len(self._buf) < n):
            try:
                msg = next(self._stream)
            except StopIteration:
                self._done = True
                break
            except grpc.RpcError as exc:
                raise self.ctrd.error(exc, f"read blob {self.digest}") from None
            self._buf += msg.data
        if n is None or n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stream.cancel()

    def __enter__(self) -> "_ContentReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
