"""Building OCI image layouts, archives and docker-save tars in Python (for tests)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import zstandard


@dataclass
class M:
    """One tar member of a layer."""
    name: str
    kind: str = "file"          # file dir symlink hardlink char block fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
         "fifo": tarfile.FIFOTYPE}


def layer_tar(members: list[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type = KINDS[m.kind]
            ti.mode, ti.uid, ti.gid = m.mode, m.uid, m.gid
            ti.mtime = m.mtime
            ti.linkname = m.link
            ti.devmajor, ti.devminor = m.dev
            ti.pax_headers = dict(m.pax)
            if m.kind == "file":
                ti.size = len(m.data)
                tf.addfile(ti, io.BytesIO(m.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(data: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(data, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data), "application/vnd.oci.image.layer.v1.tar+zstd"
    return data, "application/vnd.oci.image.layer.v1.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        self.index: list[dict] = []

    def blob(self, data: bytes) -> str:
        digest = sha(data)
        with open(os.path.join(self.path, "blobs", "sha256", digest[7:]), "wb") as f:
            f.write(data)
        return digest

    def image(self, layers: list[tuple[list[M], str]], *, arch: str = "amd64",
              config_extra: dict | None = None) -> dict:
        """Write config, layers and manifest; return the manifest descriptor."""
        diff_ids, descs = [], []
        for members, how in layers:
            raw = layer_tar(members)
            diff_ids.append(sha(raw))
            blob, media = compress(raw, how)
            descs.append({"mediaType": media, "digest": self.blob(blob), "size": len(blob)})
        config = {"architecture": arch, "os": "linux",
                  "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        config.update(config_extra or {})
        cbytes = json.dumps(config).encode()
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": self.blob(cbytes), "size": len(cbytes)},
                    "layers": descs}
        mbytes = json.dumps(manifest).encode()
        return {"mediaType": manifest["mediaType"], "digest": self.blob(mbytes), "size": len(mbytes),
                "platform": {"os": "linux", "architecture": arch}}

    def tag(self, desc: dict, tag: str) -> None:
        d = dict(desc)
        d["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.index.append(d)

    def tag_index(self, descs: list[dict], tag: str) -> None:
        idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": descs}
        data = json.dumps(idx).encode()
        self.tag({"mediaType": idx["mediaType"], "digest": self.blob(data), "size": len(data)}, tag)

    def save(self) -> None:
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.index}, f)


def tar_dir(src: str, out: str) -> None:
    with tarfile.open(out, "w") as tf:
        for name in sorted(os.listdir(src)):
            tf.add(os.path.join(src, name), arcname=name)


def docker_archive(layout: str, manifest_digest: str, out: str, tag: str) -> None:
    """A legacy `docker save` tar of one image from a layout (layers uncompressed)."""
    def read(d: str) -> bytes:
        with open(os.path.join(layout, "blobs", "sha256", d[7:]), "rb") as f:
            return f.read()
    manifest = json.loads(read(manifest_digest))
    config = read(manifest["config"]["digest"])
    with tarfile.open(out, "w") as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        names = []
        for i, ld in enumerate(manifest["layers"]):
            raw = read(ld["digest"])
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            elif raw[:4] == b"\x28\xb5\x2f\xfd":
                raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
            names.append(f"layer{i}/layer.tar")
            add(names[-1], raw)
        add(manifest["config"]["digest"][7:] + ".json", config)
        add("manifest.json", json.dumps([{"Config": manifest["config"]["digest"][7:] + ".json",
                                          "RepoTags": [tag], "Layers": names}]).encode())
