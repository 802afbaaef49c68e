"""`push` and `pull` against the update server.  Uploads stream with progress.
A download goes to FILE.partial, is retried with backoff for as long as it
makes progress (each connection resumes with a Range from the last byte
written), is kept for the next run when it gives up, and gets its final name
only once its digest (and, where the client can, every body) is checked."""

from __future__ import annotations

import base64
import fcntl
import http.client
import json
import os
import time
import urllib.parse
from typing import Any, BinaryIO, Callable

from ..errors import (BadInput, Conflict, CorruptDelta, CorruptImage, D4CError, NotFound, SystemFailure, Unauthorized,
                      Unavailable, UsageError, from_oserror)
from ..fsutil import open_input
from ..progress import Progress
from ..digests import path_sha256

CHUNK = 1 << 20
RETRY_TIME = 300.0       # seconds of retrying without a byte of progress before pull gives up
STALL_TIMEOUT = 30.0     # a download connection silent this long is dropped and resumed
FIRST_DELAY, MAX_DELAY = 0.5, 10.0
REPLANS = 3              # a planned payload evicted before it was fetched: ask again
TRANSIENT = (502, 503, 504)


def _split(host: str) -> tuple[str, int]:
    host = host.split("://", 1)[-1].rstrip("/")
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        return host, 8081
    return name, int(port)


class _Retry:
    """Backoff for one operation: retried until `budget` seconds pass without
    progress; any progress restarts the budget and the backoff."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self.delay = FIRST_DELAY

    def progressed(self) -> None:
        self.deadline = time.monotonic() + self.budget
        self.delay = FIRST_DELAY

    def wait(self) -> bool:
        """Sleep before the next attempt; False when the budget is spent."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, MAX_DELAY)
        return True


def read_token(path: str) -> str:
    """A bearer token from its file (its first line: the token, or a `push|read
    TOKEN` line as the server's file has it): never from the command line,
    where `ps` shows it to every user."""
    try:
        with open(path, encoding="utf-8") as f:
            words = f.readline(4096).split()
    except FileNotFoundError:
        raise NotFound(f"no such token file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the token file {path}: {exc}") from None
    if len(words) == 2 and words[0] in ("push", "read"):
        words = words[1:]
    if len(words) != 1 or not (words[0].isascii() and words[0].isprintable()):  # an HTTP header's bytes
        raise UsageError(f"{path}: its first line is not a token")
    return words[0]


