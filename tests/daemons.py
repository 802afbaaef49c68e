"""Real daemons for the tests: a private containerd (with the di3fs proxy
plugin), our snapshotter, a registry and a token-auth front for it, each in
its own session, always torn down."""

from __future__ import annotations

import contextlib
import glob
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable

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
    def __init__(self, base: str, binary: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.extra = list(extra)
        self.root = os.path.join(base, "di3fs")
        self.socket = os.path.join(base, "run", "di3fs.sock")
        self.log = os.path.join(base, "snapshotter.log")
        self.binary = binary
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    def start(self) -> None:
        cmd = [self.binary] if self.binary else [sys.executable, "-m", "d4c.snap"]
        env = dict(os.environ, PYTHONPATH=SRC)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd + ["--address", self.socket, "--root", self.root, *self.extra], env=env,
                                         stdout=log, stderr=log, start_new_session=True)
        wait_for(self.socket, self.proc, "snapshotter")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        terminate(self.proc, sig)

    def kill(self) -> None:
        """kill -9 of the daemon: its whole session (a one-file binary's bootloader and the
        program it runs; the FUSE servers have sessions of their own and stay)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def logs(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""


class Containerd:
    """A private containerd using di3fs.  With `cri_registries` its CRI plugin runs too
    (image service only: no CNI), pulling into di3fs with the snapshot labels a remote
    snapshotter needs, from those registries over plain HTTP; its namespace is k8s.io."""

    def __init__(self, base: str, snapshotter_socket: str, cri_registries: tuple[str, ...] = ()) -> None:
        self.base = base
        self.socket = os.path.join(base, "run", "containerd.sock")
        self.namespace = "k8s.io" if cri_registries else f"d4c-test-{uuid.uuid4().hex[:8]}"
        self.config = os.path.join(base, "containerd.toml")
        self.log = os.path.join(base, "containerd.log")
        if cri_registries:
            cri = "\n".join(['[plugins."io.containerd.grpc.v1.cri".containerd]', '  snapshotter = "di3fs"',
                             "  disable_snapshot_annotations = false"]
                            + [f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]\n'
                               f'  endpoint = ["http://{host}"]' for host in cri_registries])
            disabled = ""
        else:
            cri, disabled = "", 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
        with open(self.config, "w") as f:
            f.write(f'''version = 2
root = "{base}/containerd-root"
state = "{base}/containerd-state"
{disabled}
[grpc]
  address = "{self.socket}"
[proxy_plugins.di3fs]
  type = "snapshot"
  address = "{snapshotter_socket}"
{cri}
''')
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", self.config], stdout=log, stderr=log,
                                         start_new_session=True)
        wait_for(self.socket, self.proc, "containerd")

    def ctr_args(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.socket, "--namespace", self.namespace, *args]

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.ctr_args(*args), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise AssertionError(f"ctr {' '.join(args)}: {p.stderr.strip()}")
        return p

    def remove_container(self, name: str, check: bool = True) -> None:
        """Kill a container's task, wait until it can be deleted, delete both."""
        self.ctr("tasks", "kill", "-s", "KILL", name, check=False)
        for _ in range(50):
            if self.ctr("tasks", "delete", name, check=False).returncode == 0:
                break
            time.sleep(0.1)
        self.ctr("containers", "delete", name, check=check)

    def remove_containers(self) -> None:
        """Kill and delete every container of our namespace (teardown)."""
        for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.remove_container(c, check=False)

    def stop(self) -> None:
        terminate(self.proc)
        for leftover in namespace_cgroups(self.namespace):
            with contextlib.suppress(OSError):  # not empty: a container still runs, keep it
                os.rmdir(leftover)


def namespace_cgroups(namespace: str) -> list[str]:
    """The cgroups runc made for a containerd namespace's containers: deleting the
    containers removes theirs but leaves the namespace's own in every hierarchy."""
    return glob.glob(f"/sys/fs/cgroup/{namespace}") + glob.glob(f"/sys/fs/cgroup/*/{namespace}")


