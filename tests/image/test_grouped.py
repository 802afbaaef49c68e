"""Image format 2: small bodies grouped in shared frames (golden bytes, trees equal to
format 1's, mixed stacks, hostile group tables, a damaged group)."""

from __future__ import annotations

import hashlib
import random
import os

import pytest
import zstandard

from helpers import (TESTS, as_format, assert_one_line_error, assert_pinned, diff_trees, make_tree, run_cli,
                     snapshot_tree)
from test_format import GOLDEN_CONFIG, GOLDEN_ID, golden_entries

from d4c.errors import EXIT_CORRUPT, CorruptImage
from d4c.image.bodies import BLOCK_MIN, DICT_SLICE, GROUP_TARGET, BodySpool
from d4c.image.format import Group, dimg_preamble, has_multi_frame_bodies, encode_storage, encode_tree, image_id_of
from d4c.image.reader import Image, _GroupStream
from d4c.image.tree import Entry, EntryType, Storage, canonicalize
from d4c.image.writer import save_image

GOLDEN_V2 = os.path.join(TESTS, "data", "golden-v2-grouped.cdimg")
GOLDEN_V2_SHA256 = "4699fe46006589ab64728f6f0da4624cf7c0d3d33c1600a392dae3a704601e4d"


def write_golden_v2(path: str) -> bytes:
    with BodySpool(os.path.dirname(path), level=19, grouped=True) as spool:
        return save_image(golden_entries(spool), spool, cdimg_path=path, config=GOLDEN_CONFIG)


def test_golden_grouped_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The bytes are pinned; the id is format 1's (it names the tree, not the storage)."""
    out = str(tmp_path / "g.cdimg")
    assert write_golden_v2(out) == bytes.fromhex(GOLDEN_ID.split(":")[1])
    assert_pinned(out, GOLDEN_V2, GOLDEN_V2_SHA256)
    with Image(GOLDEN_V2) as image:
        assert image.info.grouped and len(image.groups) == 1
        kinds = {e.path: e.storage for e in image.entries if e.type == EntryType.FILE}
        assert kinds[b"bin/copy"] == Storage.GROUPED and kinds[b"data"] == Storage.GROUPED
        assert image.read_body(image.lookup(b"bin/copy")) == b"hello, d4c\n"
        assert image.read_body(image.lookup(b"data")) == bytes(range(256)) * 1000


def pack(src: str, out: str, *extra: str) -> str:
    code, stdout, err = run_cli("pack", "--in", src, "--out", out, "-q", *extra)
    assert code == 0, err
    return stdout.strip()


def test_format_2_unpacks_to_format_1s_tree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = str(tmp_path / "src")
    make_tree(src)
    for i in range(40):  # enough small files for a group of many
        with open(os.path.join(src, "dir", f"note{i}.txt"), "wb") as f:
            f.write(b"note %d\n" % i * (i + 1))
    one = pack(src, str(tmp_path / "1.dimg"), "--format", "1")
    two = pack(src, str(tmp_path / "2.dimg"), "--format", "2", "--threadNum", "1")
    assert pack(src, str(tmp_path / "2b.dimg"), "--format", "2", "--threadNum", "4") == two == one
    with open(tmp_path / "2.dimg", "rb") as a, open(tmp_path / "2b.dimg", "rb") as b:
        assert a.read() == b.read()  # the thread count changes nothing
    with Image(str(tmp_path / "1.dimg")) as image:
        assert not image.info.grouped
    with Image(str(tmp_path / "2.dimg")) as image:
        assert image.info.grouped
        kinds = {e.storage for e in image.entries if e.type == EntryType.FILE}
        assert Storage.GROUPED in kinds and Storage.FRAME in kinds  # big.bin keeps its frames
    trees = []
    for name in ("1", "2"):
        out = str(tmp_path / f"out{name}")
        code, _, err = run_cli("unpack", "--dimg", str(tmp_path / f"{name}.dimg"), "--out", out)
        assert code == 0, err
        trees.append(snapshot_tree(out))
    assert diff_trees(trees[0], trees[1]) == []


