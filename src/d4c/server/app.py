"""The update server's HTTP API (docs/API.md), on the standard library's
threading HTTP server: each request has its own thread, so a slow client
never blocks another; the same merge asked twice at once is computed once.

    POST /v1/push?tag=NAME:TAG      body: a cdimg (base or delta)   -> 201 {artifact}
    GET  /v1/tags                                                    -> {tag: id}
    GET  /v1/update?tag=NAME:TAG&have=sha256:ID...                   -> {plan}
    GET  /v1/payloads/<sha256>       (Range supported)               -> the bytes a plan names
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import threading
import urllib.parse
from collections import OrderedDict
from typing import Any

from ..daemons import record_signals, wait_for_signal
from ..errors import AlreadyExists, BadInput, Conflict, CorruptImage, D4CError, NotFound, UsageError
from .store import Artifact, Store, check_tag

log = logging.getLogger("d4c.server")
MAX_UPLOAD = 64 << 30
COPY = 1 << 20
STATUS = [(NotFound, 404), (Conflict, 409), (AlreadyExists, 409), (UsageError, 400), (BadInput, 400),
          (CorruptImage, 400)]


class Updates:
    """Plans and merged payloads, cached by (from, to) within a byte budget."""

    def __init__(self, store: Store, cache_limit: int = 8 << 30, threads: int = 2) -> None:
        self.store = store
        self.dir = os.path.join(store.root, "merged")
        os.makedirs(self.dir, exist_ok=True)
        self.limit = cache_limit
        self.threads = threads
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._cached: OrderedDict[str, int] = OrderedDict()
        self.merges = 0
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".cdimg"):
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
            self._build(key, start, path)
            return self._find(key) or ("", 0)

    def _find(self, key: str) -> tuple[str, int] | None:
        with self._lock:
            for name in self._cached:
                if name.startswith(key + "-"):
                    self._cached.move_to_end(name)
                    return name.rsplit("-", 1)[1], self._cached[name]
        return None

    def _build(self, key: str, start: str, path: list[Artifact]) -> None:
        """Merge the chain (never touching stored artifacts) into the cache."""
        from ..imagedelta import close_all, merge_stack, open_stack, patch_image
        self.merges += 1
        below = self.store.chain_to(start) if start else []
        files = [self.store.path(a.digest) for a in below + path]
        tmp = os.path.join(self.dir, f".tmp-{key}-{threading.get_ident()}.cdimg")
        stack = open_stack(files[1:], files[0])
        try:
            if start:
                merge_stack(stack[len(below) - 1:], tmp, cdimg=True, threads=self.threads)
            else:
                patch_image(stack[-1], tmp, cdimg=True, threads=self.threads)
        finally:
            close_all(stack)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(COPY), b""):
                h.update(chunk)
        name = f"{key}-{h.hexdigest()}"
        os.rename(tmp, os.path.join(self.dir, name + ".cdimg"))
        with self._lock:
            self._cached[name] = os.path.getsize(os.path.join(self.dir, name + ".cdimg"))
            while sum(self._cached.values()) > self.limit and len(self._cached) > 1:
                old, _ = self._cached.popitem(last=False)
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
                    return os.path.join(self.dir, name + ".cdimg")
        raise NotFound(f"no payload {digest!r}")


def _peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def make_handler(store: Store, updates: Updates, max_upload: int = MAX_UPLOAD):  # type: ignore[no-untyped-def]
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "d4c-server"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

        def _json(self, status: int, doc: Any) -> None:
            body = json.dumps(doc, sort_keys=True).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _fail(self, exc: BaseException) -> None:
            status = next((code for kind, code in STATUS if isinstance(exc, kind)), 500)
            if status == 500:
                log.exception("request failed")
            self._json(status, {"error": str(exc) if isinstance(exc, D4CError) else "internal error"})

        def _route(self) -> tuple[str, dict[str, list[str]]]:
            url = urllib.parse.urlsplit(self.path)
            return url.path, urllib.parse.parse_qs(url.query)

        def do_GET(self) -> None:  # noqa: N802
            path, query = self._route()
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
                    self._send_file(updates.payload(path[len("/v1/payloads/"):]))
                else:
                    self._json(404, {"error": f"no such endpoint {path}"})
            except Exception as exc:  # every error is an HTTP answer
                self._fail(exc)

        def do_POST(self) -> None:  # noqa: N802
            path, query = self._route()
            try:
                if path != "/v1/push":
                    self._json(404, {"error": f"no such endpoint {path}"})
                    return
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._json(411, {"error": "Content-Length required"})
                    return
                size = int(length)
                if size > max_upload:
                    self._json(413, {"error": f"upload larger than {max_upload} bytes"})
                    self.close_connection = True
                    return
                tag = (query.get("tag") or [None])[0]
                if tag is not None:
                    check_tag(tag)  # before a byte is stored
                tmp = store.temp_path()
                got = 0
                with open(tmp, "wb") as f:
                    while got < size:
                        chunk = self.rfile.read(min(COPY, size - got))
                        if not chunk:
                            break
                        f.write(chunk)
                        got += len(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                if got != size:
                    os.unlink(tmp)
                    raise BadInput(f"upload truncated: {got} of {size} bytes")
                a = store.add(tmp, tag)
                self._json(201, {"sha256": a.digest, "image": "sha256:" + a.image,
                                 "parent": ("sha256:" + a.parent) if a.parent else None, "size": a.size,
                                 "tag": tag})
            except Exception as exc:
                self._fail(exc)

        def _send_file(self, path: str) -> None:
            size = os.path.getsize(path)
            start, end = 0, size - 1
            rng = self.headers.get("Range", "")
            status = 200
            if rng.startswith("bytes="):
                first, _, last = rng[6:].partition("-")
                try:
                    start = int(first) if first else 0
                    end = min(int(last), size - 1) if last else size - 1
                except ValueError:
                    start = size
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left:
                    chunk = f.read(min(COPY, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    return Handler


def serve(root: str, host: str, port: int, cache_limit: int, threads: int, storage: str | None = None,
          storage_plain_http: bool = False) -> None:
    import signal
    backend = None
    if storage:
        from .registry_backend import RegistryBackend
        backend = RegistryBackend(storage, plain_http=storage_plain_http)
    store = Store(root, backend)
    updates = Updates(store, cache_limit, threads)
    server = http.server.ThreadingHTTPServer((host, port), make_handler(store, updates))
    server.daemon_threads = True
    signals = record_signals(signal.SIGTERM)  # a watcher stops the server

    def stop_on_signal() -> None:
        wait_for_signal(signals)
        server.shutdown()

    threading.Thread(target=stop_on_signal, name="d4c-stop", daemon=True).start()
    log.info("serving on http://%s:%d (store %s)", host, server.server_address[1], store.root)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()

