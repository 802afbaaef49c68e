"""An OCI distribution (registry v2) client: what `convert` and `publish` need.

Manifests and blobs by digest, anonymous bearer tokens (the Docker Hub flow),
basic auth from `--user` or ~/.docker/config.json, retries with backoff, and
resumption of a dropped blob download with an HTTP Range request.  Every byte
is verified by digest by the caller (source.py / flatten.py); downloaded
layers are kept in a local cache so the next version fetches only new layers.
Pushing: blobs in chunks that resume where the registry says it stopped,
manifests by tag or digest, and the referrers of a manifest (the OCI 1.1 API).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from ..errors import BadInput, D4CError, NotFound, Unavailable, UsageError
from ..digests import sha256

DOCKER_HUB = "registry-1.docker.io"
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
RETRIES = 4
CHUNK = 1 << 20
UPLOAD_CHUNK = 8 << 20  # bytes per PATCH of a blob upload: what a dropped connection costs again
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


class AuthFailed(D4CError):
    """{}"""

    exit_code = 5


@dataclass(frozen=True)
class Reference:
    host: str
    repository: str
    reference: str          # a tag or a sha256 digest

    def __str__(self) -> str:
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.host}/{self.repository}{sep}{self.reference}"


def parse_reference(ref: str) -> Reference:
    """`[host[:port]/]name[:tag][@digest]`; short names are Docker Hub's library/."""
    name, digest = ref, ""
    if "@" in ref:
        name, digest = ref.split("@", 1)
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    parts = name.split("/", 1)
    if len(parts) == 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host, repo = parts
    else:
        host, repo = DOCKER_HUB, name
        if "/" not in repo:
            repo = "library/" + repo
    if host == "docker.io":
        host = DOCKER_HUB
    if not re.fullmatch(r"[a-z0-9]+([._\-/][a-z0-9]+)*", repo or "-"):
        raise UsageError(f"bad repository name in {ref!r}")
    reference = digest or tag or "latest"
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise UsageError(f"bad digest in {ref!r}")
    return Reference(host, repo, reference)


def docker_credentials(host: str) -> tuple[str, str] | None:
    """user and password for `host` from ~/.docker/config.json (`auths`), if any."""
    path = os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"), "config.json")
    try:
        with open(path) as f:
            auths = json.load(f).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    names = [host] + (["https://index.docker.io/v1/", "docker.io"] if host == DOCKER_HUB else [])
    for key, entry in auths.items() if isinstance(auths, dict) else []:
        bare = key.split("://", 1)[-1].rstrip("/")
        if (key in names or bare in names) and isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            return user, password
    return None


