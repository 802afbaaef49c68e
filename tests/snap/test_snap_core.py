"""The snapshotter core without gRPC or containerd (a fake FileSystem, or real llfs)."""

from __future__ import annotations

import os
import shutil

import pytest

from d4c.errors import AlreadyExists, Conflict, NotFound, UsageError
from d4c.snap.metadata import KIND_COMMITTED
from d4c.snap.snapshotter import IMAGE_LABEL, MOUNT_LABEL, Snapshotter


class FakeFS:
    """Records mounts; the mount point gets a marker file instead of a FUSE tree."""

    def __init__(self) -> None:
        self.active: dict[str, list[str]] = {}

    def mount(self, paths: list[str], mountpoint: str, cache_dir: str, log_path: str) -> None:
        self.active[mountpoint] = paths
        with open(os.path.join(mountpoint, "MOUNTED"), "w") as f:
            f.write("\n".join(paths))

    def unmount(self, mountpoint: str) -> None:
        self.active.pop(mountpoint, None)

    def alive(self, mountpoint: str) -> bool:
        return mountpoint in self.active

    def mounted(self, mountpoint: str) -> bool:
        return mountpoint in self.active


def hand_over(sn: Snapshotter, path: str) -> str:
    """What `ctr-cli load` does before asking containerd for the snapshot."""
    from d4c.image.format import read_info
    fd = os.open(path, os.O_RDONLY)
    try:
        hexid = read_info(fd, path).image_id.hex()
    finally:
        os.close(fd)
    shutil.copyfile(path, sn.incoming_path(hexid))
    return hexid


def test_overlay_semantics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sn = Snapshotter(str(tmp_path / "root"), FakeFS())
    m = sn.prepare("ns/1/extract", "", {})
    assert m[0].type == "bind" and "rw" in m[0].options
    with open(os.path.join(m[0].source, "layer-file"), "w") as f:
        f.write("x")
    sn.commit("ns/2/sha256:layer1", "ns/1/extract", {"a": "b"})
    info = sn.stat("ns/2/sha256:layer1")
    assert info.kind == KIND_COMMITTED and info.labels == {"a": "b"}
    with pytest.raises(NotFound):
        sn.stat("ns/1/extract")
    m = sn.prepare("ns/3/container", "ns/2/sha256:layer1", {})
    assert m[0].type == "overlay"
    opts = dict(o.split("=", 1) for o in m[0].options)
    assert opts["lowerdir"].endswith("/fs") and opts["upperdir"].endswith("/fs")
    v = sn.view("ns/4/view", "ns/2/sha256:layer1", {})
    assert v[0].type == "bind" and "ro" in v[0].options
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/3/container", "", {})
    with pytest.raises(UsageError):
        sn.prepare("ns/5/x", "ns/3/container", {})  # parent not committed
    with pytest.raises(Conflict):
        sn.remove("ns/2/sha256:layer1")  # has children
    updated = sn.update("ns/2/sha256:layer1", {"c": "d"}, ["labels.c"])
    assert updated.labels == {"a": "b", "c": "d"}
    assert sn.usage("ns/2/sha256:layer1")[1] >= 1
    for key in ("ns/3/container", "ns/4/view", "ns/2/sha256:layer1"):
        sn.remove(key)
    assert sn.list() == []
    assert os.listdir(tmp_path / "root" / "snapshots") == []


def test_image_snapshots_and_store(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    fs = FakeFS()
    sn = Snapshotter(str(tmp_path / "root"), fs)
    base, d12 = stack[0], stack[1]
    # a delta before its base: refused, nothing left behind
    hexid2 = hand_over(sn, d12)
    with pytest.raises(Conflict) as info:
        sn.prepare("ns/1/load-2", "", {IMAGE_LABEL: "sha256:" + hexid2})
    assert "load that image first" in str(info.value)
    assert sn.list() == []
    hexid1 = hand_over(sn, base)
    m = sn.prepare("ns/1/load-1", "", {IMAGE_LABEL: "sha256:" + hexid1})
    assert m[0].type == "bind" and "ro" in m[0].options
    sn.commit("ns/2/sha256:" + hexid1, "ns/1/load-1", {IMAGE_LABEL: "sha256:" + hexid1})
    assert MOUNT_LABEL in sn.stat("ns/2/sha256:" + hexid1).labels
    sn.prepare("ns/3/load-2", "", {IMAGE_LABEL: "sha256:" + hexid2})
    sn.commit("ns/4/sha256:" + hexid2, "ns/3/load-2", {})
    assert sorted(os.listdir(tmp_path / "root" / "images")) == sorted([hexid1 + ".cdimg", hexid2 + ".cdimg"])
    assert len(fs.active) == 2 and [len(p) for p in fs.active.values()] == [1, 2]
    # two containers on one image share its mount
    c1 = sn.prepare("ns/5/c1", "ns/4/sha256:" + hexid2, {})
    c2 = sn.prepare("ns/6/c2", "ns/4/sha256:" + hexid2, {})
    lower = {dict(o.split("=", 1) for o in m[0].options)["lowerdir"] for m in (c1, c2)}
    assert len(lower) == 1 and len(fs.active) == 2
    # the base's snapshot goes first: its file stays, the delta needs it
    sn.remove("ns/2/sha256:" + hexid1)
    assert os.path.exists(sn.image_path(hexid1))
    # a restart re-mounts what is not served
    fs.active.clear()
    sn2 = Snapshotter(str(tmp_path / "root"), fs)
    sn2.restore()
    assert list(fs.active.values()) == [[sn.image_path(hexid1), sn.image_path(hexid2)]]
    for key in ("ns/5/c1", "ns/6/c2", "ns/4/sha256:" + hexid2):
        sn2.remove(key)
    assert os.listdir(tmp_path / "root" / "images") == [] and fs.active == {}


def test_bad_image_hand_over(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    sn = Snapshotter(str(tmp_path / "root"), FakeFS())
    with pytest.raises(NotFound):
        sn.prepare("k", "", {IMAGE_LABEL: "sha256:" + "0" * 64})
    with pytest.raises(UsageError):
        sn.prepare("k", "", {IMAGE_LABEL: "sha256:../../etc"})
    hexid = hand_over(sn, stack[0])
    with open(sn.incoming_path(hexid), "r+b") as f:  # damage the header
        f.seek(300)
        f.write(b"\xff\xff\xff")
    from d4c.errors import CorruptImage
    with pytest.raises(CorruptImage):
        sn.prepare("k", "", {IMAGE_LABEL: "sha256:" + hexid})
    assert sn.list() == []
