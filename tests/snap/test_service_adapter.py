"""The gRPC servicer (d4c.snap.service) over a fake core and a fake context: no server, no containerd,
only the conversions and the error table."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2

from d4c import errors
from d4c.errors import (AlreadyExists, BadInput, Conflict, CorruptDelta, CorruptImage, D4CError, MissingBase,
                        NotFound, SystemFailure, Unavailable, UnsupportedVersion, UsageError, WrongBase)
from d4c.snap import service
from d4c.snap.api import snapshots_pb2 as pb
from d4c.snap.metadata import KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, Snapshot
from d4c.snap.service import SnapshotsService
from d4c.snap.snapshotter import Mount

Code = grpc.StatusCode
CREATED, UPDATED = 1_700_000_000_123_456_789, 1_700_000_100_000_000_001


class Aborted(Exception):
    """What the fake context's abort raises: grpc's raises (a bare Exception) once the status is set."""


class FakeContext:
    """Records how the servicer reports a status; abort raises, as grpc's does."""

    def __init__(self) -> None:
        self.aborts: list[tuple[grpc.StatusCode, str]] = []
        self.codes: list[grpc.StatusCode] = []
        self.details: list[str] = []

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborts.append((code, details))
        raise Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.codes.append(code)

    def set_details(self, details: str) -> None:
        self.details.append(details)


def snap(key: str, kind: int = KIND_COMMITTED, parent: str = "", labels: dict[str, str] | None = None,
         n: int = 1) -> Snapshot:
    return Snapshot(n, key, parent, kind, dict(labels or {}), CREATED, UPDATED)


class FakeCore:
    """The Snapshotter methods the servicer calls.  `fail[method] = exc` makes it raise exc;
    `calls` records each call with its arguments."""

    def __init__(self) -> None:
        self.fail: dict[str, BaseException] = {}
        self.calls: list[tuple[object, ...]] = []
        self.snaps: list[Snapshot] = []

    def _enter(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        self._enter("prepare", key, parent, labels)
        return [Mount("overlay", "overlay", ["workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs"])]

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        self._enter("view", key, parent, labels)
        return [Mount("bind", "/s/1/fs", ["ro", "rbind"])]

    def mounts(self, key: str) -> list[Mount]:
        self._enter("mounts", key)
        return [Mount("bind", "/s/3/fs", ["rw", "rbind"]), Mount("tmpfs", "none")]

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        self._enter("commit", name, key, labels)

    def remove(self, key: str) -> None:
        self._enter("remove", key)

    def stat(self, key: str) -> Snapshot:
        self._enter("stat", key)
        return snap(key, KIND_ACTIVE, "ns/1/parent", {"a": "b"})

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        self._enter("update", key, labels, paths)
        return snap(key, KIND_COMMITTED, "", {"kept": "1", **labels})

    def list(self) -> list[Snapshot]:
        self._enter("list")
        return list(self.snaps)

    def usage(self, key: str) -> tuple[int, int]:
        self._enter("usage", key)
        return 3 << 40, 123_456

    def cleanup(self) -> None:
        self._enter("cleanup")


@pytest.fixture
def core() -> FakeCore:
    return FakeCore()


@pytest.fixture
def svc(core: FakeCore) -> SnapshotsService:
    return SnapshotsService(core)  # type: ignore[arg-type]


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext()


def snap_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "d4c.snap"]


def mounts_of(response) -> list[tuple[str, str, str, list[str]]]:  # type: ignore[no-untyped-def]
    return [(m.type, m.source, m.target, list(m.options)) for m in response.mounts]


