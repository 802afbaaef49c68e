"""Edge footprint: how long a call takes to start, and what a FUSE mount server holds.

Rows, each program as a device runs it: the installed offline bundle (`make dist`,
one shared one-dir runtime), the one-file binary of the repo root (`make all`), and
the source tree under the venv's Python.  Start-up is `ctr-cli version`, the median
of RUNS runs.  Mount servers serve a cdimg of CORPUS: RSS idle after the mount, and
after every file of the tree was read once (a cold walk; bodies stream, nothing is
cached as no file needs a delta).  Targets from the issue: installed `ctr-cli
version` <= 0.15 s; an idle mount server <= 20 MiB, one serving reads <= 32 MiB plus
its configured caches.  Mounts need root and FUSE; without them those rows are skipped.
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
    if bundles:
        with tarfile.open(bundles[-1]) as tf:
            tf.extractall(os.path.join(work, "bundle"), filter="data")
        [top] = os.listdir(os.path.join(work, "bundle"))
        found.append(("installed bundle (one-dir)", [os.path.join(work, "bundle", top, "ctr-cli")]))
    else:
        print("footprint bench: no d4c-*.tar.gz (run `make dist`): no bundle row", file=sys.stderr)
    if os.access(os.path.join(ROOT, "ctr-cli"), os.X_OK):
        found.append(("one-file binary", [os.path.join(ROOT, "ctr-cli")]))
    found.append(("source (python -m d4c)", [sys.executable, "-m", "d4c"]))
    return found


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


def mount_server_rss(cmd: list[str], image: str, mnt: str) -> tuple[int, int, int]:
    """(idle RSS, RSS after reading every file, peak RSS) of the mount's server, KiB."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    subprocess.run(cmd + ["-q", "mount", "--background", "--cdimg", image, mnt], check=True, env=env)
    try:
        out = subprocess.run(["pgrep", "-f", f"mount --cdimg {os.path.abspath(image)}"], capture_output=True,
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
        return idle, status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
    finally:
        subprocess.run(cmd + ["-q", "umount", mnt], env=env, check=False)


def main() -> int:
    work = tempfile.mkdtemp(prefix="d4c-footprint-")
    try:
        progs = programs(work)
        rows = [{"what": name, "start_s": start_seconds(cmd)} for name, cmd in progs]
        can_mount = os.geteuid() == 0 and os.path.exists("/dev/fuse")
        if can_mount:
            image, tree = os.path.join(work, "corpus.dimg"), os.path.join(work, "tree")
            # links followed: a link out of the tree is refused by pack
            shutil.copytree(CORPUS, tree, symlinks=False, ignore_dangling_symlinks=True)
            subprocess.run(progs[-1][1] + ["-q", "pack", "--in", tree, "--out", image], check=True,
                           capture_output=True, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
            for row, (_, cmd) in zip(rows, progs):
                mnt = os.path.join(work, "mnt")
                os.makedirs(mnt, exist_ok=True)
                row["idle_kib"], row["read_kib"], row["peak_kib"] = mount_server_rss(cmd, image, mnt)
        else:
            print("footprint bench: mounts need root and /dev/fuse: no mount rows", file=sys.stderr)
        lines = ["# edge footprint: start-up and FUSE mount server memory", "",
                 f"`ctr-cli version`: median of {RUNS} runs (target for the installed bundle: <= {START_TARGET} s). "
                 f"Mount servers (default 30 FUSE threads) serve a dimg of {CORPUS}: RSS idle after mounting, "
                 f"after reading every file once, and the peak (targets: idle <= {IDLE_TARGET_MIB} MiB, serving "
                 f"<= {SERVING_TARGET_MIB} MiB plus caches; no file here needs the rebuilt-body cache).", "",
                 "| program | `ctr-cli version` s | vs target | mount server idle | after reading the tree | peak |",
                 "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            mem = [human_bytes(r[k] * 1024) if k in r else "-" for k in ("idle_kib", "read_kib", "peak_kib")]
            lines.append(f"| {r['what']} | {r['start_s']:.3f} | {r['start_s'] / START_TARGET:.2f} | "
                         + " | ".join(mem) + " |")
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
    fig, (start, mem) = plt.subplots(1, 2, figsize=(12, 3.6))
    bars(start, [r["what"] for r in rows], [r["start_s"] for r in rows], "#2a7",
         "seconds for `ctr-cli version` (lower is better)")
    target_line(start, START_TARGET, f"target {START_TARGET} s (installed)", vertical=True)
    start.legend(fontsize=8)
    measured = [r for r in rows if "idle_kib" in r]
    for i, (key, color) in enumerate((("idle_kib", "#2a7"), ("read_kib", "#27a"))):
        mem.barh([j + i * 0.4 for j in range(len(measured))], [r[key] / 1024 for r in measured], height=0.4,
                 color=color, label="idle" if key == "idle_kib" else "after reading the tree")
    mem.set_yticks([j + 0.2 for j in range(len(measured))])
    mem.set_yticklabels([r["what"] for r in measured], fontsize=8)
    mem.invert_yaxis()
    target_line(mem, IDLE_TARGET_MIB, f"idle target {IDLE_TARGET_MIB} MiB", vertical=True)
    mem.axvline(SERVING_TARGET_MIB, color="#c93", linestyle=":", label=f"serving target {SERVING_TARGET_MIB} MiB")
    mem.set_xlabel("FUSE mount server RSS, MiB (lower is better)")
    mem.legend(fontsize=7)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    sys.exit(main())
