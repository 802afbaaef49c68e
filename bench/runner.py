"""One measured diff or patch in a fresh process: prints `seconds peak_rss_kib`.

Python tools are timed around the call only (not interpreter start-up, nor the
import of their compiled parts); peak RSS is this process's VmHWM, which exec
resets (ru_maxrss would carry the parent's).  Usage: python -m bench.runner diff|patch TOOL A B OUT [threads]
"""

from __future__ import annotations

import os
import re
import sys
import time


def vmhwm_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]


def main() -> int:
    op, tool, a, b, out = sys.argv[1:6]
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    if tool.startswith("d4c"):
        from d4c import accel
        from d4c.engine import delta
        accel.check()  # the compiled kernels, imported before the clock as the peers' C cores are
        fast = tool == "d4c-fast"
        start = time.perf_counter()
        if op == "diff":
            delta.diff_files(a, b, out, threads=threads, fast=fast,
                             level=delta.FAST_LEVEL if fast else delta.DEFAULT_LEVEL)
        else:
            delta.apply_files(a, b, out)
    elif tool == "bsdiff4":
        import bsdiff4
        start = time.perf_counter()
        if op == "diff":
            bsdiff4.file_diff(a, b, out)
        else:
            bsdiff4.file_patch(a, out, b)  # (source, destination, patch)
    elif tool == "detools":
        import detools
        start = time.perf_counter()
        if op == "diff":
            with open(a, "rb") as fa, open(b, "rb") as fb, open(out, "wb") as fo:
                detools.create_patch(fa, fb, fo, patch_type="hdiffpatch", algorithm="hdiffpatch")
        else:
            with open(a, "rb") as fa, open(b, "rb") as fb, open(out, "wb") as fo:
                detools.apply_patch(fa, fb, fo)
    else:
        raise SystemExit(f"unknown tool {tool}")
    if op == "patch" and not tool.startswith("d4c"):
        # d4c fsyncs what it writes (a crash must not leave a torn file); make
        # the peers' outputs durable too, so every tool is timed for the same work
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - start
    print(f"{seconds:.6f} {vmhwm_kib()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
