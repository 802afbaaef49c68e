"""Keeping the server's artifacts and tags in an OCI distribution registry, so
several server replicas can share one store (behind a load balancer).

Each artifact is a blob plus a small OCI manifest tagged `a-<sha256>` whose
config records what the index needs (image id, parent id, size); each d4c tag
is a manifest tagged `t-<hex of NAME:TAG>` whose config names the image.
A replica rebuilds its sqlite index from the registry's tag list, and fetches
an artifact's file into its local directory the first time it needs it.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
import uuid
from typing import Any

from ..errors import BadInput, NotFound, Unavailable
from ..oci.registry import Reference, Registry
from ..digests import path_sha256, sha256

CONFIG_TYPE = "application/vnd.d4c.artifact.config.v1+json"
LAYER_TYPE = "application/vnd.d4c.cdimg.v1"
TAG_CONFIG_TYPE = "application/vnd.d4c.tag.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class RegistryBackend:
    """`registry://HOST[:PORT]/REPOSITORY` (plain HTTP with `plain_http`)."""

    def __init__(self, url: str, plain_http: bool = False) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "registry" or not parsed.netloc or not parsed.path.strip("/"):
            raise BadInput(f"bad storage {url!r} (registry://HOST[:PORT]/REPOSITORY)")
        self.host = parsed.netloc
        self.repo = parsed.path.strip("/")
        self.plain_http = plain_http
        self.reader = Registry(Reference(self.host, self.repo, "latest"), plain_http=plain_http)

    # -- HTTP writes ---------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        if self.plain_http:
            return http.client.HTTPConnection(self.host, timeout=120)
        return http.client.HTTPSConnection(self.host, timeout=120)

    def _call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
              ok: tuple[int, ...] = (200, 201, 202)) -> http.client.HTTPResponse:
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"storage registry {self.host}: {exc}") from None
        finally:
            conn.close()
        if resp.status not in ok:
            raise Unavailable(f"storage registry {self.host}: {method} {path}: HTTP {resp.status}")
        return resp

    def _has_blob(self, digest: str) -> bool:
        resp = self._call("HEAD", f"/v2/{self.repo}/blobs/{digest}", ok=(200, 404))
        return resp.status == 200

    def put_blob(self, path: str | None = None, data: bytes | None = None) -> tuple[str, int]:
        """Upload a blob (monolithic) unless the registry has it; (digest, size)."""
        if path is not None:
            h, size = path_sha256(path), os.path.getsize(path)
        else:
            assert data is not None
            h, size = sha256(data), len(data)
        digest = "sha256:" + h.hexdigest()
        if self._has_blob(digest):
            return digest, size
        resp = self._call("POST", f"/v2/{self.repo}/blobs/uploads/")
        location = resp.getheader("Location") or ""
        loc = urllib.parse.urlsplit(location)
        target = (loc.path or location) + ("?" + loc.query + "&" if loc.query else "?") + \
            urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if path is not None:
            with open(path, "rb") as f:
                self._call("PUT", target, body=f, headers=headers)
        else:
            self._call("PUT", target, body=data, headers=headers)
        return digest, size

    def _put_manifest(self, tag: str, config: dict[str, Any], config_type: str,
                      layers: list[dict[str, Any]]) -> None:
        cbytes = json.dumps(config, sort_keys=True).encode()
        cdigest, csize = self.put_blob(data=cbytes)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                               "config": {"mediaType": config_type, "digest": cdigest, "size": csize},
                               "layers": layers}, sort_keys=True).encode()
        self._call("PUT", f"/v2/{self.repo}/manifests/{tag}", body=manifest,
                   headers={"Content-Type": MANIFEST_TYPE})

    # -- what the store uses ------------------------------------------
    def add_artifact(self, path: str, image: str, parent: str, file_digest: str, size: int) -> None:
        digest, _ = self.put_blob(path)
        if digest != "sha256:" + file_digest:
            raise BadInput("storage: the uploaded artifact changed")
        self._put_manifest(f"a-{file_digest}", {"image": image, "parent": parent, "size": size}, CONFIG_TYPE,
                           [{"mediaType": LAYER_TYPE, "digest": digest, "size": size}])

    def set_tag(self, tag: str, image: str) -> None:
        self._put_manifest("t-" + sha256(tag.encode()).hexdigest(), {"tag": tag, "image": image},
                           TAG_CONFIG_TYPE, [])

    def fetch(self, file_digest: str, dest: str) -> None:
        """Bring an artifact's file to `dest` (checked against its digest)."""
        tmp = f"{dest}.part-{uuid.uuid4().hex}"  # two requests may fetch the same artifact at once
        h = sha256()
        try:
            with self.reader.open_blob("sha256:" + file_digest) as src, open(tmp, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != file_digest:
                raise BadInput(f"storage: artifact {file_digest} does not match its digest")
            os.rename(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def listing(self) -> tuple[list[tuple[str, str, str, int]], dict[str, str]]:
        """(artifacts as (digest, image, parent, size), {tag: image}) from the registry."""
        conn = self._conn()
        try:
            conn.request("GET", f"/v2/{self.repo}/tags/list")
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"storage registry {self.host}: {exc}") from None
        finally:
            conn.close()
        if resp.status == 404:
            return [], {}
        if resp.status != 200:
            raise Unavailable(f"storage registry {self.host}: tags/list: HTTP {resp.status}")
        names = json.loads(body).get("tags") or []
        artifacts, tags = [], {}
        for name in sorted(names):
            if not name.startswith(("a-", "t-")):
                continue
            try:
                _, data = self.reader.manifest(name)
                config_digest = json.loads(data)["config"]["digest"]
                config = json.loads(self.reader.blob(config_digest))
            except (NotFound, KeyError, ValueError):
                continue
            if name.startswith("a-"):
                artifacts.append((name[2:], str(config["image"]), str(config["parent"]), int(config["size"])))
            else:
                tags[str(config["tag"])] = str(config["image"])
        return artifacts, tags
