"""x86 programs in format 2: stored branch-converted (the `_x86` kernel), read back as
they were (golden bytes, kernel parity, what is and is not converted, hostile tables)."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import zstandard

from helpers import TESTS, assert_one_line_error, assert_pinned, diff_trees, run_cli, snapshot_tree
from test_format import GOLDEN_CONFIG, golden_entries

from d4c import _x86_py, accel
from d4c.errors import EXIT_CORRUPT, CorruptImage
from d4c.image.bodies import FRAME_CHUNK, MAX_X86_BODY, BodySpool, is_x86_program
from d4c.image import format
from d4c.image.format import dimg_preamble, encode_storage, encode_tree, has_multi_frame_bodies, image_id_of
from d4c.image.reader import Image
from d4c.image.tree import Entry, EntryType, Storage, canonicalize
from d4c.image.writer import save_image

ELF_X86_64 = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x03\x00\x3e\x00" + bytes(44)
ELF_ARM64 = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x03\x00\xb7\x00" + bytes(44)
GOLDEN_V2_X86 = os.path.join(TESTS, "data", "golden-v2-x86.cdimg")
GOLDEN_V2_X86_SHA256 = "ad05be3b777aad443a91a49be109b348443d68fbb1ba4d9a7b9ffea036cffc60"


def x86_code(n: int, seed: int, functions: int = 24) -> bytes:
    """Code-like bytes: runs of a few instruction bytes and calls (E8 rel32) to a few
    functions, as a compiler lays them out; each call's rel32 differs with its place."""
    rnd = random.Random(seed)
    targets = [rnd.randrange(n) for _ in range(functions)]
    alphabet = bytes(rnd.randrange(256) for _ in range(12)).replace(b"\xe8", b"\x90").replace(b"\xe9", b"\x90")
    out = bytearray()
    while len(out) < n:
        out += bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(2, 9)))
        rel = rnd.choice(targets) - (len(out) + 5)
        out += b"\xe8" + rel.to_bytes(4, "little", signed=True)
    return bytes(out[:n])


def edge_cases() -> list[bytes]:
    """Branches at the very end, overlapping opcodes, values just inside and outside the range."""
    return [b"", b"\xe8", b"\xe8\x00\x00\x00", b"\xe8\x00\x00\x00\x00", b"\xe9\xff\xff\xff\xff",
            b"\xe8\xe8\xe8\xe8\x00\xe8", b"\xe8\x00\x00\x80\x00", b"\xe8\xff\xff\x7f\xff" * 3,
            b"x\xe8\x01\x02\x03\x00\xe9\x04\x05\x06\xff\xe8\x07\x08\x09\x10"]


def test_kernel_matches_its_reference_and_inverts() -> None:
    compiled = accel.x86
    rnd = random.Random(5)
    samples = edge_cases() + [x86_code(50_000, 1)]
    samples += [bytes(rnd.choice(b"\xe8\xe9\x00\xff\x10") for _ in range(4000)) for _ in range(5)]
    for data in samples:
        for start, end in ((0, len(data)), (min(3, len(data)), max(len(data) - 2, min(3, len(data))))):
            a, b = bytearray(data), bytearray(data)
            compiled.encode(a, start, end)
            _x86_py.encode(b, start, end)
            assert a == b, data[:32]
            assert a[:start] == data[:start] and a[end:] == data[end:]  # nothing outside the range
            piece = bytearray(data[start:end])
            compiled.encode(piece, 0, len(piece))
            assert piece == a[start:end]  # positions count from `start`
            whole = bytes(a)
            compiled.decode(a, start, end)
            _x86_py.decode(b, start, end)
            assert a == b == bytearray(data)
            if start == 0 and end == len(data):
                assert compiled.decoded(whole) == _x86_py.decoded(whole) == data
    code = x86_code(50_000, 1)
    converted = bytearray(code)
    compiled.encode(converted, 0, len(converted))
    assert converted != code  # calls were converted
    level19 = zstandard.ZstdCompressor(level=19)
    assert len(level19.compress(bytes(converted))) < 0.9 * len(level19.compress(code))


@pytest.mark.parametrize("kernel", [accel.x86, _x86_py], ids=["compiled", "reference"])
def test_kernel_refuses_a_range_outside_its_buffer(kernel) -> None:  # type: ignore[no-untyped-def]
    for start, end in ((-1, 3), (2, 1), (0, 11)):
        for convert in (kernel.encode, kernel.decode):
            with pytest.raises(ValueError, match="outside"):
                convert(bytearray(10), start, end)


def test_kernel_matches_its_reference_across_its_scan_blocks() -> None:
    """The kernel finds opcodes 64 bytes at a time: branches that straddle a block's
    end, opcodes inside a converted rel32 and chains of unconverted ones at every
    place around the edges of its blocks and of the byte-by-byte tail."""
    rnd = random.Random(11)
    for n in list(range(60, 140)) + [255, 256, 257, 1000]:
        for _ in range(6):
            data = bytes(rnd.choice(b"\xe8\xe9\x00\xff\x01") for _ in range(n))
            start = rnd.randrange(0, 70)
            start, end = min(start, n), max(min(start, n), n - rnd.randrange(0, 8))
            for name in ("encode", "decode"):
                a, b = bytearray(data), bytearray(data)
                getattr(accel.x86, name)(a, start, end)
                getattr(_x86_py, name)(b, start, end)
                assert a == b, (name, n, start, end)


