"""Pack / unpack throughput and size against tar + zstd on the same tree, same run.

The corpus is this machine's /usr/lib/python3* and /usr/share/doc style data:
real files, nothing downloaded; fastest of RUNS runs each.  Results: bench/results/pack.md (table),
pack.json and pack.png (plot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

from d4c.cli import main as ctr_cli
from d4c.progress import human_bytes

from . import report
from .image_bench import format2_layout
from .plotting import bars, pyplot, save_figure

CORPUS_CANDIDATES = ["/usr/lib/python3.11", "/usr/share/doc", "/usr/lib/x86_64-linux-gnu"]


RUNS = 3


def best_time(fn: Callable[[], object], fresh_output: str) -> float:
    """Fastest of RUNS runs of `fn`, each into a fresh `fresh_output` (removed
    before each run) and ended by a sync: d4c fsyncs what it writes, so every
    row pays for durable output."""
    best = float("inf")
    for _ in range(RUNS):
        if os.path.isdir(fresh_output):
            shutil.rmtree(fresh_output)
        elif os.path.exists(fresh_output):
            os.unlink(fresh_output)
        os.sync()
        start = time.perf_counter()
        fn()
        os.sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    corpus = next((p for p in CORPUS_CANDIDATES if os.path.isdir(p)), None)
    if corpus is None:
        print("no corpus directory found", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="d4c-bench-")
    try:
        # keep the corpus at its real path under a fake root, so relative symlinks stay inside
        src = os.path.join(work, "src")
        shutil.copytree(corpus, src + corpus, symlinks=True)
        raw = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(src) for f in fs)
        rows = []
        for threads in (1, os.cpu_count() or 1):
            out = f"{work}/x{threads}.dimg"
            # format 1 at its level 3: the peer of tar + zstd -3 (format 2 is the table below)
            t = best_time(lambda: ctr_cli(["-q", "pack", "--in", src, "--out", out, "--threadNum", str(threads),
                                           "--format", "1"]), out)
            rows.append((f"d4c pack --format 1, {threads} thread(s)", os.path.getsize(out), t))
        t = best_time(lambda: ctr_cli(["-q", "unpack", "--dimg", f"{work}/x1.dimg", "--out", f"{work}/un"]),
                      f"{work}/un")
        rows.append(("d4c unpack", 0, t))
        t = best_time(lambda: subprocess.run(["tar", "-I", "zstd -3 -T1", "-cf", f"{work}/x.tar.zst", "-C", src, "."],
                                             check=True), f"{work}/x.tar.zst")
        rows.append(("tar + zstd -3 -T1", os.path.getsize(f"{work}/x.tar.zst"), t))

        def untar() -> None:
            os.makedirs(f"{work}/un2")
            subprocess.run(["tar", "-I", "zstd", "-xf", f"{work}/x.tar.zst", "-C", f"{work}/un2"], check=True)
        rows.append(("tar + zstd -d", 0, best_time(untar, f"{work}/un2")))
        pack_peer, unpack_peer = rows[-2][2], rows[-1][2]
        lines = [f"# pack benchmark: {corpus} ({human_bytes(raw)})", "",
                 "| what | output size | seconds | MB/s | time vs tar + zstd (the same direction) |",
                 "|---|---:|---:|---:|---:|"]
        for name, size, secs in rows:
            peer = unpack_peer if "unpack" in name or name.endswith("-d") else pack_peer
            lines.append(f"| {name} | {human_bytes(size) if size else '-'} | {secs:.2f} | "
                         f"{raw / secs / 1e6:.0f} | {secs / peer:.2f} |")
        installs = first_installs(work, [("the image bench's nginx image (B)", _nginx_tree()), (corpus, src)])
        lines += ["", "## A first install: image format 2 against `tar | zstd -19`", "",
                  f"Format 2 (`pack --format 2`: {format2_layout()}) against "
                  "the same tree as one `tar | zstd -19 -T2` stream, and format 1 at its default (one frame per "
                  "file, level 3). One run each, 2 threads. Target: format 2 <= 1.0 x the tar stream; pack time "
                  "<= 3 x its.", "",
                  "| tree | format 1 | format 2 | tar \\| zstd -19 | format 2 / tar | pack s | tar s | time ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in installs:
            lines.append(f"| {r['tree']} | {r['format1']:,} | {r['format2']:,} | {r['tar']:,} | "
                         f"{r['format2'] / r['tar']:.3f} | {r['format2_s']:.1f} | {r['tar_s']:.1f} | "
                         f"{r['format2_s'] / r['tar_s']:.2f} |")
        text = "\n".join(lines) + "\n"
        data = {"corpus": corpus, "raw_bytes": raw, "first_install": installs,
                "rows": [{"what": name, "size": size, "seconds": secs} for name, size, secs in rows]}
        report.save("pack", text, data, plot)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _nginx_tree() -> str | None:
    """The image bench's B tree, when it can be built here (root, debootstrap) or is cached."""
    from . import image_bench
    try:
        return image_bench.build_rootfs("B")
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"pack bench: no nginx tree ({exc}); that row is skipped", file=sys.stderr)
        return None


def first_installs(work: str, trees: list[tuple[str, str | None]]) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for name, tree in trees:
        if tree is None:
            continue
        sizes = {}
        for fmt in ("1", "2"):
            dimg = f"{work}/install{fmt}.dimg"
            start = time.perf_counter()
            ctr_cli(["-q", "pack", "--in", tree, "--out", dimg, "--threadNum", "2", "--format", fmt])
            os.sync()
            sizes[fmt] = (os.path.getsize(dimg), time.perf_counter() - start)
            os.unlink(dimg)
        start = time.perf_counter()
        with open(f"{work}/install.tar.zst", "wb") as f:
            tar = subprocess.Popen(["tar", "-cf", "-", "-C", tree, "."], stdout=subprocess.PIPE)
            subprocess.run(["zstd", "-19", "-T2", "-q", "-c"], stdin=tar.stdout, stdout=f, check=True)
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait():
                raise RuntimeError(f"tar of {tree} failed")
        os.sync()
        tar_s = time.perf_counter() - start
        out.append({"tree": name, "format1": sizes["1"][0], "format2": sizes["2"][0], "format2_s": sizes["2"][1],
                    "tar": os.path.getsize(f"{work}/install.tar.zst"), "tar_s": tar_s})
        os.unlink(f"{work}/install.tar.zst")
    return out


def plot(data: dict, path: str) -> None:  # type: ignore[type-arg]
    """Throughput of every row and the size of every archive, d4c beside tar + zstd."""
    plt = pyplot("pack bench")
    if plt is None:
        return
    rows = data["rows"]
    color = ["#2a7" if r["what"].startswith("d4c") else "#888" for r in rows]
    fig, (speed, size) = plt.subplots(1, 2, figsize=(12, 4))
    bars(speed, [r["what"] for r in rows], [data["raw_bytes"] / r["seconds"] / 1e6 for r in rows], color,
         "MB/s of the tree (higher is better)")
    packed = [r for r in rows if r["size"]]
    bars(size, [r["what"] for r in packed], [r["size"] / 2**20 for r in packed],
         ["#2a7" if r["what"].startswith("d4c") else "#888" for r in packed],
         f"archive MiB (the tree: {data['raw_bytes'] / 2**20:.1f} MiB; lower is better)")
    fig.suptitle(f"pack / unpack of {data['corpus']} against tar + zstd")
    save_figure(plt, fig, path)


if __name__ == "__main__":
    sys.exit(main())
