"""The update server and pull under faults and load: corrupt uploads, bursts of
clients, idle connections, cut links, outages, full disks, crashes, eviction.
Everything goes through a real server on 127.0.0.1 and real HTTP; link faults
through a cutting TCP proxy (daemons.CuttingProxy)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time

import pytest

from daemons import CuttingProxy, Server, thread_count
from helpers import assert_one_line_error, binary, need_root, run_cli

from d4c.image.format import read_info
from d4c.server.store import Store
from d4c.image.tree import Storage

CUT = 500 << 10             # the field's link dropped every 500 KB


def start_server(base: str, *extra: str, name: str = "server") -> Server:
    srv = Server(base, binary("server"), extra=extra, name=name)
    srv.start()
    return srv


@pytest.fixture()
def server(tmp_path):  # type: ignore[no-untyped-def]
    srv = start_server(str(tmp_path))
    yield srv
    srv.stop()


@pytest.fixture()
def big_tagged(server, big) -> str:  # type: ignore[no-untyped-def]
    """`big` pushed to `server` as big:1."""
    code, _, err = push(server.host, big, "big:1")
    assert code == 0, err
    return big


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def push(host: str, path: str, tag: str | None = None) -> tuple[int, str, str]:
    return run_cli(*(["push", "--cdimg", path, "--serverHost", host, "-q"] + (["--imageTag", tag] if tag else [])))


def pull(host: str, tag: str, out: str, *extra: str) -> tuple[int, str, str]:
    return run_cli("pull", "--image", tag, "--host", host, "--output", out, *extra)


def downloaded(out: str) -> int:
    return int(out.rsplit(",", 1)[1].split()[0])


def request(host: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def plan(host: str, tag: str, *have: str) -> dict:  # type: ignore[type-arg]
    query = "&".join([f"tag={tag}"] + [f"have=sha256:{h}" for h in have])
    status, body = request(host, "GET", f"/v1/update?{query}")
    assert status == 200, body
    return json.loads(body)


def image_id(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_info(fd, path).image_id.hex()
    finally:
        os.close(fd)


def body_flipped(path: str, out: str, storage: Storage, parent: str | None = None) -> str:
    """A copy of `path` with one byte flipped inside a body of `storage` (header intact)."""
    from d4c.image.stack import close_all, open_stack
    stack = open_stack([path], parent)
    try:
        image = stack[-1]
        if storage == Storage.FRAME:
            e = max((e for e in image.entries if e.storage == Storage.FRAME), key=lambda e: e.body_length)
            at = image.info.body_offset + e.body_offset + e.body_length // 2
        else:
            e = next(e for e in image.entries if e.storage == Storage.DELTA)
            step = e.delta_steps[0]
            at = image.info.body_offset + step.offset + step.length // 2
    finally:
        close_all(stack)
    data = bytearray(read(path))
    data[at] ^= 0x55
    with open(out, "wb") as f:
        f.write(data)
    return out


# ---------------------------------------------------------------- 1. corrupt bodies

def test_uploads_with_a_corrupt_body_are_refused(server, images, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A byte flipped in a file body (header and tree intact) got 201, and the
    corrupt copy could then be served for pulls from nothing."""
    bad_base = body_flipped(images[0], str(tmp_path / "bad-base.cdimg"), Storage.FRAME)
    code, _, err = push(server.host, bad_base, "d4c-app:1")
    assert_one_line_error(code, err, 3)
    assert not os.listdir(os.path.join(server.root, "artifacts"))
    code, _, err = push(server.host, stack[0], "d4c-app:1")
    assert code == 0, err
    # the same image id again, corrupt: refused, the good copy stays the one served
    assert image_id(bad_base) == image_id(stack[0])
    code, _, err = push(server.host, bad_base, "d4c-app:1")
    assert_one_line_error(code, err, 3)
    bad_delta = body_flipped(stack[1], str(tmp_path / "bad-delta.cdimg"), Storage.DELTA, stack[0])
    code, _, err = push(server.host, bad_delta)
    assert_one_line_error(code, err, 3)
    assert len(os.listdir(os.path.join(server.root, "artifacts"))) == 1
    assert not os.listdir(os.path.join(server.root, "tmp"))
    out = str(tmp_path / "1.cdimg")
    code, _, err = pull(server.host, "d4c-app:1", out)
    assert code == 0, err
    assert read(out) == read(stack[0])


