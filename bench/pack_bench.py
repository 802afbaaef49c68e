"""Pack / unpack throughput and size against tar + zstd on the same tree, same run.

The corpus is this machine's /usr/lib/python3* and /usr/share/doc style data:
real files, nothing downloaded.  Results go to bench/out/pack.md as a table.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from d4c.cli import main as ctr_cli
from d4c.progress import human_bytes

CORPUS_CANDIDATES = ["/usr/lib/python3.11", "/usr/share/doc", "/usr/lib/x86_64-linux-gnu"]
OUT = os.path.join(os.path.dirname(__file__), "results")


def timed(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    corpus = next((p for p in CORPUS_CANDIDATES if os.path.isdir(p)), None)
    if corpus is None:
        print("no corpus directory found", file=sys.stderr)
        return 1
    os.makedirs(OUT, exist_ok=True)
    work = tempfile.mkdtemp(prefix="d4c-bench-")
    try:
        # keep the corpus at its real path under a fake root, so relative symlinks stay inside
        src = os.path.join(work, "src")
        shutil.copytree(corpus, src + corpus, symlinks=True)
        raw = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(src) for f in fs)
        rows = []
        for threads in (1, os.cpu_count() or 1):
            t, _ = timed(lambda: ctr_cli(["-q", "pack", "--in", src, "--out", f"{work}/x{threads}.dimg",
                                          "--threadNum", str(threads)]))
            rows.append((f"d4c pack, {threads} thread(s)", os.path.getsize(f"{work}/x{threads}.dimg"), t))
        t, _ = timed(lambda: ctr_cli(["-q", "unpack", "--dimg", f"{work}/x1.dimg", "--out", f"{work}/un"]))
        rows.append(("d4c unpack", 0, t))
        t, _ = timed(lambda: subprocess.run(["tar", "-I", "zstd -3 -T1", "-cf", f"{work}/x.tar.zst", "-C", src, "."],
                                            check=True))
        rows.append(("tar + zstd -3 -T1", os.path.getsize(f"{work}/x.tar.zst"), t))
        os.makedirs(f"{work}/un2")
        t, _ = timed(lambda: subprocess.run(["tar", "-I", "zstd", "-xf", f"{work}/x.tar.zst", "-C", f"{work}/un2"],
                                            check=True))
        rows.append(("tar + zstd -d", 0, t))
        base = rows[-2][2]
        lines = [f"# pack benchmark: {corpus} ({human_bytes(raw)})", "",
                 "| what | output size | seconds | MB/s | time vs tar+zstd pack |", "|---|---:|---:|---:|---:|"]
        for name, size, secs in rows:
            lines.append(f"| {name} | {human_bytes(size) if size else '-'} | {secs:.2f} | "
                         f"{raw / secs / 1e6:.0f} | {secs / base:.2f} |")
        text = "\n".join(lines) + "\n"
        with open(os.path.join(OUT, "pack.md"), "w") as f:
            f.write(text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
