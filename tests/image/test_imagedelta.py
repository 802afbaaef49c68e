"""Image deltas: cdimg diff / patch / merge over built images with every change kind."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest

from helpers import TESTS, assert_one_line_error, diff_trees, run_cli, snapshot_tree
from ocibuild import M, Layout

from d4c.engine import delta
from d4c.image.reader import Image
from d4c.image.stack import close_all, open_stack
from d4c.image.tree import EntryType, Storage

DATA = os.path.join(TESTS, "data")
GOLDEN_DELTA = os.path.join(DATA, "golden-v2-delta.cdimg")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def diff(old: str, new: str, out: str, *extra: str) -> None:
    code, _, err = run_cli("cdimg", "diff", "--oldCdimg", old, "--newCdimg", new, "--outCdimg", out, "-q", *extra)
    assert code == 0, err


def patch(base: str, d: str, out: str) -> None:
    code, _, err = run_cli("cdimg", "patch", "--diffCdimg", d, "--baseCdimg", base, "--outCdimg", out, "-q")
    assert code == 0, err


def storage_of(delta_path: str, base_path: str) -> dict[str, tuple[Storage, str | None]]:
    stack = open_stack([delta_path], base_path)
    try:
        top, base = stack[-1], stack[0]
        return {e.path.decode(): (e.storage, base.entries[e.delta_source].path.decode()
                                  if e.storage == Storage.DELTA else None)
                for e in top.entries if e.type == EntryType.FILE}
    finally:
        close_all(stack)


def steps_of(delta_path: str, base_path: str) -> dict[str, list[int]]:
    """The delta methods of each delta-stored file."""
    stack = open_stack([delta_path], base_path)
    try:
        return {e.path.decode(): [s.method for s in e.delta_steps] for e in stack[-1].entries
                if e.type == EntryType.FILE and e.storage == Storage.DELTA}
    finally:
        close_all(stack)


def test_every_change_kind(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path / "d12.cdimg")
    diff(images[0], images[1], d)
    kinds = storage_of(d, images[0])
    assert kinds["newdir/moved"] == (Storage.PARENT, None)          # moved
    assert kinds["bin/hl"] == (Storage.PARENT, None)                # content elsewhere in the base
    assert "share/dup2" not in kinds                                # now a hard link to bin/hl
    assert kinds["meta"] == (Storage.PARENT, None)                  # metadata only: no body
    assert kinds["etc/conf"] == (Storage.PARENT, None)              # unchanged
    assert kinds["bin/tool"] == (Storage.DELTA, "bin/hl")           # modified (bin/hl: its inode's primary)
    assert kinds["etc/status"] == (Storage.DELTA, "etc/status")     # text diffs too
    assert kinds["lib/libfoo.so.1.3"] == (Storage.DELTA, "lib/libfoo.so.1.2")  # renamed + modified
    assert kinds["newfile"][0] == Storage.FRAME                     # added
    assert kinds["share/changelog.gz"] == (Storage.DELTA, "share/changelog.gz")  # diffed inside the gzip
    assert kinds["lib/app.jar"] == (Storage.DELTA, "lib/app.jar")   # and inside the zip
    assert kinds["empty"][0] == Storage.EMPTY
    assert "removed" not in kinds and "gone_dir/x" not in kinds and "opq/a" not in kinds
    methods = steps_of(d, images[0])
    assert methods["share/changelog.gz"] == [delta.METHOD_RECOMPRESS] == methods["lib/app.jar"]
    # only the changed bytes travel: far below the new image's size
    assert os.path.getsize(d) < 0.2 * os.path.getsize(images[1])
    # patch gives exactly what convert gives: same bytes, same id
    out = str(tmp_path / "v2.cdimg")
    patch(images[0], d, out)
    assert read(out) == read(images[1])
    with Image(out) as a, Image(images[1]) as b:
        assert a.info.image_id == b.info.image_id
        e = {x.path: x for x in a.entries}
        assert e[b"typechg_file"].type == EntryType.DIR and e[b"typechg_dir"].type == EntryType.SYMLINK
        assert e[b"meta"].mode == 0o600
        assert e[b"share/dup2"].type == EntryType.HARDLINK and a.entries[e[b"share/dup2"].link].path == b"bin/hl"


def test_patch_to_directory(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path / "d12.cdimg")
    diff(images[0], images[1], d)
    code, _, err = run_cli("cdimg", "patch", "--diffCdimg", d, "--baseCdimg", images[0],
                           "--outDir", str(tmp_path / "tree"), "-q", "--no-same-owner")
    assert code == 0, err
    code, _, err = run_cli("unpack", "--cdimg", images[1], "--out", str(tmp_path / "want"), "--no-same-owner")
    assert code == 0, err
    assert diff_trees(snapshot_tree(str(tmp_path / "tree")), snapshot_tree(str(tmp_path / "want"))) == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".d4c")]


def test_threads_and_modes(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    one, two = str(tmp_path / "t1.cdimg"), str(tmp_path / "t2.cdimg")
    diff(images[0], images[1], one, "--threadNum", "1")
    diff(images[0], images[1], two, "--threadNum", "2")
    assert read(one) == read(two)
    files = str(tmp_path / "files.cdimg")
    diff(images[0], images[1], files, "--mode", "file-diff")
    kinds = storage_of(files, images[0])
    assert not [k for k, (s, _) in kinds.items() if s == Storage.DELTA]
    assert kinds["bin/tool"][0] == Storage.FRAME
    assert os.path.getsize(files) > os.path.getsize(one)
    fast = str(tmp_path / "fast.cdimg")
    diff(images[0], images[1], fast, "--deltaEncoding", "fast")
    for d in (files, fast):
        out = d + ".patched"
        patch(images[0], d, out)
        assert read(out) == read(images[1])


@pytest.mark.parametrize("mode", ["linear", "bisect"])
def test_chain_merge(images, tmp_path, mode) -> None:  # type: ignore[no-untyped-def]
    deltas = []
    for i in range(3):
        deltas.append(str(tmp_path / f"d{i + 1}{i + 2}.cdimg"))
        diff(images[i], images[i + 1], deltas[-1])
    merged = str(tmp_path / "merged.cdimg")
    code, _, err = run_cli("cdimg", "merge", "--cdimgs", ",".join(deltas), "--baseCdimg", images[0],
                           "--outCdimg", merged, "--mergeMode", mode, "-q")
    assert code == 0, err
    out = str(tmp_path / "v4.cdimg")
    patch(images[0], merged, out)
    assert read(out) == read(images[3])
    kinds = storage_of(merged, images[0])
    assert kinds["data/moved"] == (Storage.PARENT, None)   # back to the base's content: no body
    assert kinds["newfile"][0] == Storage.FRAME            # never in the base: stored whole
    assert kinds["bin/tool"][0] == Storage.DELTA
    # smaller than the three deltas it replaces
    assert os.path.getsize(merged) < sum(os.path.getsize(d) for d in deltas)


def test_merge_forms(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d12, d23 = str(tmp_path / "d12.cdimg"), str(tmp_path / "d23.cdimg")
    diff(images[0], images[1], d12)
    diff(images[1], images[2], d23)
    pair = str(tmp_path / "pair.cdimg")
    code, _, err = run_cli("cdimg", "merge", "--lowerCdimg", d12, "--upperCdimg", d23, "--baseCdimg", images[0],
                           "--outCdimg", pair, "-q")
    assert code == 0, err
    rediff = str(tmp_path / "rediff.cdimg")
    code, _, err = run_cli("cdimg", "merge", "--lowerCdimg", d12, "--upperCdimg", d23, "--baseCdimg", images[0],
                           "--outCdimg", rediff, "--rediff", "-q")
    assert code == 0, err
    assert os.path.getsize(rediff) <= os.path.getsize(pair)
    for merged in (pair, rediff):
        patch(images[0], merged, merged + ".v3")
        assert read(merged + ".v3") == read(images[2])
    # a full image as the lowest input: the result is the full top image
    full = str(tmp_path / "full.cdimg")
    code, _, err = run_cli("cdimg", "merge", "--cdimgs", f"{images[0]},{d12},{d23}", "--outCdimg", full, "-q")
    assert code == 0, err
    assert read(full) == read(images[2])
    # the dimg twin (inputs may be cdimgs: their dimg is read) lists the upper first, as the original did
    d12d, d23d, merged_d, v3d = (str(tmp_path / n) for n in ("d12.dimg", "d23.dimg", "m.dimg", "v3.dimg"))
    for old, new, out in ((images[0], images[1], d12d), (images[1], images[2], d23d)):
        code, _, err = run_cli("dimg", "diff", "--oldDimg", old, "--newDimg", new, "--outDimg", out, "-q")
        assert code == 0, err
    code, _, err = run_cli("dimg", "merge", "--dimgs", f"{d23d},{d12d}", "--baseDimg", images[0],
                           "--outDimg", merged_d, "-q")
    assert code == 0, err
    code, _, err = run_cli("dimg", "patch", "--diffDimg", merged_d, "--baseDimg", images[0], "--outDimg", v3d, "-q")
    assert code == 0, err
    with Image(v3d) as a, Image(images[2]) as b:
        assert a.info.kind == "dimg" and a.info.image_id == b.info.image_id


def test_show(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path / "d12.cdimg")
    diff(images[0], images[1], d)
    code, out, err = run_cli("cdimg", "show", "--cdimg", d)
    assert code == 0, err
    assert "(delta)" in out and "--baseCdimg" in out
    code, out, err = run_cli("cdimg", "show", "--cdimg", d, "--baseCdimg", images[0], "--json", "--entries")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["decisions"]["delta"]["files"] == 5 and doc["decisions"]["frame"]["files"] >= 1  # 3 + .gz + .jar
    tool = next(e for e in doc["entryList"] if e["path"] == "/bin/tool")
    assert tool["storage"] == "delta" and tool["deltaSource"] == "/bin/hl" and tool["storedSize"] > 0


def test_bad_inputs(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path / "d12.cdimg")
    diff(images[0], images[1], d)
    out = str(tmp_path / "out.cdimg")

    def fails(code_expected: int, *args: str) -> str:
        code, _, err = run_cli(*args)
        assert_one_line_error(code, err, code_expected)
        assert not os.path.exists(out)
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], os.listdir(tmp_path)
        return err

    # a delta for another base
    err = fails(3, "cdimg", "patch", "--diffCdimg", d, "--baseCdimg", images[2], "--outCdimg", out)
    assert "is a delta of image" in err
    # missing base
    err = fails(4, "cdimg", "patch", "--diffCdimg", d, "--outCdimg", out)
    assert "--baseCdimg" in err
    fails(4, "cdimg", "patch", "--diffCdimg", d, "--baseCdimg", str(tmp_path / "nope"), "--outCdimg", out)
    # corrupted delta body: the rebuilt file fails its digest or its delta checks
    data = bytearray(read(d))
    for where in (len(data) - 40, len(data) // 2):
        bad = bytearray(data)
        bad[where] ^= 0xFF
        path = str(tmp_path / "bad.cdimg")
        with open(path, "wb") as f:
            f.write(bad)
        fails(3, "cdimg", "patch", "--diffCdimg", path, "--baseCdimg", images[0], "--outCdimg", out)
    # truncated
    with open(str(tmp_path / "bad.cdimg"), "wb") as f:
        f.write(data[:-100])
    fails(3, "cdimg", "patch", "--diffCdimg", str(tmp_path / "bad.cdimg"), "--baseCdimg", images[0],
          "--outCdimg", out)
    # merge needs the base to read the deltas' trees
    d23 = str(tmp_path / "d23.cdimg")
    diff(images[1], images[2], d23)
    fails(4, "cdimg", "merge", "--lowerCdimg", d, "--upperCdimg", d23, "--outCdimg", out)
    # deltas that do not follow each other
    fails(3, "cdimg", "merge", "--lowerCdimg", d, "--upperCdimg", d, "--baseCdimg", images[0], "--outCdimg", out)
    # diff of a delta
    fails(2, "cdimg", "diff", "--oldCdimg", d, "--newCdimg", images[1], "--outCdimg", out)
    # wrong flags
    fails(2, "cdimg", "diff", "--oldCdimg", images[0], "--newCdimg", images[1], "--outCdimg", out,
          "--mode", "both")
    fails(2, "cdimg", "patch", "--diffCdimg", d, "--baseCdimg", images[0])


def _golden_pair(tmp_path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    lay = Layout(str(tmp_path / "golden-layout"))
    lay.tag(lay.image([([M("./", "dir"), M("a", data=b"hello " * 50), M("b", data=b"same"),
                         M("c", data=b"gone")], "none")]), "old")
    lay.tag(lay.image([([M("./", "dir"), M("a", data=b"hello " * 49 + b"world "), M("b", data=b"same"),
                         M("d", data=b"new file")], "none")]), "new")
    lay.save()
    paths = []
    for tag in ("old", "new"):
        code, _, err = run_cli("convert", "--image", f"oci:{lay.path}:{tag}", "--output", str(tmp_path / tag),
                               "--cdimg", "-q")
        assert code == 0, err
        paths.append(str(tmp_path / tag / "image.cdimg"))
    return paths[0], paths[1]


def test_golden_delta(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Pins the delta format (version 2): same inputs, same bytes, and the stored
    golden file still patches."""
    old, new = _golden_pair(tmp_path)
    out = str(tmp_path / "delta.cdimg")
    diff(old, new, out, "--threadNum", "1")
    assert read(out) == read(GOLDEN_DELTA), "tests/data/golden-v2-delta.cdimg differs from what this d4c writes"
    assert hashlib.sha256(read(GOLDEN_DELTA)).hexdigest() == GOLDEN_DELTA_SHA256
    patch(old, GOLDEN_DELTA, str(tmp_path / "new.cdimg"))
    assert read(str(tmp_path / "new.cdimg")) == read(new)


