"""convert: flattening OCI layers from layouts and archives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, assert_one_line_error, run_cli
from ocibuild import M, Layout, docker_archive, tar_dir

from d4c.image.reader import Image
from d4c.image.format import format_id
from d4c.image.tree import EntryType

CAP = bytes.fromhex("0000000200040000000000000000000000000000")

LAYER1 = [
    M("./", "dir", mode=0o755, mtime=1000),
    M("bin/", "dir"),
    M("bin/sh", data=b"#!shell", mode=0o755),
    M("bin/hl", "hardlink", link="bin/sh"),
    M("etc/", "dir", mtime=1001),
    M("etc/x", data=b"old x"),
    M("etc/keep", data=b"kept"),
    M("usr/", "dir"),
    M("usr/lib/", "dir"),
    M("usr/lib/libold.so", data=b"lib"),
    M("lib", "symlink", link="usr/lib", mode=0o777),
    M("todelete/", "dir"),
    M("todelete/inner", data=b"gone"),
    M("opq/", "dir"),
    M("opq/a", data=b"a"),
    M("opq/sub/", "dir"),
    M("opq/sub/deep", data=b"deep"),
    M("setuid", data=b"su", mode=0o4755, uid=0, gid=0),
]
LAYER2 = [
    M(".wh.todelete", data=b""),
    M("opq/", "dir", mtime=2000),
    M("opq/.wh..wh..opq"),
    M("opq/c", data=b"c"),
    M("lib/newfile", data=b"through the symlink"),
    M("etc/", "dir", mtime=2001, mode=0o750),
    M("etc/x", data=b"new x", mode=0o600, uid=5, gid=6),
    M("hl2", "hardlink", link="bin/sh"),
    M(".wh..wh..plnk", "dir"),
]
LAYER3 = [
    M("caps", data=b"cap", pax={"SCHILY.xattr.security.capability": CAP.decode("latin-1"),
                                "SCHILY.xattr.user.note": "hi"}),
    M("precise", data=b"p", pax={"mtime": "1600000000.123456789"}),
    M("dev/", "dir"),
    M("dev/null", "char", mode=0o666, dev=(1, 3)),
    M("dev/sda", "block", mode=0o660, dev=(8, 0)),
    M("fifo", "fifo"),
    M("bin/.wh.sh"),
    M("empty", data=b""),
]


def build(tmp_path, compressions=("none", "gzip", "zstd")):  # type: ignore[no-untyped-def]
    lay = Layout(str(tmp_path / "layout"))
    # SCHILY xattr values are written as latin-1 strings; tarfile encodes pax values as utf-8,
    # so give it the surrogate-escaped form our reader turns back into the raw bytes
    LAYER3[0].pax["SCHILY.xattr.security.capability"] = CAP.decode("utf-8", "surrogateescape")
    desc = lay.image([(LAYER1, compressions[0]), (LAYER2, compressions[1]), (LAYER3, compressions[2])])
    lay.tag(desc, "v1")
    lay.save()
    return lay, desc


def convert(ref: str, out: str, *extra: str) -> str:
    code, stdout, err = run_cli("convert", "--image", ref, "--output", out, "--cdimg", *extra)
    assert code == 0, err
    return stdout.strip()


def test_flatten_rules(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lay, _ = build(tmp_path)
    image_id = convert(f"oci:{lay.path}:v1", str(tmp_path / "out"))
    with Image(str(tmp_path / "out" / "image.cdimg")) as image:
        paths = {e.path for e in image.entries}
        get = image.lookup
        assert format_id(image.info.image_id) == image_id
        # whiteouts
        assert b"todelete" not in paths and b"todelete/inner" not in paths
        assert b"bin/sh" not in paths
        # opaque dir: lower children gone, this layer's kept
        assert b"opq/a" not in paths and b"opq/sub" not in paths and b"opq/c" in paths
        assert get(b"opq").mtime_ns == 2000 * 10**9
        # dir re-declared: metadata updated, children kept
        assert get(b"etc").mode == 0o750 and b"etc/keep" in paths
        x = get(b"etc/x")
        assert image.read_body(x) == b"new x" and (x.uid, x.gid, x.mode) == (5, 6, 0o600)
        # through a symlinked parent
        assert b"usr/lib/newfile" in paths and get(b"lib").type == EntryType.SYMLINK
        # hard links across layers outlive the removed original
        hl, hl2 = get(b"bin/hl"), get(b"hl2")
        assert {hl.type, hl2.type} == {EntryType.FILE, EntryType.HARDLINK}
        primary = hl if hl.type == EntryType.FILE else hl2
        assert image.read_body(primary) == b"#!shell"
        # metadata
        assert get(b"caps").xattrs == {b"security.capability": CAP, b"user.note": b"hi"}
        assert get(b"precise").mtime_ns == 1_600_000_000_123_456_789
        assert get(b"setuid").mode == 0o4755
        assert get(b"dev/null").type == EntryType.CHARDEV and get(b"dev/null").rdev == (1, 3)
        assert get(b"dev/sda").type == EntryType.BLOCKDEV
        assert get(b"fifo").type == EntryType.FIFO
        assert get(b"empty").size == 0
        assert b".wh..wh..plnk" not in paths
        assert get(b"").mtime_ns == 1000 * 10**9
        cfg = image.info.config
        assert cfg["rootfs"]["diff_ids"] == [image_id] and cfg["config"]["Cmd"] == ["/bin/sh"]
    with open(tmp_path / "out" / "config.json") as f:
        assert len(json.load(f)["rootfs"]["diff_ids"]) == 3


def test_same_id_from_every_transport(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lay, desc = build(tmp_path)
    ids = {convert(f"oci:{lay.path}:v1", str(tmp_path / "o1"), "--threadNum", "1")}
    ids.add(convert(f"oci:{lay.path}", str(tmp_path / "o2"), "--threadNum", "4"))
    ids.add(convert(lay.path, str(tmp_path / "o2b")))
    tar_dir(lay.path, str(tmp_path / "img.tar"))
    ids.add(convert(f"oci-archive:{tmp_path / 'img.tar'}:v1", str(tmp_path / "o3")))
    ids.add(convert(str(tmp_path / "img.tar"), str(tmp_path / "o3b")))
    docker_archive(lay.path, desc["digest"], str(tmp_path / "docker.tar"), "example/img:v1")
    ids.add(convert(f"docker-archive:{tmp_path / 'docker.tar'}", str(tmp_path / "o4")))
    assert len(ids) == 1
    with open(tmp_path / "o1" / "image.cdimg", "rb") as a, open(tmp_path / "o4" / "image.cdimg", "rb") as b:
        assert a.read() == b.read()
    # other compressions of the same layers: same tree, same id
    lay2, _ = build(tmp_path / "z", ("zstd", "none", "gzip"))
    assert convert(f"oci:{lay2.path}:v1", str(tmp_path / "o5")) in ids


def test_dimg_and_excludes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lay, _ = build(tmp_path)
    convert(f"oci:{lay.path}:v1", str(tmp_path / "o"), "--dimg", "--excludes", "etc/keep,/dev", "--excludes", "caps")
    assert sorted(os.listdir(tmp_path / "o")) == ["config.json", "image.cdimg", "image.dimg"]
    with Image(str(tmp_path / "o" / "image.dimg")) as image:
        paths = {e.path for e in image.entries}
    assert b"etc/keep" not in paths and b"dev" not in paths and b"dev/null" not in paths and b"caps" not in paths
    assert b"etc/x" in paths


def test_platform_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lay = Layout(str(tmp_path / "layout"))
    amd = lay.image([([M("amd", data=b"1")], "gzip")], arch="amd64")
    arm = lay.image([([M("arm", data=b"2")], "gzip")], arch="arm64")
    lay.tag_index([amd, arm], "multi")
    lay.save()
    for arch in ("amd64", "arm64"):
        convert(f"oci:{lay.path}:multi", str(tmp_path / arch), "--arch", arch)
        with Image(str(tmp_path / arch / "image.cdimg")) as image:
            assert {e.path for e in image.entries} == {b"", arch[:3].encode()}
            assert image.info.config["architecture"] == arch
    code, _, err = run_cli("convert", "--image", f"oci:{lay.path}:multi", "--output", str(tmp_path / "x"),
                           "--arch", "s390x")
    assert_one_line_error(code, err)
    assert "no image for platform linux/s390x" in err


def _fails(tmp_path, ref: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "fail-out"
    code, _, err = run_cli("convert", "--image", ref, "--output", str(out))
    assert_one_line_error(code, err)
    assert needle in err, err
    leftovers = [n for n in os.listdir(out)] if out.exists() else []
    assert not [n for n in leftovers if n.endswith("cdimg") or n.endswith(".tmp")], leftovers


def test_bad_images(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lay, desc = build(tmp_path)
    _fails(tmp_path, f"oci:{lay.path}:nosuchtag", "no tag 'nosuchtag'")
    _fails(tmp_path, f"oci:{tmp_path / 'missing'}", "no such OCI layout directory")
    os.makedirs(tmp_path / "empty-layout")
    _fails(tmp_path, f"oci:{tmp_path / 'empty-layout'}", "missing index.json")
    # tamper with a layer blob: digest check
    manifest = json.load(open(os.path.join(lay.path, "blobs", "sha256", desc["digest"][7:])))
    blob = os.path.join(lay.path, "blobs", "sha256", manifest["layers"][0]["digest"][7:])
    data = bytearray(open(blob, "rb").read())
    data[-1] ^= 1  # trailing padding of a plain tar: the tree is unchanged, only the digest says so
    open(blob, "wb").write(bytes(data))
    _fails(tmp_path, f"oci:{lay.path}:v1", "does not match its digest")


def test_hostile_layers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cases = [
        ([M("../escape", data=b"x")], "climbs out of the root"),
        ([M("a", "symlink", link="../../etc")], "escapes the image root"),
        ([M("h", "hardlink", link="nothere")], "hard link target"),
        ([M("d/", "dir"), M("h", "hardlink", link="d")], "hard link to a directory"),
        ([M("f", data=b"x"), M("f/g", data=b"y")], "parent is not a directory"),
    ]
    for i, (members, needle) in enumerate(cases):
        lay = Layout(str(tmp_path / f"l{i}"))
        lay.tag(lay.image([(members, "gzip")]), "t")
        lay.save()
        _fails(tmp_path, f"oci:{lay.path}:t", needle)
    # truncated gzip layer
    lay = Layout(str(tmp_path / "trunc"))
    desc = lay.image([([M("f", data=os.urandom(50000))], "gzip")])
    lay.tag(desc, "t")
    lay.save()
    manifest = json.load(open(os.path.join(lay.path, "blobs", "sha256", desc["digest"][7:])))
    blob = os.path.join(lay.path, "blobs", "sha256", manifest["layers"][0]["digest"][7:])
    data = open(blob, "rb").read()
    open(blob, "wb").write(data[: len(data) // 2])
    _fails(tmp_path, f"oci:{lay.path}:t", "damaged layer")


def test_unsupported_media_type(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lay = Layout(str(tmp_path / "l"))
    desc = lay.image([([M("f", data=b"x")], "none")])
    mpath = os.path.join(lay.path, "blobs", "sha256", desc["digest"][7:])
    manifest = json.load(open(mpath))
    manifest["layers"][0]["mediaType"] = "application/vnd.example.weird"
    data = json.dumps(manifest).encode()
    new = dict(desc, digest=lay.blob(data), size=len(data))
    lay.tag(new, "t")
    lay.save()
    _fails(tmp_path, f"oci:{lay.path}:t", "unsupported layer media type")


@pytest.mark.parametrize("ref", ["nginx:1.23.1", "docker://nginx:1.23.1"])
def test_unreachable_registry(tmp_path, ref: str) -> None:  # type: ignore[no-untyped-def]
    """No internet here: a clear one-line error, at once (no retries on a name
    that does not resolve), and no output left."""
    _fails(tmp_path, ref, "cannot reach the registry")


def test_review_regressions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Cases a review found: each gives one line and the right result."""
    # a whiteout of a name that itself starts with "wh."
    lay = Layout(str(tmp_path / "wh"))
    lay.tag(lay.image([([M("wh.foo", data=b"x"), M("keep", data=b"k")], "none"),
                       ([M(".wh.wh.foo")], "none")]), "t")
    lay.save()
    convert(f"oci:{lay.path}:t", str(tmp_path / "o1"))
    with Image(str(tmp_path / "o1" / "image.cdimg")) as image:
        assert {e.path for e in image.entries} == {b"", b"keep"}
    # symlink targets are judged where the link lands, through symlinked parents
    lay = Layout(str(tmp_path / "sym"))
    lay.tag(lay.image([([M("usr/", "dir"), M("usr/lib/", "dir"), M("bin/", "dir"),
                         M("lib", "symlink", link="usr/lib"),
                         M("lib/foo", "symlink", link="../../bin/x")], "none")]), "t")
    lay.save()
    convert(f"oci:{lay.path}:t", str(tmp_path / "o2"))
    lay = Layout(str(tmp_path / "sym2"))
    lay.tag(lay.image([([M("s", "symlink", link="."), M("s/s/s/x", "symlink", link="../../../etc")],
                        "none")]), "t")
    lay.save()
    _fails(tmp_path, f"oci:{lay.path}:t", "escapes the image root")
    # out-of-range metadata and absurd mtimes
    for i, member in enumerate([M("f", data=b"x", pax={"mtime": "inf"}), M("f", data=b"x", uid=-1)]):
        lay = Layout(str(tmp_path / f"meta{i}"))
        lay.tag(lay.image([([member], "none")]), "t")
        lay.save()
        _fails(tmp_path, f"oci:{lay.path}:t", "layer entry 'f'")
    # JSON of the wrong shape or depth
    for i, index in enumerate(['{"manifests": ["x"]}', "[" * 100000 + "]" * 100000,
                               '{"manifests": [{"digest": 5}]}']):
        d = tmp_path / f"json{i}"
        d.mkdir()
        (d / "index.json").write_text(index)
        _fails(tmp_path, f"oci:{d}", "ctr-cli")


def test_a_layer_blob_that_is_not_a_regular_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A FIFO (convert hung forever in open) or a link to /dev/zero (it read without
    end) as a layer blob: a one-line 'not a regular file', exit 3, and no output."""
    for i, make in enumerate((lambda p: os.mkfifo(p), lambda p: os.symlink("/dev/zero", p))):
        lay = Layout(str(tmp_path / f"l{i}"))
        desc = lay.image([([M("f", data=b"x" * 1000)], "gzip")])
        lay.tag(desc, "t")
        lay.save()
        manifest = json.load(open(os.path.join(lay.path, "blobs", "sha256", desc["digest"][7:])))
        blob = os.path.join(lay.path, "blobs", "sha256", manifest["layers"][0]["digest"][7:])
        os.unlink(blob)
        make(blob)
        out = str(tmp_path / f"out{i}")
        p = subprocess.run([sys.executable, "-m", "d4c", "convert", "--image", f"oci:{lay.path}:t", "--output", out,
                            "-q"], capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
        assert_one_line_error(p.returncode, p.stderr, 3)
        assert "is not a regular file" in p.stderr
        assert not os.path.exists(out)
