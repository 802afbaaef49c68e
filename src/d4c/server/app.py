"""The update server's HTTP API (docs/API.md), on the standard library's HTTP
server with a bounded pool of workers: a connection waits in a selector (no
thread) until it has sent a whole request head, and again between kept-alive
requests, so idle and slow connections cost no thread and block no one; a
burst of clients queues in a deep backlog instead of being reset; the same
merge asked twice at once is computed once.

    POST /v1/push?tag=NAME:TAG      body: a cdimg (base or delta)   -> 201 {artifact}
    GET  /v1/tags                                                    -> {tag: id}
    GET  /v1/update?tag=NAME:TAG&have=sha256:ID...                   -> {plan}
    GET  /v1/payloads/<sha256>       (Range supported)               -> the bytes a plan names
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import io
import json
import logging
import os
import re
import selectors
import socket
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..daemons import record_signals, wait_for_signal
from ..errors import AlreadyExists, BadInput, Conflict, CorruptImage, D4CError, NotFound, UsageError
from .store import Artifact, Store, check_tag
from ..digests import path_sha256

log = logging.getLogger("d4c.server")
MAX_UPLOAD = 64 << 30
COPY = 1 << 20
SEND = 64 << 10
RECV = 256 << 10
STATUS = [(NotFound, 404), (Conflict, 409), (AlreadyExists, 409), (UsageError, 400), (BadInput, 400),
          (CorruptImage, 400)]
BACKLOG = 1024           # the kernel caps it at net.core.somaxconn
WORKERS = 64
IDLE_TIMEOUT = 60.0      # seconds a connection may wait for, or inside, a request
MAX_HEAD = 64 << 10      # a request line and headers (http.server refuses longer lines anyway)
LINGER, MAX_LINGER_BYTES = 1.0, 16 << 20   # a refused request's unread body, read and dropped
PIN_TIME = 600.0         # seconds a planned payload is kept for its download
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# a merged payload: <from id or "base">-<to id>-<sha256>.cdimg; anything else in merged/ is a temp
MERGED_NAME = re.compile(r"^(?:base|[0-9a-f]{64})-[0-9a-f]{64}-[0-9a-f]{64}\.cdimg$")


class Updates:
    """Plans and merged payloads, cached by (from, to) within a byte budget.  A
    payload a plan names is pinned until a client has downloaded it whole or
    `pin_time` has passed, so a concurrent merge cannot evict it in between."""

    def __init__(self, store: Store, cache_limit: int = 8 << 30, threads: int = 2,
                 pin_time: float = PIN_TIME) -> None:
        self.store = store
        self.dir = os.path.join(store.root, "merged")
        os.makedirs(self.dir, exist_ok=True)
        self.limit = cache_limit
        self.threads = threads
        self.pin_time = pin_time
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._cached: OrderedDict[str, int] = OrderedDict()
        self._pins: dict[str, tuple[int, float]] = {}   # name -> (downloads outstanding, pinned until)
        self.merges = 0
        for name in sorted(os.listdir(self.dir)):
            # only finished merges have their final name; a temp a crash left is never adopted
            if MERGED_NAME.match(name):
                self._cached[name[:-6]] = os.path.getsize(os.path.join(self.dir, name))
            else:
                os.unlink(os.path.join(self.dir, name))

    def plan(self, tag: str, have: set[str]) -> dict[str, Any]:
        target = self.store.resolve_tag(tag)
        path = self.store.cheapest(target, have)
        if not path:
            return {"tag": tag, "to": "sha256:" + target, "from": "sha256:" + target, "upToDate": True}
        start = path[0].parent
        if len(path) == 1:
            digest, size = path[0].digest, path[0].size
        else:
            digest, size = self._merged(start, target, path)
        return {"tag": tag, "to": "sha256:" + target, "from": ("sha256:" + start) if start else None,
                "dimgs": len(path), "artifacts": [a.digest for a in path], "size": size, "sha256": digest,
                "url": f"/v1/payloads/{digest}"}

    def _merged(self, start: str, target: str, path: list[Artifact]) -> tuple[str, int]:
        key = f"{start or 'base'}-{target}"
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            found = self._find(key)
            if found:
                return found
            return self._build(key, start, path)

    def _find(self, key: str) -> tuple[str, int] | None:
        """The cached merge for `key`, pinned for the download its plan announces."""
        with self._lock:
            for name in self._cached:
                if name.startswith(key + "-"):
                    self._cached.move_to_end(name)
                    self._pin(name)
                    return name.rsplit("-", 1)[1], self._cached[name]
        return None

    def _pin(self, name: str) -> None:
        count, _ = self._pins.get(name, (0, 0.0))
        self._pins[name] = (count + 1, time.monotonic() + self.pin_time)

    def _pinned(self, name: str, now: float) -> bool:
        count, until = self._pins.get(name, (0, 0.0))
        if count and until > now:
            return True
        self._pins.pop(name, None)
        return False

    def downloaded(self, digest: str) -> None:
        """A client has the whole payload: its plan's pin is released."""
        with self._lock:
            for name, (count, until) in list(self._pins.items()):
                if name.endswith("-" + digest):
                    if count > 1:
                        self._pins[name] = (count - 1, until)
                    else:
                        del self._pins[name]

    def _build(self, key: str, start: str, path: list[Artifact]) -> tuple[str, int]:
        """Merge the chain (never touching stored artifacts) into the cache; the
        merge is pinned before the lock is let go, so another plan's eviction
        cannot take it before this plan is answered."""
        from ..image.stack import close_all, open_stack
        from ..image.deltas import merge_stack, patch_image
        self.merges += 1
        below = self.store.chain_to(start) if start else []
        files = [self.store.path(a.digest) for a in below + path]
        tmp = os.path.join(self.dir, f".tmp-{uuid.uuid4().hex}.partial")
        try:
            stack = open_stack(files[1:], files[0])
            try:
                if start:
                    # every stored body was checked at upload (Store.add), and a device checks
                    # what it loads: checking the copied bodies again would only slow merges
                    merge_stack(stack[len(below) - 1:], tmp, cdimg=True, threads=self.threads, check_copied=False)
                else:
                    patch_image(stack[-1], tmp, cdimg=True, threads=self.threads)
            finally:
                close_all(stack)
            name = f"{key}-{path_sha256(tmp).hexdigest()}"
            os.rename(tmp, os.path.join(self.dir, name + ".cdimg"))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with self._lock:
            size = self._cached[name] = os.path.getsize(os.path.join(self.dir, name + ".cdimg"))
            self._pin(name)
            self._evict(keep=name)
        return name.rsplit("-", 1)[1], size

    def _evict(self, keep: str) -> None:
        """Oldest first, down to the budget; pinned payloads stay (the cache may
        then exceed its budget until their downloads end or their pins expire)."""
        now = time.monotonic()
        total = sum(self._cached.values())
        for old in list(self._cached):
            if total <= self.limit:
                break
            if old == keep or self._pinned(old, now):
                continue
            total -= self._cached.pop(old)
            os.unlink(os.path.join(self.dir, old + ".cdimg"))

    def payload(self, digest: str) -> str:
        """The file holding the bytes named `digest`: an artifact or a merge."""
        try:
            path = self.store.path(digest)
        except NotFound:
            path = ""
        if path and os.path.exists(path):
            return path
        with self._lock:
            for name in self._cached:
                if name.endswith("-" + digest):
                    if name in self._pins:  # a download in progress keeps its pin for another pin_time
                        self._pins[name] = (self._pins[name][0], time.monotonic() + self.pin_time)
                    return os.path.join(self.dir, name + ".cdimg")
        raise NotFound(f"no payload {digest!r} (evicted from the cache: ask for the update again)")