class Registry:
    """One repository on one registry."""

    def __init__(self, ref: Reference, *, plain_http: bool = False, insecure: bool = False,
                 credentials: tuple[str, str] | None = None, cache_dir: str | None = None,
                 timeout: float = 60.0, retries: int = RETRIES) -> None:
        self.ref = ref
        self.retries = retries
        self.scheme = "http" if plain_http else "https"
        self.insecure = insecure
        self.credentials = credentials if credentials is not None else docker_credentials(ref.host)
        self.cache_dir = cache_dir
        self.timeout = timeout
        self._auth: str | None = None
        # one kept-alive connection for GET and HEAD: on a thin link each new one costs a round trip
        self._idle: tuple[str, str, http.client.HTTPConnection] | None = None
        self._idle_lock = threading.Lock()
        self._origin: weakref.WeakKeyDictionary[http.client.HTTPConnection, tuple[str, str]] = \
            weakref.WeakKeyDictionary()  # (host, scheme) each open connection was made for

    # -- HTTP ----------------------------------------------------------
    def _connection(self, host: str, scheme: str) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(host, timeout=self.timeout)
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, timeout=self.timeout, context=ctx)

    def _take_idle(self, host: str, scheme: str) -> http.client.HTTPConnection | None:
        with self._idle_lock:
            idle, self._idle = self._idle, None
        if idle is None:
            return None
        if idle[:2] == (host, scheme):
            return idle[2]
        idle[2].close()
        return None

    def _done(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Keep `conn` for the next GET or HEAD when its answer was read to the end
        and the server keeps it open; close it otherwise."""
        origin = self._origin.get(conn)
        if origin is None or not resp.isclosed() or resp.will_close or conn.sock is None:
            conn.close()
            return
        with self._idle_lock:
            previous, self._idle = self._idle, (*origin, conn)
        if previous is not None:
            previous[2].close()

    def close(self) -> None:
        """Close the kept-alive connection (a Registry is usable again afterwards)."""
        with self._idle_lock:
            idle, self._idle = self._idle, None
        if idle is not None:
            idle[2].close()

    def _request(self, path: str, headers: dict[str, str], *, what: str, ok: tuple[int, ...] = (200,),
                 method: str = "GET", body: Callable[[], Any] | None = None,
                 retries: int | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A request with auth and retries; returns the open response (caller
        reads it).  `path` may be a URL the registry gave (an upload's Location);
        `body()` makes the body afresh for every attempt.  With `retries=0` a
        dropped connection is the caller's to recover (a PATCH that may have
        been stored in part)."""
        delay = 0.5
        retries = self.retries if retries is None else retries
        url = urllib.parse.urlsplit(path)
        host, scheme = url.netloc or self.ref.host, url.scheme or self.scheme
        target = urllib.parse.urlunsplit(("", "", url.path, url.query, ""))
        attempt, logins = -1, 0
        while attempt < retries:
            attempt += 1
            reused = self._take_idle(host, scheme) if method in ("GET", "HEAD") else None
            conn = reused or self._connection(host, scheme)
            if reused is not None and reused.sock is not None:
                reused.timeout = self.timeout  # the caller may have changed it since the connection was made
                reused.sock.settimeout(self.timeout)
            self._origin[conn] = (host, scheme)
            hdrs = dict(headers)
            if self._auth:
                hdrs["Authorization"] = self._auth
            try:
                conn.request(method, target, body=body() if body is not None else None, headers=hdrs)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused is not None:  # the server closed the idle connection: not a failure of this one
                    attempt -= 1
                    continue
                if attempt >= retries or isinstance(exc, socket.gaierror):  # a name that does not resolve
                    raise Unavailable(f"{self.ref.host}: cannot reach the registry ({what}): {exc}") from None
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status == 401 and logins < 2:  # a login is not a retry: it works with retries=0 too
                logins += 1
                challenge = resp.getheader("WWW-Authenticate", "")
                resp.read(MAX_ANSWER)
                self._done(conn, resp)
                if not self._authenticate(challenge, what):
                    raise AuthFailed(f"{self.ref.host}: {what}: authentication required "
                                     "(give --user USER:PASSWORD or log in with docker/skopeo)")
                attempt -= 1
                continue
            if resp.status in ok:
                return conn, resp
            answer = resp.read(4096)
            self._done(conn, resp)
            if resp.status in (429, 500, 502, 503, 504) and attempt < retries:
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status == 404:
                raise NotFound(f"{self.ref}: {what} not found in the registry")
            if resp.status in (401, 403):
                raise AuthFailed(f"{self.ref.host}: {what}: access denied ({resp.status})")
            raise BadInput(f"{self.ref.host}: {what}: HTTP {resp.status} {_message(answer)}")
        raise Unavailable(f"{self.ref.host}: {what}: giving up after {retries} retries")

    def _authenticate(self, challenge: str, what: str) -> bool:
        """Answer a 401: basic credentials, or a bearer token from the realm."""
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if not self.credentials or self._auth:
                return False
            self._auth = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.get("realm")
        if not realm:
            return False
        query = {"service": fields.get("service", ""),
                 "scope": fields.get("scope") or f"repository:{self.ref.repository}:pull"}
        url = urllib.parse.urlsplit(realm)
        conn = self._connection(url.netloc, url.scheme or "https")
        headers = {}
        if self.credentials:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        try:
            conn.request("GET", (url.path or "/") + "?" + urllib.parse.urlencode(query), headers=headers)
            resp = conn.getresponse()
            body = resp.read(1 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"{url.netloc}: cannot reach the token service: {exc}") from None
        finally:
            conn.close()
        if resp.status in (401, 403):
            raise AuthFailed(f"{self.ref.host}: {what}: the token service refused the credentials"
                             + ("" if self.credentials else " (none given)"))
        if resp.status != 200:
            raise AuthFailed(f"{self.ref.host}: token service answered HTTP {resp.status}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthFailed(f"{self.ref.host}: the token service sent no token")
        if self._auth == "Bearer " + token:
            return False  # the same token again: it does not grant this
        self._auth = "Bearer " + token
        return True

    # -- API -----------------------------------------------------------
    def manifest(self, reference: str | None = None, limit: int = 16 << 20) -> tuple[str, bytes]:
        """(media type, bytes) of a manifest or index, by tag or digest."""
        ref = reference or self.ref.reference
        conn, resp = self._request(f"/v2/{self.ref.repository}/manifests/{ref}", {"Accept": ACCEPT},
                                   what=f"manifest {ref}")
        try:
            data = resp.read(limit + 1)
        finally:
            self._done(conn, resp)
        if len(data) > limit:
            raise BadInput(f"{self.ref}: manifest {ref} is too large")
        media = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        return media, data

    def blob(self, digest: str, limit: int = 16 << 20) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BadInput(f"{self.ref}: blob {digest} is too large")
        return data

    def download(self, digest: str, offset: int = 0) -> BinaryIO:
        """The blob's bytes from `offset` on, straight from the registry (resumed
        with Range after a dropped connection); the caller checks the digest."""
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise BadInput(f"bad digest {digest!r}")
        return _Download(self, digest, offset)  # type: ignore[return-value]

    def open_blob(self, digest: str) -> BinaryIO:
        """The blob's bytes: from the cache, or downloaded into it (resuming a
        dropped connection where it stopped).  The cache keeps only blobs
        whose digest was checked."""
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise BadInput(f"bad digest {digest!r}")
        if self.cache_dir is None:
            return _Download(self, digest)  # type: ignore[return-value]
        path = os.path.join(self.cache_dir, "sha256", digest[7:])
        if os.path.exists(path):
            return open(path, "rb")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.part-{os.getpid()}"
        h = sha256()
        try:
            with _Download(self, digest) as src, open(tmp, "wb") as out:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if "sha256:" + h.hexdigest() != digest:
                raise BadInput(f"{self.ref}: blob {digest} does not match its digest")
            os.rename(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return open(path, "rb")

    def _call(self, method: str, path: str, *, what: str, ok: tuple[int, ...], headers: dict[str, str] | None = None,
              body: bytes | None = None) -> tuple[http.client.HTTPResponse, bytes]:
        """A whole small request: (response, its body)."""
        conn, resp = self._request(path, headers or {}, what=what, ok=ok, method=method,
                                   body=None if body is None else (lambda: body))
        try:
            return resp, resp.read(MAX_ANSWER)
        finally:
            self._done(conn, resp)

    def has_blob(self, digest: str) -> bool:
        resp, _ = self._call("HEAD", f"/v2/{self.ref.repository}/blobs/{digest}", what=f"blob {digest}",
                             ok=(200, 404))
        return resp.status == 200

    def has_manifest(self, reference: str) -> bool:
        resp, _ = self._call("HEAD", f"/v2/{self.ref.repository}/manifests/{reference}",
                             what=f"manifest {reference}", ok=(200, 404), headers={"Accept": ACCEPT})
        return resp.status == 200

    def push_blob(self, source: str | bytes, digest: str, progress: Callable[[int], None] | None = None) -> bool:
        """Upload the file at path `source` (or the bytes `source`) as blob
        `digest`, unless the registry has it (False).  In UPLOAD_CHUNK pieces; after a dropped connection the
        upload continues from the offset the registry reports (or, where it
        cannot report one, starts again), for as long as attempts move data."""
        if self.has_blob(digest):
            return False
        size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
        repo = self.ref.repository
        resp, _ = self._call("POST", f"/v2/{repo}/blobs/uploads/", what="blob upload", ok=(202,),
                             headers={"Content-Length": "0"})
        location = _location(resp, f"/v2/{repo}/blobs/uploads/")
        offset, stalls = 0, 0
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
            while offset < size:
                n = min(UPLOAD_CHUNK, size - offset)

                def piece(at: int = offset, n: int = n) -> bytes:
                    f.seek(at)
                    return f.read(n)
                try:
                    conn, resp = self._request(
                        location, {"Content-Type": "application/octet-stream", "Content-Length": str(n),
                                   "Content-Range": f"{offset}-{offset + n - 1}"},
                        what=f"blob upload {digest}", ok=(202,), method="PATCH", body=piece, retries=0)
                    conn.close()
                    location = _location(resp, location)
                    offset += n
                    stalls = 0
                except Unavailable:
                    stalls += 1
                    if stalls > RETRIES:
                        raise
                    time.sleep(0.2 * stalls)
                    status = self._upload_status(location)
                    if status is None:  # the registry cannot say (distribution 2.x): a new upload from zero
                        resp, _ = self._call("POST", f"/v2/{repo}/blobs/uploads/", what="blob upload",
                                             ok=(202,), headers={"Content-Length": "0"})
                        location, offset = _location(resp, f"/v2/{repo}/blobs/uploads/"), 0
                    else:
                        location, stored = status
                        stalls = 0 if stored > offset else stalls  # the dropped piece went in part-way
                        offset = stored
                if progress is not None:
                    progress(offset)
        sep = "&" if "?" in location else "?"
        self._call("PUT", location + sep + urllib.parse.urlencode({"digest": digest}), what=f"blob {digest}",
                   ok=(201,), headers={"Content-Length": "0"}, body=b"")
        return True

    def _upload_status(self, location: str) -> tuple[str, int] | None:
        """(where to go on, how many bytes the registry holds) of an upload, or
        None where the registry cannot tell: distribution 2.x answers 404 for an
        upload URL whose state token is older than its last PATCH, which is the
        URL a client holds when that PATCH's answer was lost."""
        try:
            resp, _ = self._call("GET", location, what="blob upload status", ok=(204,))
        except (NotFound, BadInput):
            return None
        stored = re.fullmatch(r"0-(\d+)", resp.getheader("Range") or "")
        return _location(resp, location), int(stored.group(1)) + 1 if stored else 0

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> http.client.HTTPResponse:
        """PUT a manifest or index under a tag or its digest."""
        resp, _ = self._call("PUT", f"/v2/{self.ref.repository}/manifests/{reference}", what=f"manifest {reference}",
                             ok=(201,), headers={"Content-Type": media_type}, body=data)
        return resp

    def tags(self) -> list[str]:
        """The repository's tags in the registry's order (following `Link` pages)."""
        path, out = f"/v2/{self.ref.repository}/tags/list?n=1000", []
        for _ in range(1000):
            resp, body = self._call("GET", path, what="tag list", ok=(200,))
            try:
                out += [str(t) for t in json.loads(body).get("tags") or []]
            except (ValueError, AttributeError):
                raise BadInput(f"{self.ref.host}: tag list of {self.ref.repository}: not JSON") from None
            link = re.match(r"<([^>]+)>", resp.getheader("Link") or "")
            if not link:
                break
            path = link.group(1)
        return out

    def referrers(self, digest: str) -> list[dict[str, Any]] | None:
        """The descriptors of the manifests whose subject is `digest`, by the
        referrers API; None where the registry lacks it (then the referrers
        tag schema holds them: see artifacts.py)."""
        resp, body = self._call("GET", f"/v2/{self.ref.repository}/referrers/{digest}", what=f"referrers of {digest}",
                                ok=(200, 404), headers={"Accept": INDEX_TYPE})
        media = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if resp.status == 404 or media != INDEX_TYPE:  # no such API (a 404 or a page that is not an index)
            return None
        return index_descriptors(body, f"{self.ref.host}: referrers of {digest}")


MAX_ANSWER = 4 << 20  # bytes of a small answer (an index, an error) read at most


def index_descriptors(data: bytes, what: str) -> list[dict[str, Any]]:
    """The descriptors an image index lists (those that are objects)."""
    try:
        found = json.loads(data).get("manifests") or []
    except (ValueError, AttributeError):
        raise BadInput(f"{what}: not an image index") from None
    return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []


def _location(resp: http.client.HTTPResponse, fallback: str) -> str:
    return resp.getheader("Location") or fallback


class _Download:
    """A blob download that resumes with Range after a dropped connection."""

    def __init__(self, registry: Registry, digest: str, offset: int = 0) -> None:
        self.registry = registry
        self.digest = digest
        self.offset = offset
        self.size: int | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.resp: http.client.HTTPResponse | None = None
        self.resumes = 0
        self._open()

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        self.conn, self.resp = self.registry._request(f"/v2/{self.registry.ref.repository}/blobs/{self.digest}",
                                                      headers, what=f"blob {self.digest}", ok=(200, 206))
        if self.offset and self.resp.status != 206:
            # the server ignored the range: skip what we already have
            skip = self.offset
            while skip:
                got = self.resp.read(min(skip, CHUNK))
                if not got:
                    break
                skip -= len(got)
        if self.size is None:
            length = self.resp.getheader("Content-Length")
            whole = re.fullmatch(r"bytes \d+-\d+/(\d+)", self.resp.getheader("Content-Range") or "")
            if self.resp.status == 200 and length and length.isdigit():
                self.size = int(length)
            elif self.resp.status == 206 and whole:
                self.size = int(whole.group(1))

    def read(self, n: int = -1) -> bytes:
        n = CHUNK if n is None or n < 0 else n
        while True:
            try:
                assert self.resp is not None
                data = self.resp.read(n)
            except (OSError, http.client.HTTPException, socket.timeout):
                data = None
            if data:
                self.offset += len(data)
                return data
            if data == b"" and (self.size is None or self.offset >= self.size):
                return b""
            # dropped before the end: resume where we are
            self.resumes += 1
            if self.resumes > RETRIES:
                raise Unavailable(f"{self.registry.ref.host}: blob {self.digest}: connection keeps dropping")
            self.close()
            time.sleep(0.2 * self.resumes)
            self._open()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.conn is not None:
            assert self.resp is not None
            self.registry._done(self.conn, self.resp)  # kept only when read to the end
            self.conn = None

    def __enter__(self) -> "_Download":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(str(e.get("message", e.get("code", ""))) for e in errors) or ""
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
