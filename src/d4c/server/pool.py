"""A threaded HTTP server with a bounded pool of workers: a deep listen
backlog, idle and half-sent connections timed out, and a request's head read
before a worker takes it (500 idle connections made 500 threads before)."""

from __future__ import annotations

import contextlib
import logging
import http.server
import io
import selectors
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("d4c.server")
BACKLOG = 1024           # the kernel caps it at net.core.somaxconn
WORKERS = 64
IDLE_TIMEOUT = 60.0      # seconds a connection may wait for, or inside, a request
MAX_HEAD = 64 << 10      # a request line and headers (http.server refuses longer lines anyway)


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


def _recv_parked(sock: socket.socket) -> bytes:
    """What a parked connection sent; for TLS also the bytes OpenSSL decrypted
    beyond the first record, which no selector readiness announces."""
    data = sock.recv(MAX_HEAD)
    if isinstance(sock, ssl.SSLSocket):
        while data and sock.pending() and len(data) <= MAX_HEAD:
            data += sock.recv(sock.pending())
    return data


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
                 idle_timeout: float = IDLE_TIMEOUT, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, handler)
        self.idle_timeout = idle_timeout
        self.tls = tls  # connections are TLS: the handshake runs in the waiter, without blocking
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

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        try:
            return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address
        except (OSError, ValueError):
            sock.close()
            raise OSError("TLS set-up failed") from None

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
                data = _recv_parked(sock)  # type: ignore[arg-type]
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue  # nothing yet, or a TLS handshake half done
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
            if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted already: no readiness will say so
                with contextlib.suppress(OSError):
                    head += sock.recv(sock.pending())
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
