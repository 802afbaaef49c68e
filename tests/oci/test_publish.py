"""`ctr-cli publish`: d4c artifacts beside the image in a real registry (Debian's
docker-registry, which lacks the referrers API: the tag schema's index holds them)."""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import pytest

from daemons import Registry as RegistryDaemon
from helpers import assert_one_line_error, need, run_cli
from ocibuild import M, Layout

from d4c.image.reader import Image
from d4c.oci import artifacts
from d4c.oci.registry import Registry, parse_reference

REPO = "d4c/pub"


def versions(path: str) -> Layout:
    """Tags 1, 2, 3 of one app: a 400 KB program changing a little each time."""
    lay = Layout(path)
    program = bytearray(random.Random(7).randbytes(400_000))
    for v in (1, 2, 3):
        program[v * 1000:v * 1000 + 8] = f"version{v}".encode()
        layers = [([M("./", "dir"), M("bin/", "dir"), M("bin/app", data=bytes(program), mode=0o755)], "gzip"),
                  ([M("etc/", "dir"), M("etc/version", data=f"{v}\n".encode())], "gzip")]
        lay.tag(lay.image(layers), str(v))
    lay.save()
    return lay


def versions_registry(tmp: str) -> RegistryDaemon:
    """A started registry holding tags 1, 2, 3 of `versions` (its layout under TMP/layout)."""
    need(shutil.which("docker-registry") is not None and shutil.which("skopeo") is not None,
         "docker-registry and skopeo are not installed")
    reg = RegistryDaemon(tmp)
    reg.start()
    lay = versions(os.path.join(tmp, "layout"))
    for tag in ("1", "2", "3"):
        reg.push(lay.path, tag, REPO)
    return reg


