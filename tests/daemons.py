"""Real daemons for the tests: a private containerd (with the di3fs proxy
plugin), our snapshotter, a registry and a token-auth front for it, each in
its own session, always torn down."""

from __future__ import annotations

import json
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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's docker-registry (distribution) on loopback, plain HTTP."""

    def __init__(self, base: str) -> None:
        self.root = os.path.join(base, "registry")
        self.port = free_port()
        self.config = os.path.join(base, "registry.yml")
        self.log = os.path.join(base, "registry.log")
        with open(self.config, "w") as f:
            f.write(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {self.root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}
""")
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import socket
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", self.config], stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise AssertionError("docker-registry exited")
            time.sleep(0.05)
        raise AssertionError("docker-registry did not listen")

    def push(self, layout: str, tag: str, name: str) -> str:
        ref = f"docker://{self.host}/{name}:{tag}"
        subprocess.run(["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", ref],
                       check=True, capture_output=True, timeout=120)
        return ref

    def blob_path(self, digest: str) -> str:
        hexd = digest.split(":", 1)[1]
        return os.path.join(self.root, "docker", "registry", "v2", "blobs", "sha256", hexd[:2], hexd, "data")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


class TokenProxy:
    """A registry front on loopback that wants bearer tokens from its own token
    endpoint (basic credentials), as Docker Hub does; it can drop the first
    download of a blob half-way to exercise resumption."""

    def __init__(self, upstream: str, user: str, password: str, drop_first_blob: bool = False) -> None:
        import base64
        import http.client
        import http.server
        import secrets
        import threading
        self.upstream = upstream
        self.token = secrets.token_hex(16)
        self.good = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.drop = drop_first_blob
        self.dropped = 0
        self.ranges: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/token"):
                    if self.headers.get("Authorization") != proxy.good:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = json.dumps({"token": proxy.token}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.headers.get("Authorization") != f"Bearer {proxy.token}":
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="http://{proxy.host}/token",'
                                     'service="d4c-test",scope="repository:d4c/app:pull"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
                if "range" in (k.lower() for k in headers):
                    proxy.ranges.append(self.headers.get("Range", ""))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "docker-content-digest", "content-range"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if proxy.drop and "/blobs/" in self.path and len(body) > 1000 and not proxy.dropped:
                    proxy.dropped += 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
