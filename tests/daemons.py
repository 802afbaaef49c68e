"""Real daemons for the tests: a private containerd (with the di3fs proxy
plugin) and our snapshotter, each in its own session, always torn down."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def wait_for(path: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode} before listening")
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {path} within {timeout} s")


class Snapshotterd:
    def __init__(self, base: str, binary: str | None = None) -> None:
        self.root = os.path.join(base, "di3fs")
        self.socket = os.path.join(base, "run", "di3fs.sock")
        self.log = os.path.join(base, "snapshotter.log")
        self.binary = binary
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    def start(self) -> None:
        cmd = [self.binary] if self.binary else [sys.executable, "-m", "d4c.snap"]
        env = dict(os.environ, PYTHONPATH=SRC)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd + ["--address", self.socket, "--root", self.root], env=env,
                                         stdout=log, stderr=log, start_new_session=True)
        wait_for(self.socket, self.proc, "snapshotter")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""


class Containerd:
    def __init__(self, base: str, snapshotter_socket: str) -> None:
        self.base = base
        self.socket = os.path.join(base, "run", "containerd.sock")
        self.namespace = f"d4c-test-{uuid.uuid4().hex[:8]}"
        self.config = os.path.join(base, "containerd.toml")
        self.log = os.path.join(base, "containerd.log")
        with open(self.config, "w") as f:
            f.write(f'''version = 2
root = "{base}/containerd-root"
state = "{base}/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.socket}"
[proxy_plugins.di3fs]
  type = "snapshot"
  address = "{snapshotter_socket}"
''')
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", self.config], stdout=log, stderr=log,
                                         start_new_session=True)
        wait_for(self.socket, self.proc, "containerd")

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["ctr", "--address", self.socket, "--namespace", self.namespace, *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise AssertionError(f"ctr {' '.join(args)}: {p.stderr.strip()}")
        return p

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def unmount_below(base: str) -> None:
    """Unmount whatever a test left mounted under `base` (deepest first)."""
    base = os.path.abspath(base)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(base + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def have_containerd() -> str | None:
    for tool in ("containerd", "ctr", "runc"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None