def test_pull_output_refuses_a_corrupt_stored_image(tmp_path, images, stack) -> None:  # type: ignore[no-untyped-def]
    """A store that holds damaged files (written before uploads were checked):
    `pull --output` must not exit 0 with one, though its digest matches."""
    import hashlib
    srv = start_server(str(tmp_path))
    srv.stop()
    db = sqlite3.connect(os.path.join(srv.root, "index.db"))
    planted = [(body_flipped(images[0], str(tmp_path / "bad.cdimg"), Storage.FRAME), "", "d4c-app:1"),
               (body_flipped(stack[1], str(tmp_path / "bad-delta.cdimg"), Storage.DELTA, stack[0]),
                image_id(images[0]), "d4c-app:2")]
    for path, parent, tag in planted:
        bad = read(path)
        digest = hashlib.sha256(bad).hexdigest()
        with open(os.path.join(srv.root, "artifacts", digest + ".cdimg"), "wb") as f:
            f.write(bad)
        db.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?)", (digest, image_id(path), parent, len(bad)))
        db.execute("INSERT INTO tags VALUES (?, ?)", (tag, image_id(path)))
    db.commit()
    db.close()
    srv.start()
    try:
        for tag, have in (("d4c-app:1", ()), ("d4c-app:2", ("--have", stack[0]))):
            out = str(tmp_path / f"{tag}.cdimg")
            code, _, err = pull(srv.host, tag, out, *have)
            assert_one_line_error(code, err, 3)
            assert "damaged" in err
            assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    finally:
        srv.stop()


# ---------------------------------------------------------------- 2. load

