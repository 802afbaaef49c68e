"""Where OCI images come from: image references and blob sources.

Transports (as skopeo names them):
  oci:DIR[:TAG]               an OCI image layout directory
  oci-archive:FILE[:TAG]      a tar of an OCI image layout (also `ctr images export`)
  docker-archive:FILE[:REF]   a `docker save` tar (legacy or OCI-style)
  docker://[HOST/]NAME[:TAG|@DIGEST]  an OCI distribution registry (registry.py)
  containerd:NAME             the containerd image store (content service)
A bare path is recognised too: a directory is `oci:`, a file is an archive
(OCI layout if it holds index.json, docker-archive otherwise).  Any other plain
name (`nginx:1.23.1`) is looked up in containerd first, as written and then as
docker normalises it (`docker.io/library/nginx:1.23.1`), then pulled from its
registry (Docker Hub for short names).
"""

from __future__ import annotations

import json
import os
import platform
import stat
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import BadInput, D4CError, NotFound, Unavailable, Unsupported, UsageError, from_oserror
from ..digests import sha256

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
MAX_JSON = 16 << 20
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = ""
    variant: str = ""

    @staticmethod
    def default() -> "Platform":
        machine = platform.machine().lower()
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x",
                "riscv64": "riscv64"}.get(machine, machine)
        return Platform("linux", arch, "v7" if machine == "armv7l" else "")

    def matches(self, p: dict[str, Any]) -> bool:
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        return not self.variant or p.get("variant", "") == self.variant

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


@dataclass
class Layer:
    digest: str | None      # compressed blob digest (None: unknown, legacy docker-archive)
    media_type: str
    diff_id: str | None     # uncompressed digest from the config, when known
    open: Any               # () -> BinaryIO of the raw blob


@dataclass
class ResolvedImage:
    config: dict[str, Any]
    config_bytes: bytes
    layers: list[Layer]
    description: str
    manifest_digest: str = ""  # the platform's manifest (where the source has one): what artifacts refer to


class HashingReader:
    """Hashes everything read through it; `verify` drains and compares."""

    def __init__(self, raw: BinaryIO, expected: str | None, what: str) -> None:
        self.raw = raw
        self.expected = expected
        self.what = what
        self.hash = sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def verify(self) -> None:
        while self.read(1 << 20):
            pass
        if self.expected is None:
            return
        algo, _, hexdigest = self.expected.partition(":")
        if algo != "sha256":
            raise Unsupported(f"{self.what}: digest algorithm {algo!r} is not supported")
        if self.hash.hexdigest() != hexdigest:
            raise BadInput(f"{self.what}: content does not match its digest {self.expected}")


def _digest_ok(data: bytes, digest: str) -> bool:
    algo, _, hexdigest = digest.partition(":")
    return algo == "sha256" and sha256(data).hexdigest() == hexdigest


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadInput(f"{what} is not valid JSON") from None


