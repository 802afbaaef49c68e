"""Thin-link benchmark (`make bench-link`): a device updates an image over a
shaped link, with a full `ctr images pull` from a registry, with d4c
(`ctr-cli pull` of the delta, which also loads it) and with containerd's own
CRI pull (as kubelet asks for it) answered by di3fs from the d4c artifacts
`ctr-cli publish` put in the registry; we count the bytes on the link and the
seconds until `ctr run` of the new image prints its first line.

Why a real link: the claim is about thin links, where round trips and loss
matter as much as sizes, so nothing here is estimated from file sizes.

Setting (the issue's reproduction of the paper's):
- two network namespaces joined by a veth pair: the server side (10.77.0.1:
  Debian's docker-registry with the images, our `server` with the deltas) and
  the device (10.77.0.2: a private containerd, the di3fs snapshotter, ctr,
  ctr-cli).  The daemons are tests/daemons.py's, started inside the namespaces;
- links, both directions shaped alike (LINKS): "50mbit" = 50 Mbit/s and 40 ms
  round trip (20 ms each way: we read the paper's "40 ms delay" as what one
  `tc ... netem delay 40ms` on one host adds, a round trip), no loss; "3g" =
  5 Mbit/s, 200 ms round trip, 1 % of the packets lost in each direction;
  a queue of 1000 packets per direction (netem's default limit);
- shaping: `tc netem` (rate, delay, loss) on both veth ends when the kernel has
  it.  A kernel without sch_netem (the 2-core VM of the committed results) gets
  the same link from parts it has: `tc tbf` for the rate on each end's egress,
  and on each end's ingress an NFQUEUE that this module holds (`--delayer`) for
  the one-way delay and the loss (a constant delay keeps the order, so one
  batch verdict releases every due packet).  The delay sits at the receiver:
  held in the sender's stack, packets would stall TCP small queues.  GSO is
  off on the veth (gso_max_segs 1) so a loss is one packet, not 44;
- images: bench/image_bench.py's A (Debian minbase + nginx 1.22.1-9+deb12u9),
  B (deb12u11) and C (B + bookworm-updates/-security + curl), one layer each;
  pairs A -> B and B -> C.  The registry gets each image twice through `skopeo
  copy`: gzip layers (what registries serve; method (a)) and zstd -19 layers
  (the best a full pull can do with containerd 1.6; (a')).  Our server gets the
  full A and the deltas A -> B, B -> C.  The cdimgs are converted and diffed by
  the same ./ctr-cli that pulls them (not timed);
- every measured run starts a fresh containerd root holding the old version
  only -- (a) pulled from the registry, (b) its cdimg loaded with `ctr-cli
  load` -- with the link unshaped; then the link is shaped and we time, from
  the first command to the first output line of `ctr run --rm IMAGE ID nginx -v`,
  (a) `ctr images pull --plain-http` (fetch + unpack) then `ctr run`, (b)
  `ctr-cli pull` (plan, download, check, load: one command, as a device runs
  it) then `ctr run --snapshotter di3fs`, (c) a CRI `PullImage` over the
  containerd socket (containerd with its CRI plugin, di3fs with
  --plain-http-registry; the old version pulled the same way beforehand) then
  `ctr -n k8s.io run --snapshotter di3fs`.  Bytes are rx_bytes + tx_bytes of the
  device's veth end (/sys/class/net/IF/statistics) over the same interval.
  Afterwards, unshaped and unmeasured, a second container checks that the image
  is the new one (sha256 of its /var/lib/dpkg/status against the new rootfs);
- runs per cell: 3 on 50mbit, 1 on 3g (a full 3g pull takes ~2 min; `--reps`
  overrides); the table shows the median and the ratios of those medians.
Results: bench/results/link.md, link.json, link.png.  Needs root, `ip netns`,
containerd + runc, docker-registry, skopeo, iptables (without netem) and the
binaries of `make all` (./ctr-cli, ./snapshotter, ./server).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from tests.daemons import (Containerd, Registry, Server, Snapshotterd, clean_below, mounts_below, stop_device,
                           terminate)

from . import image_bench
from .delta_bench import RESULTS
from .plotting import pyplot

ROOT = image_bench.ROOT
SRV_IP, CLI_IP = "10.77.0.1", "10.77.0.2"
PREFIX = "d4c-link"
PAIRS = [("A", "B", "nginx deb12u9 -> deb12u11"), ("B", "C", "security updates + curl")]
REPO = "bench/nginx"
RUN_CMD = ["nginx", "-v"]  # prints "nginx version: nginx/1.22.1" (on stderr) in A, B and C
# (a) as registries serve images (gzip layers), (a') the same with zstd -19 layers: the strongest full pull
METHODS = {"full": "(a) ctr images pull, gzip", "full-zstd": "(a') ctr images pull, zstd -19",
           "d4c": "(b) ctr-cli pull (+load)", "cri": "(c) CRI PullImage, di3fs + d4c artifacts"}
REPOS = {"full": REPO, "full-zstd": REPO + "-zstd"}
TARGET_LINK, TARGET_BYTES, TARGET_TIME = "50mbit", 10.0, 5.0
# (c) against (b): containerd's own pull, with the deltas `publish` put in the registry, costs about what d4c's
CRI_TARGET_BYTES, CRI_TARGET_TIME = 1.1, 1.3


Row = dict[str, object]  # one run, or one (pair, link) summary


@dataclass(frozen=True)
class Link:
    label: str
    rate_mbit: float
    rtt_ms: float
    loss_pct: float  # in each direction
    reps: int  # runs per cell by default: d4c's seconds vary by ~0.5 s run to run, a 3g full pull takes minutes


LINKS = {"50mbit": Link("50 Mbit/s, 40 ms RTT", 50, 40, 0.0, reps=3),
         "3g": Link("5 Mbit/s, 200 ms RTT, 1 % loss", 5, 200, 1.0, reps=1)}


def log(msg: str) -> None:
    print(f"[link] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, timeout: float = 60) -> str:
    """Run a set-up command; its stderr is the error when it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip()}")
    return p.stdout


