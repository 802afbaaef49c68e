"""containerd's CRI pulls an image into di3fs, and di3fs answers with the d4c
artifacts `publish` put beside it in the registry: the update crosses the link
as a delta (a real containerd 1.6 with the CRI plugin, the real snapshotter, a
real registry behind a counting front, runc)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from conftest import IS_ROOT
from daemons import Containerd, Registry as RegistryDaemon, RegistryFront, have_containerd, mounts_below
from helpers import binary, need, run_cli
from ocibuild import Layout
from test_snapshotter import BUSYBOX, busybox_versions, running

from d4c.oci import artifacts
from d4c.oci.registry import Registry, parse_reference

REPO = "d4c/app"


def cri_device(tmp_path, registry_host: str):  # type: ignore[no-untyped-def]
    """The device: di3fs (fetching from `registry_host` over HTTP) under a containerd with CRI."""
    base = str(tmp_path / "d")
    os.makedirs(os.path.join(base, "run"))
    return running(base, binary("snapshotter"), ("--plain-http-registry", registry_host), (registry_host,))


def cri_images(ctrd: Containerd):  # type: ignore[no-untyped-def]
    import grpc
    import cri_images_pb2_grpc
    channel = grpc.insecure_channel(f"unix://{ctrd.socket}")
    return channel, cri_images_pb2_grpc.ImageServiceStub(channel)


def pull(stub, ref: str) -> str:  # type: ignore[no-untyped-def]
    import cri_images_pb2 as pb
    return stub.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=180).image_ref


@pytest.fixture()
def published(tmp_path):  # type: ignore[no-untyped-def]
    need(IS_ROOT, "containerd, runc and FUSE mounts need root")
    missing = have_containerd()
    need(missing is None, missing or "")
    need(shutil.which("docker-registry") is not None and shutil.which("skopeo") is not None,
         "docker-registry and skopeo are not installed")
    need(os.path.exists(BUSYBOX), "busybox-static is not installed")
    reg = RegistryDaemon(str(tmp_path))
    reg.start()
    lay = Layout(str(tmp_path / "layout"))
    for n, layers in enumerate(busybox_versions()[:2], 1):
        lay.tag(lay.image([(m, "gzip") for m in layers], config_extra={
            "config": {"Cmd": ["/bin/cat", "/etc/version"], "Env": ["PATH=/bin"]}}), str(n))
    lay.save()
    for tag in ("1", "2"):
        reg.push(lay.path, tag, REPO)
    front = RegistryFront(reg.host, cut=0)
    try:
        yield reg, front
    finally:
        front.stop()
        reg.stop()


def delta_size(host: str, tag: str) -> int:
    r = Registry(parse_reference(f"{host}/{REPO}:{tag}"), plain_http=True)
    _, data = r.manifest(tag)
    from d4c.digests import sha256
    found = artifacts.find_artifacts(r, "sha256:" + sha256(data).hexdigest())
    return min(a.size for a in found if a.is_delta)


def publish_versions(host: str) -> None:
    """`ctr-cli publish` of REPO:1, then of REPO:2 with its delta from 1."""
    for tag, extra in (("1", ()), ("2", ("--from", "1"))):
        code, _, err = run_cli("-q", "publish", "--image", f"docker://{host}/{REPO}:{tag}", "--plain-http",
                               "--blob-cache", "none", *extra)
        assert code == 0, err


def pull_1_then_2(ctrd, snap, front) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """CRI pulls of REPO:1 (taken as the full d4c image) then REPO:2: (bytes the
    registry served for 2, the snapshotter's log)."""
    channel, stub = cri_images(ctrd)
    try:
        pull(stub, f"{front.host}/{REPO}:1")
        assert "fetched the full image" in snap.logs(), snap.logs()[-2000:]
        before = front.served
        pull(stub, f"{front.host}/{REPO}:2")
        return front.served - before, snap.logs()
    finally:
        channel.close()


def test_cri_pull_takes_the_delta_from_the_registry(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, front = published
    publish_versions(reg.host)
    with cri_device(tmp_path, front.host) as (ctrd, snap):
        update, logs = pull_1_then_2(ctrd, snap, front)
        assert "fetched the delta from" in logs, logs[-2000:]
        delta = delta_size(reg.host, "2")
        # the delta, the manifests, the config and the referrers index: no layer crossed the link
        print(f"CRI update pull: {update} bytes served, the delta is {delta} bytes")
        assert update <= 1.1 * delta + 64 * 1024, (update, delta)
        out = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", f"{front.host}/{REPO}:2", "cri-app-2").stdout
        assert out.strip() == "v2"
        # removing the images through CRI lets containerd's GC free every snapshot, mount and stored image
        channel, stub = cri_images(ctrd)
        try:
            import cri_images_pb2 as pb
            for tag in ("2", "1"):
                stub.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=f"{front.host}/{REPO}:{tag}")),
                                 timeout=60)
        finally:
            channel.close()
        for _ in range(100):
            listed = ctrd.ctr("snapshots", "--snapshotter", "di3fs", "ls").stdout.splitlines()[1:]
            if not listed and not os.listdir(os.path.join(snap.root, "images")):
                break
            time.sleep(0.3)
        assert listed == [] and os.listdir(os.path.join(snap.root, "images")) == []
        assert not mounts_below(snap.root)


