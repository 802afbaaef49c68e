"""Signed updates on a device (docs/SIGNING.md), through the real parts: a
snapshotter with --trust under a real containerd, `load` and `pull` from a real
server process, runc running what was accepted."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest

from conftest import IS_ROOT
from daemons import Server, have_containerd, mounts_below
from helpers import assert_one_line_error, binary, need, run_cli
from test_snapshotter import chain, running, run  # noqa: F401  (chain: the busybox chain fixture)

from d4c.errors import EXIT_UNTRUSTED


def keygen(folder: str, name: str) -> tuple[str, str]:
    code, _, err = run_cli("-q", "keygen", "--output", os.path.join(folder, name))
    assert code == 0, err
    return os.path.join(folder, name + ".key"), os.path.join(folder, name + ".pub")


def sign(path: str, *keys: str) -> None:
    args = ["-q", "sign", "--cdimg", path]
    for k in keys:
        args += ["--sign-key", k]
    code, _, err = run_cli(*args)
    assert code == 0, err


def device(tmp_path, *trust: str):  # type: ignore[no-untyped-def]
    need(IS_ROOT, "containerd, runc and FUSE mounts need root")
    missing = have_containerd()
    need(missing is None, missing or "")
    base = str(tmp_path / "d")
    os.makedirs(os.path.join(base, "run"), exist_ok=True)
    flags: tuple[str, ...] = ()
    for t in trust:
        flags += ("--trust", t)
    return running(base, binary("snapshotter"), flags)


def load(ctrd, snap, name: str, path: str, *extra: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    return run_cli("load", "--image", name, "--cdimg", path, "--address", ctrd.socket, "--namespace",
                   ctrd.namespace, "--snapshotter-root", snap.root, "-q", *extra)


def stored_signers(root: str) -> dict[str, str]:
    with sqlite3.connect(os.path.join(root, "metadata.db")) as db:
        return dict(db.execute("SELECT id, signer FROM images").fetchall())


def test_a_trusting_snapshotter_takes_only_signed_images(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Unsigned and wrongly signed loads are refused (exit 8, one line, nothing
    stored); signed ones run, after a restart too; a second trusted key (rotation)
    is accepted; the signer is recorded and shown."""
    keys = str(tmp_path / "keys")
    os.makedirs(keys)
    old_key, old_pub = keygen(keys, "old")
    other_key, _ = keygen(str(tmp_path), "other")
    files = []
    for n, path in enumerate(chain[:3], 1):
        files.append(str(tmp_path / f"{n}.cdimg"))
        shutil.copyfile(path, files[-1])
    with device(tmp_path, old_pub) as (ctrd, snap):
        code, _, err = load(ctrd, snap, "d4c-bb:1", files[0])  # no FILE.sig at all
        assert_one_line_error(code, err, EXIT_UNTRUSTED)
        assert "is not signed" in err, err
        sign(files[0], other_key)
        code, _, err = load(ctrd, snap, "d4c-bb:1", files[0])  # signed, by a key the snapshotter does not trust
        assert_one_line_error(code, err, EXIT_UNTRUSTED)
        assert "not by a trusted key" in err and "snapshotter" in err, err
        assert os.listdir(os.path.join(snap.root, "images")) == []
        assert [n for n in os.listdir(os.path.join(snap.root, "incoming")) if not n.endswith(".checked")] == []
        code, _, err = load(ctrd, snap, "d4c-bb:1", files[0], "--trust", old_pub)  # refused before the hand-over
        assert_one_line_error(code, err, EXIT_UNTRUSTED)
        sign(files[0], old_key)
        code, _, err = load(ctrd, snap, "d4c-bb:1", files[0], "--trust", old_pub)
        assert code == 0, err + snap.logs()
        assert run(ctrd, "d4c-bb:1", f"t1-{ctrd.namespace}") == "v1\n"
        # a delta whose statement was altered (another image named): refused by the signature itself
        sign(files[1], old_key)
        with open(files[1] + ".sig", "rb") as f:
            good_sig = f.read()
        import base64
        import json
        doc = json.loads(good_sig)
        stmt = json.loads(base64.b64decode(doc["payload"]))
        stmt["size"] = stmt["artifact"]["size"] + 1
        doc["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
        with open(files[1] + ".sig", "w") as f:
            json.dump(doc, f)
        code, _, err = load(ctrd, snap, "d4c-bb:2", files[1])
        assert_one_line_error(code, err, EXIT_UNTRUSTED)
        assert "does not verify" in err, err
        # restart: the stored image stays; the new key joins the trusted directory (a rotation)
        snap.stop()
        new_key, _ = keygen(keys, "new")
        snap.extra = ["--trust", keys]
        snap.start()
        from test_snapshotter import wait_redial
        wait_redial(ctrd)
        sign(files[1], new_key)  # signed by the new key only
        code, _, err = load(ctrd, snap, "d4c-bb:2", files[1])
        assert code == 0, err + snap.logs()
        assert run(ctrd, "d4c-bb:2", f"t2-{ctrd.namespace}") == "v2\n"
        signers = stored_signers(snap.root)
        assert len(signers) == 2 and all(s.startswith("sha256:") for s in signers.values()), signers
        stored = os.path.join(snap.root, "images", sorted(signers)[0] + ".cdimg")
        code, out, err = run_cli("cdimg", "show", "--cdimg", stored, "--trust", keys)
        assert code == 0 and "verified: signed by" in out, err
    assert not mounts_below(str(tmp_path / "d"))


def test_pull_with_trust_takes_a_merged_delta_and_refuses_an_unsigned_one(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """From a real server: the publisher signed each pushed file; the device pulls
    1 -> 3 as one merged delta (signed by nobody as such) and accepts it by the
    signed image it gives; an unsigned update is refused before its download."""
    key, pub = keygen(str(tmp_path), "k")
    srv = Server(str(tmp_path), binary("server"))
    srv.start()
    try:
        for i, path in enumerate(chain):
            tag = {0: "d4c-bb:1", 2: "d4c-bb:3", 3: "d4c-bb:4"}.get(i)
            signed = ["--sign-key", key] if i < 3 else []  # 3 -> 4 is pushed unsigned
            code, _, err = run_cli("push", "--cdimg", path, "--serverHost", srv.host, "-q", *signed,
                                   *(["--imageTag", tag] if tag else []))
            assert code == 0, err
        # offline: pull --output keeps the signature beside the file
        out = str(tmp_path / "3.cdimg")
        code, _, err = run_cli("pull", "--image", "d4c-bb:3", "--host", srv.host, "--output", out,
                               "--have", chain[0], "--trust", pub, "--expectedDimgsNum", "2", "-q")
        assert code == 0, err
        code, shown, err = run_cli("cdimg", "show", "--cdimg", out, "--trust", pub)
        assert code == 0 and "for the image it gives" in shown, shown + err
        refused = str(tmp_path / "4.cdimg")
        code, _, err = run_cli("pull", "--image", "d4c-bb:4", "--host", srv.host, "--output", refused,
                               "--have", chain[0], "--trust", pub)
        assert_one_line_error(code, err, EXIT_UNTRUSTED)
        assert "is not signed" in err, err
        assert not os.path.exists(refused) and not os.path.exists(refused + ".partial")
        with device(tmp_path, pub) as (ctrd, snap):
            common = ["--host", srv.host, "--address", ctrd.socket, "--namespace", ctrd.namespace,
                      "--snapshotter-root", snap.root, "--trust", pub]
            for tag, dimgs in (("d4c-bb:1", "1"), ("d4c-bb:3", "2")):
                code, _, err = run_cli("pull", "--image", tag, *common, "--expectedDimgsNum", dimgs)
                assert code == 0, err + snap.logs()
            assert run(ctrd, "d4c-bb:3", f"p3-{ctrd.namespace}") == "v3\n"
            code, _, err = run_cli("pull", "--image", "d4c-bb:4", *common)
            assert_one_line_error(code, err, EXIT_UNTRUSTED)
    finally:
        srv.stop()


def test_push_with_a_signature_of_another_file_stores_nothing(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from d4c.errors import BadInput
    from d4c.image.signing import load_private_keys, sign as sign_statement, statement_of
    from d4c.server.client import Client
    key, _ = keygen(str(tmp_path), "k")
    srv = Server(str(tmp_path), binary("server"))
    srv.start()
    try:
        envelope = sign_statement(statement_of(chain[1]), load_private_keys([key]))
        with pytest.raises(BadInput, match="another file"):
            Client(srv.host).push(chain[0], "d4c-bb:1", envelope)
        assert Client(srv.host).get_json("/v1/tags", "tags") == {}
    finally:
        srv.stop()
