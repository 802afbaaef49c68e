"""Edge footprint: how long a call takes to start, and what a FUSE mount server holds.

Rows, each program as a device runs it: the installed offline bundle (`make dist`,
one shared one-dir runtime), the one-file binary of the repo root (`make all`), and
the source tree under the venv's Python.  Start-up is `ctr-cli version`, the median
of RUNS runs.  Mount servers serve a cdimg of CORPUS, in format 1 and in format 2, in
both MODES: RSS idle after the mount, right after every file of the tree was read once
(a walk; bodies stream, nothing is cached as no file needs a delta), and settled once the
server was quiet.  Targets from the issue: installed `ctr-cli version` <= 0.15 s; an idle
mount server <= 20 MiB, one serving reads <= 32 MiB plus its configured caches.  Mounts
need root and FUSE; without them those rows are skipped.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from d4c.image.bodies import DICT_TARGET
from d4c.image.reader import GROUP_CACHE, Image
from d4c.progress import human_bytes

from . import report
from .plotting import bars, pyplot, save_figure, target_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = 30
CORPUS = "/usr/lib/python3.11" if os.path.isdir("/usr/lib/python3.11") else os.path.dirname(os.__file__)
START_TARGET = 0.15
IDLE_TARGET_MIB = 20
SERVING_TARGET_MIB = 32


def programs(work: str) -> list[tuple[str, list[str]]]:
    """(row name, ctr-cli command) for every form that is built."""
    found = []
    bundles = sorted(glob.glob(os.path.join(ROOT, "d4c-*-linux-*.tar.gz")))
    newer = newer_source(bundles[-1]) if bundles else None
    if bundles and newer is None:
        with tarfile.open(bundles[-1]) as tf:
            tf.extractall(os.path.join(work, "bundle"), filter="data")
        [top] = os.listdir(os.path.join(work, "bundle"))
        found.append(("installed bundle (one-dir)", [os.path.join(work, "bundle", top, "ctr-cli")]))
    else:
        why = f"{os.path.basename(bundles[-1])} is older than {newer}" if bundles else "no d4c-*.tar.gz"
        print(f"footprint bench: {why} (run `make dist`): no bundle row", file=sys.stderr)
    binary = os.path.join(ROOT, "ctr-cli")
    if os.access(binary, os.X_OK):
        newer = newer_source(binary)
        if newer is None:
            found.append(("one-file binary", [binary]))
        else:
            print(f"footprint bench: ./ctr-cli is older than {newer} (run `make all`): no row for it", file=sys.stderr)
    found.append(("source (python -m d4c)", [sys.executable, "-m", "d4c"]))
    return found


def newer_source(built: str) -> str | None:
    """A source file changed after `built` was made (its rows would measure old code), if any."""
    made = os.path.getmtime(built)
    for folder, _, names in os.walk(os.path.join(ROOT, "src")):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith((".py", ".pyx")) and os.path.getmtime(path) > made:
                return os.path.relpath(path, ROOT)
    return None


def start_seconds(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    subprocess.run(cmd + ["version"], check=True, capture_output=True, env=env)  # warm the page cache
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd + ["version"], check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]


MODES = (("checked at load", ["--verified-bodies"]), ("hashing every read", []))
SETTLE_S = 6.0  # quiet seconds after the walk before "settled" is read (the server trims after 2-4)


def dictionary_bytes(image: str) -> int:
    """The decoded size of a format-2 image's group dictionary (0 without one)."""
    with Image(image) as im:
        return im.groups.dictionary.usize if im.groups.dictionary is not None else 0