def test_which_bodies_are_programs() -> None:
    assert is_x86_program(ELF_X86_64) and is_x86_program(ELF_X86_64[:16] + b"\x02\x00\x03\x00")  # i386
    assert not is_x86_program(ELF_ARM64) and not is_x86_program(ELF_X86_64[:19])
    assert not is_x86_program(b"\x7fELF\x02\x02\x01" + ELF_X86_64[7:])  # big-endian


def program_tree(root: str) -> dict[str, bytes]:
    """A small program (grouped), a large one (several frames), an ARM program and text."""
    files = {"bin/small": ELF_X86_64 + x86_code(40_000, 2),
             "lib/large.so": ELF_X86_64 + x86_code(FRAME_CHUNK + 300_000, 3),
             "lib/copy.so": ELF_X86_64 + x86_code(40_000, 2),  # the small one's content again
             "arm/tool": ELF_ARM64 + x86_code(30_000, 4),
             "doc/readme": b"calls \xe8\x01\x00\x00\x00 in text stay text\n" * 200}
    for rel, data in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return files


def raw_content(image: Image, e: Entry) -> bytes:
    """What the image stores for `e`, zstd-decoded but not x86-decoded."""
    with open(image.path, "rb") as f:
        if e.storage == Storage.GROUPED:
            g = image.groups[e.group]
            f.seek(image.info.body_offset + g.offset)
            dictionary = image.group_dictionary(e) if image.groups.dictionary is not None else None
            content = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(f.read(g.csize))
            return content[e.body_offset:e.body_offset + e.size]
        f.seek(image.info.body_offset + e.body_offset)
        reader = zstandard.ZstdDecompressor().stream_reader(f.read(e.body_length), read_across_frames=True)
        return reader.read(e.size + 1)