# every RPC with a request that reaches the core, and the core method it reaches
RPCS = {
    "Prepare": (lambda: pb.PrepareSnapshotRequest(key="k", parent="p"), "prepare"),
    "View": (lambda: pb.ViewSnapshotRequest(key="k", parent="p"), "view"),
    "Mounts": (lambda: pb.MountsRequest(key="k"), "mounts"),
    "Commit": (lambda: pb.CommitSnapshotRequest(name="n", key="k"), "commit"),
    "Remove": (lambda: pb.RemoveSnapshotRequest(key="k"), "remove"),
    "Stat": (lambda: pb.StatSnapshotRequest(key="k"), "stat"),
    "Update": (lambda: pb.UpdateSnapshotRequest(info=pb.Info(name="k")), "update"),
    "List": (lambda: pb.ListSnapshotsRequest(), "list"),
    "Usage": (lambda: pb.UsageRequest(key="k"), "usage"),
    "Cleanup": (lambda: pb.CleanupRequest(), "cleanup"),
}


def call(svc: SnapshotsService, rpc: str, request, ctx: FakeContext):  # type: ignore[no-untyped-def]
    """One RPC as grpc runs it: a stream (List) is drained."""
    out = getattr(svc, rpc)(request, ctx)
    return list(out) if rpc == "List" else out


# ---------------------------------------------------------------- the error table

# every error class of d4c.errors and the code containerd gets for it
EXPECTED = {
    D4CError: Code.INTERNAL,
    errors.UsageError: Code.INVALID_ARGUMENT,
    errors.CorruptImage: Code.INVALID_ARGUMENT,
    errors.UnsupportedVersion: Code.INVALID_ARGUMENT,
    errors.BadInput: Code.INVALID_ARGUMENT,
    errors.NotFound: Code.NOT_FOUND,
    errors.AlreadyExists: Code.ALREADY_EXISTS,
    errors.Conflict: Code.FAILED_PRECONDITION,
    errors.Unavailable: Code.INTERNAL,
    errors.OutputExists: Code.INTERNAL,
    errors.SystemFailure: Code.INTERNAL,
    errors.Unsupported: Code.INTERNAL,
    errors.ExtensionMismatch: Code.INTERNAL,
    errors.CorruptDelta: Code.INVALID_ARGUMENT,
    errors.MissingBase: Code.INTERNAL,
    errors.WrongBase: Code.INVALID_ARGUMENT,
    errors.WrongSource: Code.INVALID_ARGUMENT,
    errors.Untrusted: Code.INVALID_ARGUMENT,   # a refused image, as load reports it
    errors.Unauthorized: Code.INTERNAL,
}


def all_error_classes() -> set[type]:
    found, todo = set(), [D4CError]
    while todo:
        kind = todo.pop()
        if kind.__module__ == errors.__name__:
            found.add(kind)
        todo.extend(kind.__subclasses__())
    return found


def test_every_error_class_has_a_decided_code() -> None:
    """A new error class in d4c.errors must be given its gRPC code here (and in service.CODES if it needs one)."""
    assert all_error_classes() == set(EXPECTED)


@pytest.mark.parametrize("kind", sorted(EXPECTED, key=lambda k: k.__name__), ids=lambda k: k.__name__)
def test_status_of_each_error_class(kind) -> None:  # type: ignore[no-untyped-def]
    """status_of: the table first, then any EXIT_CORRUPT error is INVALID_ARGUMENT, the rest INTERNAL."""
    assert service.status_of(kind("a", "b", "c", "d")) == EXPECTED[kind]


def test_status_of_subclasses_and_non_d4c_errors() -> None:
    """A subclass takes its base's code; an exception outside the tree is INTERNAL."""
    class GoneSnapshot(NotFound):
        """{}"""
    assert service.status_of(GoneSnapshot("x")) == Code.NOT_FOUND
    assert service.status_of(OSError(2, "gone")) == Code.INTERNAL
    assert service.status_of(ValueError("x")) == Code.INTERNAL


