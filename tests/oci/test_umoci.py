"""A real image built with umoci and busybox-static converts to exactly what `umoci unpack` gives."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess

from conftest import HAS_BUSYBOX, HAS_SKOPEO, HAS_UMOCI
from helpers import assert_one_line_error, diff_trees, need, need_root, run_cli, snapshot_tree
from ocibuild import M, layer_tar
from test_hostile import raw_layout


def sh(*args: str, cwd: str | None = None) -> None:
    subprocess.run(list(args), check=True, cwd=cwd, capture_output=True)


def build_umoci_image(work: str) -> str:
    """Three layers: a busybox rootfs; deletions and changes (umoci's whiteouts);
    a hand-made layer with an opaque dir, a whiteout and a cross-layer hard link."""
    lay = os.path.join(work, "layout")
    sh("umoci", "init", "--layout", lay)
    sh("umoci", "new", "--image", f"{lay}:t")
    b = os.path.join(work, "bundle")
    sh("umoci", "unpack", "--image", f"{lay}:t", b)
    r = os.path.join(b, "rootfs")
    for d in ("bin", "etc", "tmp", "var/lib/app", "opq/sub", "dev"):
        os.makedirs(os.path.join(r, d), exist_ok=True)
    shutil.copy2("/bin/busybox", os.path.join(r, "bin", "busybox"))
    for applet in ("sh", "ls", "cat"):
        os.symlink("busybox", os.path.join(r, "bin", applet))
    with open(os.path.join(r, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0::/root:/bin/sh\n")
    with open(os.path.join(r, "etc", "version"), "w") as f:
        f.write("v1\n")
    os.link(os.path.join(r, "etc", "version"), os.path.join(r, "etc", "version.hl"))
    os.chmod(os.path.join(r, "tmp"), 0o1777)
    su = os.path.join(r, "bin", "su")
    with open(su, "w") as f:
        f.write("su\n")
    os.chmod(su, 0o4755)
    os.setxattr(su, "security.capability", bytes.fromhex("0000000200040000000000000000000000000000"))
    os.setxattr(os.path.join(r, "etc", "passwd"), "user.k", b"v")
    os.mkfifo(os.path.join(r, "var", "fifo"))
    os.mknod(os.path.join(r, "dev", "null"), 0o20666, os.makedev(1, 3))
    for name, data in (("opq/a", "a"), ("opq/sub/d", "d"), ("var/lib/app/gone", "gone")):
        with open(os.path.join(r, name), "w") as f:
            f.write(data)
    for dirpath, dirnames, filenames in os.walk(os.path.join(r, "var", "lib", "app")):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in filenames]:
            os.chown(n, 33, 33)
    sh("umoci", "repack", "--image", f"{lay}:t", b)
    shutil.rmtree(b)
    # layer 2: umoci computes whiteouts for deletions
    sh("umoci", "unpack", "--image", f"{lay}:t", b)
    os.unlink(os.path.join(r, "etc", "version"))
    shutil.rmtree(os.path.join(r, "var", "lib", "app"))
    with open(os.path.join(r, "etc", "version2"), "w") as f:
        f.write("v2\n")
    os.chmod(os.path.join(r, "etc", "passwd"), 0o600)
    os.chown(os.path.join(r, "etc", "version.hl"), 7, 8)
    sh("umoci", "repack", "--image", f"{lay}:t", b)
    shutil.rmtree(b)
    # layer 3: opaque directory, whiteout, hard link to a lower layer's file
    tar3 = os.path.join(work, "layer3.tar")
    with open(tar3, "wb") as f:
        f.write(layer_tar([
            M("opq/", "dir", mode=0o755, mtime=1_650_000_000),
            M("opq/.wh..wh..opq"),
            M("opq/new", data=b"new\n", mtime=1_650_000_000),
            M("var/.wh.fifo"),
            M("etc/su.hl", "hardlink", link="bin/su"),
        ]))
    sh("umoci", "raw", "add-layer", "--image", f"{lay}:t", tar3)
    return lay


def test_umoci_image_converts_like_umoci_unpacks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    need_root()
    need(HAS_UMOCI and HAS_BUSYBOX, "needs umoci and busybox-static (make deps installs them)")
    lay = build_umoci_image(str(tmp_path))
    ref = str(tmp_path / "ref")
    sh("umoci", "unpack", "--image", f"{lay}:t", ref)
    code, out, err = run_cli("convert", "--image", f"oci:{lay}:t", "--output", str(tmp_path / "img"), "--cdimg")
    assert code == 0, err
    code, _, err = run_cli("unpack", "--cdimg", str(tmp_path / "img" / "image.cdimg"), "--out", str(tmp_path / "mine"))
    assert code == 0, err
    expected = snapshot_tree(os.path.join(ref, "rootfs"))
    got = snapshot_tree(str(tmp_path / "mine"))
    assert "opq/a" not in got and "opq/new" in got and "var/fifo" not in got and "var/lib/app" not in got
    assert "etc/version" not in got and got["etc/version.hl"]["uid"] == 7
    problems = diff_trees(expected, got)
    assert not problems, "\n".join(problems)


def test_umoci_image_through_skopeo_archives(tmp_path) -> None:  # type: ignore[no-untyped-def]
    need_root()
    need(HAS_UMOCI and HAS_BUSYBOX and HAS_SKOPEO, "needs umoci, busybox-static and skopeo")
    lay = build_umoci_image(str(tmp_path))
    ids = set()
    for n, ref in enumerate([f"oci:{lay}:t", f"oci-archive:{tmp_path / 'a.tar'}:t",
                             f"docker-archive:{tmp_path / 'd.tar'}"]):
        if n:
            sh("skopeo", "copy", "--quiet", f"oci:{lay}:t",
               ref if "docker" not in ref else ref + ":example/img:t")
        code, out, err = run_cli("convert", "--image", ref, "--output", str(tmp_path / f"o{n}"))
        assert code == 0, err
        ids.add(out.strip())
    assert len(ids) == 1, ids


def test_umoci_insert_layers_convert(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`umoci insert` (0.4.7) writes layers without the tar padding after the last
    member's data and without end-of-archive blocks; containerd runs such images,
    d4c refused them as 'damaged layer (unexpected end of data)'.  A layer cut
    inside a member is still refused."""
    need(HAS_UMOCI, "needs umoci")
    lay = str(tmp_path / "layout")
    sh("umoci", "init", "--layout", lay)
    sh("umoci", "new", "--image", f"{lay}:t")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "hello").write_bytes(b"hello\n")
    (src / "sub" / "odd").write_bytes(b"x" * 1001)
    sh("umoci", "insert", "--image", f"{lay}:t", str(src / "hello"), "/hello")
    sh("umoci", "insert", "--image", f"{lay}:t", str(src), "/data")
    code, _, err = run_cli("convert", "--image", f"oci:{lay}:t", "--output", str(tmp_path / "img"), "--cdimg", "-q")
    assert code == 0, err
    code, _, err = run_cli("unpack", "--cdimg", str(tmp_path / "img" / "image.cdimg"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "hello").read_bytes() == b"hello\n"
    assert (tmp_path / "out" / "data" / "sub" / "odd").read_bytes() == b"x" * 1001
    # the layers really lack what tar writers put at the end
    layers = [gzip.decompress(read_blob(lay, d["digest"])) for d in manifest(lay)["layers"]]
    assert len(layers[0]) % 512 and not layers[0].endswith(bytes(1024))
    # cut inside the last member's data, or right after its header: damaged
    for cut in (len(layers[0]) - 3, 512):
        ref = raw_layout(str(tmp_path / f"cut{cut}"), [layers[0][:cut]])
        code, _, err = run_cli("convert", "--image", ref, "--output", str(tmp_path / f"img{cut}"), "-q")
        assert_one_line_error(code, err, 3)
        assert "damaged layer (unexpected end of data)" in err


def read_blob(layout: str, digest: str) -> bytes:
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "rb") as f:
        return f.read()


def manifest(layout: str) -> dict:
    with open(os.path.join(layout, "index.json")) as f:
        desc = json.load(f)["manifests"][0]
    return json.loads(read_blob(layout, desc["digest"]))
