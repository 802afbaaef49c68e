"""The remote-snapshotter side of di3fs: when containerd (CRI) unpacks an image,
fetch its d4c artifact from the image's registry instead of its layers.

containerd prepares one snapshot per layer, labelled with the layer's chain id
(REF_LABEL) and, from CRI, the image's reference and platform manifest digest.
For the first layer, di3fs looks for the manifest's d4c artifacts
(docs/REGISTRY.md), takes the cheapest for the images it holds, fetches and
checks it like `load`, mounts it and answers AlreadyExists; every further layer
then becomes an empty committed snapshot on top, so the image's top chain id
shows the mounted image.  With no artifact, a slow or unreachable registry or a
refused download, it declines and containerd unpacks the layers as usual."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import tomllib
import urllib.parse
from typing import Callable, NamedTuple

from ..errors import BadInput, D4CError
from ..oci import artifacts
from ..oci.registry import Reference, Registry, parse_reference
from ..image.signing import MAX_ENVELOPE, SIG_SUFFIX, TrustedKeys, trusted_envelope, write_envelope

log = logging.getLogger("d4c.snap")

REF_LABEL = "containerd.io/snapshot.ref"                      # the chain id a Prepare will be committed as
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
REMOTE_LABEL = "containerd.io/snapshot/di3fs.remote"          # ours: the manifest a remote snapshot stands for
DISCOVERY_TIMEOUT = 5.0  # seconds a registry may take to answer before di3fs lets containerd pull layers
HOSTS_DIR = "/etc/containerd/certs.d"  # containerd's usual config_path for registry hosts


Endpoint = tuple[str, bool, bool]  # host[:port], plain HTTP, skip TLS verification


def endpoints(host: str, hosts_dir: str | None, plain_http: frozenset[str] = frozenset()) -> list[Endpoint]:
    """Where to ask for an image of `host`, in order, as containerd reads it:
    HOSTS_DIR/HOST/hosts.toml (or _default/hosts.toml) lists mirrors as
    `[host."URL"]` tables (those with the pull capability, in file order), then
    `server`; without such a file, the host itself.  A mirror URL's path is not
    used (artifacts live under the repository's own path)."""
    default: Endpoint = (host, host in plain_http, False)
    candidates = [os.path.join(hosts_dir, host, "hosts.toml"),
                  os.path.join(hosts_dir, "_default", "hosts.toml")] if hosts_dir else []
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        return [default]
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.warning("%s: not read (%s): asking %s itself", path, exc, host)
        return [default]
    out = []
    for url, entry in (doc.get("host") or {}).items():
        entry = entry if isinstance(entry, dict) else {}
        if "pull" in (entry.get("capabilities") or ["pull", "resolve", "push"]):
            out.append(_endpoint(str(url), bool(entry.get("skip_verify", False)), default))
    server = doc.get("server")
    out.append(_endpoint(str(server), bool(doc.get("skip_verify", False)), default) if server else default)
    return out


def _endpoint(url: str, skip_verify: bool, default: Endpoint) -> Endpoint:
    parsed = urllib.parse.urlsplit(url if "://" in url else "https://" + url)
    if not parsed.netloc:
        return default
    return parsed.netloc, parsed.scheme == "http", skip_verify


def without_rootfs(config: object) -> object:
    """An image config but its rootfs, which a cdimg names by its image id
    (its one layer) where the registry's config lists the image's layers."""
    return {k: v for k, v in config.items() if k != "rootfs"} if isinstance(config, dict) else config


class DeltaServerAuth(NamedTuple):
    """How to reach a --delta-server with --auth-tokens or TLS (docs/API.md)."""
    token: str | None = None
    ca_cert: str | None = None


class RegistryImages:
    """Finds and fetches d4c artifacts for the snapshotter."""

    def __init__(self, plain_http: frozenset[str] = frozenset(), timeout: float = DISCOVERY_TIMEOUT,
                 hosts_dir: str | None = HOSTS_DIR, delta_server: str | None = None,
                 trust: TrustedKeys | None = None, delta_auth: DeltaServerAuth = DeltaServerAuth()) -> None:
        self.plain_http = plain_http  # registry hosts spoken to over HTTP (local and test registries)
        self.timeout = timeout
        self.hosts_dir = hosts_dir
        self.delta_server = delta_server  # a d4c server asked first (its merged cheapest path)
        self.trust = trust  # --trust: an artifact no trusted key signed is not even downloaded
        self.delta_auth = delta_auth
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _discover(self, image_ref: str, manifest: str) -> tuple[Registry | None, list[artifacts.Artifact]]:
        """The first endpoint of the image's registry that lists artifacts of `manifest`, and them."""
        ref = parse_reference(image_ref)
        failure: D4CError | None = None
        for host, plain, insecure in endpoints(ref.host, self.hosts_dir, self.plain_http):
            # short timeouts and no retries for discovery: a delta is an optimisation, never a wait
            # half the budget for the referrers API, the rest for the tag schema's index after it
            registry = Registry(Reference(host, ref.repository, ref.reference), plain_http=plain, insecure=insecure,
                                timeout=self.timeout / 2, retries=0)
            try:
                found = artifacts.find_artifacts(registry, manifest, referrers_timeout=self.timeout / 2)
            except D4CError as exc:
                failure = exc
                registry.close()
                continue
            if found:
                return registry, found
            registry.close()
        if failure is not None:
            raise failure
        return None, []

    def _from_server(self, image_ref: str, manifest: str, held: set[str], dest_of: Callable[[str], str]) -> str | None:
        """The update from the d4c server, whose tag is the image reference as CRI
        gives it (`ctr-cli push --image REG/REPO:TAG`).  Its image must have the
        manifest's config, or it is another image under the same name: refused."""
        from ..image.stack import read_info_at
        from ..server.client import Client, plan_envelopes
        partial = dest_of("server-" + manifest.split(":", 1)[-1])
        signature: list[bytes] = []

        def approve(plan: dict) -> None:  # type: ignore[type-arg]
            if self.trust is not None:
                signature[:] = [trusted_envelope(plan_envelopes(plan), self.trust, str(plan.get("to")),
                                                 f"the server's {image_ref}")[0]]
        try:
            plan, got = Client(self.delta_server or "", timeout=60.0, retry_time=self.timeout,
                               token=self.delta_auth.token, ca_cert=self.delta_auth.ca_cert).fetch_update(
                image_ref, held, partial, approve=approve)
            hexid = str(plan.get("to", "")).split(":", 1)[-1]
            if plan.get("upToDate"):
                return hexid if hexid in held else None
            if not self._is_image_of(image_ref, manifest, read_info_at(partial).config, hexid):
                raise BadInput(f"the server's {image_ref} (sha256:{hexid}) is not the image of manifest {manifest}")
            if signature:
                write_envelope(dest_of(hexid) + SIG_SUFFIX, signature[0])
            os.rename(partial, dest_of(hexid))
            log.info("%s: fetched the update to sha256:%s from the d4c server %s (%d bytes over the link)",
                     image_ref, hexid, self.delta_server, got)
            return hexid
        except (D4CError, OSError, ValueError, KeyError) as exc:
            log.warning("%s: not from the d4c server %s (%s): asking the registry", image_ref, self.delta_server, exc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            return None

    def _is_image_of(self, image_ref: str, manifest: str, config: object, hexid: str) -> bool:
        """Whether the server's image (its config, its id) is the one `manifest`
        names: the same config, or, since a cdimg's config names its one layer by
        the image id, the same config but the rootfs and a d4c artifact of the
        manifest that gives this image id."""
        theirs = self._config_of(image_ref, manifest)
        if config == theirs:
            return True
        if without_rootfs(config) != without_rootfs(theirs):
            return False
        try:
            registry, found = self._discover(image_ref, manifest)
        except D4CError:
            return False
        if registry is not None:
            registry.close()
        return any(a.image_id.split(":", 1)[-1] == hexid for a in found)

    def _config_of(self, image_ref: str, manifest: str) -> object:
        """The image config the registry's manifest names, parsed."""
        ref = parse_reference(image_ref)
        host, plain, insecure = endpoints(ref.host, self.hosts_dir, self.plain_http)[0]
        registry = Registry(Reference(host, ref.repository, ref.reference), plain_http=plain, insecure=insecure,
                            timeout=self.timeout, retries=0)
        try:
            _, data = registry.manifest(manifest)
            return json.loads(registry.blob(json.loads(data)["config"]["digest"]))
        finally:
            registry.close()

    def _trusted(self, registry: Registry, chosen: artifacts.Artifact, image_ref: str) -> bytes | None:
        """With --trust, the artifact's signature by a trusted key (Untrusted if
        none: the artifact is not downloaded); None without --trust."""
        if self.trust is None:
            return None
        envelopes = artifacts.find_signatures(registry, chosen, MAX_ENVELOPE, referrers_timeout=self.timeout / 2)
        return trusted_envelope(envelopes, self.trust, chosen.image_id, f"{image_ref}'s artifact {chosen.digest[:19]}")[0]

    def fetch(self, image_ref: str, manifest: str, held: set[str], dest_of: Callable[[str], str]) -> str | None:
        """The id (hex) of the image now at `dest_of(id)`: the cheapest d4c
        artifact of `manifest` for the images `held`.  None: let containerd
        pull the layers (and say why in the log)."""
        with self._guard:
            lock = self._locks.setdefault(manifest, threading.Lock())
        with lock:
            if self.delta_server:
                hexid = self._from_server(image_ref, manifest, held, dest_of)
                if hexid:
                    return hexid
            registry: Registry | None = None
            try:
                registry, found = self._discover(image_ref, manifest)
                have = next((a for a in found if a.image_id.split(":", 1)[-1] in held), None)
                if have is not None:
                    return have.image_id.split(":", 1)[-1]  # the image itself is here already
                chosen = artifacts.cheapest(found, held)
                if chosen is None or registry is None:
                    log.info("%s: no d4c artifact for %s: containerd pulls the layers", image_ref, manifest)
                    return None
                hexid = chosen.image_id.split(":", 1)[-1]
                if len(hexid) != 64:
                    log.warning("%s: artifact %s names no image id: containerd pulls the layers", image_ref,
                                chosen.digest)
                    return None
                dest = dest_of(hexid)
                envelope = self._trusted(registry, chosen, image_ref)
                # the download itself may take long: a registry that answered is given time (and resumes)
                registry.timeout, registry.retries = 60.0, 4
                got = artifacts.fetch_layer(registry, chosen, dest)
                if envelope is not None:
                    write_envelope(dest + SIG_SUFFIX, envelope)
                log.info("%s: fetched the %s of %s (%d bytes over the link)", image_ref,
                         "delta from " + chosen.base_id if chosen.is_delta else "full image", chosen.image_id, got)
                return hexid
            except D4CError as exc:
                log.warning("%s: no d4c artifact used (%s): containerd pulls the layers", image_ref, exc)
                return None
            except OSError as exc:
                log.warning("%s: no d4c artifact used (%s): containerd pulls the layers", image_ref,
                            os.strerror(exc.errno) if exc.errno else exc)
                return None
            finally:
                if registry is not None:
                    registry.close()