@pytest.mark.parametrize("exc, code, level", [
    (NotFound("snapshot k does not exist"), Code.NOT_FOUND, logging.INFO),
    (AlreadyExists("snapshot k already exists"), Code.ALREADY_EXISTS, logging.INFO),
    (Conflict("snapshot k has children"), Code.FAILED_PRECONDITION, logging.INFO),
    (UsageError("parent p is not a committed snapshot"), Code.INVALID_ARGUMENT, logging.INFO),
    (CorruptImage("/in/x.cdimg", "bad header"), Code.INVALID_ARGUMENT, logging.INFO),
    (BadInput("not an image"), Code.INVALID_ARGUMENT, logging.INFO),
    (WrongBase("top", "sha256:aa", "low", "sha256:bb"), Code.INVALID_ARGUMENT, logging.INFO),
    (UnsupportedVersion("x.cdimg", 9, 1), Code.INVALID_ARGUMENT, logging.INFO),
    (CorruptDelta("d", "short"), Code.INVALID_ARGUMENT, logging.INFO),
    (SystemFailure("mount: Permission denied"), Code.INTERNAL, logging.ERROR),
    (Unavailable("mount server did not answer"), Code.INTERNAL, logging.ERROR),
    (MissingBase("top.cdimg", "sha256:aa"), Code.INTERNAL, logging.ERROR),
    (D4CError("plain"), Code.INTERNAL, logging.ERROR),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_d4c_error_aborts_with_its_code(  # type: ignore[no-untyped-def]
        svc, core, ctx, caplog, exc, code, level) -> None:
    """A D4CError aborts the RPC once, with its code and its one-line message; logged (info, or error
    when INTERNAL) without a traceback."""
    core.fail["prepare"] = exc
    with caplog.at_level(logging.DEBUG, "d4c.snap"), pytest.raises(Aborted):
        svc.Prepare(pb.PrepareSnapshotRequest(key="k"), ctx)
    assert ctx.aborts == [(code, str(exc))]
    assert ctx.codes == [] and ctx.details == []
    records = snap_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [(level, f"Prepare: {exc}")]
    assert records[0].exc_info is None


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), FileNotFoundError(2, "gone", "/s/1")])
def test_oserror_is_internal(svc, core, ctx, caplog, exc) -> None:  # type: ignore[no-untyped-def]
    """An OSError aborts with INTERNAL naming the RPC and the error; one error line, no traceback."""
    core.fail["commit"] = exc
    with caplog.at_level(logging.DEBUG, "d4c.snap"), pytest.raises(Aborted):
        svc.Commit(pb.CommitSnapshotRequest(name="n", key="k"), ctx)
    assert ctx.aborts == [(Code.INTERNAL, f"Commit: {exc}")]
    records = snap_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.ERROR, f"Commit: {exc}")]
    assert records[0].exc_info is None


@pytest.mark.parametrize("exc", [KeyError("labels"), TypeError("bad"), AttributeError("no attr")])
def test_bug_is_internal_with_traceback(svc, core, ctx, caplog, exc) -> None:  # type: ignore[no-untyped-def]
    """Any other exception aborts with INTERNAL 'internal error' and logs its traceback; the next call is served."""
    core.fail["stat"] = exc
    with caplog.at_level(logging.DEBUG, "d4c.snap"), pytest.raises(Aborted):
        svc.Stat(pb.StatSnapshotRequest(key="k"), ctx)
    assert ctx.aborts == [(Code.INTERNAL, f"Stat: internal error: {exc}")]
    records = snap_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.ERROR, "Stat failed")]
    assert records[0].exc_info is not None and records[0].exc_info[1] is exc
    assert "Traceback" in caplog.text
    del core.fail["stat"]
    assert svc.Stat(pb.StatSnapshotRequest(key="k"), FakeContext()).info.name == "k"


def test_rpc_error_and_abort_pass_through(svc, core, ctx, caplog) -> None:  # type: ignore[no-untyped-def]
    """A grpc.RpcError, or an abort that already happened, is re-raised as it is: no second status."""
    class CallFailed(grpc.RpcError):
        pass

    class _AbortedError(Exception):  # the name the servicer recognises
        pass
    for exc in (CallFailed("upstream"), _AbortedError()):
        core.fail["remove"] = exc
        with caplog.at_level(logging.DEBUG, "d4c.snap"), pytest.raises(type(exc)) as info:
            svc.Remove(pb.RemoveSnapshotRequest(key="k"), ctx)
        assert info.value is exc
    assert ctx.aborts == [] and snap_records(caplog) == []


