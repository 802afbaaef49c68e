"""The generated containerd API stubs import and keep containerd's wire numbers."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["snapshots", "content", "images", "leases", "types.mount", "types.descriptor"]


@pytest.mark.parametrize("name", MODULES)
def test_stubs_import(name: str) -> None:
    importlib.import_module(f"d4c.snap.api.{name}_pb2")
    importlib.import_module(f"d4c.snap.api.{name}_pb2_grpc")


def _numbers(message) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_wire_numbers_and_services() -> None:
    from d4c.snap.api import content_pb2, images_pb2, leases_pb2, snapshots_pb2
    from d4c.snap.api.types import descriptor_pb2, mount_pb2
    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert sorted(svc.methods_by_name) == sorted(["Prepare", "View", "Mounts", "Commit", "Remove", "Stat",
                                                   "Update", "List", "Usage", "Cleanup"])
    assert svc.methods_by_name["List"].server_streaming and not svc.methods_by_name["List"].client_streaming
    write = content_pb2.DESCRIPTOR.services_by_name["Content"].methods_by_name["Write"]
    assert write.client_streaming and write.server_streaming
    assert _numbers(snapshots_pb2.PrepareSnapshotRequest) == {"snapshotter": 1, "key": 2, "parent": 3, "labels": 4}
    assert _numbers(snapshots_pb2.CommitSnapshotRequest) == {"snapshotter": 1, "name": 2, "key": 3, "labels": 4}
    assert _numbers(snapshots_pb2.Info) == {"name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5,
                                            "labels": 6}
    assert _numbers(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert _numbers(descriptor_pb2.Descriptor) == {"media_type": 1, "digest": 2, "size": 3, "annotations": 5}
    assert _numbers(content_pb2.WriteContentRequest) == {"action": 1, "ref": 2, "total": 3, "expected": 4,
                                                         "offset": 5, "data": 6, "labels": 7}
    assert _numbers(images_pb2.Image) == {"name": 1, "labels": 2, "target": 3, "created_at": 7, "updated_at": 8}
    assert _numbers(leases_pb2.CreateRequest) == {"id": 1, "labels": 3}
    assert snapshots_pb2.COMMITTED == 3 and content_pb2.COMMIT == 2
    # a round trip through the wire format
    req = snapshots_pb2.PrepareSnapshotRequest(snapshotter="di3fs", key="k", labels={"a": "b"})
    assert snapshots_pb2.PrepareSnapshotRequest.FromString(req.SerializeToString()) == req
