"""Signed statements (docs/SIGNING.md): the envelope format pinned by a golden
file, verification, refusals before parsing, key rotation, and the CLI's
keygen / sign / show --trust / convert --sign-key."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import pytest

from helpers import assert_one_line_error, run_cli

from d4c.errors import EXIT_UNTRUSTED, Untrusted
from d4c.image import signing

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GOLDEN_IMAGE = os.path.join(DATA, "golden-v1.cdimg")
GOLDEN_SIG = os.path.join(DATA, "golden-v1.cdimg.sig")
# a fixed key: Ed25519 signs deterministically, so the golden envelope is reproducible
SEED = bytes(range(32))


def fixed_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.from_private_bytes(SEED)


def write_keys(tmp_path, name: str, key=None) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization as ser
    key = key or fixed_key()
    private, public = str(tmp_path / f"{name}.key"), str(tmp_path / f"{name}.pub")
    with open(private, "wb") as f:
        f.write(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    with open(public, "wb") as f:
        f.write(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def keygen(tmp_path, name: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("-q", "keygen", "--output", str(tmp_path / name))
    assert code == 0, err
    return str(tmp_path / f"{name}.key"), str(tmp_path / f"{name}.pub")


def signed_copy(tmp_path, *keys: str) -> str:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "x.cdimg")
    shutil.copyfile(GOLDEN_IMAGE, path)
    args = ["-q", "sign", "--cdimg", path]
    for k in keys:
        args += ["--sign-key", k]
    code, _, err = run_cli(*args)
    assert code == 0, err
    return path


# ---------------------------------------------------------------- the format

def test_golden_envelope_is_reproduced_and_verifies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The statement and envelope bytes are pinned: signing the golden image with
    the fixed key gives the golden .sig exactly, and it verifies."""
    stmt = signing.statement_of(GOLDEN_IMAGE)
    envelope = signing.sign(stmt, [fixed_key()])
    with open(GOLDEN_SIG, "rb") as f:
        golden = f.read()
    assert envelope == golden
    doc = json.loads(golden)
    assert doc["payloadType"] == "application/vnd.d4c.statement.v1+json"
    payload = base64.b64decode(doc["payload"])
    assert payload == json.dumps(json.loads(payload), sort_keys=True, separators=(",", ":")).encode()
    assert json.loads(payload)["statement"] == 1 and json.loads(payload)["base"] is None
    _, public = write_keys(tmp_path, "fixed")
    verified = signing.check_file(GOLDEN_IMAGE, golden, signing.TrustedKeys.load([public]))
    assert verified.exact and verified.statement.image == stmt.image


def test_signature_is_plain_ed25519_over_dsse_pae(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Another implementation (OpenSSL's command line) verifies the signature over DSSE's PAE."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command")
    with open(GOLDEN_SIG, "rb") as f:
        doc = json.loads(f.read())
    pae = signing.pae(doc["payloadType"], base64.b64decode(doc["payload"]))
    (tmp_path / "pae").write_bytes(pae)
    (tmp_path / "sig").write_bytes(base64.b64decode(doc["signatures"][0]["sig"]))
    _, public = write_keys(tmp_path, "fixed")
    good = subprocess.run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey", public, "-rawin", "-in",
                           str(tmp_path / "pae"), "-sigfile", str(tmp_path / "sig")], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    (tmp_path / "pae").write_bytes(pae.replace(b'"statement":1', b'"statement":2'))
    bad = subprocess.run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey", public, "-rawin", "-in",
                          str(tmp_path / "pae"), "-sigfile", str(tmp_path / "sig")], capture_output=True, text=True)
    assert bad.returncode != 0


def _tampered(envelope: bytes, **changes: object) -> bytes:
    doc = json.loads(envelope)
    stmt = json.loads(base64.b64decode(doc["payload"]))
    stmt.update(changes)
    doc["payload"] = base64.b64encode(json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()).decode()
    return json.dumps(doc).encode()