def test_programs_are_stored_converted_and_read_as_they_were(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = str(tmp_path / "src")
    files = program_tree(src)
    for fmt in ("1", "2"):
        code, _, err = run_cli("pack", "--in", src, "--out", str(tmp_path / f"{fmt}.dimg"), "--format", fmt, "-q")
        assert code == 0, err
    with Image(str(tmp_path / "1.dimg")) as image:
        assert not image.info.x86_code and not any(e.x86 for e in image.entries)
    with Image(str(tmp_path / "2.dimg")) as image:
        assert image.info.x86_code
        by_path = {e.path.decode(): image.holder(e) for e in image.entries if e.type == EntryType.FILE}
        assert {p for p, e in by_path.items() if e.x86} == {"bin/small", "lib/large.so", "lib/copy.so"}
        assert by_path["bin/small"].storage == Storage.GROUPED and by_path["lib/large.so"].storage == Storage.FRAME
        for rel, want in files.items():
            e = image.lookup(rel.encode())
            assert image.read_body(e) == want
            stored = raw_content(image, image.holder(e))
            assert (stored != want) is (rel in ("bin/small", "lib/large.so", "lib/copy.so")), rel
            assert stored[:20] == want[:20]  # the header a reader judges by is never converted
    out = {}
    for fmt in ("1", "2"):
        out[fmt] = str(tmp_path / f"out{fmt}")
        code, _, err = run_cli("unpack", "--dimg", str(tmp_path / f"{fmt}.dimg"), "--out", out[fmt])
        assert code == 0, err
    assert diff_trees(snapshot_tree(out["1"]), snapshot_tree(out["2"])) == []


def test_deltas_between_converted_images_store_new_programs_as_they_are(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A delta image's new bodies are plain frames (a merge copies them between deltas);
    patching it onto a converted base gives the converted image pack writes."""
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    program_tree(old)
    files = program_tree(new)
    with open(os.path.join(new, "bin", "added"), "wb") as f:
        f.write(ELF_X86_64 + x86_code(20_000, 9))
    with open(os.path.join(new, "lib", "large.so"), "r+b") as f:
        f.seek(5000)
        f.write(b"changed")
    paths = {n: str(tmp_path / f"{n}.dimg") for n in ("a", "b", "d", "p")}
    for tree, name in ((old, "a"), (new, "b")):
        assert run_cli("pack", "--in", tree, "--out", paths[name], "-q")[0] == 0
    for args in (("dimg", "diff", "--oldDimg", paths["a"], "--newDimg", paths["b"], "--outDimg", paths["d"]),
                 ("dimg", "patch", "--baseDimg", paths["a"], "--diffDimg", paths["d"], "--outDimg", paths["p"])):
        code, _, err = run_cli(*args, "-q")
        assert code == 0, err
    with Image(paths["a"]) as base, Image(paths["d"], parent=base) as delta:
        assert not delta.info.x86_code and not any(e.x86 for e in delta.entries)
        assert delta.read_body(delta.lookup(b"bin/added"))[:20] == ELF_X86_64[:20]
        assert delta.read_body(delta.lookup(b"bin/small")) == files["bin/small"]
    with open(paths["p"], "rb") as got, open(paths["b"], "rb") as want:
        assert got.read() == want.read()


# ---------------------------------------------------------------- golden bytes and hostile tables

def write_golden_v2_x86(path: str) -> bytes:
    with BodySpool(os.path.dirname(path), level=19, grouped=True) as spool:
        small = spool.add_bytes(ELF_X86_64 + x86_code(3000, 11))
        large = spool.add_bytes(ELF_X86_64 + bytes(FRAME_CHUNK) + x86_code(3000, 12))
        t = 1_700_000_000_000_000_000
        entries = canonicalize(golden_entries(spool) + [
            Entry(b"bin/prog", EntryType.FILE, mode=0o755, mtime_ns=t, size=small.size, digest=small.digest),
            Entry(b"bin/large", EntryType.FILE, mode=0o755, mtime_ns=t, size=large.size, digest=large.digest)])
        return save_image(entries, spool, cdimg_path=path, config=GOLDEN_CONFIG)


def test_golden_x86_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "x.cdimg")
    write_golden_v2_x86(out)
    assert_pinned(out, GOLDEN_V2_X86, GOLDEN_V2_X86_SHA256)
    with Image(GOLDEN_V2_X86) as image:
        assert image.info.x86_code and image.info.multi_frame
        prog, large = image.lookup(b"bin/prog"), image.lookup(b"bin/large")
        assert prog.x86 and prog.storage == Storage.GROUPED and large.x86 and large.storage == Storage.FRAME
        assert image.read_body(prog) == ELF_X86_64 + x86_code(3000, 11)
        assert image.read_body(large) == ELF_X86_64 + bytes(FRAME_CHUNK) + x86_code(3000, 12)
        assert not image.lookup(b"data").x86


def golden_tables(tmp_path) -> tuple[list[Entry], bytes, Image]:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "g.cdimg")
    write_golden_v2_x86(path)
    image = Image(path)
    with open(path, "rb") as f:
        f.seek(image.info.body_offset)
        body = f.read()
    return image.entries, body, image


def rewrap_x86(image: Image, entries: list[Entry], body: bytes, flag: bool = True) -> bytes:
    tree = encode_tree(entries)
    table = tree + encode_storage(entries, image.groups, image.groups.dictionary)
    comp = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(table)
    return dimg_preamble(comp, len(table), len(body), image_id_of(tree), None, has_multi_frame_bodies(entries),
                         grouped=True, group_dict=image.groups.dictionary is not None, x86_code=flag) + comp + body


def test_hostile_x86_storage_is_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    entries, body, image = golden_tables(tmp_path)
    with image:
        ok = tmp_path / "ok.dimg"
        ok.write_bytes(rewrap_x86(image, entries, body))
        with Image(str(ok)) as again:  # the rewrapping itself is sound
            assert again.read_body(again.lookup(b"bin/large"))[:20] == ELF_X86_64[:20]
        cases = {"without the flag": rewrap_x86(image, entries, body, flag=False)}
        shared = copies(entries)
        next(e for e in shared if e.storage == Storage.SHARED).x86 = True
        with monkeypatch.context() as m:  # an encoder that writes the bit on a shared record
            m.setattr(format, "_CONVERTIBLE", (Storage.FRAME, Storage.GROUPED, Storage.SHARED))
            cases["on a shared body"] = rewrap_x86(image, shared, body)
        big = copies(entries)
        next(e for e in big if e.path == b"bin/large").size = MAX_X86_BODY + 1
        cases["over the size bound"] = rewrap_x86(image, big, body)
        for what, data in cases.items():
            path = tmp_path / f"{what}.dimg"
            path.write_bytes(data)
            with pytest.raises(CorruptImage, match="x86-converted"):
                Image(str(path)).close()
            code, _, err = run_cli("unpack", "--dimg", str(path), "--out", str(tmp_path / "x"))
            assert_one_line_error(code, err, EXIT_CORRUPT)
            assert not os.path.exists(tmp_path / "x")


def copies(entries: list[Entry]) -> list[Entry]:
    return [Entry(**{k: getattr(e, k) for k in Entry.__slots__}) for e in entries]  # type: ignore[arg-type]


def test_a_converted_body_streams_frame_by_frame_and_is_checked() -> None:
    with Image(GOLDEN_V2_X86) as image:
        large = image.lookup(b"bin/large")
        want = ELF_X86_64 + bytes(FRAME_CHUNK) + x86_code(3000, 12)
        with image.open_body(large) as body:
            assert b"".join(body.chunks()) == want
        assert b"".join(image.stored_chunks(large)) == want
        large.digest = hashlib.sha256(b"other").digest()
        with pytest.raises(CorruptImage, match="digest"), image.open_body(large) as body:
            body.read()