def test_base_exceptions_are_not_caught(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """KeyboardInterrupt and the like are not answered as a status: they stop the server."""
    core.fail["cleanup"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        svc.Cleanup(pb.CleanupRequest(), ctx)
    assert ctx.aborts == []


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_every_rpc_is_guarded(svc, core, ctx, rpc) -> None:  # type: ignore[no-untyped-def]
    """Each RPC (List's stream too) answers the core's errors with a status, never a raw exception."""
    make, method = RPCS[rpc]
    core.fail[method] = Conflict("busy")
    with pytest.raises(Aborted):
        call(svc, rpc, make(), ctx)
    core.fail[method] = ValueError("oops")
    with pytest.raises(Aborted):
        call(svc, rpc, make(), ctx)
    assert [code for code, _ in ctx.aborts] == [Code.FAILED_PRECONDITION, Code.INTERNAL]
    assert ctx.aborts[0][1] == "busy" and "internal error: oops" in ctx.aborts[1][1]
    assert [c[0] for c in core.calls] == [method, method]


# ---------------------------------------------------------------- one good call per RPC

def test_prepare(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """Prepare passes key, parent and labels (a plain dict) and answers the core's mounts."""
    out = svc.Prepare(pb.PrepareSnapshotRequest(snapshotter="di3fs", key="ns/2/c", parent="ns/1/l",
                                                labels={"a": "b"}), ctx)
    assert isinstance(out, pb.PrepareSnapshotResponse)
    assert core.calls == [("prepare", "ns/2/c", "ns/1/l", {"a": "b"})] and type(core.calls[0][3]) is dict
    assert mounts_of(out) == [("overlay", "overlay", "", ["workdir=/s/2/work", "upperdir=/s/2/fs",
                                                          "lowerdir=/s/1/fs"])]
    assert ctx.aborts == []


def test_view(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """View passes key, parent and labels and answers the core's mounts."""
    out = svc.View(pb.ViewSnapshotRequest(key="ns/3/v", parent="ns/1/l", labels={"x": "y"}), ctx)
    assert isinstance(out, pb.ViewSnapshotResponse)
    assert core.calls == [("view", "ns/3/v", "ns/1/l", {"x": "y"})] and type(core.calls[0][3]) is dict
    assert mounts_of(out) == [("bind", "/s/1/fs", "", ["ro", "rbind"])]


def test_mounts(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """Mounts answers every mount, in order, options empty where the core has none."""
    out = svc.Mounts(pb.MountsRequest(key="ns/2/c"), ctx)
    assert isinstance(out, pb.MountsResponse)
    assert core.calls == [("mounts", "ns/2/c")]
    assert mounts_of(out) == [("bind", "/s/3/fs", "", ["rw", "rbind"]), ("tmpfs", "none", "", [])]


def test_commit(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """Commit passes name, key and labels in that order and answers Empty."""
    out = svc.Commit(pb.CommitSnapshotRequest(name="ns/4/sha256:l", key="ns/2/c", labels={"l": "1"}), ctx)
    assert out == empty_pb2.Empty()
    assert core.calls == [("commit", "ns/4/sha256:l", "ns/2/c", {"l": "1"})] and type(core.calls[0][3]) is dict


def test_remove(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """Remove passes the key and answers Empty."""
    assert svc.Remove(pb.RemoveSnapshotRequest(key="ns/2/c"), ctx) == empty_pb2.Empty()
    assert core.calls == [("remove", "ns/2/c")]


def test_stat(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """Stat answers the snapshot as Info: key as name, parent, kind, labels, both times to the nanosecond."""
    info = svc.Stat(pb.StatSnapshotRequest(key="ns/2/c"), ctx).info
    assert core.calls == [("stat", "ns/2/c")]
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("ns/2/c", "ns/1/parent", pb.ACTIVE, {"a": "b"})
    assert info.created_at.ToNanoseconds() == CREATED and info.updated_at.ToNanoseconds() == UPDATED
    assert (info.created_at.seconds, info.created_at.nanos) == (1_700_000_000, 123_456_789)


@pytest.mark.parametrize("kind, expected", [(KIND_VIEW, pb.VIEW), (KIND_ACTIVE, pb.ACTIVE),
                                            (KIND_COMMITTED, pb.COMMITTED)])
def test_kinds_are_containerds(kind, expected) -> None:  # type: ignore[no-untyped-def]
    """Our kind numbers are containerd's Kind enum values."""
    assert service.info_pb(snap("k", kind)).kind == expected


@pytest.mark.parametrize("paths", [["labels.c"], ["labels"], []])
def test_update(svc, core, ctx, paths) -> None:  # type: ignore[no-untyped-def]
    """Update passes Info.name as the key, its labels and the mask's paths (none: an empty list)."""
    request = pb.UpdateSnapshotRequest(info=pb.Info(name="ns/4/l", labels={"c": "d"}, kind=pb.VIEW))
    if paths:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    info = svc.Update(request, ctx).info
    assert core.calls == [("update", "ns/4/l", {"c": "d"}, paths)]
    assert type(core.calls[0][2]) is dict and type(core.calls[0][3]) is list
    assert (info.name, info.kind, dict(info.labels)) == ("ns/4/l", pb.COMMITTED, {"kept": "1", "c": "d"})
    assert info.updated_at.ToNanoseconds() == UPDATED


@pytest.mark.parametrize("count, batches", [(0, []), (1, [1]), (100, [100]), (250, [100, 100, 50])])
def test_list_streams_batches(svc, core, ctx, count, batches) -> None:  # type: ignore[no-untyped-def]
    """List asks the core once and streams every snapshot, in order, LIST_BATCH to a response."""
    assert service.LIST_BATCH == 100
    core.snaps = [snap(f"ns/{i}/s", KIND_COMMITTED, f"ns/{i - 1}/s" if i else "", {"i": str(i)}, i + 1)
                  for i in range(count)]
    out = list(svc.List(pb.ListSnapshotsRequest(filters=["labels.i==1"]), ctx))
    assert all(isinstance(r, pb.ListSnapshotsResponse) for r in out)
    assert [len(r.info) for r in out] == batches
    infos = [i for r in out for i in r.info]
    assert [(i.name, i.parent, dict(i.labels)) for i in infos] == \
        [(s.key, s.parent, s.labels) for s in core.snaps]
    assert core.calls == [("list",)] and ctx.aborts == []


def test_list_error_on_first_read(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """List's stream aborts when it is first read (grpc's first next()), before any response."""
    core.fail["list"] = NotFound("gone")
    stream = svc.List(pb.ListSnapshotsRequest(), ctx)
    assert core.calls == []  # a generator: nothing ran yet
    with pytest.raises(Aborted):
        next(stream)
    assert ctx.aborts == [(Code.NOT_FOUND, "gone")]


def test_usage(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """Usage answers the core's (size, inodes), 64-bit sizes included."""
    out = svc.Usage(pb.UsageRequest(key="ns/2/c"), ctx)
    assert isinstance(out, pb.UsageResponse)
    assert (out.size, out.inodes) == (3 << 40, 123_456)
    assert core.calls == [("usage", "ns/2/c")]


def test_cleanup(svc, core, ctx) -> None:  # type: ignore[no-untyped-def]
    """Cleanup calls the core and answers Empty."""
    assert svc.Cleanup(pb.CleanupRequest(), ctx) == empty_pb2.Empty()
    assert core.calls == [("cleanup",)]
