"""Whole-image deltas: Debian minbase + nginx at two package versions.

Images (built once into bench/cache/img, as root; the Debian archive must be
reachable through apt):
  A = debootstrap --variant=minbase bookworm + nginx 1.22.1-9+deb12u9
  B = the same minbase + nginx 1.22.1-9+deb12u11 (bookworm-security)
  C = B + `apt-get upgrade` from bookworm-updates/-security + curl installed
Each is a single-layer OCI layout converted with `ctr-cli convert`.

Compared, in one run: the full new image (zstd -19 of its layer tar), the d4c
delta A->B, the best peer per changed file (bsdiff4, detools, xdelta3 -9, zstd
-19 --patch-from; a file whose content is anywhere in A counts 0 for the peers,
a new file counts its zstd -19 size), xdelta3 -9 over the whole tars; d4c diff /
patch / merge time and peak RSS, and merge(A->B, B->C) against diffing A->C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import zstandard

from .delta_bench import CACHE, PEERS, RESULTS, run_tool
from .plotting import pyplot

IMG = os.environ.get("D4C_IMAGE_CACHE") or os.path.join(CACHE, "img")  # make demo shares it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX = {"A": "1.22.1-9+deb12u9", "B": "1.22.1-9+deb12u11"}
SOURCES = ("deb http://deb.debian.org/debian bookworm main\n"
           "deb http://deb.debian.org/debian bookworm-updates main\n"
           "deb http://deb.debian.org/debian-security bookworm-security main\n")
PY = sys.executable
PEERS_TARGET = 0.85  # issue [4/6] (0.95 before compressed files were diffed by content)


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def,type-arg]
    return subprocess.run(cmd, check=True, **kw)


def chroot(root: str, *cmd: str) -> None:
    """apt in the build root; its chatter (no /dev/pts, no runlevel) is shown only if it fails."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    p = subprocess.run(["chroot", root, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"{' '.join(cmd)} in {root} failed ({p.returncode})")


def minbase() -> str:
    root = os.path.join(IMG, "rootfs-minbase")
    if not os.path.isdir(os.path.join(root, "usr")):
        shutil.rmtree(root, ignore_errors=True)
        sh("debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian",
           stdout=subprocess.DEVNULL)
    return root


def nginx_version(root: str, name: str) -> str:
    """NGINX[name] while the archive carries it (the security archive keeps only
    its newest version, a point release drops the old one; snapshot.debian.org is
    out of reach here); else the oldest (A) or newest (B) version it has."""
    p = subprocess.run(["chroot", root, "apt-cache", "madison", "nginx"], capture_output=True, text=True,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    have = [line.split("|")[1].strip() for line in p.stdout.splitlines() if line.count("|") >= 2]
    if NGINX[name] in have or not have:
        return NGINX[name]
    # madison lists newest first
    if len(set(have)) < 2:
        raise SystemExit(f"image {name}: the archive has only nginx {have[0]}: no pair of versions to update between")
    chosen = have[-1] if name == "A" else have[0]
    print(f"image {name}: the archive no longer has nginx {NGINX[name]}; using {chosen}", file=sys.stderr)
    return chosen


def build_rootfs(name: str) -> str:
    """The rootfs of image `name` (cached)."""
    root = os.path.join(IMG, f"rootfs-{name}")
    if os.path.isdir(root):
        return root
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sh("cp", "-a", minbase() if name != "C" else build_rootfs("B"), tmp)
    with open(os.path.join(tmp, "etc/apt/sources.list"), "w") as f:
        f.write(SOURCES)
    with open(os.path.join(tmp, "usr/sbin/policy-rc.d"), "w") as f:
        f.write("#!/bin/sh\nexit 101\n")  # no service starts inside the build
    os.chmod(os.path.join(tmp, "usr/sbin/policy-rc.d"), 0o755)
    chroot(tmp, "apt-get", "update", "-q")
    if name == "C":
        chroot(tmp, "apt-get", "upgrade", "-y", "-q")
        chroot(tmp, "apt-get", "install", "-y", "-q", "--no-install-recommends", "curl")
    else:
        v = nginx_version(tmp, name)
        chroot(tmp, "apt-get", "install", "-y", "-q", "--no-install-recommends", f"nginx={v}", f"nginx-common={v}")
    chroot(tmp, "apt-get", "clean")
    os.unlink(os.path.join(tmp, "usr/sbin/policy-rc.d"))
    shutil.rmtree(os.path.join(tmp, "var/lib/apt/lists"))
    os.makedirs(os.path.join(tmp, "var/lib/apt/lists/partial"))
    os.rename(tmp, root)
    return root


def layer_tar(name: str) -> str:
    tar = os.path.join(IMG, f"{name}.tar")
    if not os.path.exists(tar):
        sh("tar", "--sort=name", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", build_rootfs(name),
           "-cf", tar + ".tmp", ".")
        os.rename(tar + ".tmp", tar)
    return tar


def oci_layout(name: str) -> str:
    """A one-layer OCI layout of image `name`, tagged `name`."""
    layout = os.path.join(IMG, f"oci-{name}")
    if os.path.exists(os.path.join(layout, "index.json")):
        return layout
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def blob(path: str | None = None, data: bytes | None = None) -> dict:  # type: ignore[type-arg]
        h = hashlib.sha256()
        if path:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            size = os.path.getsize(path)
            dest = os.path.join(blobs, h.hexdigest())
            if not os.path.exists(dest):
                shutil.copyfile(path, dest)
        else:
            assert data is not None
            h.update(data)
            size = len(data)
            with open(os.path.join(blobs, h.hexdigest()), "wb") as f:
                f.write(data)
        return {"digest": "sha256:" + h.hexdigest(), "size": size}

    layer = blob(layer_tar(name))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["nginx", "-g", "daemon off;"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(data=config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}]}).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(data=manifest),
            "annotations": {"org.opencontainers.image.ref.name": name}}
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    return layout