# Changing this means the delta format changed: bump DELTA_FORMAT_VERSION, document it in
# docs/FORMAT.md and regenerate tests/data/golden-v2-delta.cdimg from _golden_pair().
GOLDEN_DELTA_SHA256 = "b2de88020662b28a4e68dfc9251915a0499ae6eac821890d63ef75bc28a49084"


def _rewrite_storage(delta_path: str, base_path: str, out_path: str, storage: bytes) -> None:
    """The golden delta with its storage table replaced (header re-signed), so only
    the delta-specific checks can reject it."""
    import zstandard

    from d4c.image.format import DIMG_PREAMBLE, HEADER_LEVEL, cdimg_preamble, dimg_preamble, header_dictionary
    with Image(base_path) as base, Image(delta_path, parent=base) as d:
        info, tree, config = d.info, d.tree_table, d.info.config_bytes
        raw = read(delta_path)
        body = raw[info.body_offset:]
        table = tree + storage
        comp = zstandard.ZstdCompressor(level=HEADER_LEVEL, write_content_size=True,
                                        dict_data=header_dictionary(base.tree_table)).compress(table)
        pre = dimg_preamble(comp, len(table), len(body), info.image_id, info.parent_id)
        dimg_bytes = pre + comp + body
        assert len(pre) == DIMG_PREAMBLE.size
        with open(out_path, "wb") as f:
            f.write(cdimg_preamble(config, len(dimg_bytes)) + dimg_bytes)