def test_cri_pull_of_an_image_without_artifacts_unpacks_its_layers(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, front = published
    with cri_device(tmp_path, front.host) as (ctrd, snap):
        channel, stub = cri_images(ctrd)
        try:
            pull(stub, f"{front.host}/{REPO}:1")
        finally:
            channel.close()
        assert "no d4c artifact for" in snap.logs()
        out = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", f"{front.host}/{REPO}:1", "cri-app-1").stdout
        assert out.strip() == "v1"


def test_ctr_pull_passes_no_labels_and_unpacks_layers(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What the README says of `ctr images pull --snapshotter di3fs` (containerd 1.6): it
    adds no CRI labels, so di3fs is not asked for artifacts and the layers are unpacked."""
    reg, front = published
    code, _, err = run_cli("-q", "publish", "--image", f"docker://{reg.host}/{REPO}:1", "--plain-http",
                           "--blob-cache", "none")
    assert code == 0, err
    with cri_device(tmp_path, front.host) as (ctrd, snap):
        ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "di3fs", f"{front.host}/{REPO}:1")
        assert "fetched" not in snap.logs() and "no d4c artifact" not in snap.logs()
        out = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", f"{front.host}/{REPO}:1", "ctr-app-1").stdout
        assert out.strip() == "v1"


def test_ctr_cli_pull_from_the_registry_loads_and_runs(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`ctr-cli pull --image docker://…` (no d4c server, no CRI): the full image, then the
    update as a delta from it, loaded into containerd and run."""
    reg, front = published
    publish_versions(reg.host)
    with cri_device(tmp_path, front.host) as (ctrd, snap):
        for tag, kind in (("1", "full image"), ("2", "delta from")):
            code, out, err = run_cli("pull", "--image", f"docker://{front.host}/{REPO}:{tag}", "--plain-http",
                                     "--address", ctrd.socket, "--namespace", ctrd.namespace,
                                     "--snapshotter-root", snap.root)
            assert code == 0, err
            assert kind in out, out
            run = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", f"{front.host}/{REPO}:{tag}", f"cli-app-{tag}")
            assert run.stdout.strip() == f"v{tag}"


def test_a_snapshotter_killed_during_a_cri_pull_leaves_no_half_snapshot(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of di3fs while it downloads the artifact: that pull fails, nothing half-made
    is left in either store, and the pull after the restart gives a running image."""
    import threading

    import grpc
    from test_snapshotter import wait_redial
    reg, front = published
    code, _, err = run_cli("-q", "publish", "--image", f"docker://{reg.host}/{REPO}:1", "--plain-http",
                           "--blob-cache", "none")
    assert code == 0, err
    r = Registry(parse_reference(f"{reg.host}/{REPO}:1"), plain_http=True)
    [full] = [a for a in artifacts.find_artifacts(r, platform_manifest_digest(r, "1")) if not a.is_delta]
    layer, _ = artifacts.layer_of(r, full)
    front.stall = layer  # the artifact's download hangs until the front lets go
    with cri_device(tmp_path, front.host) as (ctrd, snap):
        channel, stub = cri_images(ctrd)
        failed: list[BaseException] = []

        def first_pull() -> None:
            try:
                pull(stub, f"{front.host}/{REPO}:1")
            except grpc.RpcError as exc:
                failed.append(exc)
        t = threading.Thread(target=first_pull)
        t.start()
        for _ in range(200):
            if any(layer in p for _, p, _ in front.requests):
                break
            time.sleep(0.05)
        assert any(layer in p for _, p, _ in front.requests), "di3fs never asked for the artifact"
        snap.kill()
        t.join(timeout=120)
        assert failed, "the pull whose snapshotter died did not fail"
        front.stall = None
        front.stopping.set()
        snap.start()
        wait_redial(ctrd)
        assert ctrd.ctr("snapshots", "--snapshotter", "di3fs", "ls").stdout.splitlines()[1:] == []
        try:
            for attempt in range(10):  # as kubelet does: containerd's first call may use the dead connection
                try:
                    pull(stub, f"{front.host}/{REPO}:1")
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 9:  # type: ignore[attr-defined]
                        raise
                    time.sleep(0.5)
        finally:
            channel.close()
        out = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", f"{front.host}/{REPO}:1", "cri-after-kill").stdout
        assert out.strip() == "v1"


def platform_manifest_digest(r: Registry, tag: str) -> str:
    from d4c.digests import sha256
    _, data = r.manifest(tag)
    return "sha256:" + sha256(data).hexdigest()


def test_a_trusting_device_takes_only_signed_registry_artifacts(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """di3fs --trust: a signed artifact is fetched and mounted; an unsigned one, or
    one signed by another key, is not even downloaded and containerd pulls the
    layers instead (logged with the reason); `ctr-cli pull --trust` refuses it with
    one line until `publish --sign-key` adds the trusted signature."""
    from d4c.errors import EXIT_UNTRUSTED
    from helpers import assert_one_line_error
    reg, front = published
    code, _, err = run_cli("-q", "keygen", "--output", str(tmp_path / "k"))
    assert code == 0, err
    key, pub = str(tmp_path / "k.key"), str(tmp_path / "k.pub")
    for tag, extra in (("1", ("--sign-key", key)), ("2", ("--from", "1"))):
        code, _, err = run_cli("-q", "publish", "--image", f"docker://{reg.host}/{REPO}:{tag}", "--plain-http",
                               "--blob-cache", "none", *extra)
        assert code == 0, err
    code, _, err = run_cli("-q", "keygen", "--output", str(tmp_path / "other"))
    assert code == 0, err
    # 2's delta unsigned, then signed by a key the device does not trust: refused either way
    for n, (signer, reason) in enumerate(((None, "is not signed"), (str(tmp_path / "other.key"),
                                                                     "not by a trusted key"))):
        if signer:
            code, _, err = run_cli("-q", "publish", "--image", f"docker://{reg.host}/{REPO}:2", "--plain-http",
                                   "--blob-cache", "none", "--from", "1", "--sign-key", signer)
            assert code == 0, err
        base = str(tmp_path / f"d{n}")
        os.makedirs(os.path.join(base, "run"))
        with running(base, binary("snapshotter"), ("--plain-http-registry", front.host, "--trust", pub),
                     (front.host,)) as (ctrd, snap):
            served, logs = pull_1_then_2(ctrd, snap, front)
            assert reason in logs and "containerd pulls the layers" in logs, logs[-2000:]
            assert "fetched the delta" not in logs
            print(f"update {reason}: {served} bytes served (the layers)")
            out = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", f"{front.host}/{REPO}:2", f"cri-trust-{n}").stdout
            assert out.strip() == "v2"
    dest = str(tmp_path / "2.cdimg")
    args = ("pull", "--image", f"docker://{front.host}/{REPO}:2", "--plain-http", "--output", dest,
            "--have", "sha256:" + "0" * 64, "--trust", pub)
    code, _, err = run_cli(*args)
    assert_one_line_error(code, err, EXIT_UNTRUSTED)
    assert "not by a trusted key" in err, err
    assert not os.path.exists(dest) and not os.path.exists(dest + ".partial")
    code, _, err = run_cli("-q", "publish", "--image", f"docker://{reg.host}/{REPO}:2", "--plain-http",
                           "--blob-cache", "none", "--from", "1", "--sign-key", key)
    assert code == 0, err
    code, out, err = run_cli(*args)
    assert code == 0, err
    code, out, err = run_cli("cdimg", "show", "--cdimg", dest, "--trust", pub)
    assert code == 0 and "verified: signed by" in out, err
