"""`push` and `pull` against the update server: uploads stream with progress,
downloads resume with HTTP Range after a dropped connection and are checked
against the digest the server announced before they get their final name."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.parse
from typing import Any

from .errors import BadInput, Conflict, D4CError, NotFound, Unavailable, UsageError, from_oserror
from .fsutil import atomic_output
from .progress import Progress

CHUNK = 1 << 20
RETRIES = 5


def _split(host: str) -> tuple[str, int]:
    host = host.split("://", 1)[-1].rstrip("/")
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        return host, 8081
    return name, int(port)


class Client:
    def __init__(self, server: str, timeout: float = 120.0) -> None:
        self.host, self.port = _split(server)
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _error(self, status: int, body: bytes, what: str) -> D4CError:
        try:
            message = json.loads(body).get("error", "")
        except (ValueError, AttributeError):
            message = body[:200].decode(errors="replace")
        kind = {404: NotFound, 409: Conflict, 400: BadInput, 413: UsageError}.get(status, D4CError)
        return kind(f"server: {what}: {message or status}")  # type: ignore[arg-type]

    def get_json(self, path: str, what: str) -> Any:
        conn = self._conn()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read(16 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"cannot reach the server at {self.host}:{self.port} ({what}): {exc}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise self._error(resp.status, body, what)
        try:
            return json.loads(body)
        except ValueError:
            raise BadInput(f"server: {what}: not JSON") from None

    def push(self, path: str, tag: str | None) -> dict[str, Any]:
        size = os.path.getsize(path)
        query = ("?" + urllib.parse.urlencode({"tag": tag})) if tag else ""
        conn = self._conn()
        try:
            conn.putrequest("POST", "/v1/push" + query)
            conn.putheader("Content-Length", str(size))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.endheaders()
            with open(path, "rb") as f, Progress(f"pushing {os.path.basename(path)}", total_bytes=size) as progress:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    conn.send(chunk)
                    progress.advance(len(chunk))
            resp = conn.getresponse()
            body = resp.read(1 << 20)
        except FileNotFoundError:
            raise NotFound(f"no such file: {path}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"cannot reach the server at {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()
        if resp.status != 201:
            raise self._error(resp.status, body, f"push {path}")
        try:
            return json.loads(body)
        except ValueError:
            raise BadInput(f"server: push {path}: the answer is not JSON (is this a d4c server?)") from None

    def download(self, url: str, digest: str, size: int, out_path: str) -> int:
        """Fetch `url` into `out_path` (atomically), resuming after drops; returns
        the bytes that crossed the wire."""
        wire = 0
        h = hashlib.sha256()
        with atomic_output(out_path) as out, Progress("pulling", total_bytes=size) as progress:
            got = 0
            attempts = 0
            while got < size:
                conn = self._conn()
                try:
                    conn.request("GET", url, headers={"Range": f"bytes={got}-"} if got else {})
                    resp = conn.getresponse()
                    if resp.status not in (200, 206):
                        raise self._error(resp.status, resp.read(1 << 16), "download")
                    if got and resp.status == 200:
                        raise BadInput("server: download: the server ignored the resume range")
                    while got < size:
                        chunk = resp.read(min(CHUNK, size - got))
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        wire += len(chunk)
                        progress.advance(len(chunk))
                except (OSError, http.client.HTTPException):
                    pass  # dropped: resume from `got`
                finally:
                    conn.close()
                if got < size:
                    attempts += 1
                    if attempts > RETRIES:
                        raise Unavailable(f"download from {self.host}:{self.port} keeps failing at byte {got}")
                    time.sleep(0.2 * attempts)
            if h.hexdigest() != digest:
                raise BadInput("server: the downloaded update does not match its digest")
        return wire


def local_images(address: str, namespace: str) -> set[str]:
    """Ids of the d4c images containerd holds (what `load` labelled)."""
    from .containerd import Containerd
    from .load import IMAGE_REF_LABEL
    from .snap.api import images_pb2
    with Containerd(address, namespace) as ctrd:
        listed = ctrd.call(ctrd.images.List, images_pb2.ListImagesRequest(), "list images")
    return {img.labels[IMAGE_REF_LABEL].split(":", 1)[-1] for img in listed.images if IMAGE_REF_LABEL in img.labels}


def have_ids(values: list[str]) -> set[str]:
    """--have: image ids, or image files whose id is taken."""
    from .dimg import read_info
    out = set()
    for v in values:
        if os.path.exists(v):
            try:
                fd = os.open(v, os.O_RDONLY)
            except OSError as exc:
                raise from_oserror(exc, "cannot read") from exc
            try:
                out.add(read_info(fd, v).image_id.hex())
            finally:
                os.close(fd)
        else:
            hexid = v.split(":", 1)[-1]
            if len(hexid) != 64:
                raise UsageError(f"--have {v!r}: neither an image file nor an image id")
            out.add(hexid)
    return out
