"""The update server's HTTP API (docs/API.md): the request handler and `serve`.
The server is the standard library's HTTP server with a bounded pool of workers
(pool.py): a connection waits in a selector (no
thread) until it has sent a whole request head, and again between kept-alive
requests, so idle and slow connections cost no thread and block no one; a
burst of clients queues in a deep backlog instead of being reset; the same
merge asked twice at once is computed once (updates.py).

    POST /v1/push?tag=NAME:TAG      body: a cdimg (base or delta)   -> 201 {artifact}
    GET  /v1/tags                                                    -> {tag: id}
    GET  /v1/update?tag=NAME:TAG&have=sha256:ID...                   -> {plan}
    GET  /v1/payloads/<sha256>       (Range supported)               -> the bytes a plan names
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import socket
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from ..daemons import record_signals, wait_for_signal
from ..errors import AlreadyExists, BadInput, Conflict, CorruptImage, D4CError, NotFound, UsageError
from .auth import Tokens
from .pool import IDLE_TIMEOUT, WORKERS, PooledHandler, PooledHTTPServer
from .store import Store, check_tag
from .updates import PIN_TIME, Updates

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("d4c.server")
MAX_UPLOAD = 64 << 30
SIGNATURE_HEADER = "D4C-Signature"   # push: the artifact's DSSE envelope, base64 (docs/SIGNING.md)
COPY = 1 << 20
SEND = 64 << 10
RECV = 256 << 10
STATUS = [(NotFound, 404), (Conflict, 409), (AlreadyExists, 409), (UsageError, 400), (BadInput, 400),
          (CorruptImage, 400)]
LINGER, MAX_LINGER_BYTES = 1.0, 16 << 20   # a refused request's unread body, read and dropped
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class ClientGone(Exception):
    """The client's connection failed mid-request: nobody to answer."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def make_handler(store: Store, updates: Updates, max_upload: int = MAX_UPLOAD,  # type: ignore[no-untyped-def]
                 idle_timeout: float = IDLE_TIMEOUT, tokens: Tokens | None = None):
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

        def _authorized(self, scope: str, refuse: bool) -> bool:
            """True when the request's token allows `scope`; else the 401 (with a
            challenge) or 403 is answered here."""
            status = tokens.check(self.headers.get("Authorization"), scope) if tokens is not None else 0
            if not status:
                return True
            message = "a push token is needed" if status == 403 else f"a valid {scope} token is needed"
            self._challenge = status == 401
            if refuse:
                self._refuse(status, message)
            else:
                self._json(status, {"error": message})
            return False

        def end_headers(self) -> None:
            if getattr(self, "_challenge", False):
                self.send_header("WWW-Authenticate", 'Bearer realm="d4c"')
                self._challenge = False
            super().end_headers()

        def _route(self) -> tuple[str, dict[str, list[str]]]:
            url = urllib.parse.urlsplit(self.path)
            return url.path, urllib.parse.parse_qs(url.query)

        def do_GET(self) -> None:  # noqa: N802
            path, query = self._route()
            if self.headers.get("Content-Length", "0") != "0" or self.headers.get("Transfer-Encoding"):
                self.close_connection = True  # a body we do not read must not be taken for the next request
            if not self._authorized("read", refuse=False):
                return
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
            if not self._authorized("push", refuse=True):  # before a byte of the body is stored
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
            envelope = None
            signature = self.headers.get(SIGNATURE_HEADER)
            if signature is not None:
                try:
                    envelope = base64.b64decode(signature, validate=True)
                except (ValueError, binascii.Error):
                    self._refuse(400, f"{SIGNATURE_HEADER} is not base64")
                    return
            tmp = store.temp_path()
            try:
                try:
                    self._receive(tmp, size)
                    a = store.add(tmp, tag, envelope)
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


def tls_context(cert: str, key: str) -> "ssl.SSLContext":
    """The server's TLS (stdlib ssl): TLS 1.2 and later, the certificate chain and its key."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: {exc}") from None
    return context


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
          pin_time: float = PIN_TIME, auth_tokens: str | None = None, tls: tuple[str, str] | None = None) -> None:
    import signal
    backend = None
    if storage:
        from .registry_backend import RegistryBackend
        backend = RegistryBackend(storage, plain_http=storage_plain_http)
    tokens = Tokens(auth_tokens) if auth_tokens else None
    context = tls_context(*tls) if tls else None
    store = Store(root, backend, threads)
    updates = Updates(store, cache_limit, threads, pin_time)
    server = PooledHTTPServer((host, port), make_handler(store, updates, idle_timeout=idle_timeout, tokens=tokens),
                              workers, idle_timeout, context)
    signals = record_signals(signal.SIGTERM)  # a watcher stops the server

    def stop_on_signal() -> None:
        wait_for_signal(signals)
        server.shutdown()

    threading.Thread(target=stop_on_signal, name="d4c-stop", daemon=True).start()
    log.info("serving on %s://%s:%d (store %s, %d workers%s)", "https" if context else "http", host,
             server.server_address[1], store.root, workers, ", tokens required to push" if tokens else "")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
