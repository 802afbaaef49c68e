"""An OCI distribution (registry v2) client: just what `convert` needs.

Manifests and blobs by digest, anonymous bearer tokens (the Docker Hub flow),
basic auth from `--user` or ~/.docker/config.json, retries with backoff, and
resumption of a dropped blob download with an HTTP Range request.  Every byte
is verified by digest by the caller (source.py / flatten.py); downloaded
layers are kept in a local cache so the next version fetches only new layers.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

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
                 timeout: float = 60.0) -> None:
        self.ref = ref
        self.scheme = "http" if plain_http else "https"
        self.insecure = insecure
        self.credentials = credentials if credentials is not None else docker_credentials(ref.host)
        self.cache_dir = cache_dir
        self.timeout = timeout
        self._auth: str | None = None

    # -- HTTP ----------------------------------------------------------
    def _connection(self, host: str, scheme: str) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(host, timeout=self.timeout)
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, timeout=self.timeout, context=ctx)

    def _request(self, path: str, headers: dict[str, str], *, what: str,
                 ok: tuple[int, ...] = (200,)) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GET with auth and retries; returns the open response (caller reads it)."""
        delay = 0.5
        for attempt in range(RETRIES + 1):
            conn = self._connection(self.ref.host, self.scheme)
            hdrs = dict(headers)
            if self._auth:
                hdrs["Authorization"] = self._auth
            try:
                conn.request("GET", path, headers=hdrs)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if attempt == RETRIES or isinstance(exc, socket.gaierror):  # a name that does not resolve
                    raise Unavailable(f"{self.ref.host}: cannot reach the registry ({what}): {exc}") from None
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status == 401 and attempt < RETRIES:
                challenge = resp.getheader("WWW-Authenticate", "")
                resp.read()
                conn.close()
                if not self._authenticate(challenge, what):
                    raise AuthFailed(f"{self.ref.host}: {what}: authentication required "
                                     "(give --user USER:PASSWORD or log in with docker/skopeo)")
                continue
            if resp.status in ok:
                return conn, resp
            body = resp.read(4096)
            conn.close()
            if resp.status in (429, 500, 502, 503, 504) and attempt < RETRIES:
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status == 404:
                raise NotFound(f"{self.ref}: {what} not found in the registry")
            if resp.status in (401, 403):
                raise AuthFailed(f"{self.ref.host}: {what}: access denied ({resp.status})")
            raise BadInput(f"{self.ref.host}: {what}: HTTP {resp.status} {_message(body)}")
        raise Unavailable(f"{self.ref.host}: {what}: giving up after {RETRIES} retries")

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
            conn.close()
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


class _Download:
    """A blob download that resumes with Range after a dropped connection."""

    def __init__(self, registry: Registry, digest: str) -> None:
        self.registry = registry
        self.digest = digest
        self.offset = 0
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
            self.size = int(length) if length and length.isdigit() and self.resp.status == 200 else None

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
            self.conn.close()
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
