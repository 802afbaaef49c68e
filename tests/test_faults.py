"""The fault campaign: kill a daemon under load, cut or stall the link, fill
the disk, lose power, and check what must hold afterwards (no container sees
a wrong byte, no stored artifact is corrupt or dangling, every interrupted
pull completes on retry, nothing under a final name is half written).

Every scenario runs `D4C_FAULT_RUNS` times (default 1: the bounded suite of
`make test`; `make bench-faults` runs the long form, bench/faults_bench.py)
and records per run whether it held and how many bytes of acknowledged data
were lost in `D4C_FAULT_RESULTS` (JSON lines) when that is set.  A scenario
fails its test when any run did not hold."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest

from conftest import BIG_SIZE, IS_ROOT
from daemons import (SRC, CuttingProxy, Server, clean_below, have_containerd, mounts_below, pids_naming, thread_count,
                     unmount_below)
from helpers import binary, fuse_server_pids, need, run_cli
from test_snapshotter import chain, daemons, load, running, wait_redial  # noqa: F401  (chain, daemons: fixtures)

RUNS = max(1, int(os.environ.get("D4C_FAULT_RUNS", "1")))
DEVICE_RUNS = max(2, RUNS)  # kill -9 of a device daemon: at least twice (the long form: N >= 20)
RESULTS = os.environ.get("D4C_FAULT_RESULTS")


class Broken(Exception):
    """A run in which something that must hold did not; `lost`: bytes of
    acknowledged data missing or wrong."""

    def __init__(self, what: str, lost: int = 0) -> None:
        super().__init__(what)
        self.lost = lost


def must(condition: object, what: str, lost: int = 0) -> None:
    if not condition:
        raise Broken(what, lost)


def campaign(scenario: str, runs: int, one: Callable[[int], int]) -> None:
    """Run `one(run)` `runs` times (it returns the bytes lost, 0 when all held, or
    raises Broken); record every run; fail when any did not hold."""
    broken: list[str] = []
    for run in range(runs):
        try:
            lost, held, why = one(run), True, ""
        except Broken as exc:
            lost, held, why = exc.lost, False, str(exc)
            broken.append(f"run {run}: {exc}")
        if held and lost:
            held, why = False, f"{lost} bytes lost"
            broken.append(f"run {run}: {why}")
        if RESULTS:
            with open(RESULTS, "a") as f:
                f.write(json.dumps({"scenario": scenario, "run": run, "held": held, "lost": lost, "why": why}) + "\n")
    assert not broken, f"{scenario}: {len(broken)} of {runs} runs broke: " + "; ".join(broken[:3])


def cli(*args: str) -> list[str]:
    """ctr-cli as its own process (one that can be killed): the binary when built."""
    path = binary("ctr-cli")
    return [path, *args] if path else [sys.executable, "-m", "d4c", *args]


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def store_damage(root: str, acknowledged: dict[str, int]) -> int:
    """Check a server store after a crash: every stored file is its digest, the
    index names only files that are there, no upload temp is left, and every
    acknowledged artifact (digest -> size) is stored whole.  Returns the bytes
    of acknowledged artifacts lost; raises Broken for any other damage."""
    folder = os.path.join(root, "artifacts")
    names = set(os.listdir(folder))
    for name in names:
        must(name.endswith(".cdimg"), f"stray file {name} in artifacts/")
        must(sha256_of(os.path.join(folder, name)) == name[:-6], f"artifacts/{name} is not its digest")
    must(not os.listdir(os.path.join(root, "tmp")), "an upload temp file outlived the restart")
    db = sqlite3.connect(f"file:{os.path.join(root, 'index.db')}?mode=ro", uri=True)
    try:
        indexed = {d for (d,) in db.execute("SELECT digest FROM artifacts")}
        tags = {i for (i,) in db.execute("SELECT image FROM tags")}
        images = {i for (i,) in db.execute("SELECT image FROM artifacts")}
    finally:
        db.close()
    must(all(d + ".cdimg" in names for d in indexed), "the index names an artifact whose file is gone")
    must(tags <= images, "a tag names an image no stored artifact gives")
    lost = sum(size for digest, size in acknowledged.items() if digest not in indexed)
    if lost:
        raise Broken(f"{lost} bytes of acknowledged artifacts are gone", lost)
    return 0


def pushed(host: str, path: str, tag: str | None = None) -> str:
    code, _, err = run_cli("push", "--cdimg", path, "--serverHost", host, "-q", *(["--imageTag", tag] if tag else []))
    must(code == 0, f"push: {err.strip()}")
    return sha256_of(path)


def pull(host: str, tag: str, out: str, *extra: str) -> tuple[int, str, str]:
    return run_cli("pull", "--image", tag, "--host", host, "--output", out, *extra)


def downloaded(text: str) -> int:
    return int(text.rsplit(",", 1)[1].split()[0])


@pytest.fixture()
def server(tmp_path):  # type: ignore[no-untyped-def]
    srv = Server(str(tmp_path), binary("server"))
    srv.start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.stop()


# ---------------------------------------------------------------- the server

def test_server_killed_mid_push(server, big, stack) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the server while a push streams in (through a link of 16 MiB/s,
    so the kill lands mid-upload or mid-check): after the restart nothing half
    stored is there, everything acknowledged is, and the push goes through."""
    acknowledged = {pushed(server.host, stack[0], "d4c-app:1"): os.path.getsize(stack[0])}
    proxy = CuttingProxy(server.host)
    proxy.rate = 16 << 20
    rnd = random.Random(1)
    try:
        def one(run: int) -> int:
            push = subprocess.Popen(cli("push", "--cdimg", big, "--serverHost", proxy.host, "--imageTag", f"big:{run}",
                                        "-q"), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(rnd.uniform(0.05, 0.4))
            server.kill()
            push.wait(timeout=60)
            if push.returncode == 0:  # it finished before the kill: acknowledged, so it must be there
                acknowledged[sha256_of(big)] = os.path.getsize(big)
            server.start()
            lost = store_damage(server.root, acknowledged)
            digest = pushed(server.host, big, f"big:{run}")
            acknowledged[digest] = os.path.getsize(big)
            out = os.path.join(server.root, "..", f"pulled-{run}.cdimg")
            code, _, err = pull(server.host, f"big:{run}", out)
            must(code == 0 and sha256_of(out) == digest, f"pull after the restart: {err.strip()}")
            os.unlink(out)
            return lost
        campaign("server killed mid-push", RUNS, one)
    finally:
        proxy.stop()


def image_id(path: str) -> str:
    from d4c.image.stack import read_info_at
    return read_info_at(path).image_id.hex()


def test_server_killed_mid_merge(server, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 while the server merges 1->2->3->4 for a client holding 1: the
    restarted server adopts only whole merges (each named by its digest) and
    the client's retry gets the image."""
    acknowledged = {pushed(server.host, path, f"d4c-app:{i + 1}"): os.path.getsize(path)
                    for i, path in enumerate(stack)}
    have = image_id(stack[0])
    rnd = random.Random(2)

    def one(run: int) -> int:
        merged = os.path.join(server.root, "merged")
        server.stop()  # every run starts with an empty cache, so the plan merges
        shutil.rmtree(merged)
        os.makedirs(merged)
        server.start()
        asking = threading.Thread(target=lambda: pull(server.host, "d4c-app:4", str(tmp_path / f"x{run}"),
                                                      "--have", stack[0], "--retry-time", "0"), daemon=True)
        asking.start()
        time.sleep(rnd.uniform(0.0, 0.3))
        server.kill()
        asking.join(60)
        server.start()
        lost = store_damage(server.root, acknowledged)
        for name in os.listdir(merged):
            must(name.endswith(".cdimg") and sha256_of(os.path.join(merged, name)) == name[:-6].rsplit("-", 1)[-1],
                 f"merged/{name} is not a whole merge")
        out = str(tmp_path / f"4-{run}.cdimg")
        code, _, err = pull(server.host, "d4c-app:4", out, "--have", stack[0])
        must(code == 0, f"pull after the restart: {err.strip()}")
        must(image_id(out) != have, "the merge gives the base")
        return lost
    campaign("server killed mid-merge", RUNS, one)


def test_pull_killed_mid_download(server, big, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of `pull --output` mid-download over a slow link: the rerun
    resumes the partial file and ends with the right bytes."""
    pushed(server.host, big, "big:1")
    proxy = CuttingProxy(server.host)
    rnd = random.Random(3)
    try:
        def one(run: int) -> int:
            out = str(tmp_path / f"big-{run}.cdimg")
            proxy.rate = 8 << 20
            proc = subprocess.Popen(cli("pull", "--image", "big:1", "--host", proxy.host, "--output", out, "-q"),
                                    env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            target = rnd.randint(256 << 10, BIG_SIZE // 2)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if os.path.exists(out + ".partial") and os.path.getsize(out + ".partial") >= target:
                    break
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)  # a one-file binary: its bootloader and the program it runs
            proc.wait()
            must(not os.path.exists(out), "a killed pull left its output under the final name")
            kept = os.path.getsize(out + ".partial") if os.path.exists(out + ".partial") else 0
            proxy.rate = None
            code, text, err = pull(proxy.host, "big:1", out)
            must(code == 0, f"the rerun: {err.strip()}")
            must(sha256_of(out) == sha256_of(big), "the resumed download is not the artifact")
            must(kept == 0 or downloaded(text) <= os.path.getsize(big) - kept + (64 << 10),
                 f"the rerun fetched {downloaded(text)} bytes, not the {os.path.getsize(big) - kept} left")
            return 0
        campaign("pull killed mid-download", RUNS, one)
    finally:
        proxy.stop()


def pulls_whole(proxy: CuttingProxy, big: str, out: str) -> None:
    """`pull` of big:1 through the faulty link ends with the artifact's bytes."""
    code, _, err = pull(proxy.host, "big:1", out, "--retry-time", "30")
    must(code == 0, f"pull: {err.strip()}")
    must(sha256_of(out) == sha256_of(big), "the pulled file is not the artifact")


def test_a_link_that_drops_every_256_kib(server, big, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pushed(server.host, big, "big:1")
    proxy = CuttingProxy(server.host, cut_every=256 << 10)
    try:
        def one(run: int) -> int:
            out = str(tmp_path / f"big-{run}.cdimg")
            cuts = proxy.cuts
            pulls_whole(proxy, big, out)
            must(proxy.cuts - cuts >= BIG_SIZE // (256 << 10), "the link was not cut every 256 KiB")
            return 0
        campaign("link drops every 256 KiB", RUNS, one)
    finally:
        proxy.stop()


def test_a_link_that_stalls(server, big, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The link goes silent for 4 s mid-download, then carries on."""
    pushed(server.host, big, "big:1")
    proxy = CuttingProxy(server.host)
    rnd = random.Random(4)
    try:
        def one(run: int) -> int:
            proxy.stall_after, proxy.stall_for = proxy.sent + rnd.randint(64 << 10, BIG_SIZE - (64 << 10)), 4.0
            out = str(tmp_path / f"big-{run}.cdimg")
            stalls = proxy.stalls
            pulls_whole(proxy, big, out)
            must(proxy.stalls == stalls + 1, "the link did not stall")
            return 0
        campaign("link stalls for 4 s", RUNS, one)
    finally:
        proxy.stop()


def test_a_full_server_disk(tmp_path, stack, big) -> None:  # type: ignore[no-untyped-def]
    """Pushes to a server whose disk is full fail with its reason (exit 5) and
    leave nothing; what was stored stays whole; freed space is used at once."""
    need(IS_ROOT, "a small tmpfs for the server's disk needs root")
    srv = Server(str(tmp_path), binary("server"))
    os.makedirs(srv.root)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", srv.root], check=True)
    try:
        srv.start()
        try:
            acknowledged = {pushed(srv.host, stack[0], "d4c-app:1"): os.path.getsize(stack[0])}

            def one(run: int) -> int:
                code, _, err = run_cli("push", "--cdimg", big, "--serverHost", srv.host, "-q")
                must(code == 5 and "no space left on device" in err, f"a push larger than the disk: {err.strip()}")
                must(not os.listdir(os.path.join(srv.root, "tmp")), "the refused upload left a temp file")
                filler = fill(srv.root)
                code, _, err = run_cli("push", "--cdimg", stack[1], "--serverHost", srv.host, "-q")
                must(code == 5, f"a push to a full disk: {err.strip()}")
                os.unlink(filler)
                acknowledged[pushed(srv.host, stack[1])] = os.path.getsize(stack[1])
                srv.stop()
                srv.start()
                return store_damage(srv.root, acknowledged)
            campaign("server disk full", RUNS, one)
        finally:
            srv.stop()
    finally:
        subprocess.run(["umount", "-l", srv.root], check=False)


def test_200_concurrent_pulls_in_bounded_memory(server, stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from d4c.server.client import Client
    for i, path in enumerate(stack):
        pushed(server.host, path, f"d4c-app:{i + 1}")
    have = {image_id(stack[0])}

    def one(run: int) -> int:
        results: list[str] = []
        start = threading.Barrier(200)

        def client(i: int) -> None:
            out = str(tmp_path / f"{run}-{i}.cdimg")
            try:
                start.wait()
                Client(server.host, timeout=120).fetch_update("d4c-app:4", have, out)
                results.append("ok")
            except Exception as exc:  # noqa: BLE001 - counted, reported below
                results.append(repr(exc))
            finally:
                for leftover in (out, out + ".partial"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        failed = [r for r in results if r != "ok"]
        must(len(results) == 200 and not failed, f"{len(failed)} of 200 pulls failed: {failed[:2]}")
        stats = Client(server.host).get_json("/v1/stats", "stats")
        must(stats["peakRssKiB"] < 256 << 10, f"the server's RSS peaked at {stats['peakRssKiB'] >> 10} MiB")
        return 0
    campaign("200 concurrent pulls, RSS < 256 MiB", RUNS, one)


def test_500_idle_connections(tmp_path, stack) -> None:  # type: ignore[no-untyped-def]
    srv = Server(str(tmp_path), binary("server"), ("--idle-timeout", "2", "--workers", "16"))
    srv.start()
    try:
        pushed(srv.host, stack[0], "d4c-app:1")
        host, port = srv.host.split(":")

        def one(run: int) -> int:
            idle = [socket.create_connection((host, int(port))) for _ in range(500)]
            try:
                time.sleep(0.3)
                assert srv.proc is not None
                threads = thread_count(srv.proc.pid)
                must(threads < 60, f"{threads} server threads for 500 idle connections")
                code, _, err = pull(srv.host, "d4c-app:1", str(tmp_path / f"1-{run}.cdimg"))
                must(code == 0, f"a pull among 500 idle connections: {err.strip()}")
            finally:
                for s in idle:
                    s.close()
            return 0
        campaign("500 idle connections", RUNS, one)
    finally:
        srv.stop()


# ---------------------------------------------------------------- power loss

class LoopDisk:
    """An ext4 file system on a loop device over an image file.  `cut()` is a
    power loss: the image file is copied as the loop device has written it,
    without what the file system still holds in memory (no sync, no unmount);
    the copy, its journal replayed, is the disk after the power came back."""

    def __init__(self, image: str, mountpoint: str, size_mib: int = 96) -> None:
        self.image, self.mountpoint = image, mountpoint
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True)
        os.makedirs(mountpoint, exist_ok=True)
        self._mount(image)

    def _mount(self, image: str) -> None:
        self.device = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                                     text=True).stdout.strip()
        subprocess.run(["mount", "-t", "ext4", self.device, self.mountpoint], check=True)

    def cut(self) -> None:
        after = self.image + ".after"
        # the loop device's writes are in the backing file (the host's page cache is coherent);
        # what ext4 has not yet written out is not
        subprocess.run(["cp", "--sparse=always", self.image, after], check=True)
        self.detach()
        os.replace(after, self.image)
        fsck = subprocess.run(["e2fsck", "-fy", self.image], capture_output=True, text=True)
        must(fsck.returncode in (0, 1), f"e2fsck after the power loss: {fsck.returncode} {fsck.stdout[-200:]}")
        self._mount(self.image)

    def detach(self) -> None:
        subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        subprocess.run(["losetup", "-d", self.device], capture_output=True)


@pytest.fixture()
def loop_disk(tmp_path):  # type: ignore[no-untyped-def]
    need(IS_ROOT and shutil.which("losetup") and shutil.which("mkfs.ext4"),
         "a loop-device file system needs root, losetup and mkfs.ext4")
    disk = LoopDisk(str(tmp_path / "disk.img"), str(tmp_path / "disk"))
    yield disk
    disk.detach()


def test_power_loss_under_the_server_store(loop_disk, tmp_path, stack, big) -> None:  # type: ignore[no-untyped-def]
    """The server's store on a disk that loses power right after pushes were
    acknowledged, with another push in flight: afterwards every acknowledged
    artifact and tag is there, whole, and nothing dangles."""
    srv = Server(loop_disk.mountpoint, binary("server"))
    rnd = random.Random(5)
    acknowledged: dict[str, int] = {}

    def one(run: int) -> int:
        srv.start()
        for i, path in enumerate(stack[:2] if run == 0 else stack[2:3] if run == 1 else []):
            acknowledged[pushed(srv.host, path, f"d4c-app:{run}-{i}")] = os.path.getsize(path)
        push = subprocess.Popen(cli("push", "--cdimg", big, "--serverHost", srv.host, "--imageTag", f"big:{run}", "-q"),
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.0, 0.3))
        srv.kill()
        push.wait(timeout=60)
        if push.returncode == 0:
            acknowledged[sha256_of(big)] = os.path.getsize(big)
        loop_disk.cut()
        srv.start()
        try:
            lost = store_damage(srv.root, acknowledged)
            code, _, err = pull(srv.host, "d4c-app:0-1", str(tmp_path / f"p{run}.cdimg"))
            must(code == 0, f"a pull after the power loss: {err.strip()}")
        finally:
            srv.stop()
        return lost
    campaign("power loss under the server's store", RUNS, one)


# ---------------------------------------------------------------- the device

READER_SCRIPT = ("while true; do /bin/busybox sha256sum /bin/busybox /lib/libdata.so 2>&1 | "
                 "/bin/busybox tr '\\n' ' ' >> /tmp/sums; echo >> /tmp/sums; /bin/busybox usleep 50000; done")


def expected_sums() -> dict[str, str]:
    with open("/bin/busybox", "rb") as f:
        bb = hashlib.sha256(f.read()).hexdigest()
    return {"/bin/busybox": bb, "/lib/libdata.so": hashlib.sha256(bytes(range(256)) * 400).hexdigest()}


def wrong_reads(ctrd, name: str) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    """(good lines, lines with a wrong digest) of a reader container's log; a
    read that failed (EIO, a dead mount) is no wrong byte and counts as neither."""
    want = expected_sums()
    text = ctrd.ctr("tasks", "exec", "--exec-id", f"x{time.monotonic_ns()}", name, "/bin/busybox", "cat",
                    "/tmp/sums", check=False).stdout
    good, wrong = 0, []
    for line in text.splitlines():
        words = line.split()
        pairs = dict(zip(words[1::2], words[0::2]))
        seen = {p: d for p, d in pairs.items() if p in want and len(d) == 64}
        if any(want[p] != d for p, d in seen.items()):
            wrong.append(line)
        elif len(seen) == len(want):
            good += 1
    return good, wrong


@pytest.fixture()
def device(daemons, chain):  # type: ignore[no-untyped-def]
    """containerd + di3fs with the busybox chain's v1 and v2 loaded and two
    containers of v2 reading its files in a loop."""
    ctrd, snap = daemons
    for n, path in enumerate(chain[:2], 1):
        code, _, err = load(ctrd, snap, f"d4c-bb:{n}", path)
        assert code == 0, err
    readers = [f"reader{i}-{ctrd.namespace}" for i in (1, 2)]
    for name in readers:
        ctrd.ctr("run", "-d", "--snapshotter", "di3fs", "d4c-bb:2", name, "/bin/sh", "-c", READER_SCRIPT)
    yield ctrd, snap, readers
    for name in readers:
        ctrd.remove_container(name, check=False)


def a_new_container_reads_v2(ctrd, run: int, within: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    wait_redial(ctrd)
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        name = f"new{run}-{time.monotonic_ns()}"
        p = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", "d4c-bb:2", name, "/bin/busybox", "sha256sum",
                     "/lib/libdata.so", check=False)
        if p.returncode == 0:
            must(p.stdout.split()[0] == expected_sums()["/lib/libdata.so"], "a new container read a wrong byte")
            return
        last = p.stderr.strip()
        ctrd.remove_container(name, check=False)
        time.sleep(0.5)
    raise Broken(f"no new container of the image ran within {within} s: {last[-200:]}")


def test_snapshotter_killed_while_containers_read(device) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of di3fs while two containers read: they go on reading the right
    bytes (their mounts are served by processes of their own), and after the
    restart new containers of the image start."""
    ctrd, snap, readers = device
    rnd = random.Random(7)

    def one(run: int) -> int:
        before = [wrong_reads(ctrd, r)[0] for r in readers]
        snap.kill()
        time.sleep(rnd.uniform(0.0, 0.5))
        snap.start()
        a_new_container_reads_v2(ctrd, run)
        time.sleep(0.3)
        for name, earlier in zip(readers, before):
            good, wrong = wrong_reads(ctrd, name)
            must(not wrong, f"{name} read a wrong byte: {wrong[:1]}")
            must(good > earlier, f"{name} stopped reading while di3fs was down")
        return 0
    campaign("snapshotter killed while containers read", DEVICE_RUNS, one)


def test_fuse_server_killed(device) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the FUSE server of the image the containers read: they see
    errors, never a wrong byte, and the next containers start on the mount
    di3fs makes again."""
    ctrd, snap, readers = device

    def one(run: int) -> int:
        servers = fuse_server_pids(snap.root)
        must(servers, "no FUSE server to kill")
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        a_new_container_reads_v2(ctrd, run, within=20)
        for name in readers:
            _, wrong = wrong_reads(ctrd, name)
            must(not wrong, f"{name} read a wrong byte: {wrong[:1]}")
        return 0
    campaign("FUSE mount servers killed", DEVICE_RUNS, one)


def test_containerd_killed(device) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of containerd: the containers go on reading the right bytes
    (runc's shims keep them), and the restarted containerd runs new ones."""
    ctrd, snap, readers = device

    def one(run: int) -> int:
        assert ctrd.proc is not None
        before = [wrong_reads(ctrd, r)[0] for r in readers]
        os.killpg(ctrd.proc.pid, signal.SIGKILL)
        ctrd.proc.wait()
        time.sleep(0.5)
        if os.path.exists(ctrd.socket):  # a killed containerd leaves its socket
            os.unlink(ctrd.socket)
        ctrd.start()
        a_new_container_reads_v2(ctrd, run)
        for name, earlier in zip(readers, before):
            good, wrong = wrong_reads(ctrd, name)
            must(not wrong, f"{name} read a wrong byte: {wrong[:1]}")
            must(good > earlier, f"{name} stopped reading when containerd died")
        return 0
    campaign("containerd killed", DEVICE_RUNS, one)



# ---------------------------------------------------------------- the device's disk

V4_LIBDATA = hashlib.sha256(bytes(range(256)) * 399 + b"x" * 256).hexdigest()


def image_mount(snap_root: str, version: str) -> str:
    """The FUSE mount of the loaded image whose /etc/version is `version`."""
    for point in mounts_below(snap_root, "fuse.d4c"):
        with contextlib.suppress(OSError), open(os.path.join(point, "etc", "version")) as f:
            if f.read() == version + "\n":
                return point
    raise Broken(f"no mount of {version}")


def stored_images_whole(snap_root: str, loaded: list[str]) -> None:
    """Every image file di3fs stores is the image its name says, every image it
    acknowledged is there, and no hand-over is left half copied."""
    from d4c.image.stack import read_info_at
    folder = os.path.join(snap_root, "images")
    names = [n for n in os.listdir(folder) if n.endswith(".cdimg")]
    for name in names:
        must(read_info_at(os.path.join(folder, name)).image_id.hex() == name[:-6], f"images/{name} is another image")
    for path in loaded:
        must(f"{read_info_at(path).image_id.hex()}.cdimg" in names, f"the acknowledged {path} is gone")
    db = sqlite3.connect(f"file:{os.path.join(snap_root, 'metadata.db')}?mode=ro", uri=True)
    try:
        rows = {i for (i,) in db.execute("SELECT id FROM images")}
    finally:
        db.close()
    must(all(f"{r}.cdimg" in names for r in rows), "metadata.db names an image whose file is gone")


def fill(folder: str) -> str:
    """Fill the file system of `folder` to the last byte; the filler's path."""
    filler = os.path.join(folder, "filler")
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        with contextlib.suppress(OSError):
            f.close()
    return filler


@contextlib.contextmanager
def device_on(base: str, mount: Callable[[str], None]):  # type: ignore[no-untyped-def]
    """containerd + di3fs whose --root is on the file system `mount(path)` makes."""
    need(IS_ROOT, "containerd, runc, FUSE and tmpfs need root")
    missing = have_containerd()
    need(missing is None, missing or "")
    os.makedirs(os.path.join(base, "run"), exist_ok=True)
    os.makedirs(os.path.join(base, "di3fs"), exist_ok=True)
    mount(os.path.join(base, "di3fs"))
    with running(base, binary("snapshotter")) as both:
        yield both


def test_a_full_snapshotter_disk_and_llfs_cache(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """di3fs's root (its images, the hand-over, the llfs cache of rebuilt files)
    on a full disk: a load is refused with the reason and leaves nothing, a
    rebuild fails its read (never a wrong byte), and all works once there is room."""
    base = str(tmp_path / "d")

    def tmpfs(path: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", path], check=True)
    try:
        with device_on(base, tmpfs) as (ctrd, snap):
            code, _, err = load(ctrd, snap, "d4c-bb:1", chain[0])
            assert code == 0, err

            def one(run: int) -> int:
                loaded = [chain[0]]
                filler = fill(snap.root)
                code, _, err = load(ctrd, snap, f"d4c-bb:2-{run}", chain[1])
                if code == 0:  # the delta fitted in what the filler left: it is stored whole
                    loaded.append(chain[1])
                else:
                    must(code == 5 and "no space" in err and len(err.strip().splitlines()) == 1,
                         f"a load to a full disk: {err.strip()}")
                with open(os.path.join(image_mount(snap.root, "v1"), "lib", "libdata.so"), "rb") as f:
                    must(hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(bytes(range(256)) * 400).hexdigest(),
                         "v1 read wrong bytes while the disk was full")
                os.unlink(filler)
                for n, path in enumerate(chain[1:], 2):
                    code, _, err = load(ctrd, snap, f"d4c-bb:{n}", path)
                    must(code == 0, f"load of v{n} once there is room: {err.strip()}")
                    loaded.append(path)
                subprocess.run(["sync"], check=False)
                for name in os.listdir(os.path.join(snap.root, "cache")):  # rebuilt bodies: rebuilt again (the
                    shutil.rmtree(os.path.join(snap.root, "cache", name), ignore_errors=True)  # cache makes its dir)
                filler = fill(snap.root)
                v4 = os.path.join(image_mount(snap.root, "v4"), "lib", "libdata.so")
                try:
                    with open(v4, "rb") as f:
                        must(hashlib.sha256(f.read()).hexdigest() == V4_LIBDATA, "a rebuild on a full disk read wrong")
                except OSError:
                    pass  # refused for want of room: the read fails, nothing wrong is read
                os.unlink(filler)
                with open(v4, "rb") as f:
                    must(hashlib.sha256(f.read()).hexdigest() == V4_LIBDATA, "the rebuilt file is wrong")
                out = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", "d4c-bb:4", f"full{run}-{ctrd.namespace}",
                               check=False)
                must(out.stdout == "v4\n", f"a container of v4 after the full disk: {out.stderr.strip()}")
                stored_images_whole(snap.root, loaded)
                must(not [n for n in os.listdir(os.path.join(snap.root, "incoming")) if not n.endswith(".checked")],
                     "a refused load left its hand-over")
                return 0
            campaign("snapshotter root and llfs cache full", DEVICE_RUNS, one)
    finally:
        clean_below(base)
        subprocess.run(["umount", "-l", os.path.join(base, "di3fs")], check=False)


def test_power_loss_under_the_snapshotter(chain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """di3fs's root (metadata.db, images) on a disk that loses power with a load
    in flight, everything killed at once: after the reboot every acknowledged
    image is there, whole, its containers run, and the next load works."""
    need(shutil.which("losetup") and shutil.which("mkfs.ext4"), "losetup and mkfs.ext4 are needed")
    base = str(tmp_path / "d")
    rnd = random.Random(8)
    disks: list[LoopDisk] = []

    def ext4(path: str) -> None:
        disks.append(LoopDisk(str(tmp_path / "root.img"), path))

    try:
        with device_on(base, ext4) as (ctrd, snap):
            disk = disks[0]

            def one(run: int) -> int:
                if run:  # after the last run's power loss: the device again, its images removed
                    snap.start()
                    ctrd.start()
                    wait_redial(ctrd)
                    ctrd.ctr("images", "rm", "--sync", "d4c-bb:1", "d4c-bb:2", check=False)
                code, _, err = load(ctrd, snap, "d4c-bb:1", chain[0])
                must(code == 0, f"load of v1: {err.strip()}")
                loading = subprocess.Popen(cli("load", "--image", "d4c-bb:2", "--cdimg", chain[1], "--address",
                                               ctrd.socket, "--namespace", ctrd.namespace, "--snapshotter-root",
                                               snap.root, "-q"), env=cli_env(), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                time.sleep(rnd.uniform(0.0, 0.6))
                # the power goes: every process at once, then the disk as far as it was written
                assert ctrd.proc is not None
                for proc in (snap.proc, ctrd.proc):
                    if proc and proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                for pid in pids_naming(base):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                loading.wait(timeout=60)
                loaded = [chain[0]] + ([chain[1]] if loading.returncode == 0 else [])
                unmount_below(snap.root)
                disk.cut()
                if os.path.exists(ctrd.socket):
                    os.unlink(ctrd.socket)
                snap.start()
                ctrd.start()
                wait_redial(ctrd)
                stored_images_whole(snap.root, loaded)
                for n, path in enumerate(chain[:2], 1):  # the next load (again, where it was lost) works
                    code, _, err = load(ctrd, snap, f"d4c-bb:{n}", path)
                    must(code == 0, f"load of v{n} after the power loss: {err.strip()}")
                out = ctrd.ctr("run", "--rm", "--snapshotter", "di3fs", "d4c-bb:2", f"pl{run}-{ctrd.namespace}",
                               check=False)
                must(out.stdout == "v2\n", f"a container of v2 after the power loss: {out.stderr.strip()}")
                ctrd.remove_containers()
                ctrd.stop()
                snap.stop()
                for pid in pids_naming(base):  # the FUSE servers; the disk itself stays mounted
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                unmount_below(snap.root)
                return 0
            campaign("power loss under the snapshotter's root", RUNS, one)
    finally:
        clean_below(base)
        for disk in disks:
            disk.detach()
