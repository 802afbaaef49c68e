"""Signed statements about images and deltas (docs/SIGNING.md).

A publisher signs a small statement per artifact (which image it gives, from
which base, the artifact's sha256 and size) with an Ed25519 key; the statement
travels as a DSSE envelope beside the artifact (`FILE.sig`, the server's store,
a registry referrer).  A device trusts a set of public keys and checks the
envelope before it parses the artifact: an unsigned artifact, or one signed by
a key it does not hold, is refused after reading nothing but the envelope and
the file's bytes for their digest.  Verification is offline: no log, no expiry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..digests import path_sha256
from ..errors import BadInput, NotFound, Untrusted, UsageError, from_oserror

PAYLOAD_TYPE = "application/vnd.d4c.statement.v1+json"
STATEMENT_VERSION = 1
SIG_SUFFIX = ".sig"
MAX_ENVELOPE = 64 << 10          # bytes of a .sig: a few signatures of a few hundred bytes each
MAX_SIGNATURES = 16
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


# ---------------------------------------------------------------- statements

@dataclass(frozen=True)
class Statement:
    """What the publisher vouches for: `image` (the id the artifact gives),
    `base` (a delta's parent id, None for a full image), the artifact's own
    sha256 and size, its image format, and for registry artifacts the image's
    platform manifest digest."""
    image: str
    base: str | None
    artifact: str
    size: int
    image_format: int | None = None  # 1 or 2; None where the signer did not read the file (publish, again)
    manifest: str | None = None

    def to_bytes(self) -> bytes:
        doc = {"statement": STATEMENT_VERSION, "image": self.image, "base": self.base,
               "artifact": {"digest": self.artifact, "size": self.size},
               "imageFormat": self.image_format, "manifest": self.manifest}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Statement":
        try:
            doc = json.loads(data)
            version = doc["statement"]
            if version != STATEMENT_VERSION:
                raise Untrusted(f"statement version {version!r} is not one this d4c reads ({STATEMENT_VERSION})")
            art = doc["artifact"]
            out = cls(image=doc["image"], base=doc["base"], artifact=art["digest"], size=art["size"],
                      image_format=doc["imageFormat"], manifest=doc.get("manifest"))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nesting bombs
            raise Untrusted(f"the signed statement is malformed ({type(exc).__name__})") from None
        ok = (isinstance(out.image, str) and _DIGEST.match(out.image)
              and (out.base is None or isinstance(out.base, str) and _DIGEST.match(out.base))
              and isinstance(out.artifact, str) and _DIGEST.match(out.artifact)
              and type(out.size) is int and out.size >= 0
              and (out.image_format is None or type(out.image_format) is int)
              and (out.manifest is None or isinstance(out.manifest, str) and _DIGEST.match(out.manifest)))
        if not ok:
            raise Untrusted("the signed statement has a field of the wrong form")
        return out


def statement_of(path: str, manifest: str | None = None) -> Statement:
    """The statement for the image file at `path` (its preamble and its sha256)."""
    from .format import format_id
    from .stack import read_info_at
    info = read_info_at(path)
    return Statement(image=format_id(info.image_id),
                     base=format_id(info.parent_id) if info.parent_id else None,
                     artifact="sha256:" + path_sha256(path).hexdigest(), size=os.path.getsize(path),
                     image_format=2 if info.grouped else 1, manifest=manifest)


# ---------------------------------------------------------------- keys

def _crypto() -> Any:
    """cryptography's Ed25519 and serialization, loaded when a key is used (not by every command)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519, serialization


def generate_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as PEM: (private PKCS#8, public SubjectPublicKeyInfo)."""
    ed25519, ser = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_ENVELOPE)
    except FileNotFoundError:
        raise NotFound(f"no such key file: {path}") from None
    except OSError as exc:
        raise from_oserror(exc, "cannot read the key") from exc


def _private_key(data: bytes, path: str) -> Any:
    ed25519, ser = _crypto()
    try:
        key = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{path}: not an Ed25519 key (make one with `ctr-cli keygen`)")
    return key


def load_private_keys(paths: Iterable[str]) -> list[Any]:
    """The signing keys of --sign-key, each checked (read them before long work)."""
    return [_private_key(_read_key_file(path), path) for path in paths]


def load_public_key(path: str) -> Any:
    """A trusted key: a .pub file, or a private key file (its public half)."""
    ed25519, ser = _crypto()
    data = _read_key_file(path)
    try:
        key = ser.load_pem_public_key(data)
    except (ValueError, TypeError):
        key = _private_key(data, path).public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{path}: not an Ed25519 public key")
    return key


def key_id(public_key: Any) -> str:
    """A key's name in envelopes: the sha256 of its 32 raw bytes."""
    _, ser = _crypto()
    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class TrustedKeys:
    """The public keys a device accepts, by key id: from `--trust` files, or
    directories of `*.pub` files (one per publisher; two during a rotation)."""

    def __init__(self, keys: dict[str, Any], sources: list[str]) -> None:
        self.keys = keys
        self.sources = sources

    @classmethod
    def load(cls, paths: Iterable[str]) -> "TrustedKeys":
        keys: dict[str, Any] = {}
        sources = list(paths)
        for path in sources:
            if os.path.isdir(path):
                names = sorted(n for n in os.listdir(path) if n.endswith(".pub"))
                if not names:
                    raise UsageError(f"--trust {path}: the directory holds no *.pub key")
                files = [os.path.join(path, n) for n in names]
            else:
                files = [path]
            for f in files:
                key = load_public_key(f)
                keys[key_id(key)] = key
        if not keys:
            raise UsageError("--trust names no key")
        return cls(keys, sources)


# ---------------------------------------------------------------- envelopes (DSSE)

def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign(statement: Statement, keys: list[Any]) -> bytes:
    """The DSSE envelope of `statement`, signed by every key of `keys`."""
    payload = statement.to_bytes()
    message = pae(PAYLOAD_TYPE, payload)
    sigs = [{"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(message)).decode()} for k in keys]
    doc = {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE, "signatures": sigs}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _decode(envelope: bytes, source: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    if len(envelope) > MAX_ENVELOPE:
        raise Untrusted(f"{source}: signature file larger than {MAX_ENVELOPE} bytes")
    try:
        doc = json.loads(envelope.decode("utf-8"))  # json.loads would also take UTF-16/32 bytes
        if doc["payloadType"] != PAYLOAD_TYPE:
            raise Untrusted(f"{source}: not a d4c statement ({str(doc['payloadType'])[:80]!r})")
        payload = base64.b64decode(doc["payload"], validate=True)
        sigs = [(str(s["keyid"]), base64.b64decode(s["sig"], validate=True)) for s in doc["signatures"]]
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
        raise Untrusted(f"{source}: not a DSSE signature envelope") from None
    if len(sigs) > MAX_SIGNATURES:
        raise Untrusted(f"{source}: more than {MAX_SIGNATURES} signatures")
    return payload, sigs


def signer_ids(envelope: bytes, source: str) -> list[str]:
    """The key ids an envelope names (unverified: for display)."""
    return [kid for kid, _ in _decode(envelope, source)[1]]


def unverified_statement(envelope: bytes, source: str) -> Statement:
    """The statement of an envelope, not checked against any key (for display and routing)."""
    return Statement.from_bytes(_decode(envelope, source)[0])


def verify(envelope: bytes, trust: TrustedKeys, source: str) -> tuple[Statement, str]:
    """(statement, key id) of the first signature by a trusted key; Untrusted otherwise."""
    from cryptography.exceptions import InvalidSignature
    payload, sigs = _decode(envelope, source)
    message = pae(PAYLOAD_TYPE, payload)
    named = []
    for kid, sig in sigs:
        key = trust.keys.get(kid)
        named.append(kid)
        if key is None:
            continue
        try:
            key.verify(sig, message)
        except InvalidSignature:
            raise Untrusted(f"{source}: the signature of trusted key {kid} does not verify "
                            "(the statement or the signature was altered)") from None
        return Statement.from_bytes(payload), kid
    who = ", ".join(named) if named else "no key"
    raise Untrusted(f"{source}: signed by {who}, not by a trusted key")


def trusted_envelope(envelopes: list[bytes], trust: TrustedKeys, image: str, what: str) -> tuple[bytes, Verified]:
    """The first of `envelopes` signed by a trusted key for `image`; Untrusted
    (naming the signers seen) when there is none."""
    reasons = []
    for envelope in envelopes:
        try:
            stmt, kid = verify(envelope, trust, what)
        except Untrusted as exc:
            reasons.append(str(exc.args[0]).removeprefix(what + ": "))
            continue
        if stmt.image == image:
            return envelope, Verified(stmt, kid, False)
        reasons.append(f"a signature for {stmt.image}")
    if not reasons:
        raise Untrusted(f"{what} is not signed")
    raise Untrusted(f"{what}: {'; '.join(dict.fromkeys(reasons))}")


def read_envelope(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_ENVELOPE + 1)
    except FileNotFoundError:
        raise Untrusted(f"{path.removesuffix(SIG_SUFFIX)} is not signed (no {os.path.basename(path)} beside it)") \
            from None
    except OSError as exc:
        raise from_oserror(exc, "cannot read the signature") from exc


def write_envelope(path: str, envelope: bytes) -> None:
    from ..fsutil import atomic_output
    with atomic_output(path) as f:
        f.write(envelope)


# ---------------------------------------------------------------- artifacts

@dataclass(frozen=True)
class Verified:
    statement: Statement
    key_id: str
    exact: bool   # the file is the signed artifact; False: it must prove to give the signed image


def check_file(path: str, envelope: bytes, trust: TrustedKeys, expect_image: str | None = None,
               source: str | None = None) -> Verified:
    """Check `envelope` (by a trusted key) for the image file at `path` before
    anything parses the file.  Either the file is the signed artifact (its
    sha256 and size), or it is another artifact to the signed image (a delta
    the server merged, `exact` False): then `check_result` and the caller's
    full check of every body prove it gives that image, whose id covers the
    whole tree and every file's digest (docs/SIGNING.md)."""
    stmt, kid = verify(envelope, trust, source or path + SIG_SUFFIX)
    if expect_image is not None and stmt.image != expect_image:
        raise Untrusted(f"{path}: the signature is for image {stmt.image}, not {expect_image}")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise from_oserror(exc, "cannot read the image") from exc
    exact = size == stmt.size and "sha256:" + path_sha256(path).hexdigest() == stmt.artifact
    verified = Verified(stmt, kid, exact)
    if not exact:
        check_result(path, verified)
    return verified


def check_result(path: str, verified: Verified) -> None:
    """The image file gives the image the statement names (its preamble's ids)."""
    from .format import format_id
    from .stack import read_info_at
    info = read_info_at(path)
    if format_id(info.image_id) != verified.statement.image:
        raise Untrusted(f"{path}: gives image {format_id(info.image_id)}, the signature is for "
                        f"{verified.statement.image}")


def sign_file(path: str, keys: list[Any], manifest: str | None = None) -> bytes:
    """Sign the image file at `path` with the keys (load_private_keys) and write `path.sig`; the envelope."""
    envelope = sign(statement_of(path, manifest), keys)
    write_envelope(path + SIG_SUFFIX, envelope)
    return envelope


def check_envelope_form(envelope: bytes, source: str) -> Statement:
    """A well-formed envelope's statement, for stores that keep signatures without trusting them."""
    try:
        return unverified_statement(envelope, source)
    except Untrusted as exc:
        raise BadInput(str(exc)) from None