def timed(*cmd: str) -> tuple[float, int]:
    """(seconds, peak RSS KiB) of one ctr-cli command in a fresh process, timed
    around the command (interpreter start-up excluded, for every step alike)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + ROOT)
    # run from compiled modules, as an installed d4c does (pip and PyInstaller ship bytecode): with
    # PYTHONDONTWRITEBYTECODE set, every run compiled each module changed since its .pyc anew
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    p = subprocess.run([PY, "-m", "bench.cli_runner", "-q", *cmd], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"ctr-cli {' '.join(cmd)} failed: {p.stderr.strip()}")
    secs, rss = p.stdout.strip().splitlines()[-1].split()
    return float(secs), int(rss)


def best_of(runs: int, *cmd: str) -> tuple[float, int]:
    """The fastest of `runs` timed runs (and the peak RSS of the largest)."""
    results = [timed(*cmd) for _ in range(runs)]
    return min(s for s, _ in results), max(rss for _, rss in results)


def cdimg(name: str, image_format: int = 2) -> str:
    """convert of image `name` in `image_format` at its default level (cached)."""
    from d4c.image import bodies  # format 2's layout is in the name: a cache from before a change is not reused
    layout = f"-f{image_format}-g{bodies.GROUP_TARGET >> 10}k-d{bodies.DICT_TARGET >> 20}m-c{bodies.GROUP_CODER}"
    out = os.path.join(IMG, f"cdimg-{name}" if image_format == 1 else f"cdimg-{name}{layout}")
    path = os.path.join(out, "image.cdimg")
    if not os.path.exists(path):
        timed("convert", "--image", f"oci:{oci_layout(name)}:{name}", "--output", out, "--cdimg",
              "--format", str(image_format))
    return path


def format2_layout() -> str:
    """Format 2's layout as the benches describe it, from the writer's constants."""
    from d4c.image import bodies
    return (f"files of at most {bodies.GROUP_FILE_MAX >> 20} MiB grouped in {bodies.GROUP_TARGET >> 10} KiB "
            f"frames coded against a dictionary of up to {bodies.DICT_TARGET >> 20} MiB, level "
            f"{bodies.GROUPED_LEVEL}, x86 programs branch-converted")


def files_of(root: str) -> dict[str, str]:
    """Regular files (not symlinks) by relative path."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out[os.path.relpath(p, root)] = p
    return out


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def peers_per_file(old_root: str, new_root: str, work: str) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(best-of-peers total, changed files, rows of (path, new size, best peer bytes))."""
    old_files, new_files = files_of(old_root), files_of(new_root)
    old_digests = {digest(p) for p in old_files.values()}
    total, rows = 0, []
    for rel, new in sorted(new_files.items()):
        if digest(new) in old_digests:
            continue
        old = old_files.get(rel)
        if old is None or os.path.getsize(old) == 0:
            with open(new, "rb") as f:
                best = len(zstandard.ZstdCompressor(level=19).compress(f.read()))
        else:
            best = min(os.path.getsize(_peer(t, old, new, work)) for t in PEERS)
        total += best
        rows.append((rel, os.path.getsize(new), best))
    return total, len(rows), rows


def _peer(tool: str, old: str, new: str, work: str) -> str:
    out = os.path.join(work, f"peer.{tool}")
    run_tool(tool, "diff", old, new, out)
    return out


def can_build() -> bool:
    """Building the images takes root, debootstrap and chroot."""
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("debootstrap", "chroot"))


def main() -> int:
    if not can_build():
        print("image bench: needs root, debootstrap and chroot (skipped)", file=sys.stderr)
        return 0
    os.makedirs(IMG, exist_ok=True)
    print("[image] building A, B, C (cached after the first run)", file=sys.stderr)
    a, b, c = cdimg("A"), cdimg("B"), cdimg("C")
    r: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="d4c-ibench-") as work:
        dab, dbc, dac, merged = (os.path.join(work, n) for n in ("ab.cdimg", "bc.cdimg", "ac.cdimg", "m.cdimg"))
        print("[image] d4c diff / patch / merge", file=sys.stderr)
        r["diff_s"], r["diff_rss"] = timed("cdimg", "diff", "--oldCdimg", a, "--newCdimg", b, "--outCdimg", dab,
                                           "--threadNum", "2")
        r["patch_s"], r["patch_rss"] = timed("cdimg", "patch", "--diffCdimg", dab, "--baseCdimg", a,
                                             "--outCdimg", os.path.join(work, "b.cdimg"), "--threadNum", "2")
        with open(os.path.join(work, "b.cdimg"), "rb") as f1, open(b, "rb") as f2:
            if f1.read() != f2.read():
                raise SystemExit("patch(A, diff(A, B)) differs from convert(B)")
        timed("cdimg", "diff", "--oldCdimg", b, "--newCdimg", c, "--outCdimg", dbc, "--threadNum", "2")
        # the two sides of the merge target vary by +-20 % run to run here: best of 3 each
        r["diff_ac_s"], _ = best_of(3, "cdimg", "diff", "--oldCdimg", a, "--newCdimg", c, "--outCdimg", dac,
                                    "--threadNum", "2")
        r["merge_s"], r["merge_rss"] = best_of(3, "cdimg", "merge", "--lowerCdimg", dab, "--upperCdimg", dbc,
                                               "--baseCdimg", a, "--outCdimg", merged, "--threadNum", "2")
        timed("cdimg", "patch", "--diffCdimg", merged, "--baseCdimg", a, "--outCdimg", os.path.join(work, "c.cdimg"))
        with open(os.path.join(work, "c.cdimg"), "rb") as f1, open(c, "rb") as f2:
            if f1.read() != f2.read():
                raise SystemExit("patch(A, merge(A->B, B->C)) differs from convert(C)")
        r["delta"] = os.path.getsize(dab)
        r["delta_ac"], r["merged"] = os.path.getsize(dac), os.path.getsize(merged)
        r["delta_bc"] = os.path.getsize(dbc)
        print("[image] the same deltas between format-1 images", file=sys.stderr)
        a1, b1, c1 = cdimg("A", 1), cdimg("B", 1), cdimg("C", 1)
        for old, new_, out in ((a1, b1, "ab1.cdimg"), (b1, c1, "bc1.cdimg")):
            timed("cdimg", "diff", "--oldCdimg", old, "--newCdimg", new_, "--outCdimg", os.path.join(work, out),
                  "--threadNum", "2")
        timed("cdimg", "merge", "--lowerCdimg", os.path.join(work, "ab1.cdimg"), "--upperCdimg",
              os.path.join(work, "bc1.cdimg"), "--baseCdimg", a1, "--outCdimg", os.path.join(work, "m1.cdimg"),
              "--threadNum", "2")
        r["delta_f1"] = os.path.getsize(os.path.join(work, "ab1.cdimg"))
        r["merged_f1"] = os.path.getsize(os.path.join(work, "m1.cdimg"))
        r["full_cdimg_f1"] = os.path.getsize(b1)
        print("[image] peers per changed file", file=sys.stderr)
        r["peers"], r["changed_files"], rows = peers_per_file(build_rootfs("A"), build_rootfs("B"), work)
        print("[image] xdelta3 and zstd over the whole tars", file=sys.stderr)
        xd = os.path.join(work, "tar.xd3")
        sh("xdelta3", "-9", "-e", "-f", "-s", layer_tar("A"), layer_tar("B"), xd)
        r["xdelta_tar"] = os.path.getsize(xd)
        full = subprocess.run(["zstd", "-19", "-T2", "-q", "-c", layer_tar("B")], check=True, capture_output=True)
        r["full_zstd19"] = len(full.stdout)
        r["full_cdimg"] = os.path.getsize(b)
        r["tar"] = os.path.getsize(layer_tar("B"))
    report = render(r, rows)
    with open(os.path.join(RESULTS, "image.md"), "w") as f:
        f.write(report)
    with open(os.path.join(RESULTS, "image.json"), "w") as f:
        json.dump({"results": r, "files": rows}, f, indent=1)
    plot(r, os.path.join(RESULTS, "image.png"))
    print(report)
    return 0


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def render(r: dict[str, float], rows: list[tuple[str, int, int]]) -> str:
    lines = ["# Image benchmark: Debian minbase + nginx 1.22.1-9+deb12u9 -> deb12u11", "",
             "A, B and C are built by `bench/image_bench.py` (debootstrap minbase bookworm; C is B with "
             "bookworm-updates/-security applied and curl installed). Every patched and merged result was "
             "checked byte-identical to `convert` of the target.", "",
             "## Sizes (A -> B)", "",
             "| what | bytes | vs d4c delta |", "|---|---:|---:|"]
    for label, key in (("layer tar of B", "tar"), ("full B, zstd -19 of the layer tar", "full_zstd19"),
                       ("full B as a cdimg, format 1 (zstd -3 per file)", "full_cdimg_f1"),
                       ("full B as a cdimg, format 2 (small files grouped, zstd -19)", "full_cdimg"),
                       ("xdelta3 -9 over the whole tars", "xdelta_tar"),
                       (f"best peer per changed file ({int(r['changed_files'])} files)", "peers"),
                       ("**d4c delta (cdimg)**", "delta")):
        lines.append(f"| {label} | {int(r[key]):,} | {r[key] / r['delta']:.2f}x |")
    lines += ["", f"Targets: d4c delta <= {PEERS_TARGET} x best-of-peers per-file total "
              f"(measured **{r['delta'] / r['peers']:.3f}**: "
              f"**{'met' if r['delta'] <= PEERS_TARGET * r['peers'] else 'not met'}**; the peers diff a .gz as "
              "bytes, d4c its content), <= 0.55 x xdelta3 over the whole tar "
              f"(measured **{r['delta'] / r['xdelta_tar']:.3f}**).", "",
              "## Time and memory (2 threads; timed around the command, interpreter start-up excluded; merge and diff A -> C: best of 3)", "",
              "| step | s | peak RSS |", "|---|---:|---:|",
              f"| diff A -> B | {r['diff_s']:.2f} | {r['diff_rss'] / 1024:.0f} MiB |",
              "| patch A + (A -> B): the full B in format 2 at level 19, as convert writes it | "
              f"{r['patch_s']:.2f} | {r['patch_rss'] / 1024:.0f} MiB |",
              f"| merge (A -> B) + (B -> C) | {r['merge_s']:.2f} | {r['merge_rss'] / 1024:.0f} MiB |",
              f"| diff A -> C again | {r['diff_ac_s']:.2f} | |", "",
              f"Merge vs diffing A -> C again: **{r['diff_ac_s'] / max(r['merge_s'], 1e-3):.1f}x** faster "
              "(target 10x). Sizes: "
              f"A -> B {int(r['delta']):,}, B -> C {int(r['delta_bc']):,}, merged {int(r['merged']):,}, "
              f"A -> C diffed directly {int(r['delta_ac']):,} bytes.", "",
              "The images are format 2 (convert's default). Between format-1 images of the same trees: "
              f"A -> B {int(r['delta_f1']):,} bytes ({r['delta'] / r['delta_f1']:.3f}x of it with format 2), "
              f"merged {int(r['merged_f1']):,} ({r['merged'] / r['merged_f1']:.3f}x). Target: no larger with "
              "format 2.", "",
              "## Changed files of B (largest 15 by new size)", "",
              "| file | new size | best peer |", "|---|---:|---:|"]
    for rel, size, best in sorted(rows, key=lambda x: -x[1])[:15]:
        lines.append(f"| /{rel} | {size:,} | {best:,} |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, float], path: str) -> None:
    plt = pyplot("image bench")
    if plt is None:
        return
    labels = ["full B\n(zstd -19)", "xdelta3\nwhole tar", "best peer\nper file", "d4c delta"]
    values = [r["full_zstd19"], r["xdelta_tar"], r["peers"], r["delta"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, [v / 1024 for v in values], color=["#999", "#bbb", "#ddd", "#2a7"])
    ax.set_yscale("log")
    ax.set_ylabel("KiB (log scale)")
    ax.set_title("nginx deb12u9 -> deb12u11 on Debian minbase: bytes to ship")
    for i, v in enumerate(values):
        ax.text(i, v / 1024, kib(v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layouts_main(names: list[str]) -> int:
    """`python -m bench.image_bench layouts A B`: build (or reuse) those images and
    print their OCI layout directories, one per line (make demo uses this)."""
    if not can_build():
        print("image layouts: needs root, debootstrap and chroot", file=sys.stderr)
        return 1
    unknown = [n for n in names if n not in ("A", "B", "C")]
    if unknown or not names:
        print(f"image layouts: images are A, B and C, not {' '.join(unknown) or 'nothing'}", file=sys.stderr)
        return 2
    os.makedirs(IMG, exist_ok=True)
    for name in names:
        print(oci_layout(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(layouts_main(sys.argv[2:]) if sys.argv[1:2] == ["layouts"] else main())