def test_refusals(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with open(GOLDEN_SIG, "rb") as f:
        golden = f.read()
    _, public = write_keys(tmp_path, "fixed")
    trust = signing.TrustedKeys.load([public])
    other_private, other_public = keygen(tmp_path, "other")
    cases = {
        "not by a trusted key": (golden, signing.TrustedKeys.load([other_public])),
        "does not verify": (_tampered(golden, image="sha256:" + "0" * 64), trust),
        "not a DSSE": (b"{}", trust),
        "larger than": (b" " * (signing.MAX_ENVELOPE + 1), trust),
        "not a d4c statement": (golden.replace(b"application/vnd.d4c.statement.v1+json", b"text/plain"), trust),
    }
    for reason, (envelope, keys) in cases.items():
        with pytest.raises(Untrusted, match=reason):
            signing.check_file(GOLDEN_IMAGE, envelope, keys)
    # a statement signed for another file of another image: refused when the file does not give it
    forged = signing.Statement(image="sha256:" + "1" * 64, base=None, artifact="sha256:" + "2" * 64, size=1)
    envelope = signing.sign(forged, signing.load_private_keys([other_private]))
    with pytest.raises(Untrusted, match="gives image"):
        signing.check_file(GOLDEN_IMAGE, envelope, signing.TrustedKeys.load([other_public]))
    # a statement of a later version is not read as this one
    with pytest.raises(Untrusted, match="statement version"):
        signing.Statement.from_bytes(b'{"statement":2}')


def test_key_rotation_two_signatures_either_key_trusts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old_private, old_public = keygen(tmp_path, "old")
    new_private, new_public = keygen(tmp_path, "new")
    path = signed_copy(tmp_path, old_private, new_private)
    with open(path + ".sig", "rb") as f:
        envelope = f.read()
    assert len(json.loads(envelope)["signatures"]) == 2
    for keys in ([old_public], [new_public], [str(tmp_path)]):  # a directory of *.pub: both
        assert signing.check_file(path, envelope, signing.TrustedKeys.load(keys)).exact
    _, stranger = keygen(tmp_path / "elsewhere", "stranger")
    with pytest.raises(Untrusted, match="not by a trusted key"):
        signing.check_file(path, envelope, signing.TrustedKeys.load([stranger]))


# ---------------------------------------------------------------- the CLI

def test_keygen_sign_show(tmp_path) -> None:  # type: ignore[no-untyped-def]
    private, public = keygen(tmp_path, "pub1")
    assert oct(os.stat(private).st_mode & 0o777) == "0o600"
    code, _, err = run_cli("keygen", "--output", str(tmp_path / "pub1"))
    assert_one_line_error(code, err)  # never replaces a key
    path = signed_copy(tmp_path, private)
    code, out, err = run_cli("cdimg", "show", "--cdimg", path, "--trust", public)
    assert code == 0, err
    assert "verified: signed by sha256:" in out
    code, out, _ = run_cli("cdimg", "show", "--cdimg", path, "--json")
    assert json.loads(out)["signature"]["verifiedBy"] is None
    assert json.loads(out)["signature"]["statement"]["image"] == json.loads(out)["id"]


def test_untrusted_is_refused_before_parsing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Unsigned, wrongly signed, or not the signed file: exit 8 and one line.
    The file is garbage, so any parse would say 'corrupt' instead."""
    private, public = keygen(tmp_path, "k")
    _, other = keygen(tmp_path, "other")
    junk = str(tmp_path / "junk.cdimg")
    with open(junk, "wb") as f:
        f.write(b"not an image at all")
    code, _, err = run_cli("cdimg", "show", "--cdimg", junk, "--trust", public)
    assert_one_line_error(code, err, EXIT_UNTRUSTED)
    assert "is not signed" in err
    path = signed_copy(tmp_path, private)
    shutil.copyfile(path + ".sig", junk + ".sig")
    code, _, err = run_cli("cdimg", "show", "--cdimg", junk, "--trust", other)
    assert_one_line_error(code, err, EXIT_UNTRUSTED)
    assert "not by a trusted key" in err


def test_convert_signs_what_it_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ocibuild import Layout
    from imagesets import VERSIONS
    private, public = keygen(tmp_path, "k")
    lay = Layout(str(tmp_path / "layout"))
    lay.tag(lay.image([(m, "gzip") for m in VERSIONS[0]]), "v1")
    lay.save()
    out = str(tmp_path / "out")
    code, _, err = run_cli("-q", "convert", "--image", f"oci:{lay.path}:v1", "--output", out, "--sign-key", private)
    assert code == 0, err
    with open(os.path.join(out, "image.cdimg.sig"), "rb") as f:
        envelope = f.read()
    verified = signing.check_file(os.path.join(out, "image.cdimg"), envelope, signing.TrustedKeys.load([public]))
    assert verified.exact and verified.statement.image_format == 2
    # a key that is not a key is said before any converting, and nothing is written
    bad = str(tmp_path / "bad.key")
    with open(bad, "w") as f:
        f.write("nope")
    code, _, err = run_cli("convert", "--image", f"oci:{lay.path}:v1", "--output", str(tmp_path / "o2"),
                           "--sign-key", bad)
    assert_one_line_error(code, err)
    assert not os.path.exists(str(tmp_path / "o2"))


@pytest.mark.parametrize("envelope", [
    b"[" * 30_000 + b"]" * 30_000,  # nesting deeper than the parser's recursion, under the size limit
    json.dumps({"payloadType": signing.PAYLOAD_TYPE, "payload": "", "signatures": []}).encode("utf-16"),
    b"\xff\xfe not json",
], ids=["nesting", "utf-16", "binary"])
def test_a_hostile_envelope_is_refused_as_a_form(envelope: bytes) -> None:
    """What a store keeps without trusting must still be UTF-8 JSON of the DSSE form
    (the server writes it into its index as text)."""
    with pytest.raises(Untrusted, match="not a DSSE signature envelope"):
        signing.unverified_statement(envelope, "upload")
