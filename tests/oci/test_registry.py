"""convert from an OCI registry and from containerd's image store (real daemons)."""

from __future__ import annotations

import os
import random
import time

import pytest

from conftest import IS_ROOT
from daemons import Containerd, CuttingProxy, Registry, RegistryFront, have_containerd
from helpers import ROOT, assert_one_line_error, need, run_cli
from ocibuild import M, Layout, tar_dir

from d4c.image.reader import Image


def convert(ref: str, out: str, *extra: str) -> tuple[int, str, str]:
    return run_cli("convert", "--image", ref, "--output", out, "-q", *extra)


@pytest.fixture(scope="module")
def app(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A layout with one tag: an index of two platforms, each image with a gzip
    and a zstd layer (plus an uncompressed one); and the id convert gives it."""
    import shutil
    need(shutil.which("docker-registry") is not None and shutil.which("skopeo") is not None,
         "docker-registry and skopeo are not installed")
    tmp = tmp_path_factory.mktemp("app")
    lay = Layout(str(tmp / "layout"))
    big = random.Random(3).randbytes(300_000)
    descs = []
    for arch in ("amd64", "arm64"):
        layers = [([M("./", "dir"), M("bin/", "dir"), M(f"bin/app-{arch}", data=big, mode=0o755)], "gzip"),
                  ([M("etc/", "dir"), M("etc/conf", data=b"conf\n"), M("bin/.wh.gone")], "zstd"),
                  ([M("etc/extra", data=b"x" * 5000)], "none")]
        descs.append(lay.image(layers, arch=arch))
    lay.tag_index(descs, "v1")
    lay.save()
    code, out, err = convert(f"oci:{lay.path}:v1", str(tmp / "direct"), "--arch", "amd64")
    assert code == 0, err
    with Image(str(tmp / "direct" / "image.cdimg")) as image:
        image_id = image.info.image_id
    return lay.path, image_id


@pytest.fixture(scope="module")
def registry(tmp_path_factory):  # type: ignore[no-untyped-def]
    reg = Registry(str(tmp_path_factory.mktemp("registry")))
    reg.start()
    yield reg
    reg.stop()


def converted_id(out: str) -> bytes:
    with Image(os.path.join(out, "image.cdimg")) as image:
        return image.info.image_id


def test_registry_gives_the_same_image(app, registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout, want = app
    ref = registry.push(layout, "v1", "d4c/app")
    cache = str(tmp_path / "cache")
    code, _, err = convert(ref, str(tmp_path / "a"), "--plain-http", "--arch", "amd64", "--blob-cache", cache)
    assert code == 0, err
    assert converted_id(str(tmp_path / "a")) == want
    cached = sorted(os.listdir(os.path.join(cache, "sha256")))
    assert len(cached) == 4  # the amd64 config and its three layers
    # the next conversion reads the cache: the registry may even be gone
    registry.stop()
    try:
        code, _, err = convert(ref, str(tmp_path / "b"), "--plain-http", "--arch", "amd64", "--blob-cache", cache)
        assert code != 0 and "cannot reach the registry" in err  # manifests are not cached
    finally:
        registry.start()
    code, _, err = convert(ref, str(tmp_path / "b"), "--plain-http", "--arch", "amd64", "--blob-cache", cache)
    assert code == 0, err
    assert converted_id(str(tmp_path / "b")) == want
    # by digest, and the other platform
    code, _, err = convert(ref + "", str(tmp_path / "c"), "--plain-http", "--arch", "arm64", "--blob-cache", "none")
    assert code == 0, err
    assert converted_id(str(tmp_path / "c")) != want


def test_token_auth_and_resume(app, registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout, want = app
    registry.push(layout, "v1", "d4c/app")
    proxy = RegistryFront(registry.host, cut=0, cut_blob_get=True, login=("alice", "s3cret"))
    try:
        ref = f"docker://{proxy.host}/d4c/app:v1"
        out = str(tmp_path / "ok")
        code, _, err = convert(ref, out, "--plain-http", "--arch", "amd64", "--user", "alice:s3cret",
                               "--blob-cache", "none")
        assert code == 0, err
        assert converted_id(out) == want
        assert proxy.blob_gets_cut == 1 and proxy.ranges  # a blob was cut half-way and resumed with Range
        # credentials from a docker config file (as `docker login` / `skopeo login` leave them)
        import base64
        import json
        cfg = tmp_path / "docker"
        cfg.mkdir()
        (cfg / "config.json").write_text(json.dumps({"auths": {proxy.host: {
            "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        os.environ["DOCKER_CONFIG"] = str(cfg)
        try:
            code, _, err = convert(ref, str(tmp_path / "cfg"), "--plain-http", "--arch", "amd64",
                                   "--blob-cache", "none")
        finally:
            del os.environ["DOCKER_CONFIG"]
        assert code == 0, err
        assert converted_id(str(tmp_path / "cfg")) == want
        # a wrong password: one line, nothing left behind
        out = str(tmp_path / "bad")
        code, _, err = convert(ref, out, "--plain-http", "--arch", "amd64", "--user", "alice:wrong")
        assert_one_line_error(code, err)
        assert "refused the credentials" in err and not os.path.exists(out)
        code, _, err = convert(ref, out, "--plain-http", "--arch", "amd64", "--blob-cache", "none")
        assert_one_line_error(code, err)
        assert not os.path.exists(out)
    finally:
        proxy.stop()


def test_one_connection_for_a_pull_and_a_new_one_after_a_close(app, registry) -> None:  # type: ignore[no-untyped-def]
    """GETs and HEADs share one kept-alive connection (a round trip less each on a
    thin link); a connection the server closed while idle is replaced, not an error."""
    import json
    from d4c.oci.registry import NotFound, Registry as Client, parse_reference
    layout, _ = app
    registry.push(layout, "v1", "d4c/keep")
    proxy = CuttingProxy(registry.host)
    try:
        client = Client(parse_reference(f"{proxy.host}/d4c/keep:v1"), plain_http=True, retries=0)
        _, index = client.manifest("v1")
        digest = json.loads(index)["manifests"][0]["digest"]
        _, manifest = client.manifest(digest)
        config = client.blob(json.loads(manifest)["config"]["digest"])
        assert json.loads(config)["architecture"] in ("amd64", "arm64")
        with pytest.raises(NotFound):
            client.manifest("no-such-tag")  # an error answer read to its end keeps the connection too
        assert client.has_manifest("v1")
        assert proxy.connections == 1, proxy.connections
        proxy.close_connections()
        time.sleep(0.2)
        assert client.manifest("v1")[1] == index  # retried on a new connection, with retries=0
        assert proxy.connections == 2
        client.close()
    finally:
        proxy.stop()


def test_token_login_needs_no_retries(app, registry) -> None:  # type: ignore[no-untyped-def]
    """Answering a 401 with a token is not a retry: the snapshotter's discovery
    (retries=0) works against a registry with token auth."""
    from d4c.oci.registry import Registry as Client, parse_reference
    layout, _ = app
    registry.push(layout, "v1", "d4c/app")
    front = RegistryFront(registry.host, cut=0, login=("alice", "s3cret"))
    try:
        client = Client(parse_reference(f"{front.host}/d4c/app:v1"), plain_http=True, retries=0,
                        credentials=("alice", "s3cret"))
        media, _ = client.manifest("v1")
        assert media == "application/vnd.oci.image.index.v1+json"
        assert front.refused == 1  # the first request, before the login
    finally:
        front.stop()


def test_registry_bad_cases(app, registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    layout, _ = app
    ref = registry.push(layout, "v1", "d4c/tampered")
    out = str(tmp_path / "o")
    # unknown tag
    code, _, err = convert(ref.replace(":v1", ":nope"), out, "--plain-http")
    assert_one_line_error(code, err, 4)
    assert not os.path.exists(out)
    # blobs whose bytes do not match their digest (the registry's storage altered):
    # the big layer of each platform
    layers = []
    for dirpath, _, names in os.walk(registry.root):
        for path in (os.path.join(dirpath, n) for n in names if n == "data"):
            if os.path.getsize(path) > 100_000:
                layers.append("sha256:" + os.path.basename(os.path.dirname(path)))
                data = bytearray(open(path, "rb").read())
                data[len(data) // 2] ^= 0x01
                open(path, "wb").write(bytes(data))
    assert len(layers) == 2
    code, _, err = convert(ref, out, "--plain-http", "--arch", "amd64", "--blob-cache", "none")
    assert_one_line_error(code, err, 3)
    assert not os.path.exists(out)
    # the cache never keeps such a blob
    cache = str(tmp_path / "cache")
    code, _, err = convert(ref, out, "--plain-http", "--arch", "amd64", "--blob-cache", cache)
    assert_one_line_error(code, err, 3)
    assert "does not match its digest" in err
    assert not any(os.path.exists(os.path.join(cache, "sha256", d[7:])) for d in layers)
    assert not os.path.exists(out)


def private_containerd(app, tmp_path) -> tuple[Containerd, str, bytes]:  # type: ignore[no-untyped-def]
    """A started private containerd (no snapshotter), the app layout as an archive to import, its id."""
    need(IS_ROOT, "containerd needs root")
    missing = have_containerd()
    need(missing is None, missing or "")
    layout, want = app
    base = str(tmp_path / "d")
    os.makedirs(os.path.join(base, "run"))
    archive = str(tmp_path / "app.tar")
    tar_dir(layout, archive)
    ctrd = Containerd(base, os.path.join(base, "run", "none.sock"))
    ctrd.start()
    return ctrd, archive, want


def test_containerd_store_gives_the_same_image(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctrd, archive, want = private_containerd(app, tmp_path)
    try:
        ctrd.ctr("images", "import", "--all-platforms", "--no-unpack", "--base-name", "d4c.test/app", archive)
        name = ctrd.ctr("images", "ls", "-q").stdout.split()[0]
        out = str(tmp_path / "o")
        code, _, err = convert(f"containerd:{name}", out, "--address", ctrd.socket, "--namespace", ctrd.namespace,
                               "--arch", "amd64")
        assert code == 0, err
        assert converted_id(out) == want
        # a plain name is looked up in containerd first
        code, _, err = convert(name, str(tmp_path / "o2"), "--address", ctrd.socket,
                               "--namespace", ctrd.namespace, "--arch", "amd64")
        assert code == 0, err
        assert converted_id(str(tmp_path / "o2")) == want
        code, _, err = convert("containerd:d4c.test/none:1", str(tmp_path / "o3"), "--address", ctrd.socket,
                               "--namespace", ctrd.namespace)
        assert_one_line_error(code, err, 4)
    finally:
        ctrd.stop()


def test_registry_unsupported_media_type(app, registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A manifest whose layer has a media type we do not read: refused by name."""
    import http.client
    import json
    layout, _ = app
    registry.push(layout, "v1", "d4c/weird")
    accept = ("application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json,"
              "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json")
    conn = http.client.HTTPConnection(registry.host)

    def get(ref: str) -> dict:  # type: ignore[type-arg]
        conn.request("GET", f"/v2/d4c/weird/manifests/{ref}", headers={"Accept": accept})
        return json.loads(conn.getresponse().read())  # as the registry holds it (skopeo may re-encode)

    amd = next(m for m in get("v1")["manifests"] if m["platform"]["architecture"] == "amd64")
    stored = get(amd["digest"])
    stored["layers"][0]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4"
    stored["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    body = json.dumps(stored).encode()
    conn.request("PUT", "/v2/d4c/weird/manifests/lz4", body=body,
                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    resp = conn.getresponse()
    assert resp.status == 201, resp.read()
    conn.close()
    out = str(tmp_path / "o")
    code, _, err = convert(f"docker://{registry.host}/d4c/weird:lz4", out, "--plain-http", "--blob-cache", "none")
    assert_one_line_error(code, err, 6)
    assert "unsupported layer media type" in err and not os.path.exists(out)


def test_original_readme_convert_of_a_short_name(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`ctr-cli convert --image nginx:1.23.1 --output ./images/nginx-1.23.1 --cdimg`, exactly as the
    original README writes it, finds the image that `ctr images import` stored as
    docker.io/library/nginx:1.23.1 (containerd reached through CONTAINERD_ADDRESS, as ctr does)."""
    import subprocess
    import sys

    from helpers import binary
    ctrd, archive, want = private_containerd(app, tmp_path)
    try:
        ctrd.ctr("images", "import", "--all-platforms", "--no-unpack", "--index-name",
                 "docker.io/library/nginx:1.23.1", archive)
        names = ctrd.ctr("images", "ls", "-q").stdout.split()
        assert "docker.io/library/nginx:1.23.1" in names and "nginx:1.23.1" not in names
        cli = binary("ctr-cli")
        cmd = [cli] if cli else [sys.executable, "-m", "d4c"]
        env = {"PATH": os.environ["PATH"], "CONTAINERD_ADDRESS": ctrd.socket, "CONTAINERD_NAMESPACE": ctrd.namespace,
               "PYTHONPATH": os.path.join(ROOT, "src")}
        os.makedirs(tmp_path / "images")
        readme = ["convert", "--image", "nginx:1.23.1", "--output", "./images/nginx-1.23.1", "--cdimg"]
        p = subprocess.run(cmd + readme, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert converted_id(str(tmp_path / "images" / "nginx-1.23.1")) == want
        # a name in neither place says what was tried in containerd, then the registry's answer
        p = subprocess.run(cmd + ["convert", "--image", "nginx:9.9", "--output", "./images/none", "-q"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert f"not in containerd at {ctrd.socket}, namespace '{ctrd.namespace}'" in p.stderr
        assert "docker.io/library/nginx:9.9" in p.stderr and "registry:" in p.stderr
        assert not os.path.exists(tmp_path / "images" / "none")
    finally:
        ctrd.stop()