def test_500_idle_connections_hold_no_thread_and_are_closed(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    """500 idle connections made 500 threads that never ended."""
    srv = start_server(str(tmp_path), "--idle-timeout", "2", "--workers", "16")
    try:
        for i, path in enumerate(stack):
            code, _, err = push(srv.host, path, f"d4c-app:{i + 1}")
            assert code == 0, err
        host, port = srv.host.split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(500)]
        half = idle[:10]
        for s in half:  # half-sent requests
            s.sendall(b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx")
        try:
            time.sleep(0.5)
            assert srv.proc is not None
            threads_now = thread_count(srv.proc.pid)
            assert threads_now < 60, threads_now  # 16 workers and a few others, not one per connection
            code, _, err = pull(srv.host, "d4c-app:4", str(tmp_path / "meanwhile.cdimg"), "--have", stack[0])
            assert code == 0, err                 # idle connections block no one
            deadline = time.monotonic() + 20
            for s in idle:  # each is closed by the server after its 2 s
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    while s.recv(1 << 16):
                        pass
                except ConnectionResetError:
                    pass
        finally:
            for s in idle:
                s.close()
    finally:
        srv.stop()


def test_one_worker_serves_past_kept_alive_and_half_sent_heads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A connection waiting for its next request, or still sending its head,
    holds no worker: with one worker, others are still served at once."""
    from d4c.server.client import Client
    srv = start_server(str(tmp_path), "--workers", "1", "--idle-timeout", "30")
    kept = http.client.HTTPConnection(srv.host, timeout=10)
    host, port = srv.host.split(":")
    slow = socket.create_connection((host, int(port)))
    try:
        for _ in range(2):  # keep-alive works, and the connection then stays open
            kept.request("GET", "/v1/tags")
            resp = kept.getresponse()
            assert resp.status == 200 and json.loads(resp.read()) == {}
        slow.sendall(b"GET /v1/tags HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        for _ in range(3):  # each would wait 30 s for the one worker
            assert Client(srv.host, timeout=5, retry_time=0).get_json("/v1/tags", "tags") == {}
        kept.request("GET", "/v1/tags")
        assert kept.getresponse().status == 200
    finally:
        kept.close()
        slow.close()
        srv.stop()


# ---------------------------------------------------------------- 3. retries, resumption

def test_a_link_that_drops_every_500_kb_completes(server, big_tagged, tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = big_tagged
    proxy = CuttingProxy(server.host, cut_every=CUT)
    try:
        out = str(tmp_path / "big.cdimg")
        code, text, err = pull(proxy.host, "big:1", out, "--retry-time", "20")
        assert code == 0, err
        assert proxy.cuts >= os.path.getsize(big) // CUT  # every connection was cut: 8 and more
        assert read(out) == read(big)
        assert downloaded(text) == os.path.getsize(big)  # each resumed where the last one stopped
    finally:
        proxy.stop()


def test_a_server_down_for_5_s_mid_download(server, big_tagged, tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = big_tagged
    proxy = CuttingProxy(server.host, cut_every=CUT)
    outage: list[float] = []

    def outage_of_5_s() -> None:
        if outage:
            return
        outage.append(time.monotonic())
        proxy.cut_every = None
        server.stop()

        def back() -> None:
            time.sleep(5)
            server.start()
            outage.append(time.monotonic())
        threading.Thread(target=back, daemon=True).start()
    proxy.on_cut = outage_of_5_s
    try:
        out = str(tmp_path / "big.cdimg")
        code, _, err = pull(proxy.host, "big:1", out, "--retry-time", "30")
        assert code == 0, err
        assert len(outage) == 2 and outage[1] - outage[0] >= 5
        assert read(out) == read(big)
    finally:
        proxy.stop()


def test_the_plan_request_is_retried(server, big_tagged, tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = big_tagged
    proxy = CuttingProxy(server.host)
    proxy.down = True  # connections reset: the server is there but the link is not

    def heal() -> None:
        time.sleep(3)
        proxy.down = False
    threading.Thread(target=heal, daemon=True).start()
    try:
        out = str(tmp_path / "big.cdimg")
        code, _, err = pull(proxy.host, "big:1", out, "--retry-time", "30")
        assert code == 0, err
        assert read(out) == read(big)
    finally:
        proxy.stop()


def test_a_rerun_resumes_the_partial_download(server, big_tagged, tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = big_tagged
    proxy = CuttingProxy(server.host, cut_every=1 << 20)

    def link_down() -> None:
        proxy.down = True
    proxy.on_cut = link_down
    try:
        out = str(tmp_path / "big.cdimg")
        code, _, err = pull(proxy.host, "big:1", out, "--retry-time", "2")
        assert_one_line_error(code, err, 7)
        assert "run the same pull again" in err
        assert not os.path.exists(out)  # never a half file under the final name
        kept = os.path.getsize(out + ".partial")
        assert (1 << 20) - 1000 < kept < 1 << 20  # all it got: 1 MiB less the answer's headers
        proxy.down, proxy.cut_every = False, None
        code, text, err = pull(proxy.host, "big:1", out, "--retry-time", "2")
        assert code == 0, err
        assert downloaded(text) == os.path.getsize(big) - kept
        assert read(out) == read(big)
        assert not os.path.exists(out + ".partial")
    finally:
        proxy.stop()


def test_a_full_local_disk_stops_the_pull_at_once(server, big_tagged, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Our own disk refusing is no link fault: no retries, exit 5, the partial kept."""
    need_root()
    small = str(tmp_path / "small")
    os.makedirs(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], check=True)
    try:
        out = os.path.join(small, "big.cdimg")
        code, _, err = pull(server.host, "big:1", out, "--retry-time", "20")
        assert_one_line_error(code, err, 5)
        assert "No space left on device" in err
        assert not os.path.exists(out) and os.path.exists(out + ".partial")
    finally:
        subprocess.run(["umount", "-l", small], check=False)


