"""The gRPC face of the snapshotter: containerd.services.snapshots.v1.Snapshots.

Each method only converts: request fields in, core call, response out.  One
table turns our errors into containerd's gRPC codes (containerd maps them back
to its errdefs: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION ...).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ..errors import (EXIT_CORRUPT, AlreadyExists, BadInput, Conflict, CorruptImage, D4CError, NotFound, Untrusted,
                      UsageError)
from .api import snapshots_pb2 as pb
from .api import snapshots_pb2_grpc as pb_grpc
from .api.types import mount_pb2
from .metadata import Snapshot
from .snapshotter import Mount, Snapshotter

log = logging.getLogger("d4c.snap")
F = TypeVar("F", bound=Callable[..., Any])

CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (CorruptImage, grpc.StatusCode.INVALID_ARGUMENT),
    (BadInput, grpc.StatusCode.INVALID_ARGUMENT),
    (Untrusted, grpc.StatusCode.INVALID_ARGUMENT),  # a refused image, as containerd 1.6 passes codes on
]
LIST_BATCH = 100


def status_of(exc: BaseException) -> grpc.StatusCode:
    for kind, code in CODES:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, D4CError) and exc.exit_code == EXIT_CORRUPT:  # a wrong base, an unknown version ...
        return grpc.StatusCode.INVALID_ARGUMENT  # `load` reports it as a refused image
    return grpc.StatusCode.INTERNAL


def reported(fn: F) -> F:
    """Errors become a gRPC status with a one-line message; bugs are logged."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except D4CError as exc:
            code = status_of(exc)
            (log.info if code != grpc.StatusCode.INTERNAL else log.error)("%s: %s", fn.__name__, exc)
            context.abort(code, str(exc))
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {exc}")
        except Exception as exc:  # a bug: answer, log the traceback, keep serving
            if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortedError":
                raise
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: internal error: {exc}")
    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------- conversions

def mounts_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_pb(snap: Snapshot) -> pb.Info:
    return pb.Info(name=snap.key, parent=snap.parent, kind=snap.kind, labels=snap.labels,
                   created_at=_ts(snap.created_ns), updated_at=_ts(snap.updated_ns))


# ---------------------------------------------------------------- servicer

class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, core: Snapshotter) -> None:
        self.core = core

    @reported
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> Any:
        mounts = self.core.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=mounts_pb(mounts))

    @reported
    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> Any:
        mounts = self.core.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_pb(mounts))

    @reported
    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> Any:
        return pb.MountsResponse(mounts=mounts_pb(self.core.mounts(request.key)))

    @reported
    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> Any:
        self.core.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @reported
    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> Any:
        self.core.remove(request.key)
        return empty_pb2.Empty()

    @reported
    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> Any:
        return pb.StatSnapshotResponse(info=info_pb(self.core.stat(request.key)))

    @reported
    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> Any:
        snap = self.core.update(request.info.name, dict(request.info.labels), list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_pb(snap))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        # a stream: the guard wraps the query, the batches are plain conversions
        snaps = self._list(request, context)
        for i in range(0, len(snaps), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_pb(s) for s in snaps[i:i + LIST_BATCH]])

    @reported
    def _list(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> list[Snapshot]:
        return self.core.list()

    @reported
    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> Any:
        size, inodes = self.core.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @reported
    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> Any:
        self.core.cleanup()
        return empty_pb2.Empty()