def terminate(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:  # type: ignore[type-arg]
    """Stop a daemon, by force if it does not go within 20 s."""
    if proc and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mounts_below(base: str, fstype: str | None = None) -> list[str]:
    """Mount points under `base` (of that file system type, e.g. "fuse.d4c"), deepest first."""
    base = os.path.abspath(base)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fstype is None or fields[fields.index("-") + 1] == fstype:
                points.append(fields[4])
    return sorted((p for p in points if p.startswith(base + "/")), key=len, reverse=True)


def unmount_below(base: str) -> None:
    """Unmount whatever a test left mounted under `base` (deepest first)."""
    for point in mounts_below(base):
        subprocess.run(["umount", "-l", point], capture_output=True)


def pids_naming(base: str, flag: bytes | None = None) -> list[int]:
    """Processes other than this one with an argument that names `base` or a path
    under it (`--opt=PATH` too) and, when given, the argument `flag`."""
    prefix = os.fsencode(os.path.abspath(base))
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if int(pid) == os.getpid() or (flag is not None and flag not in args):
            continue
        paths = [a.split(b"=", 1)[-1] for a in args]
        if any(p == prefix or p.startswith(prefix + b"/") for p in paths):
            found.append(int(pid))
    return found


def stop_device(ctrd: "Containerd", snap: Snapshotterd, base: str) -> None:
    """Teardown of a containerd + di3fs snapshotter under `base`: no container,
    daemon, FUSE server, mount or namespace cgroup of it is left."""
    if ctrd.proc and ctrd.proc.poll() is None:
        ctrd.remove_containers()
    ctrd.stop()
    snap.stop()
    clean_below(base)


def clean_below(base: str) -> None:
    """Teardown after a killed run: unmount, SIGKILL what names `base` (FUSE
    servers outlive the snapshotter by design; containerd shims), unmount again."""
    unmount_below(base)
    for pid in pids_naming(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    unmount_below(base)


def have_containerd() -> str | None:
    for tool in ("containerd", "ctr", "runc"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


def forward(upstream: str, path: str, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
    """One GET to `upstream`: (status, headers, body)."""
    import http.client
    conn = http.client.HTTPConnection(upstream, timeout=60)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.getheaders(), body


def reply_cut(handler, status: int, headers: list[tuple[str, str]], keep: tuple[str, ...], body: bytes,  # type: ignore[no-untyped-def]
              cut_at: int | None) -> None:
    """Answer with `body`, or only its first `cut_at` bytes and a dropped connection."""
    handler.send_response(status)
    for k, v in headers:
        if k.lower() in keep:
            handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if cut_at is not None:
        handler.wfile.write(body[:cut_at])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(2)
        return
    handler.wfile.write(body)


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:  # type: ignore[type-arg]
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on port {port}")


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
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", self.config], stdout=log, stderr=log,
                                         start_new_session=True)
        wait_for_port(self.port, self.proc, "docker-registry")

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


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass


class _Loopback:
    """An HTTP server of the tests on 127.0.0.1, in a thread."""

    def _serve(self, handler: type) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RegistryFront(_Loopback):
    """A registry front on loopback that passes every request through and counts
    the bytes it serves, with faults to order: `cut` the cut-th PATCH of a blob
    upload (0: none; the registry gets the first half of its body, the client a
    dropped connection and no answer: a link lost mid-push), `cut_blob_get` the
    first large blob download half-way, `stall` requests whose path holds it, and
    `login`: bearer tokens from its own token endpoint for basic credentials, as
    Docker Hub wants them."""

    def __init__(self, upstream: str, cut: int = 2, cut_blob_get: bool = False,
                 login: tuple[str, str] | None = None, stall: str | None = None) -> None:
        import base64
        import http.client
        import secrets
        self.upstream = upstream
        # with `login`: every request needs a bearer token that /token gives for those basic credentials
        self.login = "Basic " + base64.b64encode(":".join(login).encode()).decode() if login else None
        self.token = secrets.token_hex(16)
        self.refused = 0  # requests answered 401
        self.stall = stall  # requests whose path holds this get no answer until the front stops
        self.stopping = threading.Event()
        self.cut, self.patches, self.requests = cut, 0, []  # type: ignore[var-annotated]
        self.cut_blob_get, self.blob_gets_cut = cut_blob_get, 0  # the first large blob download: half, then dropped
        self.ranges: list[str] = []  # Range headers of the requests
        self.served = 0  # response body bytes sent to clients (what crossed "the link")
        proxy = self

        class Handler(_Quiet):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Range"):
                    proxy.ranges.append(self.headers["Range"])
                if proxy.login and self._refused():
                    return
                if proxy.stall and proxy.stall in self.path:
                    proxy.requests.append((self.command, self.path, 0))
                    proxy.stopping.wait(60)
                    self.close_connection = True
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                proxy.requests.append((self.command, self.path, len(body)))
                cut = False
                if self.command == "PATCH":
                    proxy.patches += 1
                    if proxy.patches == proxy.cut:
                        cut, body = True, body[:len(body) // 2]
                        start = int(headers.get("Content-Range", "0-0").split("-")[0])
                        headers["Content-Range"] = f"{start}-{start + len(body) - 1}"
                        headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body if body or self.command != "GET" else None,
                             headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if cut:  # stored in part; the client hears nothing
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                drop = (proxy.cut_blob_get and not proxy.blob_gets_cut and self.command == "GET"
                        and "/blobs/" in self.path and len(data) > 1000)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() == "location":
                        v = v.replace(f"http://{proxy.upstream}", f"http://{proxy.host}")
                    if k.lower() not in ("content-length", "connection", "date", "server"):
                        self.send_header(k, v)
                head_length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else None
                self.send_header("Content-Length", head_length or str(len(data)))
                self.end_headers()
                if drop:
                    proxy.blob_gets_cut += 1
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    proxy.served += len(data) // 2
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif self.command != "HEAD":
                    self.wfile.write(data)
                    proxy.served += len(data)

            def _refused(self) -> bool:
                """Answer the token endpoint, or a request without the token (True)."""
                if self.path.startswith("/token"):
                    good = self.headers.get("Authorization") == proxy.login
                    data = json.dumps({"token": proxy.token}).encode() if good else b""
                    self.send_response(200 if good else 401)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return True
                if self.headers.get("Authorization") == f"Bearer {proxy.token}":
                    return False
                proxy.refused += 1
                self.send_response(401)
                repo = self.path.split("/v2/", 1)[-1].split("/blobs/")[0].split("/manifests/")[0]
                repo = repo.split("/referrers/")[0].split("/tags/")[0]
                self.send_header("WWW-Authenticate", f'Bearer realm="http://{proxy.host}/token",service="d4c-test",'
                                 f'scope="repository:{repo}:pull,push"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any  # noqa: N815

        self._serve(Handler)

    def stop(self) -> None:
        self.stopping.set()  # stalled requests end
        super().stop()


class Server:
    """Our update server on loopback."""

    def __init__(self, base: str, binary: str | None = None, extra: tuple[str, ...] = (), name: str = "server") -> None:
        self.extra = list(extra)
        self.root = os.path.join(base, name)
        self.port = free_port()
        self.log = os.path.join(base, name + ".log")
        self.binary = binary
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [self.binary] if self.binary else [sys.executable, "-m", "d4c.server"]
        env = dict(os.environ, PYTHONPATH=SRC)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd + ["--port", str(self.port), "--root", self.root] + self.extra, env=env,
                                         stdout=log, stderr=log, start_new_session=True)
        wait_for_port(self.port, self.proc, "server")

    def stop(self) -> None:
        terminate(self.proc)

    def kill(self) -> None:
        """kill -9 the server: its whole process group, as a one-file binary is a
        bootloader and the process it runs (killing the first leaves the second serving)."""
        import socket
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10  # the process it ran may still be dying, and listening
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"server on port {self.port} still answers after kill -9")


class DropProxy(_Loopback):
    """Forwards to `upstream`, but cuts the first payload download after `after` bytes."""

    def __init__(self, upstream: str, after: int) -> None:
        self.dropped = 0
        self.ranges: list[str] = []
        proxy = self

        class Handler(_Quiet):
            def do_GET(self) -> None:  # noqa: N802
                headers = {k: v for k, v in self.headers.items() if k.lower() == "range"}
                if headers:
                    proxy.ranges.append(self.headers["Range"])
                status, rheaders, body = forward(upstream, self.path, headers)
                cut = None
                if "/payloads/" in self.path and not proxy.dropped and len(body) > after:
                    proxy.dropped += 1
                    cut = after
                reply_cut(self, status, rheaders, ("content-type", "content-range", "accept-ranges"), body, cut)

        self._serve(Handler)


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream`, for link faults: it cuts
    each connection (closes it, mid-answer) once it has passed `cut_every` bytes
    to the client (None: never), resets every new connection while `down`, and
    counts what it passed and the connections.  `on_cut` runs after each cut; `on_request(first_line)` before a
    request is forwarded.  `rate` (bytes/s, each way) throttles it; `stall_after` bytes to a client, it
    goes silent for `stall_for` seconds once (a link that stalls, then comes back)."""

    def __init__(self, upstream: str, cut_every: int | None = None) -> None:
        import socket
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_every = cut_every
        self.down = False
        self.sent = 0
        self.cuts = 0
        self.requests: list[bytes] = []
        self.connections = 0  # accepted from clients
        self._open: list = []  # type: ignore[type-arg]  # client sockets being served
        self.on_cut: Callable[[], None] | None = None
        self.on_request: Callable[[bytes], None] | None = None
        self.rate: float | None = None
        self.stall_after: int | None = None
        self.stall_for = 0.0
        self.stalls = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _reset(sock) -> None:  # type: ignore[no-untyped-def]
        import socket
        import struct
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                self._reset(client)
                continue
            with self._lock:
                self.connections += 1
                self._open.append(client)
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def close_connections(self) -> None:
        """Close every open client connection cleanly (FIN), as a server ends idle keep-alive ones."""
        import socket
        with self._lock:
            clients, self._open = self._open, []
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def _pipe(self, client) -> None:  # type: ignore[no-untyped-def]
        import socket
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            self._reset(client)
            return
        threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
        passed = 0
        try:
            while True:
                data = upstream.recv(1 << 16)
                if not data:
                    break
                limit = self.cut_every
                if limit is not None and passed + len(data) >= limit:
                    client.sendall(data[:limit - passed])
                    with self._lock:
                        self.sent += limit - passed
                        self.cuts += 1
                    client.shutdown(socket.SHUT_WR)  # a reset would drop what is still in flight
                    client.close()
                    upstream.close()
                    if self.on_cut:
                        self.on_cut()
                    return
                if self.stall_after is not None and self.sent + len(data) >= self.stall_after:
                    self.stall_after = None
                    self.stalls += 1
                    time.sleep(self.stall_for)
                client.sendall(data)
                passed += len(data)
                with self._lock:
                    self.sent += len(data)
                self._throttle(len(data))
        except OSError:
            pass
        with contextlib.suppress(OSError):
            client.shutdown(2)
        client.close()
        upstream.close()

    def _up(self, client, upstream) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                data = client.recv(1 << 16)
                if not data:
                    break
                if data[:4] in (b"GET ", b"POST"):
                    line = data.split(b"\r\n", 1)[0]
                    self.requests.append(line)
                    if self.on_request:
                        self.on_request(line)
                upstream.sendall(data)
                self._throttle(len(data))
        except OSError:
            pass
        with contextlib.suppress(OSError):
            upstream.shutdown(1)

    def _throttle(self, n: int) -> None:
        if self.rate:
            time.sleep(n / self.rate)

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()


def thread_count(pid: int) -> int:
    """Threads of `pid` and its descendants (a one-file binary runs its program as a child)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total