def test_hostile_delta_storage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Storage records that point outside the parent or the body are refused up
    front, with a one-line error, and nothing is written."""
    from crafted import uv
    old, _ = _golden_pair(tmp_path)
    with Image(old) as base, Image(GOLDEN_DELTA, parent=base) as d:
        files = [e for e in d.entries if e.type == EntryType.FILE]
        assert [e.storage for e in files] == [Storage.DELTA, Storage.PARENT, Storage.FRAME]
        step = files[0].delta_steps[0]
        frame_len = files[2].body_length
        src = files[0].delta_source

    def record(source: int = src, steps: int = 1, method: int = step.method, length: int = step.length,
               b: bytes = bytes([3]), dfile: bytes | None = None) -> bytes:
        head = bytes([4]) + uv(source) + uv(steps)
        head += (bytes([method]) + uv(length)) if steps else b""
        return head + b + (dfile if dfile is not None else bytes([1]) + uv(frame_len))

    out = str(tmp_path / "out.cdimg")
    cases = {
        "delta source is not a file": record(source=0),
        "out of range": record(source=50),
        "delta without steps": record(steps=0),
        "unknown delta method": record(method=7),
        "value 10000 out of range": record(length=10_000),
        "body outside the body section": record(length=step.length + frame_len),
        "its content is not in the parent image": record(dfile=bytes([3])),
    }
    _rewrite_storage(GOLDEN_DELTA, old, str(tmp_path / "same.cdimg"), record())
    patch(old, str(tmp_path / "same.cdimg"), out)  # the rewrite itself is faithful
    os.unlink(out)
    for reason, storage in cases.items():
        bad = str(tmp_path / "bad.cdimg")
        _rewrite_storage(GOLDEN_DELTA, old, bad, storage)
        code, _, err = run_cli("cdimg", "patch", "--diffCdimg", bad, "--baseCdimg", old, "--outCdimg", out)
        assert_one_line_error(code, err, 3)
        assert reason in err, (reason, err)
        assert not os.path.exists(out)


def test_flipped_bytes_never_escape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every single-byte flip of a delta is caught (header digest, tree id, body
    digests) as a clean error: a bounded fuzz run."""
    old, _ = _golden_pair(tmp_path)
    data = read(GOLDEN_DELTA)
    rnd = random.Random(7)
    positions = sorted(set(range(0, len(data), max(1, len(data) // 150))) | {rnd.randrange(len(data)) for _ in range(50)})
    out = str(tmp_path / "out.cdimg")
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << rnd.randrange(8)
        path = str(tmp_path / "flip.cdimg")
        with open(path, "wb") as f:
            f.write(bad)
        code, _, err = run_cli("cdimg", "patch", "--diffCdimg", path, "--baseCdimg", old, "--outCdimg", out)
        assert_one_line_error(code, err)
        assert code in (3, 4), err
        assert not os.path.exists(out)


def test_stat(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    binary, files = str(tmp_path / "b.cdimg"), str(tmp_path / "f.cdimg")
    diff(images[0], images[1], binary)
    diff(images[0], images[1], files, "--mode", "file-diff")
    code, out, err = run_cli("stat", "diff", "--cdimg", binary, "--baseCdimg", images[0], "--json", "--top", "2")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["fileSize"] == os.path.getsize(binary)
    assert doc["kinds"]["delta"]["files"] == 5 and doc["kinds"]["parent"]["storedSize"] == 0  # 3 + .gz + .jar
    assert sum(k["storedSize"] for k in doc["kinds"].values()) == doc["bodySize"]
    assert len(doc["top"]) == 2 and doc["top"][0]["stored"] >= doc["top"][1]["stored"] > 0
    code, out, err = run_cli("stat", "diff", "--cdimg", binary, "--baseCdimg", images[0])
    assert code == 0 and "largest stored files" in out and "whole delta" in out
    code, out, err = run_cli("stat", "compare", "--fileDimg", files, "--binaryDimg", binary,
                             "--baseCdimg", images[0], "--json")
    assert code == 0, err
    doc = json.loads(out)
    tool = next(r for r in doc["files"] if r["path"] == "/bin/tool")
    assert tool["kindA"] == "frame" and tool["kindB"] == "delta" and tool["storedB"] < tool["storedA"]
    assert doc["fileSizeB"] < doc["fileSizeA"]
    code, _, err = run_cli("stat", "compare", "--fileDimg", files, "--binaryDimg", images[1],
                           "--baseCdimg", images[0])
    assert_one_line_error(code, err)
    png = str(tmp_path / "s.png")
    code, _, err = run_cli("stat", "diff", "--cdimg", binary, "--baseCdimg", images[0], "--plot", png, "-q")
    import importlib.util
    if importlib.util.find_spec("matplotlib") is not None:  # a bench extra: the plot is optional
        assert code == 0 and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        assert_one_line_error(code, err)
        assert "matplotlib" in err and not os.path.exists(png)


def test_memory_budget_holds_threads_to_the_limit() -> None:
    """Diff threads share --memory-limit: shares that do not fit beside each other
    take turns, and a share larger than the limit still runs, alone."""
    import threading
    import time

    from d4c.image.deltas import MemoryBudget
    budget = MemoryBudget(100)
    held, over, lock = [0, 0], [], threading.Lock()  # bytes and holders now; sums seen over the limit

    def hold(n: int) -> None:
        with budget.held(n):
            with lock:
                held[0] += n
                held[1] += 1
                if held[0] > 100:
                    over.append((held[0], held[1]))
            time.sleep(0.05)
            with lock:
                held[0] -= n
                held[1] -= 1

    workers = [threading.Thread(target=hold, args=(n,)) for n in (60, 60, 30, 150, 10)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
    assert over == [(150, 1)] and budget.used == 0  # only the 150 passed the limit, and alone