def test_mixed_stacks_diff_patch_and_merge(images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Deltas from a format-1 base to a format-2 image and back, patched and merged:
    every result has the same id as the image it stands for."""
    tmp = str(tmp_path)
    v1 = [as_format(image, os.path.join(tmp, f"{n}.cdimg"), tmp, image_format)
          for n, (image, image_format) in enumerate(zip(images, (1, 2, 1)))]
    diff_patch_merge(v1, tmp)


def diff_patch_merge(paths: list[str], tmp: str, *patch_flags: str) -> tuple[list[str], str]:
    """Diff three images in a row, patch each delta onto its base and merge the two:
    every result has the id of the image it stands for.  Returns (patched, merged)."""
    deltas, patched = [], []
    for i, (old, new) in enumerate(zip(paths, paths[1:])):
        deltas.append(os.path.join(tmp, f"d{i}.cdimg"))
        code, _, err = run_cli("cdimg", "diff", "--oldCdimg", old, "--newCdimg", new, "--outCdimg", deltas[-1],
                               "-q")
        assert code == 0, err
    for i, d in enumerate(deltas):
        patched.append(os.path.join(tmp, f"p{i}.cdimg"))
        code, _, err = run_cli("cdimg", "patch", "--baseCdimg", paths[i], "--diffCdimg", d, "--outCdimg",
                               patched[-1], *patch_flags, "-q")
        assert code == 0, err
        with Image(patched[-1]) as got, Image(paths[i + 1]) as want:
            assert got.info.image_id == want.info.image_id
    merged = os.path.join(tmp, "m.cdimg")
    code, _, err = run_cli("cdimg", "merge", "--baseCdimg", paths[0], "--lowerCdimg", deltas[0], "--upperCdimg",
                           deltas[1], "--outCdimg", merged, "-q")
    assert code == 0, err
    with Image(paths[0]) as base, Image(merged, parent=base) as m, Image(paths[2]) as want:
        assert m.info.image_id == want.info.image_id
    return patched, merged


def test_the_default_is_format_2_and_patch_writes_what_pack_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pack's default is format 2; patch --outDimg writes the same bytes pack does for
    the new tree, in the default format and with --format 1 alike."""
    from d4c.cli._common import DEFAULT_IMAGE_FORMAT
    from d4c.image.bodies import DEFAULT_FORMAT
    assert DEFAULT_IMAGE_FORMAT == DEFAULT_FORMAT == 2
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    make_tree(old)
    make_tree(new)
    for i in range(30):
        with open(os.path.join(new, "dir", f"n{i}.txt"), "wb") as f:
            f.write(b"line %d\n" % i * 50)
    for flags, grouped in (((), True), (("--format", "1"), False)):
        tag = "-".join(flags) or "default"
        a, b = str(tmp_path / f"a{tag}.dimg"), str(tmp_path / f"b{tag}.dimg")
        pack(old, a, *flags)
        pack(new, b, *flags)
        with Image(b) as image:
            assert image.info.grouped is grouped
        d, out = str(tmp_path / f"d{tag}.dimg"), str(tmp_path / f"p{tag}.dimg")
        for args in (("dimg", "diff", "--oldDimg", a, "--newDimg", b, "--outDimg", d),
                     ("dimg", "patch", "--baseDimg", a, "--diffDimg", d, "--outDimg", out, *flags)):
            code, _, err = run_cli(*args, "-q")
            assert code == 0, err
        with open(out, "rb") as got, open(b, "rb") as want:
            assert got.read() == want.read()


# ---------------------------------------------------------------- hostile group tables

def grouped(tmp_path) -> tuple[list[Entry], list[Group], bytes]:  # type: ignore[no-untyped-def]
    """The golden tree plus a file too large for a group: (entries, groups, body section)."""
    path = str(tmp_path / "g.dimg")
    with BodySpool(str(tmp_path), level=3, grouped=True) as spool:
        large = spool.add_bytes(bytes(range(251)) * 9000)
        entries = canonicalize(golden_entries(spool) + [
            Entry(b"large", EntryType.FILE, mode=0o644, size=large.size, digest=large.digest)])
        save_image(entries, spool, dimg_path=path)
    with Image(path) as image:
        with open(path, "rb") as f:
            f.seek(image.info.body_offset)
            return image.entries, image.groups, f.read()


def rewrap(entries: list[Entry], groups: list[Group], body: bytes, dictionary: Group | None = None) -> bytes:
    """A grouped dimg of these tables, as d4c encodes them but never checked."""
    tree = encode_tree(entries)
    table = tree + encode_storage(entries, groups, dictionary)
    comp = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(table)
    return dimg_preamble(comp, len(table), len(body), image_id_of(tree), None, has_multi_frame_bodies(entries),
                         grouped=True, group_dict=dictionary is not None) + comp + body


def in_group(entries: list[Entry]) -> list[Entry]:
    return sorted((e for e in entries if e.storage == Storage.GROUPED), key=lambda e: e.body_offset)


def test_hostile_group_tables_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    entries, groups, body = grouped(tmp_path)
    assert len(in_group(entries)) >= 2
    table_cases = {
        "past its frame": lambda es, gs: setattr(in_group(es)[-1], "body_offset", gs[0].usize),
        "overlapping": lambda es, gs: setattr(in_group(es)[1], "body_offset", 0),
        "no such group": lambda es, gs: setattr(in_group(es)[0], "group", 5),
    }
    for what, spoil in table_cases.items():
        es = [Entry(**{k: getattr(e, k) for k in Entry.__slots__}) for e in entries]  # type: ignore[arg-type]
        gs = list(groups)
        spoil(es, gs)
        bad = rewrap(es, gs, body)
        path = tmp_path / f"{what}.dimg"
        path.write_bytes(bad)
        with pytest.raises(CorruptImage):
            Image(str(path)).close()
        code, _, err = run_cli("unpack", "--dimg", str(tmp_path / f"{what}.dimg"), "--out", str(tmp_path / "x"))
        assert_one_line_error(code, err, EXIT_CORRUPT)
        assert not os.path.exists(tmp_path / "x")
    # a frame that decodes larger than its group declares: the tables are fine, the read is not
    g = groups[0]
    content = zstandard.ZstdDecompressor().decompress(body[g.offset:g.offset + g.csize])
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(content + b"more")
    bigger = body[:g.offset] + frame + body[g.offset + g.csize:]
    assert_read_refused(tmp_path, rewrap(entries, [g._replace(csize=len(frame))] + groups[1:], bigger), "group frame")


def assert_read_refused(tmp_path, data: bytes, match: str) -> None:  # type: ignore[no-untyped-def]
    """An image whose tables are sound and whose first grouped read is refused (and unpack with it)."""
    path = tmp_path / "bigger.dimg"
    path.write_bytes(data)
    with Image(str(path)) as image:
        with pytest.raises(CorruptImage, match=match):
            image.read_body(in_group(image.entries)[0])
    code, _, err = run_cli("unpack", "--dimg", str(path), "--out", str(tmp_path / "y"))
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert not os.path.exists(tmp_path / "y")


def test_a_damaged_group_fails_its_files_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    entries, groups, body = grouped(tmp_path)
    g = groups[0]
    damaged = bytearray(body)
    damaged[g.offset + g.csize // 2] ^= 0xFF
    path = tmp_path / "d.dimg"
    path.write_bytes(rewrap(entries, groups, bytes(damaged)))
    with Image(str(path)) as image:
        # a group decodes only as far as a read needs: a body before the damage may still be
        # served, checked against its digest; the rest of the group is refused
        failed = 0
        for e in in_group(image.entries):
            try:
                assert hashlib.sha256(image.read_body(e, check=False)).digest() == e.digest
            except CorruptImage:
                failed += 1
        assert failed >= 1
        with pytest.raises(CorruptImage):
            image.group_content(in_group(image.entries)[0])
        (large,) = [e for e in image.entries if e.storage == Storage.FRAME]
        assert image.read_body(large) == bytes(range(251)) * 9000  # outside the group: unharmed


def test_a_cold_read_decodes_its_group_only_up_to_its_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The first file of a group is served from a prefix of the frame; a read further
    on decodes the rest, and the whole group is then cached."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    rnd = random.Random(5)
    want = {}
    for i in range(40):
        want[f"f{i:02}.txt"] = bytes(rnd.getrandbits(8) for _ in range(9000)) * 3
        with open(os.path.join(src, f"f{i:02}.txt"), "wb") as f:
            f.write(want[f"f{i:02}.txt"])
    pack(src, str(tmp_path / "g.dimg"), "--format", "2")
    with Image(str(tmp_path / "g.dimg")) as image:
        first, *_, last = [e for e in in_group(image.entries) if e.group == 0]
        group = image.groups[0]
        assert image.read_body(first, check=False) == want[first.path.decode()]
        (stream,) = image._streams.values()
        assert stream._filled == first.body_offset + first.size < group.usize and 0 not in image._decoded
        assert image.read_body(last, check=False) == want[last.path.decode()]
        assert not image._streams and len(image._decoded[0]) == group.usize


def zstd_blocks(frame: bytes) -> int:
    """How many blocks a zstd frame holds (RFC 8878: 3-byte block headers after the frame header)."""
    pos, count = zstandard.frame_header_size(frame), 0
    while True:
        header = int.from_bytes(frame[pos:pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        pos += 3 + (1 if kind == 1 else size)
        count += 1
        if header & 1:
            return count


def test_group_frames_end_blocks_at_body_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """zstd decodes whole blocks: a group's blocks end where a body starts (every
    BLOCK_MIN bytes or more), so a cold read of its first file decodes that file's
    blocks, not the 128 KiB that zstd's own blocks hold."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    rnd = random.Random(6)
    for i in range(12):
        with open(os.path.join(src, f"f{i:02}.txt"), "wb") as f:
            f.write(bytes(rnd.getrandbits(8) for _ in range(5000)) * 4)
    pack(src, str(tmp_path / "g.dimg"), "--format", "2")
    with Image(str(tmp_path / "g.dimg")) as image:
        group = image.groups[0]
        starts = sorted({e.body_offset for e in in_group(image.entries) if e.group == 0})
        assert group.usize > 100_000 and len(starts) >= 5
        assert all(b - a >= BLOCK_MIN for a, b in zip(starts, starts[1:]))
        assert zstd_blocks(image.group_frame(group)) >= len(starts)  # one per body at least


def groups_decoded(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """The groups whose decoding starts from here on, in order (each _GroupStream made)."""
    decoded: list[int] = []
    real = _GroupStream.__init__

    def counted(self, image, e):  # type: ignore[no-untyped-def]
        decoded.append(e.group)
        real(self, image, e)
    monkeypatch.setattr(_GroupStream, "__init__", counted)
    return decoded


def test_decoded_groups_are_cached_within_a_bound(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A walk over every file decodes each group once; the cache keeps at most its
    bound (and always the group in use)."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    for i in range(60):
        with open(os.path.join(src, f"f{i:02}.txt"), "wb") as f:
            f.write(os.urandom(100_000))  # 6 MB: some groups
    pack(src, str(tmp_path / "g.dimg"), "--format", "2")
    count = -(-60 // -(-GROUP_TARGET // 100_000))
    decoded = groups_decoded(monkeypatch)
    with Image(str(tmp_path / "g.dimg")) as image:
        assert len(image.groups) == count > 1
        files = sorted((e for e in image.entries if e.type == EntryType.FILE), key=lambda e: e.path)
        for _ in range(2):
            for e in files:
                image.read_body(e)
        assert sorted(decoded) == list(range(count))
        assert not image._streams  # every group was read to its end
    with Image(str(tmp_path / "g.dimg")) as image:
        image.group_cache = 1  # below one group: only the last one is kept
        for e in files:
            image.read_body(e)
        assert len(image._decoded) == 1



def test_a_group_whose_files_were_all_read_goes_first(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """When the cache needs room it drops a group whose bodies have all been read
    before the least recent one, whose other files a walk in path order reads later."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    rnd = random.Random(3)
    for i in range(40):
        with open(os.path.join(src, f"f{i:02}.bin"), "wb") as f:
            f.write(rnd.randbytes(30_000))
    pack(src, str(tmp_path / "g.dimg"), "--format", "2")
    decoded = groups_decoded(monkeypatch)
    with Image(str(tmp_path / "g.dimg")) as image:
        members: dict[int, list[Entry]] = {}
        for e in image.entries:
            if e.type == EntryType.FILE and e.storage == Storage.GROUPED:
                members.setdefault(e.group, []).append(e)
        x, y, z = [g for g, es in sorted(members.items()) if len(es) >= 3][:3]
        image.group_cache = sum(image.groups[g].usize for g in (x, y, z)) - 1  # room for two of them
        for e in members[x][:2] + members[y] + members[z][:2] + members[x][2:]:
            assert image.read_body(e) is not None
        assert decoded == [x, y, z]  # y went (all of it read), not x (least recent, not all read)
        assert x in image._decoded and y not in image._decoded


# ---------------------------------------------------------------- the group dictionary

GOLDEN_V2_DICT = os.path.join(TESTS, "data", "golden-v2-dict.cdimg")


def notes(seed: int = 7, files: int = 24) -> dict[bytes, bytes]:
    """More than DICT_MIN_CONTENT of small text files, each a shared text with a few words
    of its own: a dictionary is made, and the image stays small."""
    rnd = random.Random(seed)
    words = [b"delta", b"frame", b"group", b"layer", b"image", b"stack", b"mount", b"patch"]
    shared = b" ".join(rnd.choice(words) for _ in range(9000))[:50_000]
    out = {}
    for i in range(files):
        at = rnd.randrange(0, 49_000)
        out[b"note%02d.txt" % i] = shared[:at] + b"note %d" % i + shared[at + 5 + len(str(i)):]
    return out


def write_golden_v2_dict(path: str) -> bytes:
    t = 1_700_000_000_000_000_000
    with BodySpool(os.path.dirname(path), level=19, grouped=True) as spool:
        entries = [Entry(b"", EntryType.DIR, mode=0o755, mtime_ns=t)]
        for name, content in notes().items():
            body = spool.add_bytes(content)
            entries.append(Entry(name, EntryType.FILE, mode=0o644, mtime_ns=t, size=body.size, digest=body.digest))
        return save_image(canonicalize(entries), spool, cdimg_path=path, config=GOLDEN_CONFIG, threads=2)


def test_golden_dictionary_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Groups coded against a dictionary frame (flag bit 3): the bytes are pinned,
    and the file in tests/data reads back."""
    out = str(tmp_path / "d.cdimg")
    write_golden_v2_dict(out)
    assert_pinned(out, GOLDEN_V2_DICT)
    with Image(GOLDEN_V2_DICT) as image:
        assert image.info.grouped and image.info.group_dict
        assert image.groups.dictionary is not None and len(image.groups) > 1
        assert image.groups.dictionary.usize == (24 * 50_000 // 2) // DICT_SLICE * DICT_SLICE
        want = notes()
        for e in image.entries:
            if e.type == EntryType.FILE:
                assert image.read_body(e) == want[e.path]


def notes_image(path: str, files: dict[bytes, bytes], image_format: int = 2, large: bool = False) -> bytes:
    """A cdimg of `files` (and, with `large`, one file too large for a group)."""
    t = 1_700_000_000_000_000_000
    if large:
        files = {**files, b"large": bytes(range(251)) * 9000}
    with BodySpool(os.path.dirname(path), level=3, grouped=image_format == 2) as spool:
        entries = [Entry(b"", EntryType.DIR, mode=0o755, mtime_ns=t)]
        for name, content in files.items():
            body = spool.add_bytes(content)
            entries.append(Entry(name, EntryType.FILE, mode=0o644, mtime_ns=t, size=body.size, digest=body.digest))
        return save_image(canonicalize(entries), spool, cdimg_path=path, config=GOLDEN_CONFIG)


def damage_dictionary(path: str) -> None:
    """Flip a byte in the middle of the image's dictionary frame."""
    with Image(path) as image:
        d = image.groups.dictionary
        assert d is not None
        at = image.info.body_offset + d.offset + d.csize // 2
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_a_damaged_dictionary_fails_the_grouped_files_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "d.cdimg")
    notes_image(path, notes(), large=True)
    damage_dictionary(path)
    with Image(path) as image:
        for e in in_group(image.entries):
            with pytest.raises(CorruptImage, match="group dictionary"):
                image.read_body(e)
        assert image.read_body(image.lookup(b"large")) == bytes(range(251)) * 9000
    code, _, err = run_cli("unpack", "--dimg", path, "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert not os.path.exists(tmp_path / "x")


def test_the_dictionary_preloads_on_a_thread(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """start_preload (a merge's base) decodes the dictionary on a thread, once; reads
    use it; a damaged one is still reported by the read that needs it; close() waits."""
    path = str(tmp_path / "d.cdimg")
    notes_image(path, notes(), large=True)
    want = notes()
    with Image(path) as image:
        image.start_preload()
        thread = image._preloader
        assert thread is not None
        image.start_preload()
        assert image._preloader is thread
        thread.join()
        assert image._dictionary is not None
        for e in in_group(image.entries):
            assert image.read_body(e) == want[e.path]
    assert not thread.is_alive() and image._preloader is None
    damage_dictionary(path)
    with Image(path) as image:
        image.start_preload()
        image.close()  # while the thread may still run: it is waited for, its failure kept for the read
        assert image._dictionary is None
    with Image(path) as image:
        image.start_preload()
        with pytest.raises(CorruptImage, match="group dictionary"):
            image.read_body(next(iter(in_group(image.entries))))


def test_hostile_dictionary_tables_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "d.dimg")
    with BodySpool(str(tmp_path), level=3, grouped=True) as spool:
        entries = [Entry(b"", EntryType.DIR, mode=0o755)]
        for name, content in notes().items():
            body = spool.add_bytes(content)
            entries.append(Entry(name, EntryType.FILE, mode=0o644, size=body.size, digest=body.digest))
        save_image(canonicalize(entries), spool, dimg_path=path)
    with Image(path) as image:
        entries, groups = image.entries, image.groups
        body = open(path, "rb").read()[image.info.body_offset:]
    d = groups.dictionary
    assert d is not None
    cases = {
        "outside the body": (groups, d._replace(csize=d.csize + 1), body),
        "a dictionary frame the table does not name": (groups, None, body),
    }
    # a dictionary frame that decodes larger than its table says
    content = zstandard.ZstdDecompressor().decompress(body[d.offset:])
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(content + b"more")
    bigger = body[:d.offset] + frame
    for what, (gs, dictionary, data) in cases.items():
        bad = tmp_path / "bad.dimg"
        bad.write_bytes(rewrap(entries, gs, data, dictionary))
        with pytest.raises(CorruptImage):
            Image(str(bad)).close()
        code, _, err = run_cli("unpack", "--dimg", str(bad), "--out", str(tmp_path / "x"))
        assert_one_line_error(code, err, EXIT_CORRUPT)
        assert not os.path.exists(tmp_path / "x"), what
    assert_read_refused(tmp_path, rewrap(entries, groups, bigger, d._replace(csize=len(frame))), "group dictionary")


def test_dictionary_images_in_mixed_stacks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A format-1 base, a dictionary-coded B and a format-1 C: diffs, patches and the
    merge give the images they stand for; B's delta to C reads B's dictionary."""
    tmp = str(tmp_path)
    a = notes()
    b = {**a, b"note03.txt": a[b"note03.txt"][:20_000] + b"changed" + a[b"note03.txt"][20_007:], b"new.txt": b"n" * 900}
    c = {k: v for k, v in b.items() if k != b"note05.txt"}
    c[b"note07.txt"] = b[b"note07.txt"][::-1]
    paths = [os.path.join(tmp, f"{n}.cdimg") for n in "abc"]
    for p, files, image_format in zip(paths, (a, b, c), (1, 2, 1)):
        notes_image(p, files, image_format)
    with Image(paths[1]) as image:
        assert image.info.group_dict
    patched, merged = diff_patch_merge(paths, tmp, "--format", "2")
    for p in patched:
        with Image(p) as got:
            assert got.info.group_dict  # both trees hold more than a dictionary's worth of small files
    with Image(paths[0]) as base, Image(merged, parent=base) as m:
        for e in m.entries:
            if e.type == EntryType.FILE:
                assert m.read_body(e) == c[e.path]