# --- network namespaces -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Put this thread in netns `ns` for the block: the daemons of tests/daemons.py
    that it starts (and every command) inherit it, so they are reused unchanged."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(target)
        os.close(home)


def has_netem() -> bool:
    """Whether this kernel has sch_netem (tried on a veth pair in a throw-away namespace)."""
    ns = f"{PREFIX}-probe-{os.getpid()}"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        p = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"],
                           capture_output=True)
        return p.returncode == 0
    finally:
        run("ip", "netns", "del", ns)


class Topology:
    """Two namespaces and a veth pair between them; `shape` / `unshape` the link."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.srv, self.cli = f"{PREFIX}-srv-{tag}", f"{PREFIX}-cli-{tag}"
        self.srv_if, self.cli_if = f"d4cs{tag}"[:15], f"d4cc{tag}"[:15]
        self.netem = has_netem()
        if not self.netem and not shutil.which("iptables"):
            raise SystemExit("link bench: no sch_netem in this kernel, and no iptables for the NFQUEUE delayer")
        self.delayers: list[subprocess.Popen[bytes]] = []

    def create(self, tcp_cc: str | None) -> None:
        for ns in (self.srv, self.cli):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            if tcp_cc:  # a namespace may only pick from net.ipv4.tcp_allowed_congestion_control
                run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={tcp_cc}")
        run("ip", "link", "add", self.srv_if, "netns", self.srv, "type", "veth", "peer", "name", self.cli_if,
            "netns", self.cli)
        for ns, dev, ip in ((self.srv, self.srv_if, SRV_IP), (self.cli, self.cli_if, CLI_IP)):
            # no IPv6 chatter in the byte counts; one packet per skb so loss and rate act on packets
            run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
            run("ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1", "gso_max_size", "1500")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

    def ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (self.srv, self.srv_if), (self.cli, self.cli_if)

    def shape(self, link: Link) -> None:
        """Shape both directions: rate on egress, half the RTT and the loss per direction."""
        one_way = link.rtt_ms / 2
        for ns, dev in self.ends():
            if self.netem:
                run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", "rate", f"{link.rate_mbit}mbit",
                    "delay", f"{one_way}ms", "loss", f"{link.loss_pct}%", "limit", "1000")
                continue
            # tbf: bucket of 10 packets, queue of 1000 packets (netem's default limit)
            run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{link.rate_mbit}mbit",
                "burst", "15140", "limit", str(1000 * 1514))
            self.delayers.append(start_delayer(ns, one_way / 1000, link.loss_pct / 100))
            run("ip", "netns", "exec", ns, "iptables", "-t", "raw", "-A", "PREROUTING", "-i", dev,
                "-j", "NFQUEUE", "--queue-num", "0")

    def unshape(self) -> None:
        for ns, dev in self.ends():
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if not self.netem:
                subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "raw", "-F", "PREROUTING"],
                               capture_output=True)
        died = [p.returncode for p in self.delayers if p.poll() is not None]
        for p in self.delayers:
            terminate(p)
        self.delayers.clear()
        if died:  # the run was not on the link it claims
            raise RuntimeError(f"a delayer died during the run (exit {died[0]})")

    def tcp_cc(self) -> str:
        """The congestion control the server's TCP uses (a namespace inherits the host's)."""
        return run("ip", "netns", "exec", self.srv, "sysctl", "-n", "net.ipv4.tcp_congestion_control").strip()

    def wire_bytes(self) -> int:
        """rx + tx bytes of the device's veth end, from its /sys/class/net (seen inside the namespace)."""
        stats = f"/sys/class/net/{self.cli_if}/statistics"
        out = run("ip", "netns", "exec", self.cli, "cat", f"{stats}/rx_bytes", f"{stats}/tx_bytes")
        return sum(int(x) for x in out.split())

    def destroy(self) -> None:
        """Delete both namespaces (the veth pair goes with them)."""
        with contextlib.suppress(Exception):
            self.unshape()
        for ns in (self.srv, self.cli):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def sweep_stale() -> None:
    """Delete namespaces a killed earlier run of this bench left (their pid is gone)."""
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        pid = name.rsplit("-", 1)[-1]
        if name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            log(f"removing stale namespace {name}")
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# --- the delayer: an NFQUEUE listener that releases packets after the one-way delay ---------------

