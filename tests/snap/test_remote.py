"""The snapshotter as containerd's remote snapshotter: layers answered from d4c
artifacts in a real registry (docker-registry), the core without containerd."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from daemons import Registry as RegistryDaemon
from helpers import run_cli
from test_publish import REPO, platform_manifest, versions_registry
from test_snap_core import FakeFS

from d4c.errors import AlreadyExists
from d4c.image.reader import Image
from d4c.oci import artifacts
from d4c.oci.registry import Registry, parse_reference
from d4c.snap.metadata import KIND_COMMITTED
from d4c.snap.remote import CRI_IMAGE_REF, CRI_MANIFEST, REF_LABEL, REMOTE_LABEL, RegistryImages
from d4c.snap.snapshotter import Snapshotter


@pytest.fixture(scope="module")
def registry(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Tags 1, 2, 3 of one app, with artifacts for 1 (full) and 2 (full + delta from 1); 3 has none."""
    reg = versions_registry(str(tmp_path_factory.mktemp("remote")))
    for tag, extra in (("1", ()), ("2", ("--from", "1"))):
        code, _, err = run_cli("-q", "publish", "--image", f"docker://{reg.host}/{REPO}:{tag}", "--plain-http",
                               "--blob-cache", "none", *extra)
        assert code == 0, err
    yield reg
    reg.stop()


def labels(reg: RegistryDaemon, tag: str, chain: str) -> dict[str, str]:
    """What CRI's pull puts on the Prepare of a layer."""
    return {REF_LABEL: chain, CRI_IMAGE_REF: f"{reg.host}/{REPO}:{tag}", CRI_MANIFEST: platform_manifest(reg, tag)}


def unpack(sn: Snapshotter, reg: RegistryDaemon, tag: str, layers: int = 2) -> list[str]:
    """containerd's unpack of an image: Prepare per layer; AlreadyExists skips it."""
    chains, parent = [], ""
    for i in range(layers):
        chain = f"sha256:{tag}{i}".ljust(71, "0")
        try:
            sn.prepare(f"extract-{i} {chain}", parent, labels(reg, tag, chain))
        except AlreadyExists:
            chains.append(chain)
            parent = chain
            continue
        return chains  # declined: containerd would unpack this layer itself
    return chains


def artifact_sizes(reg: RegistryDaemon, tag: str) -> dict[str, int]:
    r = Registry(parse_reference(f"{reg.host}/{REPO}:{tag}"), plain_http=True)
    return {a.artifact_type: a.size for a in artifacts.find_artifacts(r, platform_manifest(reg, tag))}


