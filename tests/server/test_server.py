"""The update server, push and pull (real server processes on loopback)."""

from __future__ import annotations

import http.client
import json
import os
import threading

import pytest

from daemons import DropProxy, Server
from helpers import assert_one_line_error, binary, run_cli

from d4c.server.store import Artifact, Store


@pytest.fixture()
def server(tmp_path):  # type: ignore[no-untyped-def]
    srv = Server(str(tmp_path), binary("server"))
    srv.start()
    yield srv
    srv.stop()


def push(srv: Server, path: str, tag: str | None = None) -> tuple[int, str, str]:
    args = ["push", "--cdimg", path, "--serverHost", srv.host, "-q"]
    return run_cli(*(args + (["--imageTag", tag] if tag else [])))


def pull(host: str, tag: str, out: str, *have: str) -> tuple[int, str, str]:
    args = ["pull", "--image", tag, "--host", host, "--output", out]
    for h in have:
        args += ["--have", h]
    return run_cli(*args)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def push_chain(srv: Server, stack: list[str]) -> None:
    for i, path in enumerate(stack):
        code, _, err = push(srv, path, "d4c-app:1" if i == 0 else ("d4c-app:4" if i == 3 else None))
        assert code == 0, err


def test_push_pull_sequence(server, stack, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The README's sequence: push 1 and three deltas, pull 1 then 4."""
    push_chain(server, stack)
    code, out, err = pull(server.host, "d4c-app:1", str(tmp_path / "1.cdimg"))
    assert code == 0, err
    assert read(str(tmp_path / "1.cdimg")) == read(images[0])
    got = str(tmp_path / "4.cdimg")
    code, out, err = run_cli("pull", "--image", "d4c-app:4", "--host", server.host, "--output", got,
                             "--have", str(tmp_path / "1.cdimg"), "--expectedDimgsNum", "3")
    assert code == 0, err
    downloaded = int(out.rsplit(",", 1)[1].split()[0])
    assert downloaded == os.path.getsize(got)
    assert os.path.getsize(got) < sum(os.path.getsize(p) for p in stack[1:])  # merged: smaller than 3 deltas
    code, _, err = run_cli("cdimg", "patch", "--diffCdimg", got, "--baseCdimg", images[0], "--outCdimg",
                           str(tmp_path / "v4.cdimg"), "-q")
    assert code == 0, err
    assert read(str(tmp_path / "v4.cdimg")) == read(images[3])
    # up to date: nothing to download; a wrong expectation is refused
    code, out, _ = run_cli("pull", "--image", "d4c-app:4", "--host", server.host, "--output", got, "--have", got)
    assert code == 0 and "up to date" in out
    code, _, err = run_cli("pull", "--image", "d4c-app:4", "--host", server.host, "--output",
                           str(tmp_path / "x"), "--have", str(tmp_path / "1.cdimg"), "--expectedDimgsNum", "2")
    assert_one_line_error(code, err)


def test_cheapest_path_not_fewest_hops(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = Store(str(tmp_path / "s"))
    rows = [Artifact("a" * 64, "B", "A", 900),      # A -> B directly: 1 hop, 900 bytes
            Artifact("b" * 64, "M", "A", 100),      # A -> M -> B: 2 hops, 300 bytes
            Artifact("c" * 64, "B", "M", 200),
            Artifact("d" * 64, "A", "", 5000),      # A stored whole
            Artifact("e" * 64, "B", "", 5200)]      # B stored whole
    for r in rows:
        store._db.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?)", (r.digest, r.image, r.parent, r.size))
    assert [a.digest[0] for a in store.cheapest("B", {"A"})] == ["b", "c"]
    assert [a.digest[0] for a in store.cheapest("B", set())] == ["e"]       # 5200 < 5000 + 300
    assert [a.digest[0] for a in store.cheapest("M", {"A", "X"})] == ["b"]
    assert store.cheapest("B", {"B"}) == []
    store.close()


def test_resume_after_a_dropped_connection(server, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    push_chain(server, stack)
    proxy = DropProxy(server.host, after=2000)
    try:
        out = str(tmp_path / "4.cdimg")
        code, text, err = pull(proxy.host, "d4c-app:4", out, stack[0])
        assert code == 0, err
        assert proxy.dropped == 1 and proxy.ranges == ["bytes=2000-"]
        downloaded = int(text.rsplit(",", 1)[1].split()[0])
        assert downloaded == os.path.getsize(out)  # nothing fetched twice
    finally:
        proxy.stop()


def test_200_concurrent_pulls(server, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The field lost 53-72 of 200 concurrent pulls to resets: socketserver's
    listen backlog was 5 (ss shows a listener's backlog as its Send-Q)."""
    import subprocess
    listed = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True).stdout
    assert int(listed.split()[2]) >= 1024, listed
    push_chain(server, stack)
    for i, path in enumerate(stack[1:3], 2):
        code, _, err = push(server, path, f"d4c-app:{i}")
        assert code == 0, err
    from d4c.server.client import Client, have_ids
    have = have_ids([stack[0]])
    start = threading.Barrier(200)
    results: list[str] = []

    def one(i: int) -> None:
        # the client library directly: run_cli swaps sys.stdout, which threads must not share
        try:
            start.wait()
            Client(server.host).fetch_update(f"d4c-app:{1 + i % 4}", have, str(tmp_path / f"p{i}.cdimg"))
            results.append("ok")
        except Exception as exc:  # collected and reported below
            results.append(repr(exc))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok"] * 200
    assert read(str(tmp_path / "p3.cdimg")) == read(str(tmp_path / "p7.cdimg"))
    conn = http.client.HTTPConnection(server.host)
    conn.request("GET", "/v1/stats")
    stats = json.loads(conn.getresponse().read())
    conn.close()
    assert stats["merges"] == 2  # 1->3 and 1->4, each computed once (1->2 is a stored delta)
    print(f"server peak RSS after 200 concurrent pulls: {stats['peakRssKiB'] / 1024:.0f} MiB")
    assert stats["peakRssKiB"] < 512 * 1024


def test_bad_uploads_and_requests(server, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def post(body: bytes, query: str = "", length: int | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
        conn = http.client.HTTPConnection(server.host)
        conn.putrequest("POST", "/v1/push" + query)
        conn.putheader("Content-Length", str(len(body) if length is None else length))
        conn.endheaders()
        conn.send(body)
        if length is not None and length > len(body):
            conn.sock.shutdown(1)  # the client stops sending: a truncated upload
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
        return resp.status, doc

    base = read(stack[0])
    assert post(base[:-100])[0] == 400                              # truncated file
    assert post(base, length=len(base) + 500)[0] == 400              # truncated transfer
    flipped = bytearray(base)
    flipped[200] ^= 0xFF
    assert post(bytes(flipped))[0] == 400                            # corrupt
    assert post(read(stack[2]))[0] == 409                            # parent not on the server
    assert post(base, "?tag=../../etc:x")[0] == 400                  # traversal in a tag
    assert post(b"", length=1 << 50)[0] == 413                       # oversized
    assert not os.listdir(os.path.join(server.root, "artifacts"))   # nothing stored
    assert not os.listdir(os.path.join(server.root, "tmp"))
    code, _, err = pull(server.host, "d4c-app:9", str(tmp_path / "x"))
    assert_one_line_error(code, err, 4)
    assert not os.path.exists(tmp_path / "x")
    code, _, err = pull("127.0.0.1:1", "d4c-app:1", str(tmp_path / "x"))
    assert_one_line_error(code, err)
    assert "cannot reach the server" in err


def test_replicas_share_a_registry_store(stack, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two servers on one registry backend: what one stores, the other serves."""
    import shutil
    from daemons import Registry
    from helpers import need
    need(shutil.which("docker-registry") is not None, "docker-registry is not installed")
    reg = Registry(str(tmp_path))
    reg.start()
    storage = ("--storage", f"registry://{reg.host}/d4c/store", "--storage-plain-http")
    a = Server(str(tmp_path), extra=storage, name="a")
    b = Server(str(tmp_path), extra=storage, name="b")
    a.start()
    b.start()
    try:
        push_chain(a, stack)
        out = str(tmp_path / "4.cdimg")
        code, text, err = pull(b.host, "d4c-app:4", out, stack[0])
        assert code == 0, err
        code, _, err = run_cli("cdimg", "patch", "--diffCdimg", out, "--baseCdimg", images[0], "--outCdimg",
                               str(tmp_path / "v4.cdimg"), "-q")
        assert code == 0, err
        assert read(str(tmp_path / "v4.cdimg")) == read(images[3])
        assert len(os.listdir(os.path.join(b.root, "artifacts"))) == 4  # fetched from the registry
        # a restarted replica rebuilds its index from the registry alone
        b.stop()
        shutil.rmtree(b.root)
        b.start()
        code, _, err = pull(b.host, "d4c-app:1", str(tmp_path / "1.cdimg"))
        assert code == 0, err
        assert read(str(tmp_path / "1.cdimg")) == read(images[0])
    finally:
        a.stop()
        b.stop()
        reg.stop()


def test_a_slow_client_blocks_no_one(server, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    push_chain(server, stack)
    host, port = server.host.split(":")
    slow = socket.create_connection((host, int(port)))
    try:
        slow.sendall(b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        code, _, err = pull(server.host, "d4c-app:4", str(tmp_path / "4.cdimg"), stack[0])  # meanwhile
        assert code == 0, err
    finally:
        slow.close()