NETLINK_NETFILTER, SOL_NETLINK, NETLINK_NO_ENOBUFS, SO_RCVBUFFORCE = 12, 270, 5, 33
NFNL_SUBSYS_QUEUE = 3
MSG_PACKET, MSG_VERDICT, MSG_CONFIG, MSG_VERDICT_BATCH = 0, 1, 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 1, 4, 2
NF_DROP, NF_ACCEPT = 0, 1


def nfq_message(kind: int, queue: int, attrs: list[tuple[int, bytes]], flags: int = NLM_F_REQUEST) -> bytes:
    """A nfnetlink_queue message: nlmsghdr, nfgenmsg (queue number big-endian), attributes."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue)
    for kind_attr, value in attrs:
        attr = struct.pack("=HH", 4 + len(value), kind_attr) + value
        body += attr + b"\0" * (-len(attr) % 4)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body


def nfq_packet_ids(data: bytes) -> list[int]:
    """Packet ids of the queued-packet messages in one netlink read."""
    ids, off = [], 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | MSG_PACKET:
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x3FFF == 1:  # NFQA_PACKET_HDR: packet id first
                    ids.append(struct.unpack_from("!I", data, a + 4)[0])
                    break
                a += (alen + 3) & ~3
        elif kind == NLMSG_ERROR and struct.unpack_from("=i", data, off + 16)[0]:
            raise OSError(-struct.unpack_from("=i", data, off + 16)[0], "nfqueue refused a message")
        off += (length + 3) & ~3
    return ids


def delayer(queue: int, delay_s: float, loss: float, seed: int) -> int:
    """Hold every packet of NFQUEUE `queue` for `delay_s`, drop a `loss` fraction.  Prints
    "ready" once bound.  Runs in the namespace whose ingress it delays."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    s.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    s.bind((0, 0))
    for attrs in ([(1, struct.pack("!BxH", 1, 0))],  # NFQA_CFG_CMD: bind
                  [(2, struct.pack("!IB", 0, 1)),  # NFQA_CFG_PARAMS: copy metadata only
                   (3, struct.pack("!I", 100000))]):  # NFQA_CFG_QUEUE_MAXLEN
        s.send(nfq_message(MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        nfq_packet_ids(s.recv(65536))  # the ack; raises on an error
    print("ready", flush=True)
    rng = random.Random(seed)
    held: collections.deque[tuple[float, int]] = collections.deque()
    parent = os.getppid()
    while os.getppid() == parent:  # a killed bench leaves no delayer behind
        wait = max(0.0, held[0][0] - time.monotonic()) if held else 1.0
        readable, _, _ = select.select([s], [], [], wait)
        now = time.monotonic()
        while readable:
            try:
                data = s.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for pid in nfq_packet_ids(data):
                if loss and rng.random() < loss:
                    s.send(nfq_message(MSG_VERDICT, queue, [(2, struct.pack("!II", NF_DROP, pid))]))
                else:
                    held.append((now + delay_s, pid))
        last = None
        while held and held[0][0] <= now:
            last = held.popleft()[1]
        if last is not None:  # accepts every queued packet up to `last`
            s.send(nfq_message(MSG_VERDICT_BATCH, queue, [(2, struct.pack("!II", NF_ACCEPT, last))]))
    return 0


def start_delayer(ns: str, delay_s: float, loss: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]))
    with inside(ns):
        p = subprocess.Popen([sys.executable, "-m", "bench.link_bench", "--delayer", "0", str(delay_s), str(loss)],
                             stdout=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != b"ready":
        terminate(p)
        raise RuntimeError(f"the delayer in {ns} did not start (exit {p.poll()})")
    return p


# --- the server side --------------------------------------------------------------------------------

class LinkRegistry(Registry):
    """The tests' docker-registry, listening on every address of its namespace
    (the tests' one binds loopback only)."""

    def __init__(self, base: str) -> None:
        super().__init__(base)
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(text.replace("addr: 127.0.0.1:", "addr: 0.0.0.0:"))

    def push_zstd(self, layout: str, tag: str, name: str, work: str) -> None:
        """Like `push`, with zstd -19 layers (containerd 1.6 unpacks them).  Through a local
        layout and --preserve-digests: pushed directly, skopeo's blob-info cache would
        substitute the gzip layer the registry already has."""
        local = os.path.join(work, f"zstd-{tag}")
        run("skopeo", "copy", "--quiet", "--dest-compress-format", "zstd", "--dest-compress-level", "19",
            f"oci:{layout}:{tag}", f"oci:{local}:{tag}", timeout=600)
        run("skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", f"oci:{local}:{tag}",
            f"docker://{self.host}/{name}:{tag}", timeout=600)


@dataclass
class ServerSide:
    registry: LinkRegistry
    server: Server
    layers: dict[tuple[str, str], tuple[int, str]]  # (method, image) -> layer bytes, media type served
    cdimgs: dict[str, str]  # image -> its full cdimg
    deltas: dict[str, str]  # new image -> delta cdimg from its predecessor
    published: dict[str, int]  # new image -> size of the delta artifact `publish` put in the registry


def binary(name: str) -> str:
    return os.path.join(ROOT, name)


def ctr_cli(*args: str, timeout: float = 600) -> str:
    return run(binary("ctr-cli"), *args, timeout=timeout)


def convert(images: dict[str, str], work: str) -> dict[str, str]:
    """cdimgs of the OCI layouts, made by the ./ctr-cli that will pull and load them (the
    cache's cdimgs come from the source tree, whose format may be ahead of the binaries)."""
    out = {}
    for name, layout in images.items():
        ctr_cli("convert", "-q", "--image", f"oci:{layout}:{name}", "--output", os.path.join(work, f"cdimg-{name}"),
                "--cdimg")
        out[name] = os.path.join(work, f"cdimg-{name}", "image.cdimg")
    return out


def serve(topo: Topology, work: str, images: dict[str, str]) -> ServerSide:
    """Start the registry and our server in the server namespace and give them the images
    and deltas (not measured: this is the vendor's side)."""
    cdimgs = convert(images, work)
    deltas = {}
    for old, new, _ in PAIRS:
        deltas[new] = os.path.join(work, f"delta-{old}{new}.cdimg")
        ctr_cli("cdimg", "diff", "-q", "--oldCdimg", cdimgs[old], "--newCdimg", cdimgs[new],
                "--outCdimg", deltas[new], "--threadNum", "2")
    registry = LinkRegistry(work)
    server = Server(work, binary("server"), extra=("--host", "0.0.0.0"))
    layers = {}
    try:
        with inside(topo.srv):
            registry.start()
            server.start()
            for name, layout in images.items():
                registry.push(layout, name, REPOS["full"])
                registry.push_zstd(layout, name, REPOS["full-zstd"], work)
                for method, repo in REPOS.items():
                    layers[(method, name)] = layer_info(registry, repo, name)
                    if not layers[(method, name)][1].endswith("+" + ("zstd" if method == "full-zstd" else "gzip")):
                        raise RuntimeError(f"{repo}:{name} has layers {layers[(method, name)][1]}")
            first = PAIRS[0][0]
            ctr_cli("push", "-q", "--cdimg", cdimgs[first], "--imageTag", f"{REPO}:{first}", "--serverHost",
                    server.host)
            for _, new, _ in PAIRS:
                ctr_cli("push", "-q", "--cdimg", deltas[new], "--imageTag", f"{REPO}:{new}", "--serverHost",
                        server.host)
            published = publish(registry)
    except BaseException:  # the caller only stops what it got back
        server.stop()
        registry.stop()
        raise
    return ServerSide(registry, server, layers, cdimgs, deltas, published)


def publish(registry: Registry) -> dict[str, int]:
    """`ctr-cli publish` beside the gzip images: the first one's cdimg, then each pair's
    delta (and the new image's cdimg); returns each new image's delta artifact size."""
    from d4c.digests import sha256
    from d4c.oci import artifacts
    from d4c.oci.registry import Registry as Client, parse_reference
    ctr_cli("publish", "-q", "--plain-http", "--blob-cache", "none", "--image",
            f"docker://{registry.host}/{REPO}:{PAIRS[0][0]}")
    sizes = {}
    for old, new, _ in PAIRS:
        ctr_cli("publish", "-q", "--plain-http", "--blob-cache", "none", "--image",
                f"docker://{registry.host}/{REPO}:{new}", "--from", old)
        client = Client(parse_reference(f"{registry.host}/{REPO}:{new}"), plain_http=True)
        _, manifest = client.manifest(new)
        found = artifacts.find_artifacts(client, "sha256:" + sha256(manifest).hexdigest())
        sizes[new] = min(a.size for a in found if a.is_delta)
    return sizes


def layer_info(registry: Registry, repo: str, tag: str) -> tuple[int, str]:
    """(layer bytes, media types) of repo:tag as the registry serves it (asked on its loopback)."""
    req = urllib.request.Request(f"http://{registry.host}/v2/{repo}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        manifest = json.load(resp)
    return (sum(layer["size"] for layer in manifest["layers"]),
            ", ".join(sorted({layer["mediaType"] for layer in manifest["layers"]})))


# --- the device -----------------------------------------------------------------------------------

@contextlib.contextmanager
def device(topo: Topology, base: str, registry: str | None = None) -> Iterator[tuple[Containerd, Snapshotterd]]:
    """A fresh containerd root with the di3fs snapshotter in the device namespace (with
    `registry`, containerd's CRI plugin pulls from it and di3fs fetches artifacts there);
    afterwards no container, daemon, FUSE server or mount of it is left."""
    os.makedirs(os.path.join(base, "run"))
    remote = ("--plain-http-registry", registry) if registry else ()
    snap = Snapshotterd(base, binary("snapshotter"), remote)
    ctrd = Containerd(base, snap.socket, (registry,) if registry else ())
    try:
        with inside(topo.cli):
            snap.start()
            ctrd.start()
            yield ctrd, snap
    finally:
        stop_device(ctrd, snap, base)


def d4c_cmd(ctrd: Containerd, snap: Snapshotterd, *args: str) -> list[str]:
    return [binary("ctr-cli"), *args, "-q", "--address", ctrd.socket, "--namespace", ctrd.namespace,
            "--snapshotter-root", snap.root]


def registry_ref(side: ServerSide, method: str, name: str) -> str:
    return f"{SRV_IP}:{side.registry.port}/{REPOS[method]}:{name}"


def check(cmd: list[str], timeout: float = 1800) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")


def first_line(cmd: list[str], timeout: float = 300) -> tuple[str, float]:
    """Start `cmd`, return its first output line (stdout or stderr) and when it came."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    watchdog = threading.Timer(timeout, p.kill)  # a silent hang ends too, not only a slow exit
    watchdog.start()
    try:
        line = p.stdout.readline()
        when = time.monotonic()
        rest, _ = p.communicate()
    finally:
        watchdog.cancel()
    if p.returncode == -signal.SIGKILL:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... did not finish in {timeout} s")
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}): {(line + rest).strip()[-2000:]}")
    return line.strip(), when


def measure(topo: Topology, side: ServerSide, old: str, new: str, link: Link, method: str,
            work: str, expect_status: str) -> Row:
    """One run on a fresh device holding `old`: update to `new` over `link` with `method`."""
    registry = f"{SRV_IP}:{side.registry.port}" if method == "cri" else None
    with tempfile.TemporaryDirectory(prefix="dev-", dir=work) as base, device(topo, base, registry) as (ctrd, snap):
        cid = f"link-{uuid.uuid4().hex[:10]}"
        pull: list[str] | str  # a command, or the reference a CRI PullImage asks for
        if method == "cri":
            cri_pull(ctrd, registry_ref(side, "full", old))
            image = registry_ref(side, "full", new)
            pull = image
            run_cmd = ctrd.ctr_args("run", "--rm", "--snapshotter", "di3fs", image, cid, *RUN_CMD)
            payload = side.published[new]
        elif method in REPOS:
            check(ctrd.ctr_args("images", "pull", "--plain-http", registry_ref(side, method, old)))
            image = registry_ref(side, method, new)
            pull = ctrd.ctr_args("images", "pull", "--plain-http", image)
            run_cmd = ctrd.ctr_args("run", "--rm", image, cid, *RUN_CMD)
            payload = side.layers[(method, new)][0]
        else:
            check(d4c_cmd(ctrd, snap, "load", "--image", f"{REPO}:{old}", "--cdimg", side.cdimgs[old]))
            image = f"{REPO}:{new}"
            pull = d4c_cmd(ctrd, snap, "pull", "--image", image, "--host", f"{SRV_IP}:{side.server.port}")
            run_cmd = ctrd.ctr_args("run", "--rm", "--snapshotter", "di3fs", image, cid, *RUN_CMD)
            payload = os.path.getsize(side.deltas[new])
        topo.shape(link)
        try:
            before = topo.wire_bytes()
            start = time.monotonic()
            if isinstance(pull, str):
                cri_pull(ctrd, pull)
            else:
                check(pull)
            pulled = time.monotonic()
            line, shown = first_line(run_cmd)
            wire = topo.wire_bytes() - before
        finally:
            topo.unshape()
        if not line.startswith("nginx version:"):
            raise RuntimeError(f"unexpected first line of {new}: {line!r}")
        snapshotter = ["--snapshotter", "di3fs"] if method in ("d4c", "cri") else []
        status, _ = first_line(ctrd.ctr_args("run", "--rm", *snapshotter, image, cid + "-v", "sha256sum",
                                       "/var/lib/dpkg/status"))
        if status.split()[0] != expect_status:
            raise RuntimeError(f"{method}: the container does not run {new} (dpkg status {status})")
    return {"method": method, "wire_bytes": wire, "payload_bytes": payload, "pull_s": pulled - start,
            "first_line_s": shown - start, "first_line": line}


def cri_pull(ctrd: Containerd, ref: str) -> None:
    """PullImage through containerd's CRI image service, as kubelet asks for an image
    (the stubs the tests generated from cri-api's runtime.v1)."""
    cri = os.path.join(ROOT, "tests", "cri")
    if cri not in sys.path:
        sys.path.insert(0, cri)
    import grpc
    import cri_images_pb2 as pb
    import cri_images_pb2_grpc
    with grpc.insecure_channel(f"unix://{ctrd.socket}") as channel:
        try:
            cri_images_pb2_grpc.ImageServiceStub(channel).PullImage(
                pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=1800)
        except grpc.RpcError as exc:
            raise RuntimeError(f"CRI PullImage {ref}: {exc.details()}") from None


def dpkg_status_digest(name: str) -> str:
    with open(os.path.join(image_bench.build_rootfs(name), "var/lib/dpkg/status"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- report -----------------------------------------------------------------------------------------


def summarize(runs: list[Row]) -> list[Row]:
    """One row per (pair, link): the median of each method's runs, and each full pull's
    bytes and time over d4c's (ratios of the same run set)."""
    cells: dict[tuple[str, str], dict[str, list[Row]]] = {}
    for r in runs:
        cells.setdefault((str(r["pair"]), str(r["link"])), collections.defaultdict(list))[str(r["method"])].append(r)
    out = []
    for (pair, link), by_method in cells.items():
        row: Row = {"pair": pair, "link": link}
        for method, rs in by_method.items():
            for key in ("wire_bytes", "payload_bytes", "pull_s", "first_line_s"):
                row[f"{method}_{key}"] = statistics.median(num(r, key) for r in rs)
            row[f"{method}_runs"] = len(rs)
            row[f"{method}_first_line_min"] = min(num(r, "first_line_s") for r in rs)
            row[f"{method}_first_line_max"] = max(num(r, "first_line_s") for r in rs)
        for method in (*REPOS, "cri"):
            if f"{method}_wire_bytes" in row and "d4c_wire_bytes" in row:
                row[f"{method}_bytes_ratio"] = num(row, f"{method}_wire_bytes") / num(row, "d4c_wire_bytes")
                row[f"{method}_time_ratio"] = num(row, f"{method}_first_line_s") / num(row, "d4c_first_line_s")
        out.append(row)
    return out


def num(row: Row, key: str) -> float:
    return float(row[key])  # type: ignore[arg-type]


def render(rows: list[Row], setup: dict[str, object]) -> str:
    reps: dict[str, int] = setup["reps"]  # type: ignore[assignment]
    lines = ["# Thin-link benchmark: full `ctr images pull` vs d4c `ctr-cli pull` and containerd's CRI pull of d4c "
             "artifacts", "",
             "A device updates an image over a shaped link. Client (containerd 1.6, di3fs snapshotter, ctr, "
             "ctr-cli) and server (docker-registry, d4c `server`) in two network namespaces joined by a veth pair; "
             f"both directions shaped ({setup['shaper']}). RTT is round trip (half of the delay each way); loss "
             f"is per direction. TCP congestion control: {setup['tcp_congestion_control']}; bbr keeps a lossy link "
             "full where reno and cubic back off. Each run starts a fresh containerd root that already holds the old "
             "image ((a): pulled from the registry, (b): its cdimg loaded, (c): pulled through CRI), then the link "
             "is shaped. Time: from the "
             "first pull command to the first output line of `ctr run --rm IMAGE ID nginx -v`; bytes: rx + tx "
             "of the client's veth end over that interval (/sys/class/net/IF/statistics). "
             "Runs per cell: " + ", ".join(f"{LINKS[k].label}: {v}" for k, v in reps.items())
             + " (median; first line: min-max in brackets). `make bench-link` (bench/link_bench.py).", "",
             "| pair | link | method | fetched | bytes on the wire | pull done | first line | bytes / d4c "
             "| time / d4c |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for method, label in METHODS.items():
            if f"{method}_wire_bytes" not in r:
                continue
            close = method == "cri"  # near 1: two decimals
            rb = f"{num(r, method + '_bytes_ratio'):,.{2 if close else 0}f}x" if method + "_bytes_ratio" in r else ""
            rt = f"{num(r, method + '_time_ratio'):.{2 if close else 1}f}x" if method + "_time_ratio" in r else ""
            spread = (f" ({num(r, method + '_first_line_min'):.2f}-{num(r, method + '_first_line_max'):.2f})"
                      if num(r, method + "_runs") > 1 else "")
            lines.append(f"| {r['pair']} | {LINKS[str(r['link'])].label} | {label} | "
                         f"{num(r, method + '_payload_bytes'):,.0f} | {num(r, method + '_wire_bytes'):,.0f} | "
                         f"{num(r, method + '_pull_s'):.2f} s | {num(r, method + '_first_line_s'):.2f} s{spread} | "
                         f"{rb} | {rt} |")
    lines += ["", "fetched: the layer the registry serves ((a) gzip, as `skopeo copy` pushes it; (a') zstd -19) or "
              "the d4c delta ((b) from the d4c server, (c) the delta artifact `ctr-cli publish` put in the registry "
              "beside the gzip image). pull done: `ctr images pull` returned (fetch + unpack) / `ctr-cli pull` "
              "returned (plan, download, check, load) / CRI `PullImage` returned (containerd resolves the "
              "manifest; di3fs, asked to prepare the first layer, finds the artifacts by the referrers tag "
              "schema, fetches the delta, checks and mounts it; no layer is fetched). (c)'s device holds the old "
              "version pulled the same way (its full cdimg artifact), and `ctr -n k8s.io run --snapshotter "
              "di3fs` runs it. The images are single-layer (bench/image_bench.py), so a full pull "
              "shares nothing with the old version the device holds. bytes / d4c and time / d4c: each method "
              "over (b).", ""]
    for method in REPOS:  # a full pull against d4c: at least so many times the bytes and the time
        lines += target_line(rows, method, f"against {METHODS[method]}: d4c >= {TARGET_BYTES:.0f}x fewer bytes "
                             f"and >= {TARGET_TIME:.0f}x faster to a running container",
                             lambda b, t: b >= TARGET_BYTES and t >= TARGET_TIME, "{:,.0f}x", "{:.1f}x")
    lines += target_line(rows, "cri", f"{METHODS['cri']} against {METHODS['d4c']}: bytes <= {CRI_TARGET_BYTES}x "
                         f"and time to the first line <= {CRI_TARGET_TIME}x",
                         lambda b, t: b <= CRI_TARGET_BYTES and t <= CRI_TARGET_TIME, "{:.2f}x", "{:.2f}x")
    return "\n".join(lines) + "\n"


def target_line(rows: list[Row], method: str, claim: str, holds: Callable[[float, float], bool],
                bytes_fmt: str, time_fmt: str) -> list[str]:
    """'- Target on the link, <claim>: met|not met (<pair>: <bytes ratio> bytes, <time ratio> time; ...)'."""
    target = [r for r in rows if r["link"] == TARGET_LINK and method + "_bytes_ratio" in r]
    if not target:
        return []
    ok = all(holds(num(r, method + "_bytes_ratio"), num(r, method + "_time_ratio")) for r in target)
    return [f"- Target on the {LINKS[TARGET_LINK].label} link, {claim}: **{'met' if ok else 'not met'}** ("
            + "; ".join(f"{r['pair']}: {bytes_fmt.format(num(r, method + '_bytes_ratio'))} bytes, "
                        f"{time_fmt.format(num(r, method + '_time_ratio'))} time" for r in target) + ")."]


def plot(rows: list[Row], path: str) -> None:
    """Grouped bars per (pair, link), one per method: bytes on the wire and time to the
    first line, log scale."""
    plt = pyplot("link bench")
    if plt is None:
        return
    methods = [m for m in METHODS if any(f"{m}_wire_bytes" in r for r in rows)]
    colors = {"full": "#888", "full-zstd": "#bbb", "d4c": "#2a7", "cri": "#27a"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(methods)
    for ax, key, unit, scale in ((axes[0], "wire_bytes", "MB on the wire", 1e6),
                                 (axes[1], "first_line_s", "s to the first line of ctr run", 1.0)):
        for i, method in enumerate(methods):
            xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(rows))]
            vals = [num(r, f"{method}_{key}") / scale if f"{method}_{key}" in r else 0.0 for r in rows]
            bars = ax.bar(xs, vals, width, label=METHODS[method], color=colors[method])
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['pair']}\n{LINKS[str(r['link'])].label}" for r in rows], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"{unit} (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=9)
    fig.suptitle("Updating an image over a thin link: full pull vs d4c delta")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------

def preflight() -> None:
    """Fail early, with the reason, on what this bench cannot work without."""
    if os.geteuid() != 0:
        raise SystemExit("link bench: run as root (network namespaces, containerd, FUSE)")
    if not shutil.which("ip") or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        raise SystemExit("link bench: `ip netns` is unavailable (install iproute2; needs network namespaces)")
    for tool in ("tc", "containerd", "ctr", "runc", "docker-registry", "skopeo"):
        if not shutil.which(tool):
            raise SystemExit(f"link bench: {tool} is not installed (make deps installs it)")
    for name in ("ctr-cli", "snapshotter", "server"):
        if not os.access(binary(name), os.X_OK):
            raise SystemExit(f"link bench: ./{name} is missing: run `make all` first")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.link_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--links", default=",".join(LINKS), help="comma-separated, of: " + ", ".join(LINKS))
    p.add_argument("--pairs", default=",".join(o + n for o, n, _ in PAIRS), help="e.g. AB,BC")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--reps", type=int, help="runs per cell, median reported (default: "
                   + ", ".join(f"{k} {v.reps}" for k, v in LINKS.items()) + ")")
    p.add_argument("--tcp-cc", metavar="NAME", help="TCP congestion control in both namespaces (default: the "
                   "host's; bbr ignores random loss, reno backs off: a 3g full pull then takes ~10 min)")
    p.add_argument("--delayer", nargs=3, metavar=("QUEUE", "DELAY_S", "LOSS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_cells(topo: Topology, side: ServerSide, pairs: list[tuple[str, str, str]], links: list[str],
              reps: int | None, methods: list[str], work: str) -> list[Row]:
    """Every (pair, link, repetition, method) run, methods side by side within a cell."""
    expect = {new: dpkg_status_digest(new) for _, new, _ in pairs}
    runs = []
    for old, new, pair_label in pairs:
        for link_key in links:
            n = reps or LINKS[link_key].reps
            for rep in range(n):
                for method in methods:
                    log(f"{old} -> {new} over {link_key}, {method} (run {rep + 1}/{n})")
                    r = measure(topo, side, old, new, LINKS[link_key], method, work, expect[new])
                    r.update(pair=pair_label, link=link_key, rep=rep)
                    log(f"  {num(r, 'wire_bytes'):,.0f} bytes, pull {num(r, 'pull_s'):.2f} s, "
                        f"first line {num(r, 'first_line_s'):.2f} s")
                    runs.append(r)
    return runs


def write_results(runs: list[Row], setup: dict[str, object]) -> str:
    rows = summarize(runs)
    report = render(rows, setup)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "link.md"), "w") as f:
        f.write(report)
    with open(os.path.join(RESULTS, "link.json"), "w") as f:
        json.dump({"setup": setup, "summary": rows, "runs": runs}, f, indent=1)
    plot(rows, os.path.join(RESULTS, "link.png"))
    return report


def clear_work(work: str) -> None:
    """Unmount and remove the work dir -- never rm -rf through a mount that is still there."""
    clean_below(work)
    left = mounts_below(work)
    if left:
        log(f"left {work} in place: still mounted: {', '.join(left)}")
        return
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.delayer:
        queue, delay_s, loss = args.delayer
        return delayer(int(queue), float(delay_s), float(loss), seed=os.getpid())
    preflight()
    links = args.links.split(",")
    pairs = [p for p in PAIRS if p[0] + p[1] in args.pairs.split(",")]
    methods = args.methods.split(",")
    if not pairs or not set(links) <= set(LINKS) or not set(methods) <= set(METHODS):
        raise SystemExit(f"link bench: --pairs of {[o + n for o, n, _ in PAIRS]}, --links of {list(LINKS)}, "
                         f"--methods of {list(METHODS)}")
    # teardown in `finally` on SIGTERM, and on Ctrl-C even when started in the background (SIGINT ignored)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sweep_stale()
    names = sorted({n for o, n, _ in PAIRS} | {o for o, n, _ in PAIRS})  # the servers hold the whole chain
    log("images: " + ", ".join(names) + " (bench/cache/img, built by image_bench when missing)")
    images = {n: image_bench.oci_layout(n) for n in names}
    topo = Topology()
    setup: dict[str, object] = {
        "shaper": "tc netem on both veth ends" if topo.netem else "this kernel has no sch_netem: tc tbf for the "
                  "rate on each egress, an NFQUEUE delayer for delay and loss on each ingress",
        "links": {k: vars(v) for k, v in LINKS.items()}, "rtt": "round trip: half of it each way",
        "loss": "per direction", "reps": {k: args.reps or v.reps for k, v in LINKS.items() if k in links},
        "run": " ".join(RUN_CMD)}
    work = tempfile.mkdtemp(prefix="d4c-link-", dir="/var/tmp")
    side = None
    try:
        log(f"namespaces {topo.srv} / {topo.cli}, veth {topo.srv_if} <-> {topo.cli_if}; {setup['shaper']}")
        topo.create(args.tcp_cc)
        setup["tcp_congestion_control"] = topo.tcp_cc() + (" (--tcp-cc)" if args.tcp_cc else
                                                            " (the host's default, which the namespaces inherit)")
        log(f"TCP congestion control: {setup['tcp_congestion_control']}")
        log("server side: convert, diff, registry (gzip and zstd -19 layers), server (not measured)")
        side = serve(topo, work, images)
        setup["registry_layers"] = {f"{m}:{n}": v for (m, n), v in side.layers.items()}
        runs = run_cells(topo, side, pairs, links, args.reps, methods, work)
    # a step, or a daemon of tests.daemons, failed: one line, after the teardown
    except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"link bench: {exc}") from None
    finally:
        log("teardown")
        if side:
            side.server.stop()
            side.registry.stop()
        topo.destroy()
        clear_work(work)
    print(write_results(runs, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