def test_layers_come_from_artifacts_and_the_update_is_a_delta(registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fs = FakeFS()
    sn = Snapshotter(str(tmp_path / "root"), fs, RegistryImages(frozenset({registry.host})))
    top1 = unpack(sn, registry, "1")
    assert len(top1) == 2  # both layers answered: containerd fetches none
    first, second = sn.stat(top1[0]), sn.stat(top1[1])
    assert first.kind == second.kind == KIND_COMMITTED and first.image and not second.image
    assert second.parent == top1[0] and second.labels[REMOTE_LABEL] == platform_manifest(registry, "1")
    assert first.labels[REF_LABEL] == top1[0]  # containerd adopts it by this label
    # a container of the image: overlay over the image's mount (and the empty layer above it)
    m = sn.prepare("container-1", top1[1], {})
    lower = dict(o.split("=", 1) for o in m[0].options if "=" in o)["lowerdir"].split(":")
    assert sn.fs_dir(first) in lower and fs.active[sn.fs_dir(first)]
    # the update: the device holds 1, so only the delta crosses the link
    incoming = []
    real_fetch = sn.remote.fetch  # type: ignore[union-attr]

    def watch(*args, **kwargs):  # type: ignore[no-untyped-def]
        hexid = real_fetch(*args, **kwargs)
        incoming.append(os.path.getsize(sn.incoming_path(hexid)) if hexid else 0)
        return hexid
    sn.remote.fetch = watch  # type: ignore[union-attr, method-assign]
    top2 = unpack(sn, registry, "2")
    assert len(top2) == 2
    sizes = artifact_sizes(registry, "2")
    assert incoming == [sizes[artifacts.DELTA_ARTIFACT]] and incoming[0] < sizes[artifacts.IMAGE_ARTIFACT] / 10
    image2 = sn.stat(top2[0])
    stack = fs.active[sn.fs_dir(image2)]
    assert len(stack) == 2  # the stored v1 under the delta
    with Image(stack[-1]) as top:
        assert top.is_delta and top.info.image_id.hex() == image2.image
    # preparing the same layers again: already there, nothing fetched
    assert unpack(sn, registry, "2") == top2 and len(incoming) == 1


def test_no_artifacts_means_the_layers_are_unpacked(registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sn = Snapshotter(str(tmp_path / "root"), FakeFS(), RegistryImages(frozenset({registry.host})))
    mounts = sn.prepare("extract-0 sha256:x", "", labels(registry, "3", "sha256:x"))
    assert mounts and mounts[0].type == "bind"  # an ordinary snapshot for containerd to unpack into
    assert sn.stat("extract-0 sha256:x").kind != KIND_COMMITTED


def test_a_registry_that_stalls_is_given_up_quickly(registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.extend(silent.accept()[0] for _ in range(8)), daemon=True).start()
    host = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        sn = Snapshotter(str(tmp_path / "root"), FakeFS(), RegistryImages(frozenset({host}), timeout=1.0))
        lab = labels(registry, "1", "sha256:y")
        lab[CRI_IMAGE_REF] = f"{host}/{REPO}:1"
        t = time.monotonic()
        mounts = sn.prepare("extract-0 sha256:y", "", lab)
        assert time.monotonic() - t < 5  # the bound: containerd pulls the layers instead
        assert mounts and mounts[0].type == "bind"
    finally:
        silent.close()
        for s in held:
            s.close()


def test_a_corrupt_artifact_is_refused_and_the_layers_pulled(registry, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    r = Registry(parse_reference(f"{registry.host}/{REPO}:1"), plain_http=True)
    [full] = [a for a in artifacts.find_artifacts(r, platform_manifest(registry, "1")) if not a.is_delta]
    digest, _ = artifacts.layer_of(r, full)
    blob = registry.blob_path(digest)
    saved = open(blob, "rb").read()
    damaged = bytearray(saved)
    damaged[len(damaged) // 2] ^= 0xFF
    try:
        with open(blob, "wb") as f:
            f.write(damaged)
        sn = Snapshotter(str(tmp_path / "root"), FakeFS(), RegistryImages(frozenset({registry.host})))
        with caplog.at_level("WARNING", logger="d4c.snap"):
            mounts = sn.prepare("extract-0 sha256:z", "", labels(registry, "1", "sha256:z"))
        assert mounts and mounts[0].type == "bind"
        assert any("containerd pulls the layers" in r.getMessage() for r in caplog.records)
        assert sn.list()[0].kind != KIND_COMMITTED and not os.listdir(tmp_path / "root" / "images")
    finally:
        with open(blob, "wb") as f:
            f.write(saved)


def test_an_update_over_a_layer_containerd_holds(registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An update that shares its first layer with an image unpacked earlier: containerd
    prepares only the next layer, on top of the held one.  The image's mount goes there,
    and a container sees the image's whole tree only (the held layer is shadowed)."""
    fs = FakeFS()
    sn = Snapshotter(str(tmp_path / "root"), fs, RegistryImages(frozenset({registry.host})))
    sn.prepare("extract-a", "", {})
    sn.commit("sha256:held", "extract-a", {})
    chain = "sha256:" + "2" * 64
    with pytest.raises(AlreadyExists):
        sn.prepare(f"extract-b {chain}", "sha256:held", labels(registry, "2", chain))
    image = sn.stat(chain)
    assert image.image and image.parent == "sha256:held"
    m = sn.prepare("container", chain, {})
    lower = dict(o.split("=", 1) for o in m[0].options if "=" in o)["lowerdir"].split(":")
    assert lower == [sn.fs_dir(image)]


def test_hosts_toml_mirrors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """containerd's hosts.toml: pull-capable mirrors first, in file order, then the server."""
    from d4c.snap.remote import endpoints
    d = tmp_path / "certs.d" / "registry.example.com"
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text('server = "https://registry.example.com"\n'
                                  '[host."http://10.0.0.5:5000"]\n  capabilities = ["pull", "resolve"]\n'
                                  '[host."https://push-only.example.com"]\n  capabilities = ["push"]\n'
                                  '[host."https://cache.local/v2/prefix"]\n  skip_verify = true\n')
    hosts = str(tmp_path / "certs.d")
    assert endpoints("registry.example.com", hosts) == [("10.0.0.5:5000", True, False), ("cache.local", False, True),
                                                        ("registry.example.com", False, False)]
    assert endpoints("other.example.com", hosts, frozenset({"other.example.com"})) == [
        ("other.example.com", True, False)]
    (tmp_path / "certs.d" / "_default").mkdir()
    (tmp_path / "certs.d" / "_default" / "hosts.toml").write_text("this is not toml [")
    assert endpoints("other.example.com", hosts) == [("other.example.com", False, False)]  # logged, not fatal
    assert endpoints("x.example.com", None) == [("x.example.com", False, False)]


def test_a_mirror_from_hosts_toml_is_asked(registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The image is named by a registry that does not answer; hosts.toml sends di3fs to the real one."""
    d = tmp_path / "certs.d" / "unreachable.invalid:5000"
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(f'[host."http://{registry.host}"]\n  capabilities = ["pull", "resolve"]\n')
    sn = Snapshotter(str(tmp_path / "root"), FakeFS(), RegistryImages(hosts_dir=str(tmp_path / "certs.d")))
    lab = labels(registry, "1", "sha256:m")
    lab[CRI_IMAGE_REF] = f"unreachable.invalid:5000/{REPO}:1"
    with pytest.raises(AlreadyExists):
        sn.prepare("extract-0 sha256:m", "", lab)
    assert sn.stat("sha256:m").image


def test_a_link_cut_mid_download_resumes(registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The artifact's download drops half-way: it goes on with a Range request, and
    the bytes over the link stay about one artifact."""
    from daemons import RegistryFront
    front = RegistryFront(registry.host, cut=0, cut_blob_get=True)
    try:
        sn = Snapshotter(str(tmp_path / "root"), FakeFS(), RegistryImages(frozenset({front.host}), hosts_dir=None))
        lab = labels(registry, "1", "sha256:r")
        lab[CRI_IMAGE_REF] = f"{front.host}/{REPO}:1"
        with pytest.raises(AlreadyExists):
            sn.prepare("extract-0 sha256:r", "", lab)
        assert sn.stat("sha256:r").image
        assert front.blob_gets_cut == 1
        full = artifact_sizes(registry, "1")[artifacts.IMAGE_ARTIFACT]
        assert front.served < full * 1.6 + 65536  # half again at most, not the whole twice
    finally:
        front.stop()


def test_an_interrupted_fetch_leaves_no_snapshot_and_resumes(registry, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What a snapshotter killed during a download leaves: the partial download, no
    snapshot.  After the restart, the layer's Prepare goes on from the partial file."""
    r = Registry(parse_reference(f"{registry.host}/{REPO}:1"), plain_http=True)
    [full] = [a for a in artifacts.find_artifacts(r, platform_manifest(registry, "1")) if not a.is_delta]
    digest, size = artifacts.layer_of(r, full)
    with open(registry.blob_path(digest), "rb") as f:
        blob = f.read()
    root = str(tmp_path / "root")
    sn = Snapshotter(root, FakeFS(), RegistryImages(frozenset({registry.host}), hosts_dir=None))
    hexid = full.image_id.split(":", 1)[-1]
    with open(sn.incoming_path(hexid) + ".partial", "wb") as f:
        f.write(blob[:size // 2])  # the killed run's download
    sn.meta.close()
    again = Snapshotter(root, FakeFS(), RegistryImages(frozenset({registry.host}), hosts_dir=None))
    again.restore()
    assert again.list() == []  # no half snapshot
    front_bytes = []
    real = artifacts.fetch_layer
    monkeypatch.setattr(artifacts, "fetch_layer", lambda *a, **k: front_bytes.append(real(*a, **k)) or front_bytes[-1])
    with pytest.raises(AlreadyExists):
        again.prepare("extract-0 sha256:p", "", labels(registry, "1", "sha256:p"))
    assert front_bytes == [size - size // 2]
    assert again.stat("sha256:p").image == hexid


def test_a_registry_that_stalls_on_referrers_falls_back_to_the_tag_schema(registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The referrers call gets no answer: within half the discovery budget di3fs takes
    the tag schema's index instead, and the layer still comes from the artifact."""
    from daemons import RegistryFront
    front = RegistryFront(registry.host, cut=0, stall="/referrers/")
    try:
        sn = Snapshotter(str(tmp_path / "root"), FakeFS(),
                         RegistryImages(frozenset({front.host}), timeout=2.0, hosts_dir=None))
        lab = labels(registry, "1", "sha256:s")
        lab[CRI_IMAGE_REF] = f"{front.host}/{REPO}:1"
        t = time.monotonic()
        with pytest.raises(AlreadyExists):
            sn.prepare("extract-0 sha256:s", "", lab)
        assert time.monotonic() - t < 5
        assert any("/referrers/" in p for _, p, _ in front.requests)
        assert sn.stat("sha256:s").image
    finally:
        front.stop()


def test_a_delta_server_is_asked_first_and_checked_against_the_manifest(registry, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """--delta-server: the update comes from the d4c server (tag: the image reference);
    an image the server holds under that name that is not the manifest's is refused,
    and the registry's artifacts are used instead."""
    from daemons import Server
    out = {}
    for tag in ("1", "2", "3"):
        code, _, err = run_cli("-q", "convert", "--image", f"docker://{registry.host}/{REPO}:{tag}", "--output",
                               str(tmp_path / tag), "--plain-http", "--blob-cache", "none")
        assert code == 0, err
        out[tag] = str(tmp_path / tag / "image.cdimg")
    srv = Server(str(tmp_path))
    srv.start()
    try:
        for tag, path in (("1", out["1"]), ("2", out["2"]), ("1-wrong", out["3"])):
            name = f"{registry.host}/{REPO}:{'1' if tag == '1-wrong' else tag}"
            code, _, err = run_cli("-q", "push", "--cdimg", path, "--serverHost", srv.host, "--imageTag",
                                   name if tag != "1" else f"{registry.host}/{REPO}:base")
            assert code == 0, err
        images = RegistryImages(frozenset({registry.host}), hosts_dir=None, delta_server=srv.host)
        sn = Snapshotter(str(tmp_path / "root"), FakeFS(), images)
        # tag 1 on the server is v3's image: refused by its config, taken from the registry
        with caplog.at_level("INFO", logger="d4c.snap"):
            with pytest.raises(AlreadyExists):
                sn.prepare("extract-0 sha256:a", "", labels(registry, "1", "sha256:a"))
        assert any("is not the image of manifest" in r.getMessage() for r in caplog.records)
        assert any("fetched the full image" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level("INFO", logger="d4c.snap"):
            with pytest.raises(AlreadyExists):
                sn.prepare("extract-1 sha256:b", "", labels(registry, "2", "sha256:b"))
        assert any("from the d4c server" in r.getMessage() for r in caplog.records), caplog.text
        with Image(out["2"]) as v2:
            assert sn.stat("sha256:b").image == v2.info.image_id.hex()
    finally:
        srv.stop()


def test_a_delta_server_that_wants_a_read_token_gets_it(registry, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """--delta-server-token-file: without the token the server answers 401 and the
    registry is asked instead; with it the update comes from the server."""
    from daemons import Server
    from d4c.snap.remote import DeltaServerAuth
    push_token, read_token = "push-token-0123456789abcdef", "read-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"push {push_token}\nread {read_token}\n")
    pusher = tmp_path / "push.token"
    pusher.write_text(push_token + "\n")
    code, _, err = run_cli("-q", "convert", "--image", f"docker://{registry.host}/{REPO}:2", "--output",
                           str(tmp_path / "2"), "--plain-http", "--blob-cache", "none")
    assert code == 0, err
    srv = Server(str(tmp_path), extra=("--auth-tokens", str(tokens)))
    srv.start()
    try:
        code, _, err = run_cli("-q", "push", "--cdimg", str(tmp_path / "2" / "image.cdimg"), "--serverHost", srv.host,
                               "--imageTag", f"{registry.host}/{REPO}:2", "--token-file", str(pusher))
        assert code == 0, err
        for n, auth in enumerate((DeltaServerAuth(), DeltaServerAuth(token=read_token))):
            images = RegistryImages(frozenset({registry.host}), hosts_dir=None, delta_server=srv.host,
                                    delta_auth=auth)
            sn = Snapshotter(str(tmp_path / f"root{n}"), FakeFS(), images)
            caplog.clear()
            with caplog.at_level("INFO", logger="d4c.snap"):
                with pytest.raises(AlreadyExists):
                    sn.prepare("extract-0 sha256:b", "", labels(registry, "2", "sha256:b"))
            from_server = any("fetched the update" in r.getMessage() for r in caplog.records)
            assert from_server == bool(auth.token), caplog.text
            if not auth.token:
                assert any("token" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        srv.stop()