class _HeadFirst(io.RawIOBase):
    """A connection's bytes, those the waiter read already first.  Unbuffered,
    so what a handler leaves unread (a pipelined request) is known exactly."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = memoryview(head)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def, override]
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._sock.recv_into(b)

    def leftover(self) -> bytes:
        return bytes(self._head)


class PooledHandler(http.server.BaseHTTPRequestHandler):
    """One request per dispatch: a kept-alive connection waits for its next
    request in the server's selector, not in a worker."""

    server: "PooledHTTPServer"

    def setup(self) -> None:
        super().setup()
        self.rfile = _HeadFirst(self.server.take_head(self.connection), self.connection)  # type: ignore[assignment]

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()


def _has_head(data: bytes | bytearray) -> bool:
    return b"\r\n\r\n" in data or b"\n\n" in data or len(data) > MAX_HEAD


class PooledHTTPServer(http.server.HTTPServer):
    """A connection waits in a selector, without a thread, until it has sent a
    whole request head (read there, without blocking); then one of `workers`
    threads serves that request, and a kept-alive connection goes back to
    wait for its next.  A connection whose head takes longer than
    `idle_timeout` seconds is closed, as is one silent that long inside a
    request (the handler's socket timeout)."""

    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], handler: type, workers: int = WORKERS,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        super().__init__(address, handler)
        self.idle_timeout = idle_timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="d4c-http")
        self._selector = selectors.DefaultSelector()
        self._incoming: list[tuple[socket.socket, Any, bytes]] = []
        self._heads: dict[socket.socket, bytes] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closing = False
        self._active: set[socket.socket] = set()   # being served: cut at shutdown, so workers end
        self._waiter = threading.Thread(target=self._park_loop, name="d4c-parked", daemon=True)
        self._waiter.start()

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        self._park(request, client_address, b"")

    def _park(self, sock: socket.socket, address: Any, head: bytes) -> None:
        with self._lock:
            self._incoming.append((sock, address, head))
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def take_head(self, sock: socket.socket) -> bytes:
        with self._lock:
            return self._heads.pop(sock, b"")

    def _park_loop(self) -> None:
        tick = min(0.5, self.idle_timeout / 4)
        while not self._closing:
            try:
                self._park_once(tick)
            except Exception:  # this thread ending would stop the server answering anyone
                log.exception("the connection waiter failed; continuing")

    def _park_once(self, tick: float) -> None:
        """Read what parked connections sent, hand those with a whole request
        head to the workers, take in new ones, close those past their deadline."""
        for key, _ in self._selector.select(timeout=tick):
            sock = key.fileobj
            if sock is self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
                continue
            try:
                data = sock.recv(MAX_HEAD)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # the client closed (or reset) it
                self._selector.unregister(sock)
                self.shutdown_request(sock)
                continue
            key.data[2].extend(data)
            if _has_head(key.data[2]):
                self._selector.unregister(sock)
                self._dispatch(sock, key.data[0], bytes(key.data[2]))  # type: ignore[arg-type]
        now = time.monotonic()
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for sock, address, head in incoming:
            if head and _has_head(head):  # a pipelined request, already whole
                self._dispatch(sock, address, head)
                continue
            try:
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ,
                                        [address, now + self.idle_timeout, bytearray(head)])
            except (ValueError, OSError):  # closed meanwhile
                self.shutdown_request(sock)
        for key in list(self._selector.get_map().values()):
            if key.data is not None and key.data[1] < now:
                self._selector.unregister(key.fileobj)
                self.shutdown_request(key.fileobj)

    def _dispatch(self, sock: socket.socket, address: Any, head: bytes) -> None:
        sock.setblocking(True)  # the handler sets its timeout
        with self._lock:
            self._heads[sock] = head
        self._pool.submit(self._serve, sock, address)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        with self._lock:
            self._active.add(request)
        keep, leftover = False, b""
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
            keep = not handler.close_connection and not self._closing  # type: ignore[attr-defined]
            leftover = handler.rfile.leftover()  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._lock:
                self._active.discard(request)
                self._heads.pop(request, None)
            if keep:
                self._park(request, client_address, leftover)
            else:
                self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        log.debug("connection from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._closing = True
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")
        self._waiter.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for sock in self._active:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self.shutdown_request(key.fileobj)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class ClientGone(Exception):
    """The client's connection failed mid-request: nobody to answer."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def make_handler(store: Store, updates: Updates, max_upload: int = MAX_UPLOAD,  # type: ignore[no-untyped-def]
                 idle_timeout: float = IDLE_TIMEOUT):
    class Handler(PooledHandler):
        protocol_version = "HTTP/1.1"
        server_version = "d4c-server"
        timeout = idle_timeout  # each read and write of the connection: a silent client is closed

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

        def _json(self, status: int, doc: Any) -> None:
            body = json.dumps(doc, sort_keys=True).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _refuse(self, status: int, message: str) -> None:
            """Answer before the body was read: the connection cannot carry another
            request.  What the client still sends is read and dropped for a moment
            (a lingering close): closed with unread data, the socket would send a
            reset, which can destroy the answer before the client reads it."""
            self.close_connection = True
            self._json(status, {"error": message})
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(LINGER)
                dropped = 0
                while dropped < MAX_LINGER_BYTES:
                    chunk = self.connection.recv(COPY)
                    if not chunk:
                        break
                    dropped += len(chunk)

        def _fail(self, exc: BaseException) -> None:
            if isinstance(exc, ClientGone):
                self.close_connection = True
                return
            if isinstance(exc, OSError) and exc.errno in FULL_DISK:
                log.warning("%s", exc)
                self._json(507, {"error": "no space left on device"})
                return
            status = next((code for kind, code in STATUS if isinstance(exc, kind)), 500)
            if status == 500:
                log.exception("request failed")
            self._json(status, {"error": str(exc) if isinstance(exc, D4CError) else "internal error"})

        def _route(self) -> tuple[str, dict[str, list[str]]]:
            url = urllib.parse.urlsplit(self.path)
            return url.path, urllib.parse.parse_qs(url.query)

        def do_GET(self) -> None:  # noqa: N802
            path, query = self._route()
            if self.headers.get("Content-Length", "0") != "0" or self.headers.get("Transfer-Encoding"):
                self.close_connection = True  # a body we do not read must not be taken for the next request
            try:
                if path == "/v1/tags":
                    self._json(200, {t: "sha256:" + i for t, i in store.tags().items()})
                elif path == "/v1/stats":
                    self._json(200, {"merges": updates.merges, "peakRssKiB": _peak_rss_kib()})
                elif path == "/v1/update":
                    tag = (query.get("tag") or [""])[0]
                    have = {h.split(":", 1)[-1] for h in query.get("have", [])}
                    self._json(200, updates.plan(tag, have))
                elif path.startswith("/v1/payloads/"):
                    digest = path[len("/v1/payloads/"):]
                    if self._send_file(updates.payload(digest)):
                        updates.downloaded(digest)
                else:
                    self._json(404, {"error": f"no such endpoint {path}"})
            except Exception as exc:  # every error is an HTTP answer
                self._fail(exc)

        def do_POST(self) -> None:  # noqa: N802
            path, query = self._route()
            if path != "/v1/push":
                self._refuse(404, f"no such endpoint {path}")
                return
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) > 1:  # which one frames the body is ambiguous: request smuggling
                self._refuse(400, "more than one Content-Length header")
                return
            plain = bool(lengths) and lengths[0].isascii() and lengths[0].isdigit()  # not '²', which int() refuses
            if not plain or self.headers.get("Transfer-Encoding"):
                self._refuse(411, "Content-Length required")
                return
            size = int(lengths[0])
            if size > max_upload:
                self._refuse(413, f"upload larger than {max_upload} bytes")
                return
            tag = (query.get("tag") or [None])[0]
            try:
                if tag is not None:
                    check_tag(tag)  # before a byte is stored
            except UsageError as exc:
                self._refuse(400, str(exc))
                return
            tmp = store.temp_path()
            try:
                try:
                    self._receive(tmp, size)
                    a = store.add(tmp, tag)
                finally:  # whatever went wrong, no upload is left behind (before the answer)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            except Exception as exc:
                self._fail(exc)
                return
            self._json(201, {"sha256": a.digest, "image": "sha256:" + a.image,
                             "parent": ("sha256:" + a.parent) if a.parent else None, "size": a.size, "tag": tag})

        def _receive(self, tmp: str, size: int) -> None:
            """The body into `tmp`, fsynced.  When the disk refuses, the rest is
            still read (and dropped), so the client, still sending, gets the
            reason instead of a broken pipe."""
            got = 0
            refused: OSError | None = None
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                fd, refused = -1, exc
            try:
                while got < size:
                    try:
                        chunk = self.rfile.read(min(RECV, size - got))
                    except OSError as exc:  # reset, or silent for longer than the timeout
                        raise ClientGone(str(exc)) from exc
                    if not chunk:
                        break
                    got += len(chunk)
                    if refused is None:
                        try:
                            _write_all(fd, chunk)
                        except OSError as exc:
                            refused = exc
                            os.ftruncate(fd, 0)  # give the space back now
                if got == size and refused is None:
                    try:
                        os.fsync(fd)
                    except OSError as exc:
                        refused = exc
            finally:
                if fd >= 0:
                    os.close(fd)
            if got != size:
                self.close_connection = True
                raise BadInput(f"upload truncated: {got} of {size} bytes")
            if refused is not None:
                raise refused

        def _send_file(self, path: str) -> bool:
            """Send `path` (or the range asked for); True when its last byte was sent."""
            try:
                f = open(path, "rb")  # held open: an eviction from now on cannot take it away
            except FileNotFoundError:  # evicted between its lookup and here
                raise NotFound("payload evicted from the cache: ask for the update again") from None
            with f:
                return self._send_open(f)

        def _send_open(self, f: Any) -> bool:
            size = os.fstat(f.fileno()).st_size
            start, end = 0, size - 1
            rng = self.headers.get("Range", "")
            status = 200
            if rng.startswith("bytes="):
                first, _, last = rng[6:].partition("-")
                try:
                    if first:
                        start = int(first)
                        end = min(int(last), size - 1) if last else size - 1
                    else:  # a suffix: the last N bytes
                        start, end = max(0, size - int(last)), size - 1
                        if not int(last):
                            start = size
                except ValueError:
                    start = size
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            f.seek(start)
            left = end - start + 1
            while left:
                # small pieces: the idle timeout bounds each, so a thin link is not cut for being thin
                chunk = f.read(min(SEND, left))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except OSError as exc:  # the client went away (it resumes with a Range)
                    raise ClientGone(str(exc)) from exc
                left -= len(chunk)
            return end == size - 1 and not left

    return Handler


def _peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def serve(root: str, host: str, port: int, cache_limit: int, threads: int, storage: str | None = None,
          storage_plain_http: bool = False, workers: int = WORKERS, idle_timeout: float = IDLE_TIMEOUT,
          pin_time: float = PIN_TIME) -> None:
    import signal
    backend = None
    if storage:
        from .registry_backend import RegistryBackend
        backend = RegistryBackend(storage, plain_http=storage_plain_http)
    store = Store(root, backend, threads)
    updates = Updates(store, cache_limit, threads, pin_time)
    server = PooledHTTPServer((host, port), make_handler(store, updates, idle_timeout=idle_timeout), workers,
                              idle_timeout)
    signals = record_signals(signal.SIGTERM)  # a watcher stops the server

    def stop_on_signal() -> None:
        wait_for_signal(signals)
        server.shutdown()

    threading.Thread(target=stop_on_signal, name="d4c-stop", daemon=True).start()
    log.info("serving on http://%s:%d (store %s, %d workers)", host, server.server_address[1], store.root, workers)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