# Typed access to untrusted JSON: a wrong type is bad input, never an AttributeError.
def _obj(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise BadInput(f"{what} is not a JSON object")
    return x


def _text(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise BadInput(f"{what} is not a string")
    return x


def _items(x: Any, what: str) -> list[Any]:
    if x is None:
        return []
    if not isinstance(x, list):
        raise BadInput(f"{what} is not a list")
    return x


def _annotation(desc: Any, key: str) -> str:
    ann = desc.get("annotations") if isinstance(desc, dict) else None
    value = ann.get(key) if isinstance(ann, dict) else None
    return value if isinstance(value, str) else ""


def _platform_of(desc: Any) -> dict[str, Any] | None:
    plat = desc.get("platform") if isinstance(desc, dict) else None
    return plat if isinstance(plat, dict) else None


class _Store:
    """A place holding files by name: a directory or a tar archive."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if not os.path.isdir(path):
            try:
                self.tar = tarfile.open(path, "r:")
                members = self.tar.getmembers()
            except FileNotFoundError:
                raise NotFound(f"no such file: {path}") from None
            except (tarfile.TarError, OSError, EOFError) as exc:
                if self.tar is not None:
                    self.tar.close()
                raise BadInput(f"{path}: not a readable tar archive ({exc})") from None
            for m in members:
                self.members[os.path.normpath(m.name.lstrip("/"))] = m

    def exists(self, name: str) -> bool:
        if self.tar is None:
            return os.path.isfile(os.path.join(self.path, name))
        m = self.members.get(os.path.normpath(name))
        return m is not None and m.isfile()

    def open(self, name: str) -> BinaryIO:
        norm = os.path.normpath(name)
        if norm.startswith("..") or os.path.isabs(norm):
            raise BadInput(f"{self.path}: refusing path {name!r} outside the image")
        if self.tar is None:
            return self._open_regular(norm, name)
        m = self.members.get(norm)
        if m is None or not m.isfile():
            raise NotFound(f"{self.path}: missing {name}")
        f = self.tar.extractfile(m)
        assert f is not None
        return f  # type: ignore[return-value]

    def _open_regular(self, norm: str, name: str) -> BinaryIO:
        """A blob of a layout directory, refused unless it is a regular file: a FIFO
        or a link to /dev/zero would hang convert or feed it without end.  Opened
        without blocking, so a FIFO cannot stop us before we look at it."""
        try:
            fd = os.open(os.path.join(self.path, norm), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{self.path}: missing {name}") from None
        except OSError as exc:
            raise from_oserror(exc, "cannot read image") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadInput(f"{self.path}: {name} is not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BadInput(f"{self.path}: {name} is too large")
        return data

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _blob_name(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
        raise BadInput(f"bad digest {digest!r}")
    return f"blobs/{algo}/{hexdigest}"


def parse_ref(ref: str) -> tuple[str, str, str]:
    """Split a reference into (transport, path, tag)."""
    for transport in ("oci-archive", "docker-archive", "oci"):
        prefix = transport + ":"
        if ref.startswith(prefix):
            rest = ref[len(prefix):]
            path, tag = rest, ""
            head, sep, tail = rest.rpartition(":")
            if sep and head and "/" not in tail:
                path, tag = head, tail
            if not path:
                raise UsageError(f"no path in image reference {ref!r}")
            return transport, path, tag
    if os.path.isdir(ref):
        return "oci", ref, ""
    if os.path.isfile(ref):
        return "archive", ref, ""
    if ref.startswith("docker://"):
        return "docker", ref[len("docker://"):], ""
    if ref.startswith("containerd:"):
        return "containerd", ref[len("containerd:"):], ""
    if not ref.startswith(("/", "./", "../")):
        return "name", ref, ""
    raise NotFound(f"no such image: {ref}")


class ImageSource:
    """An image in an OCI layout or archive, resolved to config + layers."""

    def __init__(self, ref: str, platform_: Platform | None = None) -> None:
        self.ref = ref
        self.platform = platform_ or Platform.default()
        self.transport, path, self.tag = parse_ref(ref)
        if not os.path.exists(path):
            kind = "OCI layout directory" if self.transport == "oci" else "image archive"
            raise NotFound(f"no such {kind}: {path}")
        self.store = _Store(path)
        if self.transport == "archive":
            self.transport = "oci-archive" if self.store.exists("index.json") else "docker-archive"
        problem = None
        if self.transport == "oci" and self.store.tar is not None:
            problem = f"{path}: oci: needs a directory (use oci-archive: for a tar)"
        if self.transport != "oci" and self.store.tar is None:
            problem = f"{path}: {self.transport}: needs a tar file"
        if problem:
            self.store.close()
            raise BadInput(problem)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self) -> ResolvedImage:
        if self.transport == "docker-archive":
            return self._resolve_docker()
        return self._resolve_oci()

    # -- OCI layout ----------------------------------------------------
    def _read_blob(self, digest: str, what: str, limit: int = MAX_JSON) -> bytes:
        data = self.store.read(_blob_name(digest), limit)
        if not _digest_ok(data, digest):
            raise BadInput(f"{self.ref}: {what} does not match its digest {digest}")
        return data

    def _resolve_oci(self) -> ResolvedImage:
        index = _obj(_load_json(self.store.read("index.json"), f"{self.ref}: index.json"),
                     f"{self.ref}: index.json")
        manifests = [m for m in _items(index.get("manifests"), f"{self.ref}: index.json manifests")]
        if not manifests:
            raise BadInput(f"{self.ref}: index.json lists no manifests")
        for m in manifests:
            _obj(m, f"{self.ref}: index.json entry")
        if self.tag:
            chosen = [m for m in manifests if _annotation(m, REF_NAME) == self.tag]
            if not chosen:
                tags = sorted({_annotation(m, REF_NAME) for m in manifests} - {""})
                raise NotFound(f"{self.ref}: no tag {self.tag!r} (tags: {', '.join(tags) or 'none'})")
        else:
            chosen = manifests
        if len(chosen) > 1:
            # several tags or platforms: an index at the top level is resolved by platform
            return self._pick_platform(chosen, "index.json")
        return self._follow(chosen[0], depth=0)

    def _follow(self, desc: Any, depth: int) -> ResolvedImage:
        if depth > 4:
            raise BadInput(f"{self.ref}: nested indexes too deep")
        desc = _obj(desc, f"{self.ref}: descriptor")
        media = desc.get("mediaType", "")
        digest = _text(desc.get("digest"), f"{self.ref}: descriptor digest")
        data = self._read_manifest(digest)
        doc = _obj(_load_json(data, f"{self.ref}: manifest {digest}"), f"{self.ref}: manifest {digest}")
        media = doc.get("mediaType") or media
        if not isinstance(media, str):
            raise BadInput(f"{self.ref}: manifest {digest} has a bad media type")
        if media in INDEX_TYPES or (not media and "manifests" in doc):
            return self._pick_platform(_items(doc.get("manifests"), f"{self.ref}: index {digest}"), digest, depth)
        if media not in MANIFEST_TYPES and not (not media and "layers" in doc):
            raise Unsupported(f"{self.ref}: unsupported manifest media type {media!r}")
        return self._from_manifest(doc, digest)

    def _pick_platform(self, manifests: list[Any], where: str, depth: int = 0) -> ResolvedImage:
        manifests = [_obj(m, f"{self.ref}: {where} entry") for m in manifests]
        if not manifests:
            raise BadInput(f"{self.ref}: {where} lists no manifests")
        matching = [m for m in manifests if self.platform.matches(_platform_of(m) or {})]
        if not matching:
            with_platform = [_platform_of(m) for m in manifests if _platform_of(m) is not None]
            if not with_platform and len(manifests) > 1:
                raise UsageError(f"{self.ref}: holds several images; name one with :TAG")
            if with_platform:
                have = ", ".join(sorted({str(Platform(str(p.get("os", "")), str(p.get("architecture", "")),
                                                      str(p.get("variant", ""))))
                                         for p in with_platform if p is not None}))
                raise NotFound(f"{self.ref}: no image for platform {self.platform} (has {have})")
            matching = manifests
        if len(matching) > 1 and len({str(m.get("digest")) for m in matching}) > 1:
            raise UsageError(f"{self.ref}: several images match {self.platform} in {where}; name one with :TAG")
        return self._follow(matching[0], depth + 1)

    def _from_manifest(self, manifest: dict[str, Any], digest: str) -> ResolvedImage:
        cdesc = _obj(manifest.get("config"), f"{self.ref}: manifest config")
        config_bytes = self._read_blob(_text(cdesc.get("digest"), f"{self.ref}: config digest"), "config")
        config = _obj(_load_json(config_bytes, f"{self.ref}: config"), f"{self.ref}: config")
        diff_ids = self._diff_ids(config)
        ldescs = [_obj(x, f"{self.ref}: layer") for x in _items(manifest.get("layers"), f"{self.ref}: layers")]
        if len(diff_ids) != len(ldescs):
            raise BadInput(f"{self.ref}: config lists {len(diff_ids)} layers, manifest {len(ldescs)}")
        layers = []
        for ld, diff_id in zip(ldescs, diff_ids):
            media = ld.get("mediaType", "")
            if media not in LAYER_TYPES:
                raise Unsupported(f"{self.ref}: unsupported layer media type {media!r}")
            layer_digest = _text(ld.get("digest"), f"{self.ref}: layer digest")
            _blob_name(layer_digest)  # checks the form
            layers.append(Layer(layer_digest, media, diff_id, lambda d=layer_digest: self._open_blob(d)))
        return ResolvedImage(config, config_bytes, layers, f"{self.ref} ({digest})", digest)

    def _open_blob(self, digest: str) -> BinaryIO:
        return self.store.open(_blob_name(digest))

    def _read_manifest(self, digest: str) -> bytes:
        return self._read_blob(digest, "manifest")

    def _diff_ids(self, config: dict[str, Any]) -> list[str]:
        rootfs = _obj(config.get("rootfs") or {}, f"{self.ref}: config rootfs")
        return [_text(d, f"{self.ref}: diff id") for d in _items(rootfs.get("diff_ids"), f"{self.ref}: diff ids")]

    # -- docker save ---------------------------------------------------
    def _resolve_docker(self) -> ResolvedImage:
        doc = _items(_load_json(self.store.read("manifest.json"), f"{self.ref}: manifest.json"),
                     f"{self.ref}: manifest.json")
        entries = [_obj(m, f"{self.ref}: manifest.json entry") for m in doc]
        if not entries:
            raise BadInput(f"{self.ref}: manifest.json lists no images")
        chosen = entries
        if self.tag:
            def tagged(m: dict[str, Any]) -> bool:
                tags = [t for t in _items(m.get("RepoTags"), f"{self.ref}: RepoTags") if isinstance(t, str)]
                return any(t == self.tag or t.endswith("/" + self.tag) or t.split(":")[-1] == self.tag
                           for t in tags)
            chosen = [m for m in entries if tagged(m)]
            if not chosen:
                raise NotFound(f"{self.ref}: no image tagged {self.tag!r}")
        if len(chosen) > 1:
            raise UsageError(f"{self.ref}: holds several images; name one with :REF")
        m = chosen[0]
        config_name = _text(m.get("Config"), f"{self.ref}: manifest.json Config")
        config_bytes = self.store.read(config_name)
        base = os.path.basename(config_name)
        hexpart = base[:-5] if base.endswith(".json") else base
        if len(hexpart) == 64 and not _digest_ok(config_bytes, "sha256:" + hexpart):
            raise BadInput(f"{self.ref}: config does not match its digest")
        config = _obj(_load_json(config_bytes, f"{self.ref}: config"), f"{self.ref}: config")
        diff_ids = self._diff_ids(config)
        names = [_text(n, f"{self.ref}: layer name") for n in _items(m.get("Layers"), f"{self.ref}: Layers")]
        if len(diff_ids) != len(names):
            raise BadInput(f"{self.ref}: config lists {len(diff_ids)} layers, manifest {len(names)}")
        layers = []
        for name, diff_id in zip(names, diff_ids):
            digest = None
            if name.startswith("blobs/sha256/"):
                digest = "sha256:" + name.rsplit("/", 1)[-1]
            layers.append(Layer(digest, "docker-archive", diff_id, lambda n=name: self.store.open(n)))
        return ResolvedImage(config, config_bytes, layers, self.ref)


@dataclass
class RemoteOptions:
    """How to reach registries and containerd (convert's flags)."""
    address: str = "/run/containerd/containerd.sock"
    namespace: str = "default"
    plain_http: bool = False
    insecure: bool = False
    credentials: tuple[str, str] | None = None
    cache_dir: str | None = None


class RegistrySource(ImageSource):
    """An image in an OCI distribution registry; same resolution as a layout."""

    def __init__(self, ref: str, platform_: Platform | None, options: RemoteOptions) -> None:
        from .registry import Registry, parse_reference
        self.ref = ref
        self.platform = platform_ or Platform.default()
        self.tag = ""
        self.transport = "docker"
        self.registry = Registry(parse_reference(ref), plain_http=options.plain_http, insecure=options.insecure,
                                 credentials=options.credentials, cache_dir=options.cache_dir)

    def close(self) -> None:
        pass

    def resolve(self) -> ResolvedImage:
        media, data = self.registry.manifest()
        digest = "sha256:" + sha256(data).hexdigest()
        ref = self.registry.ref.reference
        if ref.startswith("sha256:") and digest != ref:
            raise BadInput(f"{self.ref}: manifest does not match its digest {ref}")
        return self._from_document(media, data, digest)

    def _from_document(self, media: str, data: bytes, digest: str) -> ResolvedImage:
        doc = _obj(_load_json(data, f"{self.ref}: manifest"), f"{self.ref}: manifest")
        media = doc.get("mediaType") or media
        if media in INDEX_TYPES or "manifests" in doc:
            return self._pick_platform(_items(doc.get("manifests"), f"{self.ref}: index"), digest)
        if media not in MANIFEST_TYPES and "layers" not in doc:
            raise Unsupported(f"{self.ref}: unsupported manifest media type {media!r}")
        return self._from_manifest(doc, digest)

    def _read_manifest(self, digest: str) -> bytes:
        _, data = self.registry.manifest(digest)
        if not _digest_ok(data, digest):
            raise BadInput(f"{self.ref}: manifest does not match its digest {digest}")
        return data

    def _read_blob(self, digest: str, what: str, limit: int = MAX_JSON) -> bytes:
        data = self.registry.blob(digest, limit)
        if not _digest_ok(data, digest):
            raise BadInput(f"{self.ref}: {what} does not match its digest {digest}")
        return data

    def _open_blob(self, digest: str) -> BinaryIO:
        return self.registry.open_blob(digest)


def containerd_names(ref: str) -> list[str]:
    """The names containerd may hold `ref` under: as written, then normalised as
    docker and containerd name what they pull (`nginx:1.23.1` is stored as
    `docker.io/library/nginx:1.23.1`, `user/app` as `docker.io/user/app:latest`)."""
    from .registry import DOCKER_HUB, parse_reference
    names = [ref]
    try:
        parsed = parse_reference(ref)
    except UsageError:
        return names
    host = "docker.io" if parsed.host == DOCKER_HUB else parsed.host
    sep = "@" if parsed.reference.startswith("sha256:") else ":"
    full = f"{host}/{parsed.repository}{sep}{parsed.reference}"
    if full != ref:
        names.append(full)
    return names


class ContainerdSource(ImageSource):
    """An image in containerd's store, read through its content service."""

    def __init__(self, ref: str, platform_: Platform | None, options: RemoteOptions) -> None:
        from ..containerd import Containerd
        self.ref = ref
        self.names = containerd_names(ref)
        self.platform = platform_ or Platform.default()
        self.tag = ""
        self.transport = "containerd"
        self.ctrd = Containerd(options.address, options.namespace)

    def close(self) -> None:
        self.ctrd.close()

    def _image(self) -> Any | None:
        for name in self.names:
            image = self.ctrd.get_image(name)
            if image is not None:
                self.ref = name
                return image
        return None

    def exists(self) -> bool:
        return self._image() is not None

    def where(self) -> str:
        return (f"not in containerd at {self.ctrd.address}, namespace {self.ctrd.namespace!r} "
                f"(looked for {', '.join(self.names)})")

    def resolve(self) -> ResolvedImage:
        image = self._image()
        if image is None:
            raise NotFound(f"image {self.ref!r} is {self.where()}")
        t = image.target
        return self._follow({"mediaType": t.media_type, "digest": t.digest, "size": t.size}, depth=0)

    def _read_blob(self, digest: str, what: str, limit: int = MAX_JSON) -> bytes:
        data = self.ctrd.read_blob(digest, limit)
        if not _digest_ok(data, digest):
            raise BadInput(f"{self.ref}: {what} does not match its digest {digest}")
        return data

    def _open_blob(self, digest: str) -> BinaryIO:
        return self.ctrd.open_blob(digest)


class _NamedSource(RegistrySource):
    """A plain NAME[:TAG] that containerd does not hold: its registry, with a
    failure that also says what containerd was asked."""

    def __init__(self, ref: str, platform_: Platform | None, options: RemoteOptions, tried: str) -> None:
        self.tried = tried
        try:
            super().__init__(ref, platform_, options)
        except D4CError as exc:
            raise self._both_failed(exc) from None

    def _both_failed(self, exc: D4CError) -> D4CError:
        err = NotFound(f"{self.ref}: {self.tried}; registry: {exc}")
        err.exit_code = exc.exit_code if exc.exit_code != NotFound.exit_code else err.exit_code
        return err

    def resolve(self) -> ResolvedImage:
        try:
            return super().resolve()
        except D4CError as exc:
            raise self._both_failed(exc) from None


def open_source(ref: str, platform_: Platform | None = None,
                options: RemoteOptions | None = None) -> ImageSource:
    """The source `ref` names (see the module docstring for the forms)."""
    options = options or RemoteOptions()
    transport, rest, _ = parse_ref(ref)
    if transport == "docker":
        return RegistrySource(rest, platform_, options)
    if transport == "containerd":
        return ContainerdSource(rest, platform_, options)
    if transport == "name":
        # containerd first (if it runs here), then the image's registry
        src = ContainerdSource(rest, platform_, options)
        try:
            if src.exists():
                return src
            tried = src.where()
        except Unavailable as exc:
            tried = str(exc)
        src.close()
        return _NamedSource(rest, platform_, options, tried)
    return ImageSource(ref, platform_)