@pytest.fixture(scope="module")
def published(tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("publish")
    reg = versions_registry(str(tmp))
    yield reg, tmp
    reg.stop()


def publish(reg: RegistryDaemon, tag: str, *extra: str) -> tuple[int, str, str]:
    return run_cli("-q", "publish", "--image", f"docker://{reg.host}/{REPO}:{tag}", "--plain-http",
                   "--blob-cache", "none", *extra)


def client(reg: RegistryDaemon, tag: str) -> Registry:
    return Registry(parse_reference(f"{reg.host}/{REPO}:{tag}"), plain_http=True)


def platform_manifest(reg: RegistryDaemon, tag: str) -> str:
    from d4c.digests import sha256
    _, data = client(reg, tag).manifest(tag)
    return "sha256:" + sha256(data).hexdigest()


def converted(reg: RegistryDaemon, tag: str, out: str) -> str:
    code, stdout, err = run_cli("-q", "convert", "--image", f"docker://{reg.host}/{REPO}:{tag}", "--output", out,
                                "--plain-http", "--blob-cache", "none")
    assert code == 0, err
    return stdout.strip()


def fetch_layer(reg: RegistryDaemon, art: artifacts.Artifact, out: str) -> str:
    r = client(reg, "2")
    digest, size = artifacts.layer_of(r, art)
    with r.open_blob(digest) as src, open(out, "wb") as f:
        shutil.copyfileobj(src, f)
    assert os.path.getsize(out) == size == art.size
    return out


def stored_files(reg: RegistryDaemon) -> int:
    return sum(len(files) for _, _, files in os.walk(reg.root))


def test_publish_pushes_the_image_and_a_delta_in_the_tag_schema(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, _ = published
    code, out, err = publish(reg, "2", "--from", "1")
    assert code == 0, err
    subject = platform_manifest(reg, "2")
    r = client(reg, "2")
    assert r.referrers(subject) is None  # this registry has no referrers API ...
    assert artifacts.fallback_tag(subject) in r.tags()  # ... so the tag schema's index lists them
    found = {a.artifact_type: a for a in artifacts.find_artifacts(r, subject)}
    assert set(found) == {artifacts.IMAGE_ARTIFACT, artifacts.DELTA_ARTIFACT}
    full, delta = found[artifacts.IMAGE_ARTIFACT], found[artifacts.DELTA_ARTIFACT]
    new_id, old_id = converted(reg, "2", str(tmp_path / "c2")), converted(reg, "1", str(tmp_path / "c1"))
    assert full.image_id == delta.image_id == new_id
    assert delta.base_id == old_id
    assert delta.annotations[artifacts.ANNOTATION_BASE_MANIFEST] == platform_manifest(reg, "1")
    assert 0 < delta.size < full.size / 10  # a few bytes changed in a 400 KB program
    with Image(fetch_layer(reg, delta, str(tmp_path / "d.cdimg"))) as image:
        assert image.is_delta and image.info.parent_id is not None
    with Image(fetch_layer(reg, full, str(tmp_path / "f.cdimg"))) as image:
        assert not image.is_delta
    # the artifact's manifest names the image's manifest as its subject
    _, manifest = r.manifest(delta.digest)
    doc: dict[str, Any] = json.loads(manifest)
    assert doc["subject"]["digest"] == subject and doc["artifactType"] == artifacts.DELTA_ARTIFACT


def test_publishing_again_pushes_nothing(published) -> None:  # type: ignore[no-untyped-def]
    reg, _ = published
    code, _, err = publish(reg, "2", "--from", "1")
    assert code == 0, err
    before = stored_files(reg)
    code, out, err = run_cli("publish", "--image", f"docker://{reg.host}/{REPO}:2", "--plain-http",
                             "--blob-cache", "none", "--from", "1")
    assert code == 0, err
    assert "already there" in out and "yes" not in out
    assert stored_files(reg) == before


def test_previous_publishes_a_delta_per_older_tag(published) -> None:  # type: ignore[no-untyped-def]
    reg, _ = published
    code, _, err = publish(reg, "3", "--previous", "2")  # the registry's tag order: 1, 2, 3
    assert code == 0, err
    found = artifacts.find_artifacts(client(reg, "3"), platform_manifest(reg, "3"))
    bases = sorted(a.annotations[artifacts.ANNOTATION_BASE_MANIFEST] for a in found if a.is_delta)
    assert bases == sorted([platform_manifest(reg, "1"), platform_manifest(reg, "2")])
    assert sum(not a.is_delta for a in found) == 1


def test_bad_publish_lines(published) -> None:  # type: ignore[no-untyped-def]
    reg, tmp = published
    code, _, err = publish(reg, "2", "--from", "nope")
    assert_one_line_error(code, err, 4)
    assert "nope" in err
    code, _, err = run_cli("-q", "publish", "--image", f"oci:{tmp}/layout:2")
    assert_one_line_error(code, err, 2)
    assert "--to" in err
    code, _, err = publish(reg, "2", "--previous", "1", "--tags", "7,8")
    assert_one_line_error(code, err, 2)
    assert "--previous" in err
    code, _, err = run_cli("-q", "publish", "--image", "docker://127.0.0.1:1/x/y:1", "--previous", "-1")
    assert_one_line_error(code, err, 2)  # said before any network
    code, _, err = run_cli("-q", "publish", "--image", f"oci:{tmp}/missing:1", "--to", f"docker://{reg.host}/{REPO}:1",
                           "--plain-http")
    assert_one_line_error(code, err, 4)  # a missing local image, before the registry is asked
    code, _, err = run_cli("-q", "publish", "--image", "docker://127.0.0.1:1/x/y:1", "--plain-http")
    assert_one_line_error(code, err, 7)  # the registry is not there: its own exit code


def test_a_local_copy_publishes_to_the_registry_image(published) -> None:  # type: ignore[no-untyped-def]
    reg, tmp = published
    code, _, err = run_cli("-q", "publish", "--image", f"oci:{tmp}/layout:1", "--to",
                           f"docker://{reg.host}/{REPO}:1", "--plain-http", "--blob-cache", "none")
    assert code == 0, err
    found = artifacts.find_artifacts(client(reg, "1"), platform_manifest(reg, "1"))
    assert [a.artifact_type for a in found] == [artifacts.IMAGE_ARTIFACT]
    # a local image that is not the one at --to is refused before anything is pushed
    code, _, err = run_cli("-q", "publish", "--image", f"oci:{tmp}/layout:3", "--to",
                           f"docker://{reg.host}/{REPO}:1", "--plain-http", "--blob-cache", "none")
    assert_one_line_error(code, err, 2)
    assert "is not the image at --to" in err


def test_a_blob_upload_survives_a_cut(published, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The link drops during the second piece of an upload and its answer is lost.
    distribution 2.x then cannot say how much it holds (the upload URL's state is
    stale: 404), so the push starts a new upload and completes; the blob is whole."""
    from daemons import RegistryFront
    from d4c.digests import sha256
    from d4c.oci import registry as registry_module
    reg, _ = published
    monkeypatch.setattr(registry_module, "UPLOAD_CHUNK", 64 << 10)
    data = random.Random(11).randbytes(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = "sha256:" + sha256(data).hexdigest()
    cutter = RegistryFront(reg.host, cut=2)
    try:
        r = Registry(parse_reference(f"{cutter.host}/{REPO}:x"), plain_http=True)
        assert r.push_blob(str(path), digest) is True
        methods = [m for m, p, _ in cutter.requests if "/uploads/" in p]
        assert methods.count("POST") == 2 and "GET" in methods  # asked where to go on, then began again
        assert methods[-1] == "PUT"
        assert r.push_blob(str(path), digest) is False  # there now
    finally:
        cutter.stop()
    with open(reg.blob_path(digest), "rb") as f:
        assert f.read() == data


class FakeRegistry:
    """What push_artifact and find_artifacts ask of a registry with the referrers API."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.blobs: set[str] = set()

    def push_blob(self, source, digest, progress=None) -> bool:  # type: ignore[no-untyped-def]
        new = digest not in self.blobs
        self.blobs.add(digest)
        return new

    def has_manifest(self, ref: str) -> bool:
        return ref in self.manifests

    def put_manifest(self, ref: str, data: bytes, media: str):  # type: ignore[no-untyped-def]
        self.manifests[ref] = data

        class Answer:
            @staticmethod
            def getheader(name: str, default: str = "") -> str:
                return json.loads(data).get("subject", {}).get("digest", "") if name == "OCI-Subject" else default
        return Answer()

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        out = []
        for ref, data in self.manifests.items():
            doc = json.loads(data)
            if doc.get("subject", {}).get("digest") == digest:
                out.append({"mediaType": doc["mediaType"], "digest": ref, "size": len(data),
                            "artifactType": doc.get("artifactType"), "annotations": doc.get("annotations")})
        return out


def test_the_referrers_api_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Where the registry indexes referrers itself (OCI-Subject), no tag-schema index is written."""
    fake = FakeRegistry()
    body = tmp_path / "image.cdimg"
    body.write_bytes(b"cdimg bytes")
    subject = {"mediaType": artifacts.MANIFEST_TYPE, "digest": "sha256:" + "ab" * 32, "size": 10}
    digest, new = artifacts.push_artifact(fake, subject, artifacts.IMAGE_ARTIFACT, str(body),  # type: ignore[arg-type]
                                          {artifacts.ANNOTATION_IMAGE_ID: "sha256:" + "cd" * 32})
    assert new and list(fake.manifests) == [digest]  # no sha256-<hex> index
    [found] = artifacts.find_artifacts(fake, subject["digest"])  # type: ignore[arg-type]
    assert (found.digest, found.artifact_type, found.size) == (digest, artifacts.IMAGE_ARTIFACT, len(b"cdimg bytes"))
    assert found.image_id == "sha256:" + "cd" * 32
    assert artifacts.push_artifact(fake, subject, artifacts.IMAGE_ARTIFACT, str(body),  # type: ignore[arg-type]
                                   {artifacts.ANNOTATION_IMAGE_ID: "sha256:" + "cd" * 32}) == (digest, False)


def test_artifact_manifest_golden() -> None:
    """The artifact manifest's bytes (docs/REGISTRY.md, version 1): its digest is
    what makes publishing twice push nothing, so it must not drift."""
    from d4c.digests import sha256
    notes = {artifacts.ANNOTATION_IMAGE_ID: "sha256:" + "33" * 32, artifacts.ANNOTATION_BASE_ID: "sha256:" + "44" * 32,
             artifacts.ANNOTATION_BASE_MANIFEST: "sha256:" + "55" * 32, artifacts.ANNOTATION_SIZE: "1234",
             artifacts.ANNOTATION_IMAGE_SIZE: "99999"}
    subject = {"mediaType": artifacts.MANIFEST_TYPE, "digest": "sha256:" + "11" * 32, "size": 527}
    data = artifacts.artifact_manifest(subject, artifacts.DELTA_ARTIFACT, "sha256:" + "22" * 32, 1234, notes)
    assert data.startswith(b'{"annotations":{"io.d4c.base.id":"sha256:4444')
    assert sha256(data).hexdigest() == "92448d7a0e2369c29f25508045f21858646a32007e593feade0dbdc24944406b"
    assert artifacts.fallback_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32


def pull(reg: RegistryDaemon, tag: str, *extra: str, repo: str = REPO) -> tuple[int, str, str]:
    return run_cli("pull", "--image", f"docker://{reg.host}/{repo}:{tag}", "--plain-http", *extra)


def test_pull_from_a_plain_registry(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No d4c server: pull picks the cheapest artifact for the images it holds."""
    reg, tmp = published
    code, _, err = publish(reg, "2", "--from", "1")
    assert code == 0, err
    converted(reg, "1", str(tmp_path / "c1"))
    converted(reg, "2", str(tmp_path / "c2"))
    v1, v2 = str(tmp_path / "c1" / "image.cdimg"), str(tmp_path / "c2" / "image.cdimg")
    with Image(v1) as a, Image(v2) as b:
        id1, id2 = a.info.image_id, b.info.image_id
    out = str(tmp_path / "delta.cdimg")
    code, stdout, err = pull(reg, "2", "--have", v1, "--output", out)
    assert code == 0, err
    assert "delta from" in stdout
    with Image(out) as image:
        assert image.is_delta and image.info.parent_id == id1 and image.info.image_id == id2
    assert not os.path.exists(out + ".partial")
    full = str(tmp_path / "full.cdimg")
    code, stdout, err = pull(reg, "2", "--have", "sha256:" + "0" * 64, "--output", full)
    assert code == 0 and "full image" in stdout, err
    with Image(full) as image:
        assert not image.is_delta and image.info.image_id == id2
    code, stdout, err = pull(reg, "2", "--have", v2, "--output", str(tmp_path / "none.cdimg"))
    assert code == 0 and "up to date" in stdout, err
    assert not os.path.exists(tmp_path / "none.cdimg")


def test_pull_resumes_a_kept_partial_download(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, _ = published
    code, _, err = publish(reg, "2", "--from", "1")
    assert code == 0, err
    first = str(tmp_path / "first.cdimg")
    code, _, err = pull(reg, "2", "--have", "sha256:" + "0" * 64, "--output", first)
    assert code == 0, err
    data = open(first, "rb").read()
    out = str(tmp_path / "again.cdimg")
    with open(out + ".partial", "wb") as f:
        f.write(data[:len(data) // 2])  # what an interrupted run left
    code, stdout, err = pull(reg, "2", "--have", "sha256:" + "0" * 64, "--output", out)
    assert code == 0, err
    assert f"{len(data) - len(data) // 2} bytes downloaded" in stdout
    assert open(out, "rb").read() == data
    # a partial file that is not a prefix of the blob is refused and dropped, never kept under the name
    with open(out + "2.partial", "wb") as f:
        f.write(b"\0" * (len(data) // 2))
    code, _, err = pull(reg, "2", "--have", "sha256:" + "0" * 64, "--output", out + "2", "-q")
    assert_one_line_error(code, err)
    assert not os.path.exists(out + "2") and not os.path.exists(out + "2.partial")


def test_pull_of_an_image_without_artifacts(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, tmp = published
    reg.push(str(tmp / "layout"), "1", "d4c/plain")
    code, _, err = pull(reg, "1", "--have", "sha256:" + "0" * 64, "--output", str(tmp_path / "o"), "-q",
                        repo="d4c/plain")
    assert_one_line_error(code, err, 4)
    assert "no d4c artifacts" in err


def test_publish_through_a_registry_that_wants_tokens(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Bearer tokens from the registry's token service for --user, on every push request."""
    from daemons import RegistryFront
    reg, _ = published
    front = RegistryFront(reg.host, cut=0, login=("alice", "s3cret"))
    try:
        ref = f"docker://{front.host}/{REPO}:1"  # a delta from 3 (a downgrade): new in every order
        code, _, err = run_cli("-q", "publish", "--image", ref, "--plain-http", "--blob-cache", "none",
                               "--from", "3")
        assert_one_line_error(code, err, 5)  # no credentials
        code, _, err = run_cli("-q", "publish", "--image", ref, "--plain-http", "--blob-cache", "none",
                               "--from", "3", "--user", "alice:s3cret")
        assert code == 0, err
        assert front.refused >= 1 and any(m == "PUT" for m, _, _ in front.requests)
    finally:
        front.stop()
    bases = [a.annotations[artifacts.ANNOTATION_BASE_MANIFEST] for a in
             artifacts.find_artifacts(client(reg, "1"), platform_manifest(reg, "1")) if a.is_delta]
    assert platform_manifest(reg, "3") in bases


def test_a_broken_signature_referrer_costs_only_the_signature(published, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A pull that asked for no trust still pulls when a signature referrer cannot be
    taken (it keeps no signature, with a warning); one with --trust is refused."""
    reg, _ = published
    code, _, err = publish(reg, "2", "--from", "1")
    assert code == 0, err
    registry = client(reg, "2")
    from d4c.image.signing import MAX_ENVELOPE
    for found in artifacts.find_artifacts(registry, platform_manifest(reg, "2")):  # an envelope too large to take
        artifacts.push_signature(registry, artifacts.artifact_descriptor(registry, found),
                                 b"{" * (MAX_ENVELOPE + 1), ["nobody"])
    out = str(tmp_path / "full.cdimg")
    code, stdout, err = pull(reg, "2", "--have", "sha256:" + "0" * 64, "--output", out)
    assert code == 0, err
    assert "signatures not kept" in caplog.text and "Traceback" not in err
    assert os.path.exists(out) and not os.path.exists(out + ".sig")
    key = str(tmp_path / "k")
    assert run_cli("-q", "keygen", "--output", key)[0] == 0
    code, _, err = pull(reg, "2", "--have", "sha256:" + "0" * 64, "--output", str(tmp_path / "t.cdimg"),
                        "--trust", key + ".pub", "-q")
    assert_one_line_error(code, err)
    assert not os.path.exists(tmp_path / "t.cdimg")
