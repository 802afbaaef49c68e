"""`make bench-faults`: the long form of the fault campaign (tests/test_faults.py).

Runs every scenario D4C_FAULT_RUNS times (default 20) against the real server,
containerd, di3fs, FUSE mounts and a loop-device disk, as root, and writes
bench/results/faults.md: per scenario, how many runs, how many held, and the
bytes of acknowledged data lost.  Target: every run of every scenario holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from .plotting import bars, pyplot, save_figure
from .report import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(os.environ.get("D4C_FAULT_RUNS", "20"))


def run_campaign(runs: int) -> tuple[list[dict[str, Any]], int, float]:
    """The pytest run of the campaign: (its records, pytest's exit code, seconds)."""
    with tempfile.TemporaryDirectory(prefix="d4c-faults-") as tmp:
        results = os.path.join(tmp, "results.jsonl")
        env = dict(os.environ, D4C_FAULT_RUNS=str(runs), D4C_FAULT_RESULTS=results, CI="1",
                   PYTHONPATH=os.path.join(ROOT, "src"))
        if os.path.exists(os.path.join(ROOT, "ctr-cli")):
            env.setdefault("D4C_BINARIES", ROOT)  # the shipped binaries when they are built
        started = time.monotonic()
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                               os.path.join(tmp, "t"), os.path.join(ROOT, "tests", "test_faults.py")],
                              env=env, cwd=ROOT).returncode
        seconds = time.monotonic() - started
        records = []
        if os.path.exists(results):
            with open(results) as f:
                records = [json.loads(line) for line in f if line.strip()]
    return records, code, seconds


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r["scenario"], {"scenario": r["scenario"], "runs": 0, "held": 0, "lost": 0, "why": []})
        row["runs"] += 1
        row["held"] += bool(r["held"])
        row["lost"] += int(r["lost"])
        if r["why"] and len(row["why"]) < 2:
            row["why"].append(r["why"])
    return list(rows.values())


def table(rows: list[dict[str, Any]], runs: int, code: int, seconds: float) -> str:
    lines = ["# Fault campaign: the long form of tests/test_faults.py", "",
             f"Every scenario run {runs} times (the kill -9 of a device daemon at least twice) against real "
             "daemons on this machine: our server on 127.0.0.1, containerd 1.6 + runc with di3fs and its FUSE "
             "mounts, a cutting TCP proxy for the link, tmpfs for full disks, ext4 on a loop device copied "
             "without a sync for a power loss. \"held\": every check of the run passed (no wrong byte read, no "
             "corrupt or dangling stored artifact, the interrupted pull completed on retry, nothing half "
             "written under a final name). \"bytes lost\": of artifacts the server had acknowledged.", "",
             "| scenario | runs | held | bytes lost | what broke |", "|---|---:|---:|---:|---|"]
    for row in rows:
        why = "; ".join(w.replace("|", "/")[:160] for w in row["why"]) or "-"
        lines.append(f"| {row['scenario']} | {row['runs']} | {row['held']} | {row['lost']:,} | {why} |")
    total_runs = sum(r["runs"] for r in rows)
    total_held = sum(r["held"] for r in rows)
    lines += ["", f"{total_held} of {total_runs} runs held, {len(rows)} scenarios, {seconds / 60:.1f} min "
              f"(pytest exit {code}). Target: every run of every scenario holds."]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: str) -> None:
    plt = pyplot("faults")
    if plt is None:
        return
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    fractions = [r["held"] / r["runs"] if r["runs"] else 0.0 for r in rows]
    bars(ax, [f"{r['scenario']} ({r['held']}/{r['runs']})" for r in rows], fractions,
         ["#4a4" if f == 1 else "#c33" for f in fractions], "fraction of runs that held")
    ax.set_xlim(0, 1.05)
    save_figure(plt, fig, path)


def main() -> int:
    if os.geteuid() != 0:
        print("faults: needs root (containerd, FUSE, loop devices, tmpfs)", file=sys.stderr)
        return 2
    records, code, seconds = run_campaign(RUNS)
    rows = summarise(records)
    if not rows:
        print(f"faults: the campaign recorded nothing (pytest exit {code})", file=sys.stderr)
        return 1
    save("faults", table(rows, RUNS, code, seconds), {"runs": RUNS, "rows": rows, "seconds": seconds,
                                                      "pytest_exit": code}, plot)
    return 0 if code == 0 and all(r["held"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