def test_two_pulls_never_write_one_partial_file(server, big_tagged, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import fcntl
    out = str(tmp_path / "big.cdimg")
    with open(out + ".partial", "ab") as held:  # as the first pull holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        code, _, err = pull(server.host, "big:1", out)
        assert_one_line_error(code, err, 1)
        assert "another pull is writing" in err
    assert os.path.getsize(out + ".partial") == 0
    code, _, err = pull(server.host, "big:1", out)
    assert code == 0, err
    assert read(out) == read(big_tagged)


# ---------------------------------------------------------------- 4. aborted and failed uploads

def test_a_reset_upload_leaves_no_temp_file(server, big) -> None:  # type: ignore[no-untyped-def]
    host, port = server.host.split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n" + read(big)[:1 << 20])
    time.sleep(0.5)
    CuttingProxy._reset(s)
    deadline = time.monotonic() + 10
    while os.listdir(os.path.join(server.root, "tmp")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.listdir(os.path.join(server.root, "tmp"))


# a full server disk: tests/test_faults.py (test_a_full_server_disk)


# ---------------------------------------------------------------- 5. crash mid-merge

def test_a_restart_never_adopts_a_merge_temp_file(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(str(tmp_path))
    try:
        for i, path in enumerate(stack):
            code, _, err = push(srv.host, path, f"d4c-app:{i + 1}")
            assert code == 0, err
        first = plan(srv.host, "d4c-app:4", image_id(stack[0]))
        srv.kill()
        merged = os.path.join(srv.root, "merged")
        key = f"{image_id(stack[0])}-{image_id(stack[3])}"
        # what a kill -9 mid-merge leaves: the merge's output under its temp names (the
        # old code named it .tmp-KEY-THREAD.cdimg, and adopted it at start)
        leftovers = [f".tmp-{key}-140213.cdimg", ".tmp-0123abcd.partial", f".{key}.cdimg.x1y2.tmp"]
        for name in leftovers:
            with open(os.path.join(merged, name), "wb") as f:
                f.write(b"half a merge")
        fetched = os.path.join(srv.root, "artifacts", f"{first['sha256']}.cdimg.part-77")  # a registry fetch
        with open(fetched, "wb") as f:
            f.write(b"half a fetch")
        srv.start()
        assert not os.path.exists(fetched)
        assert sorted(os.listdir(merged)) == [f"{key}-{first['sha256']}.cdimg"]  # the finished merge stays
        again = plan(srv.host, "d4c-app:4", image_id(stack[0]))
        assert again["sha256"] == first["sha256"]
        status, body = request(srv.host, "GET", "/v1/stats")
        assert json.loads(body)["merges"] == 0  # served from the adopted cache
    finally:
        srv.stop()


# ---------------------------------------------------------------- 6. eviction of planned payloads

def test_a_planned_payload_is_not_evicted_before_its_download(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(str(tmp_path), "--cache-size", "1")  # every merge evicts the others
    try:
        for i, path in enumerate(stack):
            code, _, err = push(srv.host, path, f"d4c-app:{i + 1}")
            assert code == 0, err
        have = image_id(stack[0])
        a = plan(srv.host, "d4c-app:3", have)
        b = plan(srv.host, "d4c-app:4", have)  # another client's merge, before a's download
        assert a["dimgs"] == b["dimgs"] - 1 == 2
        for p in (a, b):
            status, body = request(srv.host, "GET", p["url"])
            assert status == 200 and len(body) == p["size"]
        c = plan(srv.host, "d4c-app:4", image_id(stack[1]))  # a third merge: downloaded payloads may go
        status, _ = request(srv.host, "GET", c["url"])
        assert status == 200
        assert len(os.listdir(os.path.join(srv.root, "merged"))) == 1
    finally:
        srv.stop()


def test_pull_plans_again_when_its_payload_is_gone(tmp_path, stack, images) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(str(tmp_path), "--cache-size", "1", "--pin-time", "0")  # no pins: evicted at once
    proxy = CuttingProxy(srv.host)
    try:
        for i, path in enumerate(stack):
            code, _, err = push(srv.host, path, f"d4c-app:{i + 1}")
            assert code == 0, err
        have = image_id(stack[0])
        evicted: list[str] = []

        def another_merge_first(line: bytes) -> None:
            if b"/v1/payloads/" in line and not evicted:
                evicted.append(plan(srv.host, "d4c-app:4", have)["sha256"])
        proxy.on_request = another_merge_first
        out = str(tmp_path / "3.cdimg")
        code, _, err = pull(proxy.host, "d4c-app:3", out, "--have", stack[0])
        assert code == 0, err
        assert evicted and sum(b"/v1/update" in r for r in proxy.requests) == 2  # planned again
        code, _, err = run_cli("cdimg", "patch", "--diffCdimg", out, "--baseCdimg", images[0], "--outCdimg",
                               str(tmp_path / "v3.cdimg"), "-q")
        assert code == 0, err
        assert read(str(tmp_path / "v3.cdimg")) == read(images[2])
    finally:
        proxy.stop()
        srv.stop()


def _stored(tmp_path, stack) -> Store:  # type: ignore[no-untyped-def]
    store = Store(str(tmp_path / "store"))
    for i, path in enumerate(stack):
        tmp = store.temp_path()
        shutil.copyfile(path, tmp)
        store.add(tmp, f"d4c-app:{i + 1}")
    return store


def test_a_merge_is_pinned_before_another_plan_can_evict_it(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    """Another client's plan right after this plan's merge was built, with a cache of one
    byte: it evicted the unpinned merge and this plan announced an empty digest."""
    from d4c.server.updates import Updates
    store = _stored(tmp_path, stack)
    have = {image_id(stack[0])}

    class Racing(Updates):
        raced = False

        def _build(self, key, start, path):  # type: ignore[no-untyped-def]
            made = super()._build(key, start, path)
            if not self.raced:
                self.raced = True
                self.plan("d4c-app:4", have)  # another merge, and its eviction
            return made

    try:
        updates = Racing(store, cache_limit=1)
        p = updates.plan("d4c-app:3", have)
        assert updates.raced and p["sha256"] and p["size"] > 0, p
        assert os.path.getsize(updates.payload(p["sha256"])) == p["size"]
    finally:
        store.close()


def test_a_payload_evicted_before_it_is_opened_is_404(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    """It was a 500, and pull exited 1 instead of asking for the update again."""
    from d4c.server.pool import PooledHTTPServer
    from d4c.server.updates import Updates
    from d4c.server.app import make_handler
    store = _stored(tmp_path, stack)

    class EvictsOnce(Updates):
        evicted = False

        def payload(self, digest: str) -> str:
            path = super().payload(digest)
            if "/merged/" in path and not self.evicted:  # a concurrent merge's eviction, right now
                self.evicted = True
                with self._lock:
                    [merged] = [m for m in self.cache.keys() if self.cache.path(m) == path]
                    self.cache.discard(merged)
            return path

    updates = EvictsOnce(store, cache_limit=1)
    srv = PooledHTTPServer(("127.0.0.1", 0), make_handler(store, updates))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{srv.server_address[1]}"
    try:
        out = str(tmp_path / "o.cdimg")
        code, _, err = run_cli("-q", "pull", "--image", "d4c-app:3", "--host", host, "--output", out,
                               "--have", stack[0], "--retry-time", "10")
        assert updates.evicted and code == 0, err
        assert image_id(out) == image_id(stack[2])
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


# ---------------------------------------------------------------- 7. minor

def test_suffix_ranges_and_two_content_lengths(server, stack) -> None:  # type: ignore[no-untyped-def]
    code, _, err = push(server.host, stack[0], "d4c-app:1")
    assert code == 0, err
    p = plan(server.host, "d4c-app:1")
    whole = read(stack[0])
    status, body = request(server.host, "GET", p["url"], headers={"Range": "bytes=-100"})
    assert status == 206 and body == whole[-100:]
    status, body = request(server.host, "GET", p["url"], headers={"Range": f"bytes=-{len(whole) + 5}"})
    assert status == 206 and body == whole
    status, _ = request(server.host, "GET", p["url"], headers={"Range": "bytes=-0"})
    assert status == 416
    host, port = server.host.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nContent-Length: 2\r\n\r\n0123456789")
        answer = b"".join(iter(lambda: s.recv(65536), b""))  # until the server closes
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"Content-Length" in answer.split(b"\r\n\r\n", 1)[1]
    with socket.create_connection((host, int(port)), timeout=30) as s:  # a digit int() refuses gets an answer
        s.sendall(b"POST /v1/push HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n0")
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 411"), answer


def test_a_tag_and_its_artifact_are_stored_together(tmp_path, images) -> None:  # type: ignore[no-untyped-def]
    store = Store(str(tmp_path / "store"))
    try:  # the tag's write fails (as a kill between the two would): the artifact must not stay alone
        store._db.execute("CREATE TRIGGER no_tags BEFORE INSERT ON tags BEGIN SELECT RAISE(ABORT, 'cut'); END")
        tmp = store.temp_path()
        shutil.copyfile(images[0], tmp)
        with pytest.raises(sqlite3.DatabaseError):
            store.add(tmp, "d4c-app:1")
        assert store.artifacts() == [] and store.tags() == {}
        assert os.listdir(store.dir) == []  # and no file the index does not know stays behind
        store._db.execute("DROP TRIGGER no_tags")
        tmp = store.temp_path()
        shutil.copyfile(images[0], tmp)
        store.add(tmp, "d4c-app:1")
        assert len(store.artifacts()) == 1 and list(store.tags()) == ["d4c-app:1"]
    finally:
        store.close()


# ---------------------------------------------------------------- 8. messages and exit codes

def test_a_server_that_is_not_running_is_named_with_a_hint(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    from daemons import free_port
    host = f"127.0.0.1:{free_port()}"
    for code, _, err in (pull(host, "d4c-app:1", str(tmp_path / "x")), push(host, stack[0])):
        assert_one_line_error(code, err, 7)
        assert f"is `server --root DIR --port {host.split(':')[1]}` running on 127.0.0.1?" in err
    code, _, err = push(host, str(tmp_path / "missing.cdimg"))
    assert_one_line_error(code, err, 4)
