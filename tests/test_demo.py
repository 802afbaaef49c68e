"""`make demo` (demo/demo.sh): the original README's workflow with our binaries,
against a private containerd, snapshotter and server that it starts and stops.
Run for real: it needs root, containerd and the binaries of `make all`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
from conftest import IS_ROOT
from daemons import have_containerd
from helpers import need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo", "demo.sh")


def need_demo() -> None:
    need(IS_ROOT, "the demo needs root (containerd, FUSE and overlay mounts)")
    missing = have_containerd()
    need(missing is None, missing or "")
    for name in ("ctr-cli", "snapshotter", "server"):
        need(os.access(os.path.join(ROOT, name), os.X_OK), f"no ./{name} in the repo root (run `make all`)")


def archive_reachable() -> bool:
    try:
        urllib.request.urlopen("http://deb.debian.org/debian/dists/bookworm/Release", timeout=10).read(1)
        return True
    except OSError:
        return False


def start_demo(images: str) -> subprocess.Popen[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "D4C_DEMO_IMAGES": images,
           "PY": os.path.join(ROOT, ".venv", "bin", "python")}
    return subprocess.Popen(["bash", DEMO], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def work_dir_of(output: str) -> str:
    found = re.search(r"\(logs in (/tmp/d4c-demo\.\w+)\)", output)
    assert found, output
    return found.group(1)


def assert_nothing_left(work: str) -> None:
    """No mount, no process and no files of the demo's work directory remain."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if work in line]
    assert not mounts, mounts
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if work.encode() in f.read():
                    left.append(pid)
        except OSError:
            continue
    assert not left, f"processes of the demo still run: {left}"
    assert not os.path.exists(work)


def run_demo(images: str, timeout: float) -> str:
    proc = start_demo(images)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"the demo did not finish in {timeout} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert_nothing_left(work_dir_of(output))
    return output


def sizes(output: str) -> tuple[int, int]:
    full = re.search(r"full v2 image \(cdimg\)\s+(\d+) bytes", output)
    delta = re.search(r"delta v1 -> v2\s+(\d+) bytes", output)
    assert full and delta, output[-2000:]
    return int(full.group(1)), int(delta.group(1))


def test_demo_busybox_pair() -> None:
    """The whole workflow ends with the new version's output and the table; the
    delta is a small part of the image; nothing is left running or mounted."""
    need_demo()
    output = run_demo("busybox", timeout=600)
    assert "hello from d4c, version 2" in output
    assert "(busybox pair)" in output
    full, delta = sizes(output)
    assert delta < full / 10, (full, delta)
    for step in ("convert v1", "cdimg diff", "push delta", "pull 2", "ctr run"):
        assert re.search(rf"^{step}\s+[\d.]+ s$", output, re.M), step


def test_demo_debian_nginx_pair() -> None:
    """With the Debian archive reachable the demo builds the minbase + nginx pair
    (deb12u9 -> deb12u11) and the running container reports the new packages."""
    need_demo()
    # CI installs its apt packages from this archive: there it must be reachable
    need(archive_reachable(), "the Debian archive (deb.debian.org) is not reachable: the demo uses the busybox pair")
    output = run_demo("debian", timeout=1500)
    assert "(debian pair)" in output
    assert re.search(r"^nginx\s+1\.22\.1-9\+deb12u11$", output, re.M), output[-2000:]
    full, delta = sizes(output)
    assert delta < full / 100, (full, delta)


def test_demo_ctrl_c_leaves_nothing_behind() -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while
    an image is mounted: every daemon, FUSE server and mount goes away."""
    need_demo()
    proc = start_demo("busybox")
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    work, mounted, deadline = None, [], time.monotonic() + 300
    while not mounted and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        found = re.search(r"\(logs in (/tmp/d4c-demo\.\w+)\)", "".join(lines))
        if found:
            work = found.group(1)
            with open("/proc/self/mountinfo") as f:
                mounted = [line.split()[4] for line in f if work in line]
    assert mounted, "the demo never mounted anything:\n" + "".join(lines)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    assert proc.returncode != 0, "".join(lines)
    assert work is not None
    assert_nothing_left(work)
