"""Our containerd .proto files against containerd's public API (v1.6).

The tables below pin every message (field names, numbers, types), enum value and
rpc of the six files, as read from containerd v1.6.39's api/ directory (they did
not change across the 1.6 series).  A change to our .proto files that would break
wire compatibility with containerd fails here.  Beyond the descriptors, the tests
check the method paths and call kinds the generated stubs use and the bytes a
message puts on the wire.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

import d4c.snap.api
from d4c.snap.api import content_pb2, images_pb2, leases_pb2, snapshots_pb2
from d4c.snap.api.types import descriptor_pb2 as oci_descriptor_pb2
from d4c.snap.api.types import mount_pb2

API = "d4c.snap.api"

# module -> (proto file as imported, proto package, services)
FILES = {
    "types.mount": ("d4c/snap/api/types/mount.proto", "containerd.types", []),
    "types.descriptor": ("d4c/snap/api/types/descriptor.proto", "containerd.types", []),
    "snapshots": ("d4c/snap/api/snapshots.proto", "containerd.services.snapshots.v1", ["Snapshots"]),
    "content": ("d4c/snap/api/content.proto", "containerd.services.content.v1", ["Content"]),
    "images": ("d4c/snap/api/images.proto", "containerd.services.images.v1", ["Images"]),
    "leases": ("d4c/snap/api/leases.proto", "containerd.services.leases.v1", ["Leases"]),
}

# "name=number:type"; [T] is repeated, map is map<string, string>
MESSAGES = {
    "types.mount": {
        "Mount": "type=1:string source=2:string target=3:string options=4:[string]",
    },
    "types.descriptor": {
        "Descriptor": "media_type=1:string digest=2:string size=3:int64 annotations=5:map",
    },
    "snapshots": {
        "PrepareSnapshotRequest": "snapshotter=1:string key=2:string parent=3:string labels=4:map",
        "PrepareSnapshotResponse": "mounts=1:[Mount]",
        "ViewSnapshotRequest": "snapshotter=1:string key=2:string parent=3:string labels=4:map",
        "ViewSnapshotResponse": "mounts=1:[Mount]",
        "MountsRequest": "snapshotter=1:string key=2:string",
        "MountsResponse": "mounts=1:[Mount]",
        "RemoveSnapshotRequest": "snapshotter=1:string key=2:string",
        "CommitSnapshotRequest": "snapshotter=1:string name=2:string key=3:string labels=4:map",
        "StatSnapshotRequest": "snapshotter=1:string key=2:string",
        "Info": "name=1:string parent=2:string kind=3:Kind created_at=4:Timestamp updated_at=5:Timestamp "
                "labels=6:map",
        "StatSnapshotResponse": "info=1:Info",
        "UpdateSnapshotRequest": "snapshotter=1:string info=2:Info update_mask=3:FieldMask",
        "UpdateSnapshotResponse": "info=1:Info",
        "ListSnapshotsRequest": "snapshotter=1:string filters=2:[string]",
        "ListSnapshotsResponse": "info=1:[Info]",
        "UsageRequest": "snapshotter=1:string key=2:string",
        "UsageResponse": "size=1:int64 inodes=2:int64",
        "CleanupRequest": "snapshotter=1:string",
    },
    "content": {
        "Info": "digest=1:string size=2:int64 created_at=3:Timestamp updated_at=4:Timestamp labels=5:map",
        "InfoRequest": "digest=1:string",
        "InfoResponse": "info=1:Info",
        "UpdateRequest": "info=1:Info update_mask=2:FieldMask",
        "UpdateResponse": "info=1:Info",
        "ListContentRequest": "filters=1:[string]",
        "ListContentResponse": "info=1:[Info]",
        "DeleteContentRequest": "digest=1:string",
        "ReadContentRequest": "digest=1:string offset=2:int64 size=3:int64",
        "ReadContentResponse": "offset=1:int64 data=2:bytes",
        "Status": "started_at=1:Timestamp updated_at=2:Timestamp ref=3:string offset=4:int64 total=5:int64 "
                  "expected=6:string",
        "StatusRequest": "ref=1:string",
        "StatusResponse": "status=1:Status",
        "ListStatusesRequest": "filters=1:[string]",
        "ListStatusesResponse": "statuses=1:[Status]",
        "WriteContentRequest": "action=1:WriteAction ref=2:string total=3:int64 expected=4:string offset=5:int64 "
                               "data=6:bytes labels=7:map",
        "WriteContentResponse": "action=1:WriteAction started_at=2:Timestamp updated_at=3:Timestamp "
                                "offset=4:int64 total=5:int64 digest=6:string",
        "AbortRequest": "ref=1:string",
    },
    "images": {
        "Image": "name=1:string labels=2:map target=3:Descriptor created_at=7:Timestamp updated_at=8:Timestamp",
        "GetImageRequest": "name=1:string",
        "GetImageResponse": "image=1:Image",
        "CreateImageRequest": "image=1:Image",
        "CreateImageResponse": "image=1:Image",
        "UpdateImageRequest": "image=1:Image update_mask=2:FieldMask",
        "UpdateImageResponse": "image=1:Image",
        "ListImagesRequest": "filters=1:[string]",
        "ListImagesResponse": "images=1:[Image]",
        "DeleteImageRequest": "name=1:string sync=2:bool",
    },
    "leases": {
        "Lease": "id=1:string created_at=2:Timestamp labels=3:map",
        "CreateRequest": "id=1:string labels=3:map",
        "CreateResponse": "lease=1:Lease",
        "DeleteRequest": "id=1:string sync=2:bool",
        "ListRequest": "filters=1:[string]",
        "ListResponse": "leases=1:[Lease]",
        "Resource": "id=1:string type=2:string",
        "AddResourceRequest": "id=1:string resource=2:Resource",
        "DeleteResourceRequest": "id=1:string resource=2:Resource",
        "ListResourcesRequest": "id=1:string",
        "ListResourcesResponse": "resources=1:[Resource]",
    },
}

ENUMS = {
    "snapshots": {"Kind": {"UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3}},
    "content": {"WriteAction": {"STAT": 0, "WRITE": 1, "COMMIT": 2}},
}

# service -> rpcs in declaration order: "Name(Request) -> Response kind"
RPCS = {
    "Snapshots": [
        "Prepare(PrepareSnapshotRequest) -> PrepareSnapshotResponse unary_unary",
        "View(ViewSnapshotRequest) -> ViewSnapshotResponse unary_unary",
        "Mounts(MountsRequest) -> MountsResponse unary_unary",
        "Commit(CommitSnapshotRequest) -> Empty unary_unary",
        "Remove(RemoveSnapshotRequest) -> Empty unary_unary",
        "Stat(StatSnapshotRequest) -> StatSnapshotResponse unary_unary",
        "Update(UpdateSnapshotRequest) -> UpdateSnapshotResponse unary_unary",
        "List(ListSnapshotsRequest) -> ListSnapshotsResponse unary_stream",
        "Usage(UsageRequest) -> UsageResponse unary_unary",
        "Cleanup(CleanupRequest) -> Empty unary_unary",
    ],
    "Content": [
        "Info(InfoRequest) -> InfoResponse unary_unary",
        "Update(UpdateRequest) -> UpdateResponse unary_unary",
        "List(ListContentRequest) -> ListContentResponse unary_stream",
        "Delete(DeleteContentRequest) -> Empty unary_unary",
        "Read(ReadContentRequest) -> ReadContentResponse unary_stream",
        "Status(StatusRequest) -> StatusResponse unary_unary",
        "ListStatuses(ListStatusesRequest) -> ListStatusesResponse unary_unary",
        "Write(WriteContentRequest) -> WriteContentResponse stream_stream",
        "Abort(AbortRequest) -> Empty unary_unary",
    ],
    "Images": [
        "Get(GetImageRequest) -> GetImageResponse unary_unary",
        "List(ListImagesRequest) -> ListImagesResponse unary_unary",
        "Create(CreateImageRequest) -> CreateImageResponse unary_unary",
        "Update(UpdateImageRequest) -> UpdateImageResponse unary_unary",
        "Delete(DeleteImageRequest) -> Empty unary_unary",
    ],
    "Leases": [
        "Create(CreateRequest) -> CreateResponse unary_unary",
        "Delete(DeleteRequest) -> Empty unary_unary",
        "List(ListRequest) -> ListResponse unary_unary",
        "AddResource(AddResourceRequest) -> Empty unary_unary",
        "DeleteResource(DeleteResourceRequest) -> Empty unary_unary",
        "ListResources(ListResourcesRequest) -> ListResourcesResponse unary_unary",
    ],
}

KINDS = {(False, False): "unary_unary", (False, True): "unary_stream",
         (True, False): "stream_unary", (True, True): "stream_stream"}


def _pb2(module: str) -> Any:
    return importlib.import_module(f"{API}.{module}_pb2")


def _field(field: Any) -> str:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        key, value = message.fields_by_name["key"], message.fields_by_name["value"]
        assert key.type == value.type == FieldDescriptor.TYPE_STRING, field.full_name
        kind = "map"
    else:
        target = message or field.enum_type
        kind = target.name if target is not None else _SCALARS[field.type]
        if field.is_repeated:
            kind = f"[{kind}]"
    return f"{field.name}={field.number}:{kind}"


_SCALARS = {getattr(FieldDescriptor, f"TYPE_{name.upper()}"): name
            for name in ("string", "bytes", "bool", "int64", "int32", "uint64", "uint32")}


def test_every_generated_module_imports() -> None:
    found = sorted(info.name for info in pkgutil.walk_packages(d4c.snap.api.__path__, f"{API}.")
                   if info.name.endswith(("_pb2", "_pb2_grpc")))
    expected = sorted(f"{API}.{module}{suffix}" for module in FILES for suffix in ("_pb2", "_pb2_grpc"))
    assert found == expected
    for name in found:
        importlib.import_module(name)


@pytest.mark.parametrize("module", sorted(FILES))
def test_file_package_and_imports(module: str) -> None:
    path, package, services = FILES[module]
    file = _pb2(module).DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    assert (proto.name, proto.package, proto.syntax) == (path, package, "proto3")
    assert sorted(file.services_by_name) == services
    for dep in file.dependencies:  # ours by our package path, the rest well-known types
        assert dep.name.startswith(("d4c/snap/api/types/", "google/protobuf/")), dep.name


@pytest.mark.parametrize("module", sorted(MESSAGES))
def test_messages_match_containerd(module: str) -> None:
    file = _pb2(module).DESCRIPTOR
    got = {name: " ".join(_field(f) for f in message.fields) for name, message in file.message_types_by_name.items()}
    assert got == MESSAGES[module]
    enums = {name: {v.name: v.number for v in enum.values} for name, enum in file.enum_types_by_name.items()}
    assert enums == ENUMS.get(module, {})


@pytest.mark.parametrize("service", sorted(RPCS))
def test_rpcs_match_containerd(service: str) -> None:
    module = {s: m for m, (_, _, services) in FILES.items() for s in services}[service]
    desc = _pb2(module).DESCRIPTOR.services_by_name[service]
    got = [f"{m.name}({m.input_type.name}) -> {m.output_type.name} {KINDS[m.client_streaming, m.server_streaming]}"
           for m in desc.methods]
    assert got == RPCS[service]


class _RecordingChannel:
    """Stands in for a grpc.Channel: records the path and call kind of each stub method."""

    def __init__(self) -> None:
        self.calls: dict[str, str] = {}

    def __getattr__(self, kind: str) -> Any:
        if kind not in KINDS.values():
            raise AttributeError(kind)

        def make(path: str, **_: Any) -> str:
            self.calls[path] = kind
            return path
        return make


@pytest.mark.parametrize("service", sorted(RPCS))
def test_stubs_call_containerd_paths(service: str) -> None:
    module = {s: m for m, (_, _, services) in FILES.items() for s in services}[service]
    package = FILES[module][1]
    channel = _RecordingChannel()
    getattr(importlib.import_module(f"{API}.{module}_pb2_grpc"), f"{service}Stub")(channel)
    expected = {f"/{package}.{service}/{rpc.split('(')[0]}": rpc.rsplit(" ", 1)[1] for rpc in RPCS[service]}
    assert channel.calls == expected


def test_wire_bytes() -> None:
    mount = mount_pb2.Mount(type="overlay", source="overlay", options=["ro"])
    assert mount.SerializeToString() == b"\x0a\x07overlay\x12\x07overlay\x22\x02ro"
    commit = content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref="r", total=5, offset=5)
    assert commit.SerializeToString() == b"\x08\x02\x12\x01r\x18\x05\x28\x05"
    image = images_pb2.Image(name="n", created_at=timestamp_pb2.Timestamp(seconds=1))
    assert image.SerializeToString() == b"\x0a\x01n\x3a\x02\x08\x01"  # created_at is field 7


def test_round_trips() -> None:
    now = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    target = oci_descriptor_pb2.Descriptor(media_type="application/vnd.oci.image.manifest.v1+json",
                                           digest="sha256:" + "ab" * 32, size=1234, annotations={"k": "v"})
    messages = [
        images_pb2.Image(name="docker.io/library/nginx:1.23.2", labels={"a": "b"}, target=target,
                         created_at=now, updated_at=now),
        snapshots_pb2.ListSnapshotsResponse(info=[snapshots_pb2.Info(
            name="sha256:x", parent="sha256:y", kind=snapshots_pb2.COMMITTED, created_at=now, labels={"l": "1"})]),
        snapshots_pb2.PrepareSnapshotResponse(mounts=[mount_pb2.Mount(type="bind", source="/s", options=["rbind"])]),
        content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref="ref", total=3, expected="sha256:z",
                                        offset=0, data=b"\x00\x01\x02", labels={"x": "y"}),
        leases_pb2.AddResourceRequest(id="lease", resource=leases_pb2.Resource(id="sha256:x", type="content")),
        snapshots_pb2.UsageResponse(size=-1, inodes=2**40),
    ]
    for message in messages:
        data = message.SerializeToString(deterministic=True)
        assert type(message).FromString(data) == message
