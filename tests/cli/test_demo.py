"""`make demo` (demo/demo.sh): the original README's workflow with our binaries,
against a private containerd, snapshotter and server that it starts and stops.
Run for real: it needs root, containerd and the binaries of `make all`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import IS_ROOT
from daemons import clean_below, have_containerd, mounts_below, namespace_cgroups, pids_naming
from helpers import ROOT, need

DEMO = os.path.join(ROOT, "demo", "demo.sh")


def need_demo(*tools: str) -> None:
    """What demo.sh needs (`make demo` installs it): root, containerd, FUSE, the
    binaries of `make all`, and `tools` for the image pair."""
    need(IS_ROOT, "the demo needs root (containerd, FUSE and overlay mounts)")
    missing = have_containerd()
    need(missing is None, missing or "")
    need(os.path.exists("/dev/fuse"), "no /dev/fuse")
    for tool in tools:
        need(shutil.which(tool) is not None, f"{tool} is not installed (`make demo` installs it)")
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
           "PY": sys.executable}
    return subprocess.Popen(["bash", DEMO], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def work_dir_of(output: str) -> str | None:
    found = re.search(r"\(logs in (/tmp/d4c-demo\.\w+)\)", output)
    return found.group(1) if found else None


def assert_nothing_left(work: str, demo_pid: int) -> None:
    """No mount, no process, no files of the demo's work directory and no cgroup
    of its containerd namespace (d4c-demo-PID) remain."""
    assert not mounts_below(work), mounts_below(work)
    left = pids_naming(work)
    assert not left, f"processes of the demo still run: {left}"
    assert not os.path.exists(work)
    assert not namespace_cgroups(f"d4c-demo-{demo_pid}"), namespace_cgroups(f"d4c-demo-{demo_pid}")


def kill_demo(proc: subprocess.Popen[str], output: str) -> None:
    """A demo that hung: its process group and whatever names its work directory
    go, mounts first -- the next test must not find them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    work = work_dir_of(output)
    if work:
        clean_below(work)
        shutil.rmtree(work, ignore_errors=True)


def run_demo(images: str, timeout: float) -> str:
    proc = start_demo(images)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # its own cleanup first
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired as exc:
            raw = exc.output or b""  # bytes even in text mode
            output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        kill_demo(proc, output)
        pytest.fail(f"the demo did not finish in {timeout} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    work = work_dir_of(output)
    assert work, output[-3000:]
    assert_nothing_left(work, proc.pid)
    return output


def installed_version(rootfs: str, package: str) -> str:
    """The version dpkg recorded for `package` in an image's rootfs."""
    with open(os.path.join(rootfs, "var", "lib", "dpkg", "status")) as f:
        for stanza in f.read().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
            if fields.get("Package") == package:
                return fields["Version"]
    raise AssertionError(f"{package} is not installed in {rootfs}")


def sizes(output: str) -> tuple[int, int]:
    full = re.search(r"full v2 image \(cdimg\)\s+(\d+) bytes", output)
    delta = re.search(r"delta v1 -> v2\s+(\d+) bytes", output)
    assert full and delta, output[-2000:]
    return int(full.group(1)), int(delta.group(1))


def test_demo_busybox_pair() -> None:
    """The whole workflow ends with the new version's output and the table; the
    delta is a small part of the image; nothing is left running or mounted."""
    need_demo("umoci", "busybox")
    output = run_demo("busybox", timeout=600)
    assert "hello from d4c, version 2" in output
    assert "(busybox pair)" in output
    full, delta = sizes(output)
    assert delta < full / 10, (full, delta)
    for step in ("convert v1", "cdimg diff", "push delta", "pull 2", "ctr run"):
        assert re.search(rf"^{step}\s+[\d.]+ s$", output, re.M), step


def test_demo_debian_nginx_pair() -> None:
    """With the Debian archive reachable the demo builds the minbase + nginx pair
    (deb12u9 -> deb12u11) and the running container reports the new package."""
    need_demo("debootstrap")
    # CI installs its apt packages from this archive: there it must be reachable
    need(archive_reachable(), "the Debian archive (deb.debian.org) is not reachable: the demo uses the busybox pair")
    output = run_demo("debian", timeout=1500)
    assert "(debian pair)" in output
    # the newer nginx: deb12u11, or the newest the archive has when it moved on
    new = installed_version(os.path.join(ROOT, "bench", "cache", "img", "rootfs-B"), "nginx")
    assert re.search(rf"^nginx\s+{re.escape(new)}$", output, re.M), output[-2000:]
    assert new != installed_version(os.path.join(ROOT, "bench", "cache", "img", "rootfs-A"), "nginx")
    full, delta = sizes(output)
    assert delta < full / 100, (full, delta)


def test_demo_ctrl_c_leaves_nothing_behind() -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while
    an image is mounted: every daemon, FUSE server and mount goes away."""
    need_demo("umoci", "busybox")
    proc = start_demo("busybox")
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    work, mounted, deadline = None, [], time.monotonic() + 300
    try:
        while not mounted and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            work = work_dir_of("".join(lines))
            mounted = mounts_below(work) if work else []
        assert mounted, "the demo never mounted anything:\n" + "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        assert proc.returncode != 0, "".join(lines)
        assert work is not None
        assert_nothing_left(work, proc.pid)
    finally:
        if proc.poll() is None or (work and (mounts_below(work) or pids_naming(work) or os.path.exists(work))):
            kill_demo(proc, "".join(lines))