class Client:
    def __init__(self, server: str, timeout: float = 120.0, retry_time: float = RETRY_TIME,
                 token: str | None = None, ca_cert: str | None = None) -> None:
        """`server`: HOST:PORT, or https://HOST:PORT for a server with --tls-cert
        (checked against the system's CAs, or `ca_cert`).  `token`: the bearer
        token a server with --auth-tokens asks for."""
        self.tls = server.startswith("https://")
        self._context = None
        if self.tls:
            import ssl
            try:
                self._context = ssl.create_default_context(cafile=ca_cert)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"--ca-cert {ca_cert}: {exc}") from None
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.host, self.port = _split(server)
        # one attempt never outlasts the time a pull may go without progress
        self.timeout = min(timeout, max(5.0, retry_time))
        self.retry_time = retry_time
        self.reached = False   # a server that answered once is worth waiting for when it goes away

    def _conn(self, timeout: float | None = None) -> http.client.HTTPConnection:
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout or self.timeout,
                                               context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def _unreachable(self, exc: BaseException, what: str) -> Unavailable:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        hint = ""
        if isinstance(exc, ConnectionRefusedError):
            hint = f" (is `server --root DIR --port {self.port}` running on {self.host}?)"
        return Unavailable(f"cannot reach the server at {self.host}:{self.port} ({what}): {reason}{hint}")

    def _error(self, status: int, body: bytes, what: str) -> D4CError:
        try:
            message = json.loads(body).get("error", "")
        except (ValueError, AttributeError):
            message = body[:200].decode(errors="replace")
        if status in (401, 403):
            hint = "" if self._auth else " (give --token-file)"
            return Unauthorized(f"server: {what}: {message or status}{hint}")
        kind = {404: NotFound, 409: Conflict, 400: BadInput, 413: UsageError, 507: SystemFailure}.get(status, D4CError)
        return kind(f"server: {what}: {message or status}")  # type: ignore[arg-type]

    def _gives_up(self, exc: BaseException) -> bool:
        """A refused connection before the server ever answered is a server not
        running (or a wrong address), and a certificate that does not verify will
        not start to: said at once, not after minutes of retries."""
        if self.tls:
            import ssl
            if isinstance(exc, ssl.SSLCertVerificationError):
                return True
        return isinstance(exc, ConnectionRefusedError) and not self.reached

    def get_json(self, path: str, what: str) -> Any:
        retry = _Retry(self.retry_time)
        while True:
            conn = self._conn()
            try:
                conn.request("GET", path, headers=self._auth)
                resp = conn.getresponse()
                body = resp.read(16 << 20)
                self.reached = True
                if resp.status not in TRANSIENT:
                    break
                failure: BaseException = self._error(resp.status, body, what)
            except (OSError, http.client.HTTPException) as exc:
                failure = exc
            finally:
                conn.close()
            if self._gives_up(failure) or not retry.wait():
                if isinstance(failure, D4CError):
                    raise failure
                raise self._unreachable(failure, what) from None
        if resp.status != 200:
            raise self._error(resp.status, body, what)
        try:
            return json.loads(body)
        except ValueError:
            raise BadInput(f"server: {what}: not JSON") from None

    def push(self, path: str, tag: str | None, envelope: bytes | None = None) -> dict[str, Any]:
        f = open_input(path)
        query = ("?" + urllib.parse.urlencode({"tag": tag})) if tag else ""
        conn = self._conn()
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                conn.putrequest("POST", "/v1/push" + query)
                conn.putheader("Content-Length", str(size))
                conn.putheader("Content-Type", "application/octet-stream")
                for name, value in self._auth.items():
                    conn.putheader(name, value)
                if envelope is not None:
                    conn.putheader("D4C-Signature", base64.b64encode(envelope).decode())
                conn.endheaders()
                with Progress(f"pushing {os.path.basename(path)}", total_bytes=size) as progress:
                    try:
                        for chunk in iter(lambda: f.read(CHUNK), b""):
                            conn.send(chunk)
                            progress.advance(len(chunk))
                    except OSError as exc:  # the server may have answered why it stopped reading
                        if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                            raise
                resp = conn.getresponse()
                body = resp.read(1 << 20)
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc, f"push {path}") from None
            finally:
                conn.close()
        if resp.status != 201:
            raise self._error(resp.status, body, f"push {path}")
        try:
            return json.loads(body)
        except ValueError:
            raise BadInput(f"server: push {path}: the answer is not JSON (is this a d4c server?)") from None

    def download(self, url: str, digest: str, size: int, out_path: str,
                 check: Callable[[str], None] | None = None) -> int:
        """Fetch `url` into `out_path`, through `out_path`.partial (kept when the
        download gives up, resumed by the next call); returns the bytes that
        crossed the wire.  `check(path)` looks at the complete file before it
        gets its final name.  NotFound when the server no longer has the payload."""
        partial = out_path + ".partial"
        wire = 0
        try:
            os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
            out = open(partial, "ab")
        except OSError as exc:
            raise from_oserror(exc, "cannot write") from exc
        with out:  # locked until it has its final name: a second pull must not append to it
            try:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict(f"another pull is writing {partial}") from None
            for fresh in (False, True):
                try:
                    if fresh:
                        out.truncate(0)
                    wire += self._fetch_into(url, size, out)
                except OSError as exc:
                    raise from_oserror(exc, f"cannot write {partial}") from exc
                if _sha256_of(partial) == digest:
                    break
                if fresh or wire == size:  # nothing was resumed: the server sent other bytes
                    os.unlink(partial)
                    raise BadInput("server: the downloaded update does not match its digest")
                # a partial of another payload (the update changed since): from byte 0 again
            try:
                if check is not None:
                    check(partial)
                os.replace(partial, out_path)
            except D4CError:
                os.unlink(partial)  # a second download would bring the same bytes
                raise
            except OSError as exc:
                raise from_oserror(exc, f"cannot write {out_path}") from exc
        return wire

    def _fetch_into(self, url: str, size: int, out: BinaryIO) -> int:
        """Append to `out` until it holds `size` bytes; returns the bytes received."""
        wire = 0
        with Progress("pulling", total_bytes=size) as progress:
            got = out.seek(0, os.SEEK_END)
            if got > size:
                out.truncate(0)
                got = 0
            progress.advance(got)
            retry = _Retry(self.retry_time)
            while got < size:
                moved = 0
                failure: BaseException | None = None
                conn = self._conn(min(STALL_TIMEOUT, self.timeout))
                try:
                    conn.request("GET", url, headers=dict(self._auth, **({"Range": f"bytes={got}-"} if got else {})))
                    resp = conn.getresponse()
                    self.reached = True
                    if resp.status in (401, 403, 404):
                        raise self._error(resp.status, resp.read(1 << 16), "download")
                    if resp.status in TRANSIENT:
                        raise ConnectionError(f"HTTP {resp.status}")
                    if resp.status not in (200, 206):
                        raise self._error(resp.status, resp.read(1 << 16), "download")
                    if got and (resp.status != 206 or
                                not resp.getheader("Content-Range", "").startswith(f"bytes {got}-")):
                        raise BadInput("server: download: the server ignored the resume range")
                    while got < size:
                        chunk = resp.read1(min(CHUNK, size - got))  # what arrived: kept even if the link then stalls
                        if not chunk:
                            break
                        try:
                            out.write(chunk)
                        except OSError as exc:  # our disk, not the link: no retry helps
                            raise from_oserror(exc, f"cannot write {out.name}") from exc
                        got += len(chunk)
                        moved += len(chunk)
                        progress.advance(len(chunk))
                except (OSError, http.client.HTTPException) as exc:
                    failure = exc  # dropped: resume from `got`
                finally:
                    conn.close()
                    wire += moved
                if got >= size:
                    break
                out.flush()
                if moved:
                    retry.progressed()
                if (failure is not None and self._gives_up(failure)) or not retry.wait():
                    raise Unavailable(f"download from {self.host}:{self.port} stopped at byte {got} of {size} "
                                      f"({failure or 'connection closed'}); kept in {out.name}: "
                                      "run the same pull again to resume")
            out.flush()
            os.fsync(out.fileno())
        return wire

    def fetch_update(self, tag: str, have: set[str], out_path: str, expected_dimgs: int = 0,
                     check: Callable[[str, dict[str, Any]], None] | None = None,
                     approve: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], int]:
        """Plan the update to `tag` from `have` and download it to `out_path`:
        (plan, bytes downloaded); the plan is asked again when its payload was
        evicted before the download (404).  The plan is {"upToDate": True} and
        nothing is written when there is nothing to fetch.  `approve(plan)` may
        refuse a plan (its signatures) before a byte is downloaded."""
        query = "&".join([f"tag={urllib.parse.quote(tag)}"] + [f"have=sha256:{h}" for h in sorted(have)])
        replans = 0
        while True:
            plan = self.get_json(f"/v1/update?{query}", f"update to {tag}")
            if plan.get("upToDate"):
                return plan, 0
            if expected_dimgs and plan["dimgs"] != expected_dimgs:
                raise Conflict(f"the server used {plan['dimgs']} stored images, expected {expected_dimgs}")
            if approve is not None:
                approve(plan)
            before = _size_or_zero(out_path + ".partial")
            try:
                wire = self.download(plan["url"], plan["sha256"], plan["size"], out_path,
                                     (lambda path: check(path, plan)) if check else None)
                return plan, wire
            except NotFound:
                # a download that moved data before its payload went is not a failure to count
                replans = 0 if _size_or_zero(out_path + ".partial") > before else replans + 1
                if replans > REPLANS:
                    raise


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _sha256_of(path: str) -> str:
    return path_sha256(path).hexdigest()


