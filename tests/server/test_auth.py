"""Authenticated publishing (docs/API.md): bearer tokens from --auth-tokens and
TLS from --tls-cert/--tls-key, against real server processes on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys

import pytest

from daemons import SRC, Server
from helpers import assert_one_line_error, binary, run_cli

from d4c.errors import EXIT_UNAUTHORIZED

PUSH_TOKEN = "push-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"


def token_file(path: str, token: str) -> str:
    with open(path, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return path


def tokens_file(path: str, *lines: str) -> str:
    with open(path, "w") as f:
        f.write("# scope token\n" + "".join(line + "\n" for line in lines))
    return path


def push(host: str, path: str, tag: str | None, *extra: str) -> tuple[int, str, str]:
    return run_cli("push", "--cdimg", path, "--serverHost", host, "-q",
                   *(["--imageTag", tag] if tag else []), *extra)


def stored(srv: Server) -> list[str]:
    folder = os.path.join(srv.root, "artifacts")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture()
def guarded(tmp_path):  # type: ignore[no-untyped-def]
    tokens = tokens_file(str(tmp_path / "tokens"), f"push {PUSH_TOKEN}")
    srv = Server(str(tmp_path), binary("server"), ("--auth-tokens", tokens, "--debug"))
    srv.start()
    yield srv, tokens
    srv.stop()


def test_push_needs_a_push_token_and_stores_nothing_without(guarded, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv, tokens = guarded
    code, _, err = push(srv.host, stack[0], "d4c-app:1")
    assert_one_line_error(code, err, EXIT_UNAUTHORIZED)
    assert "401" in err or "token" in err, err
    wrong = token_file(str(tmp_path / "wrong"), "not-the-token-0123456789")
    code, _, err = push(srv.host, stack[0], "d4c-app:1", "--token-file", wrong)
    assert_one_line_error(code, err, EXIT_UNAUTHORIZED)
    assert stored(srv) == []
    good = token_file(str(tmp_path / "good"), f"push {PUSH_TOKEN}")  # a line copied from the server's file
    code, _, err = push(srv.host, stack[0], "d4c-app:1", "--token-file", good)
    assert code == 0, err
    assert len(stored(srv)) == 1
    # reads stay open without a read line
    code, _, err = run_cli("pull", "--image", "d4c-app:1", "--host", srv.host, "--output", str(tmp_path / "1.cdimg"))
    assert code == 0, err
    # a read line closes reads; the file is read again when it changes: no restart
    tokens_file(tokens, f"push {PUSH_TOKEN}", f"read {READ_TOKEN}")
    os.utime(tokens, ns=(1, 1))  # a change the server notices even within the mtime granularity
    code, _, err = run_cli("pull", "--image", "d4c-app:1", "--host", srv.host, "--output", str(tmp_path / "2.cdimg"))
    assert_one_line_error(code, err, EXIT_UNAUTHORIZED)
    reader = token_file(str(tmp_path / "reader"), READ_TOKEN)
    code, _, err = run_cli("pull", "--image", "d4c-app:1", "--host", srv.host, "--output", str(tmp_path / "2.cdimg"),
                           "--token-file", reader)
    assert code == 0, err
    code, _, err = push(srv.host, stack[1], None, "--token-file", reader)  # a read token cannot push
    assert_one_line_error(code, err, EXIT_UNAUTHORIZED)
    assert "push token" in err, err
    assert len(stored(srv)) == 1
    # the raw answer: 401 with a challenge, before the body is read
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("POST", "/v1/push", body=b"x" * 1000, headers={"Content-Length": "1000"})
    resp = conn.getresponse()
    assert resp.status == 401 and resp.getheader("WWW-Authenticate", "").startswith("Bearer")
    conn.close()
    srv.stop()
    with open(srv.log) as f:
        log = f.read()
    assert PUSH_TOKEN not in log and READ_TOKEN not in log and "/v1/push" in log  # --debug logs requests


def test_a_bad_tokens_file_is_refused_at_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for lines in (("push short",), (f"read {READ_TOKEN}",), ("admin " + PUSH_TOKEN,)):
        bad = tokens_file(str(tmp_path / "bad"), *lines)
        cmd = [binary("server")] if binary("server") else [sys.executable, "-m", "d4c.server"]
        p = subprocess.run(cmd + ["--root", str(tmp_path / "r"), "--port", "0", "--auth-tokens", bad],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=SRC), timeout=60)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr


def test_a_broken_edit_keeps_the_old_tokens_and_is_told_once(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from d4c.server.auth import Tokens
    path = tokens_file(str(tmp_path / "tokens"), f"push {PUSH_TOKEN}")
    tokens = Tokens(path)
    tokens_file(path, "push short")
    os.utime(path, ns=(1, 1))
    for _ in range(3):
        assert tokens.check(f"Bearer {PUSH_TOKEN}", "push") == 0
    assert caplog.text.count("the file is not taken") == 1
    tokens_file(path, f"push {READ_TOKEN}")  # a good edit is taken again
    os.utime(path, ns=(2, 2))
    assert tokens.check(f"Bearer {PUSH_TOKEN}", "push") == 401
    assert tokens.check(f"Bearer {READ_TOKEN}", "push") == 0


def self_signed(tmp_path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A certificate for 127.0.0.1, its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d4c test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_push_and_pull(stack, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed(tmp_path)
    tokens = tokens_file(str(tmp_path / "tokens"), f"push {PUSH_TOKEN}")
    srv = Server(str(tmp_path), binary("server"), ("--auth-tokens", tokens, "--tls-cert", cert, "--tls-key", key))
    srv.start()
    try:
        url = "https://" + srv.host
        good = token_file(str(tmp_path / "good"), f"push {PUSH_TOKEN}")  # a line copied from the server's file
        for i, path in enumerate(stack[:3]):
            code, _, err = push(url, path, {0: "d4c-app:1", 2: "d4c-app:3"}.get(i), "--token-file", good,
                                "--ca-cert", cert)
            assert code == 0, err
        out = str(tmp_path / "3.cdimg")
        code, _, err = run_cli("pull", "--image", "d4c-app:3", "--host", url, "--output", out, "--have", images[0],
                               "--ca-cert", cert, "--expectedDimgsNum", "2", "-q")
        assert code == 0, err
        code, _, err = run_cli("cdimg", "patch", "--diffCdimg", out, "--baseCdimg", images[0], "--outCdimg",
                               str(tmp_path / "v3.cdimg"), "-q")
        assert code == 0, err
        with open(str(tmp_path / "v3.cdimg"), "rb") as a, open(images[2], "rb") as b:
            assert a.read() == b.read()
        # a certificate the client cannot verify: said at once, in one line
        code, _, err = run_cli("pull", "--image", "d4c-app:3", "--host", url, "--output", str(tmp_path / "x"),
                               "--retry-time", "60")
        assert_one_line_error(code, err)
        assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate" in err, err
        # plain HTTP to the TLS port gets no answer that looks like success
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        with pytest.raises((OSError, http.client.HTTPException)):
            conn.request("GET", "/v1/tags")
            conn.getresponse().read()
        conn.close()
        # the TLS server keeps serving after that
        code, _, err = run_cli("pull", "--image", "d4c-app:1", "--host", url, "--output", str(tmp_path / "1.cdimg"),
                               "--ca-cert", cert, "-q")
        assert code == 0, err
    finally:
        srv.stop()
