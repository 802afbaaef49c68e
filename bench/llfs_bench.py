"""Reading through an llfs mount vs the same tree unpacked on disk.

Image: B of the image benchmark (Debian minbase + nginx deb12u11, or the archive's newest), mounted as
A + the delta A -> B, so unchanged files come from A's frames and the nginx
binary is rebuilt from its delta.  The page cache is dropped before every
measurement (both sides), and the mount's body cache starts empty for "first
read".  Needs root (mount, drop_caches); skipped otherwise.  The large-file
read is also measured on an edge-speed disk (a throttled loop device) when
this machine has cgroup v1 blkio throttling, losetup and mkfs.ext4.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

from tests.daemons import pids_naming

from . import image_bench
from .delta_bench import RESULTS, run_tool
from .plotting import pyplot, target_line

ROOT = image_bench.ROOT
BIG = 1 << 20


# A KVM guest's idle vCPU halts, and waking it for each FUSE round trip (two
# wakeups: the server, then the reader) costs tens of microseconds; on the
# Firecracker VM of the committed results the tree walk was half wakeups
# (reader and server pinned to one CPU: 0.94 s against 1.9 s).  Guests can
# poll before halting (cpuidle-haltpoll); bare metal has no such cost.  Rows
# marked POLLED are measured with it on, the disk as well, and compared
# with each other.
HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"
HALT_POLL_NS = 200_000
POLLED = "guest halt polling 200 us: "


@contextlib.contextmanager
def guest_halt_polling(ns: int) -> Iterator[bool]:
    """Guest halt polling set to `ns` while inside (False: this machine has no
    haltpoll module), restored afterwards."""
    try:
        with open(HALT_POLL) as f:
            before = f.read().strip()
        with open(HALT_POLL, "w") as f:
            f.write(str(ns))
    except OSError:
        before = None
    try:
        yield before is not None
    finally:
        if before is not None:
            with open(HALT_POLL, "w") as f:
                f.write(before)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


DI3FS = "llfs, default workers, --verified-bodies (as di3fs mounts)"
DI3FS_F2 = "llfs, format 2, default workers, --verified-bodies (as di3fs mounts)"
ROUNDS = 5  # of the paired large-file reads
FIRST_RUNS = 7  # of a first read and of its util patch peer: 10-20 ms, single runs vary by +-40 %
TARGET_BIG = 0.70  # the target: unchanged large files at >= this fraction of the disk's throughput


def clock(fn, runs: int = 3, setup=lambda: None) -> float:  # type: ignore[no-untyped-def]
    """The fastest of `runs` cold runs (`setup`, then the page cache dropped, before
    each): single runs of these 30-100 ms reads vary by +-30 % on this machine."""
    best = float("inf")
    for _ in range(runs):
        setup()
        drop_caches()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# Edge storage (SD cards, eMMC: 50-200 MB/s) is where a device reads its images;
# this VM's disk is backed by the host's page cache and reads at 1-1.5 GB/s.  A
# loop device doing direct I/O to its backing file, with this process's reads
# from it throttled (cgroup v1 blkio; it held for the loop device, not for vda).
EDGE_MIB_S = (50, 200)
BLKIO = "/sys/fs/cgroup/blkio"


@contextlib.contextmanager
def edge_disk(work: str, size: int) -> Iterator[tuple[str, Callable[[int], None]]]:
    """An ext4 file system of `size` bytes on a loop device, with this process (and
    what it starts) in a blkio cgroup: yields (its root, set_rate(bytes per s))."""
    image, root = os.path.join(work, "edge.img"), os.path.join(work, "edge")
    cgroup = os.path.join(BLKIO, f"d4c-edge-{os.getpid()}")
    with open(image, "wb") as f:
        f.truncate(size)
    loop = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", image], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", loop], check=True)
        os.makedirs(root)
        subprocess.run(["mount", loop, root], check=True)
        try:
            os.mkdir(cgroup)
            dev = os.stat(loop).st_rdev

            def rate(bps: int) -> None:
                with open(os.path.join(cgroup, "blkio.throttle.read_bps_device"), "w") as f:
                    f.write(f"{os.major(dev)}:{os.minor(dev)} {bps}\n")

            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            try:
                yield root, rate
            finally:
                with open(os.path.join(BLKIO, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                deadline = time.monotonic() + 10  # an unmounted FUSE server takes a moment to exit
                while True:
                    try:
                        os.rmdir(cgroup)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
        finally:
            subprocess.run(["umount", root], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def can_throttle() -> bool:
    return (os.path.isfile(os.path.join(BLKIO, "blkio.throttle.read_bps_device"))
            and all(shutil.which(tool) for tool in ("losetup", "mkfs.ext4", "cp")))


def tree_bytes(path: str) -> int:
    return sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(path) for n in names)


EDGE_SIDES = {1: "llfs", 2: "llfs_f2"}  # image format -> its key in edge_rows' results


def edge_rows(work: str, disk: str, tops: dict[int, str], big: list[str]) -> dict[int, dict[str, Any]]:
    """The large-file read of the disk tree and of the llfs mounts of each image
    format's stack (tops: format -> its top image, as di3fs mounts), all on a
    throttled edge disk, for each rate of EDGE_MIB_S: the median of ROUNDS cold
    runs each.  Before every timed read, a ballast file is read so the throttle
    starts the timed read mid-window: a fresh window lets its first rate x 0.1 s
    through at once, which favours the side reading fewer bytes."""
    out: dict[int, dict[str, Any]] = {}
    folders = {f: os.path.dirname(top) for f, top in tops.items()}
    size = (tree_bytes(disk) + sum(tree_bytes(d) for d in folders.values())) * 13 // 10 + (128 << 20)
    with edge_disk(work, size) as (root, rate):
        subprocess.run(["cp", "-a", disk, os.path.join(root, "disk")], check=True)
        sides = {"disk": os.path.join(root, "disk")}
        mounted: list[str] = []
        try:
            for image_format, top in tops.items():
                images = os.path.join(root, f"images-f{image_format}")
                subprocess.run(["cp", "-a", folders[image_format], images], check=True)
                mnt = os.path.join(work, f"edge-mnt-f{image_format}")
                os.makedirs(mnt)
                ctr_cli("mount", "--background", "--cdimg", os.path.join(images, os.path.basename(top)),
                        "--cache-dir", os.path.join(work, f"edge-cache-f{image_format}"), "--verified-bodies", mnt)
                mounted.append(mnt)
                sides[EDGE_SIDES[image_format]] = mnt
            ballast = os.path.join(root, "ballast")
            for mib_s in EDGE_MIB_S:
                rate(mib_s << 20)
                with open(ballast, "wb") as f:
                    f.write(os.urandom(mib_s << 18))  # a quarter second's worth
                times: dict[str, list[float]] = {side: [] for side in sides}
                for _ in range(ROUNDS):
                    for side, where in sides.items():
                        drop_caches()
                        read_files([ballast])
                        start = time.perf_counter()
                        read_files([os.path.join(where, p) for p in big])
                        times[side].append(time.perf_counter() - start)
                out[mib_s] = {side: statistics.median(ts) for side, ts in times.items()}
        finally:
            for mnt in mounted:
                ctr_cli("umount", mnt)
    return out


def empty_dir(path: str) -> None:
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))


def read_files(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def tar_walk(root: str) -> None:
    """Read every file and directory (a plain `tar -cf /dev/null` would skip the reads)."""
    tar = subprocess.Popen(["tar", "-C", root, "-cf", "-", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    while tar.stdout.read(1 << 20):
        pass
    if tar.wait() not in (0, 1):
        raise SystemExit("tar failed")


def stat_all(root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.lstat(os.path.join(dirpath, n))


def server_pid(mountpoint: str) -> int:
    """The FUSE server process of a mount (started with --ready-fd, naming it)."""
    pids = pids_naming(mountpoint, flag=b"--ready-fd")
    if len(pids) != 1:
        raise SystemExit(f"llfs bench: {len(pids)} server processes for {mountpoint}")
    return pids[0]


def process_cpu_s(pid: int) -> float:
    """CPU time of all the threads of a process, from the scheduler's nanosecond
    run times (/proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # a thread that ended meanwhile
            continue
    return total / 1e9


def cpu_per_mib(paths: list[str], mib: float, server: int | None) -> dict[str, float]:
    """CPU milliseconds per MiB that cold reads of `paths` cost the FUSE server (all
    its threads) and the reading thread (user and kernel time: page cache, copies),
    median of 3 runs: what a large-file row needs of the machine's CPUs."""
    runs = []
    for _ in range(3):
        drop_caches()
        server0, reader0 = process_cpu_s(server) if server else 0.0, time.thread_time()
        read_files(paths)
        runs.append((process_cpu_s(server) - server0 if server else 0.0, time.thread_time() - reader0))
    reader = {"reader_ms_per_mib": statistics.median(r[1] for r in runs) * 1000 / mib}
    return reader if server is None else {"server_ms_per_mib": statistics.median(r[0] for r in runs) * 1000 / mib,
                                          **reader}


SMALL_MAX = 64 << 10  # the small files of the cold-read rows: at most this large, one per group
SMALL_FILES = 15


def small_files(grouped: str, new: str) -> list[str]:
    """Unchanged small files of the format-2 base `grouped` that `new` also has, the
    first of each of SMALL_FILES groups spread over the image: each read then
    starts on a group that neither the page cache nor the group cache holds."""
    from d4c.image.reader import Image
    from d4c.image.tree import EntryType, Storage
    with Image(new) as after:
        kept = {e.path: e.digest for e in after.entries if e.type == EntryType.FILE}
    firsts: dict[int, str] = {}
    with Image(grouped) as image:
        for e in image.entries:
            h = image.holder(e) if e.type == EntryType.FILE else e
            if (e.type == EntryType.FILE and h.storage == Storage.GROUPED and 0 < e.size <= SMALL_MAX
                    and kept.get(e.path) == e.digest and h.group not in firsts):
                firsts[h.group] = e.path.decode().lstrip("/")
    groups = sorted(firsts)
    step = max(1, len(groups) // SMALL_FILES)
    return [firsts[g] for g in groups[::step][:SMALL_FILES]]


def cold_small_reads(root: str, rels: list[str]) -> float:
    """Median time of reading each of `rels` under `root` alone, the page cache dropped before each."""
    times = []
    for rel in rels:
        drop_caches()
        start = time.perf_counter()
        read_files([os.path.join(root, rel)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ctr_cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    subprocess.run([sys.executable, "-m", "d4c", "-q", *args], check=True, env=env)


def main() -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("llfs bench: needs root and /dev/fuse (skipped)", file=sys.stderr)
        return 0
    a, b = image_bench.cdimg("A", 1), image_bench.cdimg("B", 1)
    a2, b2 = image_bench.cdimg("A", 2), image_bench.cdimg("B", 2)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="d4c-lbench-", dir="/var/tmp") as work:
        tops = {}
        for image_format, (old, new) in ((1, (a, b)), (2, (a2, b2))):
            folder = os.path.join(work, f"images-f{image_format}")
            os.makedirs(folder)
            shutil.copyfile(old, os.path.join(folder, "a.cdimg"))
            tops[image_format] = os.path.join(folder, "ab.cdimg")
            ctr_cli("cdimg", "diff", "--oldCdimg", old, "--newCdimg", new, "--outCdimg", tops[image_format])
        small = small_files(a2, b2)
        disk = os.path.join(work, "disk")
        ctr_cli("unpack", "--cdimg", b, "--out", disk)
        nginx_rel = "usr/sbin/nginx"
        # the peer for a first read: the single-file engine on the same file
        old_nginx = os.path.join(image_bench.build_rootfs("A"), nginx_rel)
        single = os.path.join(work, "nginx.dlt")
        run_tool("d4c", "diff", old_nginx, os.path.join(disk, nginx_rel), single)
        # timed as the first reads are: fastest of FIRST_RUNS, the page cache dropped before each
        # (the mount's first read reads its image cold; so does this patch its inputs)
        patch_s = float("inf")
        for _ in range(FIRST_RUNS):
            drop_caches()
            patch_s = min(patch_s, run_tool("d4c", "patch", old_nginx, single, os.path.join(work, "nginx.out"))[0])
        big = sorted(os.path.relpath(os.path.join(d, n), disk) for d, _, names in os.walk(disk) for n in names
                     if os.path.isfile(os.path.join(d, n)) and not os.path.islink(os.path.join(d, n))
                     and os.path.getsize(os.path.join(d, n)) >= BIG and os.path.join(d, n) != os.path.join(disk, nginx_rel))
        big_bytes = sum(os.path.getsize(os.path.join(disk, p)) for p in big)

        def read_big(root: str) -> Callable[[], None]:
            return lambda: read_files([os.path.join(root, p) for p in big])

        def walk(root: str) -> Callable[[], None]:
            return lambda: tar_walk(root)

        def paired(rows: dict[str, str], base: str, key: str, job: Callable[[str], Callable[[], None]],
                   runs: int, slower: bool) -> None:
            """`job` on the disk as row `base` and on `rows` (name: root), in ROUNDS
            rounds that each time all of them (fastest of `runs`): the disk's own time
            varied by a third between runs, so each ratio pairs runs of one round.
            Ratios are the disk's throughput multiple, or with `slower` the time multiple."""
            times: dict[str, list[float]] = {name: [] for name in [base, *rows]}
            for _ in range(ROUNDS):
                for name, root in [(base, disk), *rows.items()]:
                    times[name].append(clock(job(root), runs))
            for name, ts in times.items():
                results[name][f"{key}_s"] = min(ts)
                results[name][f"{key}_ratios"] = [t / d if slower else d / t for d, t in zip(times[base], ts)]

        def compare(rows: dict[str, str], base: str) -> None:
            """Every comparison of the table: stat once each, the rest paired."""
            for name, root in [(base, disk), *rows.items()]:
                results[name]["stat_s"] = clock(lambda: stat_all(root))
            paired(rows, base, "walk", walk, runs=2, slower=True)
            paired(rows, base, "big", read_big, runs=3, slower=False)

        # the snapshotter mounts with --verified-bodies (it checked every body at load)
        # workers None: llfuse's default, 30 threads, what `ctr-cli mount` and the snapshotter use
        # format 1 unless the row says format 2 (base A and B converted with --format 2)
        rows: list[tuple[str, int | None, list[str], int]] = [
            ("llfs, 1 worker", 1, [], 1), ("llfs, 2 workers", 2, [], 1),
            ("llfs, default workers (as ctr-cli mount)", None, [], 1),
            ("llfs, 1 worker, --verified-bodies", 1, ["--verified-bodies"], 1),
            ("llfs, 2 workers, --verified-bodies", 2, ["--verified-bodies"], 1),
            (DI3FS, None, ["--verified-bodies"], 1), (DI3FS_F2, None, ["--verified-bodies"], 2)]
        mounts: dict[str, str] = {}
        results["disk"] = {}  # the first row
        try:
            for n, (name, workers, extra, image_format) in enumerate(rows):
                mnt, cache = os.path.join(work, f"mnt{n}"), os.path.join(work, f"cache{n}")
                os.makedirs(mnt)
                ctr_cli("mount", "--background", "--cdimg", tops[image_format], "--cache-dir", cache,
                        *(["--workers", str(workers)] if workers else []), *extra, mnt)
                mounts[name] = mnt
                # emptying the body cache makes the next read a first read again
                results[name] = {"first_s": clock(lambda: read_files([os.path.join(mnt, nginx_rel)]),
                                                  FIRST_RUNS, setup=lambda: empty_dir(cache)),
                                 "cached_s": clock(lambda: read_files([os.path.join(mnt, nginx_rel)]))}
            # before any walk: each mount's group cache holds none of these files' groups
            for name, root in [("disk", disk), (DI3FS, mounts[DI3FS]), (DI3FS_F2, mounts[DI3FS_F2])]:
                results[name]["small_s"] = cold_small_reads(root, small)
            compare(mounts, "disk")
            for name, root in [("disk", disk), *mounts.items()]:
                results[name].update(cpu_per_mib([os.path.join(root, p) for p in big], big_bytes / 2**20,
                                                 None if root == disk else server_pid(root)))
            with guest_halt_polling(HALT_POLL_NS) as polling:
                if polling:
                    name = DI3FS
                    results[POLLED + "disk"] = {"base": POLLED + "disk"}
                    results[POLLED + name] = {"base": POLLED + "disk"}
                    compare({POLLED + name: mounts[name]}, POLLED + "disk")
        finally:
            failed = []
            for mnt in mounts.values():  # every one, before the work dir goes
                try:
                    ctr_cli("umount", mnt)
                except subprocess.CalledProcessError:
                    failed.append(mnt)
            if failed:
                raise SystemExit(f"llfs bench: could not unmount {', '.join(failed)}")
        edge: dict[int, dict[str, Any]] = {}
        if can_throttle():
            try:
                edge = edge_rows(work, disk, tops, big)
            except (OSError, subprocess.CalledProcessError) as exc:  # the rows above still get written
                print(f"llfs bench: no edge-disk rows: {exc}", file=sys.stderr)
        delta_bytes = {f: os.path.getsize(t) for f, t in tops.items()}
    report = render(results, len(big), big_bytes, patch_s, edge) + render_formats(results, len(small), delta_bytes, edge)
    with open(os.path.join(RESULTS, "llfs.md"), "w") as f:
        f.write(report)
    data = {"results": results, "big_files": len(big), "big_bytes": big_bytes, "util_patch_s": patch_s, "edge": edge,
            "small_files": len(small), "delta_bytes": delta_bytes}
    with open(os.path.join(RESULTS, "llfs.json"), "w") as f:
        json.dump(data, f, indent=1)
    plot(data, os.path.join(RESULTS, "llfs.png"))
    print(report)
    return 0


def short_label(row: str) -> str:
    """A results row's name, short enough for an axis."""
    for long, short in ((POLLED, "polled: "), ("llfs, ", ""), (" (as ctr-cli mount)", ""),
                        (" (as di3fs mounts)", " = di3fs"), ("default workers", "30 workers"),
                        ("--verified-bodies", "verified")):
        row = row.replace(long, short)
    return row


def plot(data: dict[str, Any], path: str) -> None:
    """The four comparisons of the tables, each against its issue target:
    large-file throughput, the tree walk, the first read of a delta file and
    the edge-speed disks."""
    plt = pyplot("llfs bench")
    if plt is None:
        return
    results = data["results"]
    mounts = [name for name, r in results.items() if "first_s" in r or "disk" not in name]
    labels = [short_label(name) for name in mounts]
    ys = range(len(mounts))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (big, walk), (first, edge) = axes
    def paired_bars(ax: Any, key: str) -> None:  # medians of the rounds, their range as error bars
        ratios = [results[m][key] for m in mounts]
        medians = [statistics.median(r) for r in ratios]
        ax.barh(ys, medians, xerr=[[med - min(r) for med, r in zip(medians, ratios)],
                                   [max(r) - med for med, r in zip(medians, ratios)]], color="#2a7", capsize=3)

    paired_bars(big, "big_ratios")
    target_line(big, TARGET_BIG, f"target {TARGET_BIG:.2f}", vertical=True)
    big.set_title(f"unchanged files >= 1 MiB ({data['big_files']}, {data['big_bytes'] / 2**20:.1f} MiB): "
                  "throughput vs disk", fontsize=9)
    big.set_xlabel("fraction of disk throughput (median of rounds, range; higher is better)")
    paired_bars(walk, "walk_ratios")
    target_line(walk, 3.0, "target 3x", vertical=True)
    walk.set_title("full-tree read (tar of every file): time vs disk", fontsize=9)
    walk.set_xlabel("x disk time (median of rounds, range; lower is better)")
    delta_rows = [m for m in mounts if "first_s" in results[m]]
    first.barh(range(len(delta_rows)), [results[m]["first_s"] / data["util_patch_s"] for m in delta_rows],
               color="#2a7")
    target_line(first, 1.2, "target 1.2x", vertical=True)
    first.set_title("first read of a file rebuilt from its delta vs `ctr-cli util patch`", fontsize=9)
    first.set_xlabel("x util patch time (lower is better)")
    for ax, rows in ((big, labels), (walk, labels), (first, [short_label(m) for m in delta_rows])):
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=8)
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="lower right")
    if data["edge"]:
        speeds = list(data["edge"])
        for k, (side, label, color) in enumerate((("llfs", "format 1", "#2a7"), ("llfs_f2", "format 2", "#27a"))):
            if side in data["edge"][speeds[0]]:
                edge.bar([i + 0.4 * k for i in range(len(speeds))],
                         [data["edge"][s]["disk"] / data["edge"][s][side] for s in speeds], width=0.4,
                         color=color, label=label)
        target_line(edge, 1.0, "as fast as the unpacked tree")
        edge.set_xticks([i + 0.2 for i in range(len(speeds))])
        edge.set_xticklabels([f"{s} MiB/s disk" for s in speeds])
        edge.set_ylabel("llfs speed / unpacked tree speed")
        edge.set_title("the same large files on an edge-speed disk (as di3fs mounts)", fontsize=9)
        edge.legend(fontsize=8)
    else:
        edge.set_axis_off()
    fig.suptitle("llfs: reading an image stack through FUSE vs the unpacked tree")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cpu_budget(results: dict[str, dict[str, Any]], big_bytes: int) -> list[str]:
    """What the large-file target asks of the CPUs, from the disk row's time and
    the di3fs row's CPU per MiB (empty for results without CPU figures)."""
    di3fs = next((r for name, r in results.items() if name.endswith("(as di3fs mounts)")), None)
    if di3fs is None or "reader_ms_per_mib" not in di3fs:
        return []
    disk_ms = results["disk"]["big_s"] * 1000 / (big_bytes / 2**20)
    allowed = disk_ms / TARGET_BIG
    cpu = di3fs["server_ms_per_mib"] + di3fs["reader_ms_per_mib"]
    return [f"CPU budget of the large-file target: the disk row reads them at {disk_ms:.2f} ms per MiB, so "
            f"{TARGET_BIG:.2f} of its throughput allows {allowed:.2f} ms of wall time per MiB. As di3fs mounts, "
            f"the FUSE server and the reading thread spend {cpu:.2f} ms of CPU per MiB (decompression, serving, "
            f"the kernel's copies): the target needs {cpu / allowed:.2f} CPUs busy for the whole read, disk waits "
            f"included; this machine has {os.cpu_count()}. \"CPU ms per MiB\": median of 3 cold reads, from the "
            "scheduler's run times of every server thread and of the reader."]


def spread(ratios: list[float], unit: str = "") -> str:
    """The median of paired rounds' ratios, and their range."""
    return f"{statistics.median(ratios):.2f}{unit} ({min(ratios):.2f}-{max(ratios):.2f})"


def render(results: dict[str, dict[str, Any]], nbig: int, big_bytes: int, patch_s: float,
           edge: dict[int, dict[str, Any]]) -> str:
    disk = results["disk"]
    lines = ["# llfs benchmark: reading an image stack through FUSE vs the unpacked tree", "",
             "B of the image benchmark (Debian minbase + nginx deb12u11, or the archive's newest) mounted as "
             "A + the delta A -> B, "
             "against `unpack` of B on the same disk. Page cache dropped before every run; the mount's body "
             f"cache starts empty; fastest of 3 runs (first reads: of {FIRST_RUNS}, the body cache emptied "
             "before each). Large files: "
             f"{ROUNDS} rounds, each timing the disk and every mount (fastest of 3 runs each), the tree walk "
             "likewise (fastest of 2); "
             "their \"vs disk\" is the median of the rounds' ratios (their range): the disk's own time varies by a "
             "third between runs here.", "",
             f"| where | unchanged files >= 1 MiB ({nbig}, {big_bytes / 2**20:.1f} MiB) | MB/s | vs disk "
             "| CPU ms per MiB: server + reader | full-tree read (tar) s | vs disk | stat every entry s | vs disk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        base = results[r["base"]] if "base" in r else disk
        cpu = ("-" if "reader_ms_per_mib" not in r else f"{r['reader_ms_per_mib']:.2f} (reader)"
               if "server_ms_per_mib" not in r else f"{r['server_ms_per_mib']:.2f} + {r['reader_ms_per_mib']:.2f}")
        lines.append(f"| {name} | {r['big_s']:.3f} s | {big_bytes / r['big_s'] / 1e6:.0f} | "
                     f"{spread(r['big_ratios'])} | {cpu} | {r['walk_s']:.2f} | {spread(r['walk_ratios'], 'x')} | "
                     f"{r['stat_s']:.2f} | {r['stat_s'] / base['stat_s']:.2f}x |")
    lines += ["", *cpu_budget(results, big_bytes)]
    lines += ["", "`--verified-bodies`: how the di3fs snapshotter mounts (it checked every body against its digest "
              "when the image was loaded): unchanged files are served on zstd's frame checksums without a second "
              "sha256 pass; files rebuilt from deltas are checked either way. \"default workers\": llfuse's "
              "default of 30 request threads, which `ctr-cli mount` and the snapshotter use.", "",
              *([f"`{POLLED.rstrip(': ')}`: measured with the guest's cpuidle-haltpoll polling {HALT_POLL_NS // 1000} "
                 "us before it halts an idle vCPU (the disk too; ratios against that disk row). This VM boots with "
                 "it off, so every FUSE round trip wakes a halted vCPU twice; bare metal has no such cost.", ""]
                if POLLED + "disk" in results else []),
              f"Targets: unchanged large files >= {TARGET_BIG:.2f} of disk throughput; full-tree walk within 3x of disk.",
              ""]
    if edge:
        lines += ["## The same large files on an edge-speed disk", "",
                  "The disk tree and the images copied to a loop device (direct I/O) whose reads are throttled "
                  "(cgroup blkio) to an SD card's or eMMC's speed; llfs mounted as di3fs mounts. Median of "
                  f"{ROUNDS} cold runs each, a ballast read before each so no run starts on the throttle's "
                  "fresh-window allowance.", "",
                  "| disk speed | disk tree s | llfs s | llfs vs disk | llfs, format 2 s | format 2 vs disk |",
                  "|---|---:|---:|---:|---:|---:|"]
        for mib_s, r in edge.items():
            lines.append(f"| {mib_s} MiB/s | {r['disk']:.3f} | {r['llfs']:.3f} | {r['disk'] / r['llfs']:.2f} | "
                         f"{r['llfs_f2']:.3f} | {r['disk'] / r['llfs_f2']:.2f} |")
        lines += [""]
    lines += [
              "## A file rebuilt from its delta (/usr/sbin/nginx, 1.2 MiB)", "",
              "| where | first read s | cached read s | first read / `util patch` |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        if "first_s" in r:
            lines.append(f"| {name} | {r['first_s']:.3f} | {r['cached_s']:.3f} | {r['first_s'] / patch_s:.2f} |")
    lines += ["", f"`util patch` of the same file (the single-file engine): {patch_s:.3f} s. Both are the fastest "
              f"of {FIRST_RUNS} runs with the page cache dropped before each (a first read finds its image cold; "
              "the patch its old file and delta). Target: first read <= 1.2 x that."]
    return "\n".join(lines) + "\n"


def render_formats(results: dict[str, dict[str, Any]], nsmall: int, delta_bytes: dict[int, int],
                   edge: dict[int, dict[str, Any]]) -> str:
    """Format 2 against format 1, both as di3fs mounts, on the issue's three targets
    (the large files also on the edge-speed disks, where a device keeps its images)."""
    one, two, disk = results[DI3FS], results[DI3FS_F2], results["disk"]
    walk1, walk2 = statistics.median(one["walk_ratios"]), statistics.median(two["walk_ratios"])
    big1, big2 = statistics.median(one["big_ratios"]), statistics.median(two["big_ratios"])
    lines = ["", "## Image format 2 (small files grouped) against format 1", "",
             f"A and B converted with `--format 2` ({image_bench.format2_layout()}), "
             "mounted as A + the delta A -> B as di3fs mounts, against the format-1 row above. Cold read of one "
             f"small file: median over {nsmall} unchanged files of at most {SMALL_MAX >> 10} KiB, each in a "
             "different group, the page cache dropped before each (the group cache starts without their groups).",
             "", "| | disk | format 1 | format 2 | format 2 / format 1 | target |", "|---|---:|---:|---:|---:|---|",
             f"| cold read of one small file, ms | {disk['small_s'] * 1000:.2f} | {one['small_s'] * 1000:.2f} | "
             f"{two['small_s'] * 1000:.2f} | {two['small_s'] / one['small_s']:.2f} | <= 1.5 x format 1 |",
             f"| full-tree read, x disk | 1.00 | {walk1:.2f} | {walk2:.2f} | {walk2 / walk1:.2f} | "
             "format 2 <= 2.5 x disk |",
             f"| unchanged files >= 1 MiB, fraction of disk throughput | 1.00 | {big1:.2f} | {big2:.2f} | "
             f"{big2 / big1:.2f} | no slower than format 1 |",
             *[f"| the same on a {mib_s} MiB/s edge disk, fraction of its throughput | 1.00 | "
               f"{r['disk'] / r['llfs']:.2f} | {r['disk'] / r['llfs_f2']:.2f} | {r['llfs'] / r['llfs_f2']:.2f} | "
               "no slower than format 1 |" for mib_s, r in edge.items()],
             f"| delta A -> B, bytes | | {delta_bytes[1]:,} | {delta_bytes[2]:,} | "
             f"{delta_bytes[2] / delta_bytes[1]:.3f} | no larger than format 1 |"]
    return "\n".join(lines) + "\n"


def replot() -> int:
    """`python -m bench.llfs_bench plot`: draw llfs.png again from llfs.json."""
    with open(os.path.join(RESULTS, "llfs.json")) as f:
        plot(json.load(f), os.path.join(RESULTS, "llfs.png"))
    return 0


if __name__ == "__main__":
    sys.exit(replot() if sys.argv[1:] == ["plot"] else main())