def check_update(path: str, plan: dict[str, Any], have_files: dict[str, str]) -> None:
    """Check every body of a downloaded update when its base is at hand (a full
    image, or a delta of a full image given as --have): the digest only says the
    file is what the server holds, not that what it holds is sound."""
    from ..image.reader import Image, check_bodies
    from ..image.stack import close_all, open_stack, read_info_at
    parent = (plan.get("from") or "").split(":", 1)[-1]
    if parent and parent not in have_files:
        return  # `load` checks it on the device, with its base
    base = [have_files[parent]] if parent else []
    if base and read_info_at(base[0]).parent_id is not None:
        return  # the base is a delta itself: `load` checks the update on the device
    images: list[Image] = []
    try:
        images = open_stack(base + [path])
        check_bodies(images[-1], os.cpu_count() or 1)
    except (CorruptImage, CorruptDelta) as exc:
        raise CorruptImage(f"the update to {plan.get('tag')} from the server",
                           f"{exc.args[-1] if exc.args else exc} (the server stores a damaged file)") from None
    finally:
        close_all(images)


def plan_envelopes(plan: dict[str, Any]) -> list[bytes]:
    """The signatures a plan carries for its target image."""
    found = plan.get("signatures") or []
    return [e.encode() for e in found if isinstance(e, str)] if isinstance(found, list) else []


def have_ids(values: list[str]) -> set[str]:
    """--have: image ids, or image files whose id is taken."""
    return set(have_files(values))


def have_files(values: list[str]) -> dict[str, str]:
    """--have: {image id: its file, or "" when only the id was given}."""
    from ..image.stack import read_info_at
    out: dict[str, str] = {}
    for v in values:
        if os.path.exists(v):
            out[read_info_at(v).image_id.hex()] = v
        else:
            hexid = v.split(":", 1)[-1]
            if len(hexid) != 64 and os.sep in v:  # it names a file, which is not there
                raise NotFound(f"--have {v}: no such image file")
            if len(hexid) != 64:
                raise UsageError(f"--have {v!r}: neither an image file nor an image id")
            out.setdefault(hexid, "")
    return out