def mount_server_rss(cmd: list[str], image: str, mnt: str, options: list[str]) -> dict[str, int]:
    """RSS of the mount's server in KiB: idle after mounting, right after reading
    every file, settled after SETTLE_S quiet seconds, and the peak."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    subprocess.run(cmd + ["-q", "mount", "--background", *options, "--cdimg", image, mnt], check=True, env=env)
    try:
        out = subprocess.run(["pgrep", "-f", f"llfs-server .*{os.path.abspath(image)}"], capture_output=True,
                             text=True).stdout.split()
        pid = int(out[-1])
        time.sleep(1.0)
        idle = status_kib(pid, "VmRSS")
        for d, _, files in os.walk(mnt):
            for name in files:
                path = os.path.join(d, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        while f.read(1 << 20):
                            pass
        read = status_kib(pid, "VmRSS")
        time.sleep(SETTLE_S)
        return {"idle_kib": idle, "read_kib": read, "settled_kib": status_kib(pid, "VmRSS"),
                "peak_kib": status_kib(pid, "VmHWM")}
    finally:
        subprocess.run(cmd + ["-q", "umount", mnt], env=env, check=False)


def main() -> int:
    work = tempfile.mkdtemp(prefix="d4c-footprint-")
    try:
        progs = programs(work)
        rows = [{"what": name, "start_s": start_seconds(cmd)} for name, cmd in progs]
        can_mount = os.geteuid() == 0 and os.path.exists("/dev/fuse")
        if can_mount:
            tree = os.path.join(work, "tree")
            # links followed: a link out of the tree is refused by pack
            shutil.copytree(CORPUS, tree, symlinks=False, ignore_dangling_symlinks=True)
            # format 1: its rows stay comparable with earlier runs; format 2 (convert's default)
            # adds its caches: decoded groups (mount --group-cache) and the group dictionary
            images = {}
            for image_format in (1, 2):
                images[image_format] = os.path.join(work, f"corpus-f{image_format}.dimg")
                subprocess.run(progs[-1][1] + ["-q", "pack", "--in", tree, "--out", images[image_format],
                                               "--format", str(image_format)], check=True, capture_output=True,
                               env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
            mnt = os.path.join(work, "mnt")
            os.makedirs(mnt, exist_ok=True)
            dictionary_mib = dictionary_bytes(images[2]) / 2**20
            caches = {1: 0.0, 2: GROUP_CACHE / 2**20 + dictionary_mib}
            for row, (_, cmd) in zip(rows, progs):
                row["mounts"] = {(mode if image_format == 1 else f"{mode}, format 2"):
                                 dict(mount_server_rss(cmd, path, mnt, options), caches_mib=caches[image_format])
                                 for image_format, path in images.items() for mode, options in MODES}
        else:
            print("footprint bench: mounts need root and /dev/fuse: no mount rows", file=sys.stderr)
        lines = ["# edge footprint: start-up and FUSE mount server memory", "",
                 f"`ctr-cli version`: median of {RUNS} runs (target for the installed bundle: <= {START_TARGET} s).",
                 "", "| program | `ctr-cli version` s | vs target |", "|---|---:|---:|"]
        lines += [f"| {r['what']} | {r['start_s']:.3f} | {r['start_s'] / START_TARGET:.2f} |" for r in rows]
        lines += ["", f"Mount servers (default 30 FUSE threads) serve a dimg of {CORPUS}, either with bodies "
                  "checked at load (`--verified-bodies`, as the snapshotter mounts) or hashing every file read "
                  "(`ctr-cli mount`'s default). RSS idle after mounting, right after reading every file once, "
                  f"settled {SETTLE_S:.0f} s later (the server returns freed memory after 2-4 quiet seconds), and "
                  f"the peak. Targets: idle <= {IDLE_TARGET_MIB} MiB, serving <= {SERVING_TARGET_MIB} MiB plus "
                  "caches (no file here needs the rebuilt-body cache). Rows marked format 2 serve the same tree "
                  "packed in format 2: their caches are the decoded groups (`--group-cache`, "
                  f"{GROUP_CACHE >> 20} MiB) and the group dictionary ({dictionary_mib:.1f} "
                  f"MiB here: at most {DICT_TARGET >> 20} MiB, half the grouped content); their target is serving "
                  "plus those."
                  if can_mount else "", "",
                  "| program | bodies | idle | vs target | right after the walk | settled | vs target | peak |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            for mode, m in r.get("mounts", {}).items():
                lines.append(f"| {r['what']} | {mode} | {human_bytes(m['idle_kib'] * 1024)} | "
                             f"{m['idle_kib'] / 1024 / IDLE_TARGET_MIB:.2f} | {human_bytes(m['read_kib'] * 1024)} | "
                             f"{human_bytes(m['settled_kib'] * 1024)} | "
                             f"{m['settled_kib'] / 1024 / (SERVING_TARGET_MIB + m.get('caches_mib', 0)):.2f} | "
                             f"{human_bytes(m['peak_kib'] * 1024)} |")
        text = "\n".join(lines) + "\n"
        data = {"corpus": CORPUS, "runs": RUNS, "rows": rows}
        report.save("footprint", text, data, plot)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def plot(data: dict, path: str) -> None:  # type: ignore[type-arg]
    """Start-up time and mount-server memory of every form, against the targets."""
    plt = pyplot("footprint bench")
    if plt is None:
        return
    rows = data["rows"]
    fig, (start, mem) = plt.subplots(1, 2, figsize=(13, 5))
    bars(start, [r["what"] for r in rows], [r["start_s"] for r in rows], "#2a7",
         "seconds for `ctr-cli version` (lower is better)")
    target_line(start, START_TARGET, f"target {START_TARGET} s (installed)", vertical=True)
    start.legend(fontsize=8)
    measured = [(f"{r['what']}\n{mode}", m) for r in rows for mode, m in r.get("mounts", {}).items()]
    keys = (("idle_kib", "#2a7", "idle"), ("read_kib", "#c55", "right after the walk"),
            ("settled_kib", "#27a", "settled"))
    for i, (key, color, label) in enumerate(keys):
        mem.barh([j + i * 0.27 for j in range(len(measured))], [m[key] / 1024 for _, m in measured], height=0.27,
                 color=color, label=label)
    mem.set_yticks([j + 0.27 for j in range(len(measured))])
    mem.set_yticklabels([name for name, _ in measured], fontsize=7)
    mem.invert_yaxis()
    target_line(mem, IDLE_TARGET_MIB, f"idle target {IDLE_TARGET_MIB} MiB", vertical=True)
    mem.axvline(SERVING_TARGET_MIB, color="#c93", linestyle=":", label=f"serving target {SERVING_TARGET_MIB} MiB")
    mem.set_xlabel("FUSE mount server RSS, MiB (lower is better)")
    mem.legend(fontsize=7)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    sys.exit(main())
