"""Deltas of compressed files (method 4): gzip, zip, xz rebuilt bit-exactly from
their contents; streams that do not re-create stay raw; hostile payloads refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import random
import shutil
import subprocess
import zipfile
import zlib

import numpy as np

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import TESTS, assert_one_line_error, need, run_cli
from test_delta import SETTINGS

from d4c.engine import delta, recompress
from d4c.errors import EXIT_CORRUPT, CorruptDelta, D4CError

WORDS = (b"fix", b"security", b"update", b"nginx", b"upstream", b"release", b"CVE-2026-1234", b"debian",
         b"the", b"of", b"and", b"to", b"in", b"patch", b"build", b"package", b"version", b"urgency=medium")


def text(size: int, seed: int) -> bytes:
    """Changelog-like text: words and numbers from a fixed generator."""
    out, x = bytearray(), seed
    while len(out) < size:
        x = (x * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        out += WORDS[(x >> 33) % len(WORDS)] + (b"\n" if (x >> 20) % 11 == 0 else b" ")
        if (x >> 40) % 17 == 0:
            out += str(x % 100000).encode() + b" "
    return bytes(out[:size])


def edited(data: bytes, seed: int) -> bytes:
    """A new release of `data`: an entry on top and a few words changed."""
    out = bytearray(text(600, seed) + b"\n" + data)
    for i in range(3):
        pos = (seed * 7919 + i * 104729) % len(out)
        out[pos:pos + 5] = b"CHANG"
    return bytes(out)


def gz(data: bytes, level: int = 9, name: str = "", mtime: int = 0) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", compresslevel=level, fileobj=buf, mtime=mtime) as f:
        f.write(data)
    return buf.getvalue()


class Unseekable(io.RawIOBase):
    """A write-only stream without tell/seek: zipfile then writes data descriptors."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def]
        self.buf += b
        return len(b)


def make_zip(members: dict[str, bytes], stored: tuple[str, ...] = (), descriptors: bool = False,
             level: int | None = None) -> bytes:
    out = Unseekable() if descriptors else io.BytesIO()
    with zipfile.ZipFile(out, "w", compresslevel=level) as z:  # type: ignore[arg-type]
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 12, 3, 12, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            if descriptors:
                with z.open(info, "w") as f:
                    f.write(data)
            else:
                z.writestr(info, data)
    return bytes(out.buf) if isinstance(out, Unseekable) else out.getvalue()


def members(seed: int, n: int = 12) -> dict[str, bytes]:
    return {f"pkg/mod{i}.py": text(3000 + 500 * i, seed + i) for i in range(n)}


def new_members(old: dict[str, bytes]) -> dict[str, bytes]:
    new = dict(old)
    new["pkg/mod3.py"] = edited(old["pkg/mod3.py"], 5)
    new["pkg/added.py"] = text(2000, 99)
    del new["pkg/mod4.py"]
    return new


def roundtrip(old: bytes, new: bytes) -> bytes:
    d = delta.diff(old, new)
    assert delta.apply(old, d) == new
    return d


@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize("name,mtime", [("", 0), ("changelog.Debian", 1767225600)])
def test_gzip_round_trips_bit_exactly_and_small(level: int, name: str, mtime: int) -> None:
    content = text(60_000, 1)
    old, new = gz(content, level, name, mtime), gz(edited(content, 2), level, name, mtime + 86400)
    d = roundtrip(old, new)
    info = delta.read_delta_info(d)
    assert info.method == delta.METHOD_RECOMPRESS
    raw_size = len(delta.diff(old, new, fast=True))
    assert len(d) < raw_size / 4, (len(d), raw_size)  # the content's delta, not the stream's


def test_gzip_from_a_plain_file_and_a_new_gzip_without_an_old_one() -> None:
    content = text(40_000, 3)
    roundtrip(content, gz(edited(content, 4)))  # old not compressed: diffed against its bytes
    roundtrip(b"", gz(content))


@pytest.mark.parametrize("descriptors", [False, True])
def test_zip_with_stored_and_deflated_members(descriptors: bool) -> None:
    old_m = members(10)
    old = make_zip(old_m, stored=("pkg/mod1.py",), descriptors=descriptors)
    new = make_zip(new_members(old_m), stored=("pkg/mod1.py",), descriptors=descriptors)
    assert descriptors == (old[6] & 8 == 8)  # the general-purpose flag of the first entry
    d = roundtrip(old, new)
    assert delta.read_delta_info(d).method == delta.METHOD_RECOMPRESS
    # unchanged members are the same bytes in both zips: the gain is the changed and the added one
    assert len(d) < len(delta.diff(old, new, fast=True)) / 2


def test_wheel_round_trips() -> None:
    """A .whl as pip builds them: deflated members at zlib's default level, a RECORD last."""
    def wheel(version: str, seed: int) -> bytes:
        files = members(seed, 8)
        metadata = f"Metadata-Version: 2.1\nName: demo\nVersion: {version}\n"
        files[f"demo-{version}.dist-info/METADATA"] = metadata.encode()
        record = "".join(f"{n},sha256={hashlib.sha256(b).hexdigest()},{len(b)}\n" for n, b in files.items())
        files[f"demo-{version}.dist-info/RECORD"] = record.encode()
        return make_zip(files)
    old, new = wheel("1.0", 20), wheel("1.1", 20)
    d = roundtrip(old, new)
    assert delta.read_delta_info(d).method == delta.METHOD_RECOMPRESS


@pytest.mark.parametrize("check,preset", [(lzma.CHECK_CRC64, 6), (lzma.CHECK_SHA256, 9 | lzma.PRESET_EXTREME)])
def test_xz_round_trips(check: int, preset: int) -> None:
    content = text(200_000, 7)
    old = lzma.compress(content, preset=preset, check=check)
    new = lzma.compress(edited(content, 8), preset=preset, check=check)
    d = roundtrip(old, new)
    assert delta.read_delta_info(d).method == delta.METHOD_RECOMPRESS


def prose(size: int, seed: int) -> bytes:
    """A changelog's mix: repeated long lines between unique ones, so that fewer
    than half of the tokens are matches and the text still halves. GNU gzip then
    ends a block at every 4096 tokens, which zlib never does."""
    rnd = random.Random(seed)
    lines = [b"  * Fix a security issue in the HTTP parser (CVE-2026-%04d)." % i for i in range(40)]
    lines.append(b" -- Debian Security Team <team@security.debian.org>  Mon, 01 Jun 2026 12:00:00 +0000")
    out = bytearray()
    while len(out) < size:
        if rnd.random() < 0.5:
            out += rnd.choice(lines) + b"\n"
        else:
            out += bytes(rnd.choice(b"etaoinshrdlucmfwyp ") for _ in range(rnd.randrange(10, 60))) + b"\n"
    return bytes(out[:size])


def gnu_gzip(data: bytes, level: int) -> bytes:
    """As Debian's dh_compress makes .gz files (`gzip -9n`): GNU gzip's own deflate."""
    return subprocess.run(["gzip", f"-{level}", "-n", "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("level", [9, 6])
def test_gnu_gzip_streams_are_reblocked_bit_exactly(level: int) -> None:
    """GNU gzip ends blocks where zlib does not (every 4096 tokens, when it pays), so
    no zlib level gives its stream; zlib's tokens in gzip's blocks do."""
    need(shutil.which("gzip") is not None, "GNU gzip is not installed")
    content = prose(120_000, 60)
    old, new = gnu_gzip(content, level), gnu_gzip(edited(content, 61), level)
    pieces = recompress.with_params(new, recompress.expand(new)).pieces
    stream = [p for p in pieces if p.kind != recompress.KIND_RAW]
    assert [p.kind for p in stream] == [recompress.KIND_REBLOCKED] and len(stream[0].blocks) > 1
    d = roundtrip(old, new)
    assert delta.read_delta_info(d).method == delta.METHOD_RECOMPRESS
    assert len(d) < len(delta.diff(old, new, fast=True)) / 8


def test_gnu_gzip_fast_levels_round_trip() -> None:
    need(shutil.which("gzip") is not None, "GNU gzip is not installed")
    content = prose(50_000, 62)
    roundtrip(gnu_gzip(content, 1), gnu_gzip(edited(content, 63), 1))


def test_deflate_kernel_matches_its_reference_and_zlib() -> None:
    """Tokens and blocks of zlib streams of every strategy, and the stream written
    back from them: the compiled kernel, the reference and zlib's own bytes agree."""
    from d4c import _deflate, _deflate_py
    rnd = random.Random(5)
    for i in range(24):
        data = bytes(rnd.choice(b"abcde fgh\n") for _ in range(rnd.randrange(1, 20_000))) + \
            rnd.randbytes(rnd.randrange(0, 2000))
        c = zlib.compressobj(rnd.choice([1, 6, 9]), zlib.DEFLATED, -15, rnd.choice([8, 9]), i % 5)
        z = c.compress(data) + c.flush()
        ours, ref = _deflate.tokens(z, len(data) + 1), _deflate_py.tokens(z, len(data) + 1)
        assert ours[0] == ref[0] == 0 and ours[3] == ref[3] == len(z)
        assert np.array_equal(ours[1], ref[1]) and np.array_equal(ours[2], ref[2])
        assert _deflate.encode(ours[1], ours[2], data, len(z)) == (0, z) == \
            _deflate_py.encode(ref[1], ref[2], data, len(z))
    raw = zlib.compress(prose(5000, 6))[2:-4]
    for k in (_deflate, _deflate_py):  # truncated, too many tokens, a block list that does not fit
        assert k.tokens(raw[:len(raw) // 2], 10_000)[0] == k.E_TRUNCATED
        assert k.tokens(raw, 10)[0] == k.E_TOO_MANY
        assert k.tokens(b"\x07" + raw, 10_000)[0] == k.E_BAD  # block type 3
        assert k.encode(np.array([97, 98], np.uint32), np.array([[2, 3]], np.int64), b"ab", 100)[0] < 0
        assert k.encode(np.array([97, 98], np.uint32), np.array([[2, 1]], np.int64), b"ab", 100)[0] < 0
        assert k.encode(np.array([97, 98], np.uint32), np.array([[2, 2]], np.int64), b"ab", 2)[0] < 0
    # a stream made with a preset dictionary reaches before its start: only as far as allowed
    text_ = prose(8000, 7)
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 8, 0, zdict=text_[:4000])
    z = c.compress(text_[4000:]) + c.flush()
    ours, ref = _deflate.tokens(z, 8000, 4000), _deflate_py.tokens(z, 8000, 4000)
    assert ours[0] == ref[0] == 0 and np.array_equal(ours[1], ref[1])
    assert int(recompress.token_lengths(ours[1]).sum()) == 4000
    assert _deflate.tokens(z, 8000)[0] == _deflate_py.tokens(z, 8000)[0] == _deflate.E_BAD


def test_common_runs_kernel_matches_its_reference() -> None:
    """The splice plan's runs of equal tokens: the compiled kernel gives the reference's runs
    on real token streams (an edited text's) and on small alphabets full of repeats."""
    from d4c import _deflate, _deflate_py

    def toks(data: bytes) -> np.ndarray:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return _deflate.tokens(c.compress(data) + c.flush(), len(data) + 1)[1]

    content = prose(200_000, 21)
    cases = [(toks(edited(content, 22)), toks(content), 16, 1024), (toks(content), toks(content), 16, 64)]
    rng = np.random.default_rng(3)
    for _ in range(200):
        old = rng.integers(0, 3, int(rng.integers(0, 300))).astype(np.uint32)
        new = np.concatenate([old[int(rng.integers(0, len(old) + 1)):],
                              rng.integers(0, 3, int(rng.integers(0, 50))).astype(np.uint32), old])
        cases.append((new, old, int(rng.integers(1, 5)), int(rng.integers(1, 20))))
    found = 0
    for new, old, k, min_run in cases:
        ours, ref = _deflate.common_runs(new, old, k, min_run), _deflate_py.common_runs(new, old, k, min_run)
        assert ours.dtype == np.int64 and ours.shape[1:] == (3,)
        assert np.array_equal(ours, ref)
        for i, j, n in ours.tolist():
            assert n >= min_run and np.array_equal(new[i:i + n], old[j:j + n])
        found += len(ours)
    assert found > 200


def test_a_stream_that_does_not_recreate_stays_raw() -> None:
    """A deflate stream with a sync flush in the middle: no level re-creates it, so
    the new file's stream is a raw piece and the delta still rebuilds it."""
    content = text(60_000, 11)

    def flushed(data: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        return c.compress(data[:20_000]) + c.flush(zlib.Z_SYNC_FLUSH) + c.compress(data[20_000:]) + c.flush()
    new = flushed(edited(content, 12))
    pieces = recompress.with_params(new, recompress.expand(new)).pieces
    assert [p.kind for p in pieces] == [recompress.KIND_RAW]
    roundtrip(flushed(content), new)
    assert delta.read_delta_info(delta.diff(flushed(content), new)).method != delta.METHOD_RECOMPRESS


def test_expansion_of_broken_containers_keeps_the_bytes() -> None:
    """A truncated gzip, a zip whose member lies about its size, garbage after a
    gzip member: the expansion covers exactly the file, streams only where they hold."""
    good = gz(text(30_000, 13))
    for data in (good[:len(good) // 2], good + b"trailing junk", make_zip(members(14))[:-700],
                 b"PK\x03\x04" + b"\xff" * 40, b"\x1f\x8b\x08" + b"\x00" * 5):
        x = recompress.expand(data)
        assert sum(p.size for p in x.pieces) == len(data)
        assert [p.start for p in x.pieces] == sorted(p.start for p in x.pieces)
        found = recompress.with_params(data, x)
        assert bytes(recompress.reassemble(found.pieces, found.content, corrupt)) == data


# ---------------------------------------------------------------- hostile payloads

def _split(d: bytes, old: bytes | None = None) -> tuple[bytes, bytes, recompress.Header, bytes]:
    """(preamble, header bytes, header, inner payload) of a method-4 delta (of PAIR by default)."""
    payload = memoryview(d)[delta.PREAMBLE.size:]
    h = recompress.decode_header(payload, recompress.expand(PAIR[0] if old is None else old),
                                 delta.read_delta_info(d).new_size, corrupt)
    return d[:delta.PREAMBLE.size], bytes(payload[:h.inner_at]), h, bytes(payload[h.inner_at:])


def corrupt(reason: str) -> None:
    raise CorruptDelta("test", reason)


def _with_table(d: bytes, pieces: list[recompress.Piece], fingerprint: bytes | None = None,
                old: bytes | None = None) -> bytes:
    """The delta `d` (of PAIR by default) with its layout table replaced (encoded as the diff would)."""
    pre, _, h, inner = _split(d, old)
    old_x = recompress.expand(PAIR[0] if old is None else old)
    new_x = recompress.Expanded(pieces, b"")
    head = bytearray(recompress.encode_header(old_x, new_x, h.inner_method))
    if fingerprint is not None:
        head[1:9] = fingerprint
    return pre + bytes(head) + inner


PAIR = (gz(text(50_000, 21)), gz(edited(text(50_000, 21), 22)))


def refused_by_patch(tmp_path, old: bytes, hostile: bytes) -> str:  # type: ignore[no-untyped-def]
    """`util patch` of a hostile delta: one line, exit 3, nothing written; its message."""
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "d").write_bytes(hostile)
    code, _, err = run_cli("util", "patch", "--old", str(tmp_path / "old"), "--diff", str(tmp_path / "d"),
                           "--new", str(tmp_path / "new"))
    assert_one_line_error(code, err, EXIT_CORRUPT)
    assert sorted(os.listdir(tmp_path)) == ["d", "old"]
    return err


def test_hostile_parameters_and_bombs_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old, new = PAIR
    d = delta.diff(old, new)
    _, _, h, _ = _split(d)
    stream = next(p for p in h.pieces if p.kind == recompress.KIND_DEFLATE)
    others = [p for p in h.pieces if p is not stream]
    i = h.pieces.index(stream)
    bad = {
        "wrong level": stream._replace(params=stream.params._replace(a=1)),
        "level out of range": stream._replace(params=stream.params._replace(a=12)),
        "window out of range": stream._replace(params=stream.params._replace(c=20)),
        "a bomb": stream._replace(content_size=recompress.DEFLATE_RATIO * stream.size + 5000),
    }
    for what, piece in bad.items():
        pieces = others[:i] + [piece] + others[i:]
        hostile = _with_table(d, pieces)
        with pytest.raises(CorruptDelta):
            delta.apply(old, hostile)
        refused_by_patch(tmp_path, old, hostile)


def test_hostile_block_lists_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    need(shutil.which("gzip") is not None, "GNU gzip is not installed")
    content = prose(60_000, 64)
    old, new = gnu_gzip(content, 9), gnu_gzip(edited(content, 65), 9)
    d = delta.diff(old, new)
    _, _, h, _ = _split(d, old)
    i = next(i for i, p in enumerate(h.pieces) if p.kind == recompress.KIND_REBLOCKED)
    blocks = h.pieces[i].blocks
    for bad in (blocks[:-1], ((blocks[0][0], blocks[0][1] + 1),) + blocks[1:], ((0, blocks[0][1]),) + blocks[1:]):
        pieces = list(h.pieces)
        pieces[i] = pieces[i]._replace(blocks=bad)
        hostile = _with_table(d, pieces, old=old)
        with pytest.raises(CorruptDelta):
            delta.apply(old, hostile)
        refused_by_patch(tmp_path, old, hostile)


def test_an_inner_method_that_is_not_a_byte_method_is_refused() -> None:
    """The expanded contents' delta is SA, PREFIX or WHOLE: a nested RECOMPRESS or an
    unknown method is refused."""
    old, _ = PAIR
    d = delta.diff(*PAIR)
    pre, head, h, inner = _split(d)
    for method in (delta.METHOD_RECOMPRESS, 9):
        hostile = pre + head[:-1] + bytes([method]) + inner
        with pytest.raises(CorruptDelta, match="unknown method"):
            delta.apply(old, hostile)


def test_a_zlib_that_deflates_otherwise_is_refused_before_any_output(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old, new = PAIR
    d = delta.diff(old, new)
    _, _, h, _ = _split(d)
    assert h.fingerprint == recompress.zlib_fingerprint()
    other = _with_table(d, h.pieces, fingerprint=bytes(8))  # as made with a zlib-ng build
    with pytest.raises(CorruptDelta, match="deflates otherwise"):
        delta.apply(old, other)
    assert "deflates otherwise" in refused_by_patch(tmp_path, old, other)


def test_a_version_1_reader_view_and_method_checks() -> None:
    """Method 4 only in a version-2 delta file; the other methods keep version 1."""
    old, new = PAIR
    d = bytearray(delta.diff(old, new))
    assert int.from_bytes(d[8:10], "little") == delta.VERSION_RECOMPRESS
    d[8:10] = (1).to_bytes(2, "little")
    with pytest.raises(CorruptDelta, match="unknown method 4"):
        delta.read_delta_info(bytes(d))
    plain = delta.diff(text(5000, 1), text(5000, 2))
    assert int.from_bytes(plain[8:10], "little") == delta.VERSION


@pytest.mark.parametrize("base", ["one gzip", "a zip copying and splicing old streams"])
@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
@example(mutations=[(3028, 208)])  # the layout table's frame declaring a huge size: was a MemoryError
def test_fuzz_mutated_recompress_delta(base: str, mutations: list[tuple[int, int]]) -> None:
    (old, new), d = FUZZ_BASES[base]
    bad = bytearray(d)
    for pos, value in mutations:
        bad[pos % len(bad)] = value
    try:
        out = delta.apply(old, bytes(bad))
        assert out == new
    except D4CError:
        pass


FUZZ_PAIR = (gz(text(6000, 31), 6), gz(edited(text(6000, 31), 32), 6))
FUZZ_DELTA = delta.diff(*FUZZ_PAIR)

GOLDEN_P1 = os.path.join(TESTS, "data", "golden-v2-recompress.delta")
GOLDEN_P1_SHA256 = "e0f4b6b08a69229ae12ccfc2c76ac5a83949eb8f74a7332d5e105ccc54ac57dd"
GOLDEN = os.path.join(TESTS, "data", "golden-v2-recompress-linked.delta")
GOLDEN_SHA256 = "fc76a0d642a2657845181b2f89dac8d5bc1f6d1117c548dd44787149192c8c27"


def golden_p1_pair() -> tuple[bytes, bytes]:
    old_m = members(40, 6)
    return make_zip(old_m, stored=("pkg/mod2.py",)), make_zip(new_members(old_m), stored=("pkg/mod2.py",))


def golden_pair() -> tuple[bytes, bytes]:
    """A zip with unchanged members (copied from the old file) and a large changed one (spliced)."""
    old_m = members(40, 6)
    old_m["doc/big.txt"] = text(150_000, 41)
    new_m = new_members(old_m)
    new_m["doc/big.txt"] = edited(old_m["doc/big.txt"], 42)
    return make_zip(old_m, stored=("pkg/mod2.py",)), make_zip(new_m, stored=("pkg/mod2.py",))


def test_golden_recompress_delta() -> None:
    """Method 4's bytes are pinned (with this zlib: its fingerprint is in the file)."""
    old, new = golden_pair()
    with open(GOLDEN, "rb") as f:
        stored = f.read()
    _, _, h, _ = _split(stored, old)
    if h.fingerprint != recompress.zlib_fingerprint():
        pytest.skip(f"this zlib ({zlib.ZLIB_RUNTIME_VERSION}) deflates otherwise than the golden file's")
    assert any(p.kind == recompress.KIND_SPLICED for p in h.pieces)
    assert any(p.source >= 0 and p.kind != recompress.KIND_SPLICED for p in h.pieces)
    d = delta.diff(old, new)
    assert hashlib.sha256(d).hexdigest() == GOLDEN_SHA256
    assert stored == d
    assert delta.apply(old, stored) == new


def test_a_payload_version_1_delta_still_applies() -> None:
    """Made before tables could name old streams: read as it was written."""
    old, new = golden_p1_pair()
    with open(GOLDEN_P1, "rb") as f:
        stored = f.read()
    assert hashlib.sha256(stored).hexdigest() == GOLDEN_P1_SHA256
    assert memoryview(stored)[delta.PREAMBLE.size] == 1  # its payload version
    _, _, h, _ = _split(stored, old)
    if h.fingerprint != recompress.zlib_fingerprint():
        pytest.skip(f"this zlib ({zlib.ZLIB_RUNTIME_VERSION}) deflates otherwise than the golden file's")
    assert all(p.source < 0 for p in h.pieces)
    assert delta.apply(old, stored) == new


def test_table_codec_round_trip() -> None:
    old = recompress.expand(PAIR[0]).pieces
    for new, old_x in ((PAIR[1], PAIR[0]), golden_pair()[::-1]):
        base = recompress.expand(old_x)
        x = recompress.link_to_old(old_x, base, new, recompress.with_params(new, recompress.expand(new)))
        table = recompress.encode_table(x.pieces, base.pieces)
        version = recompress.table_version(x.pieces)
        assert recompress.decode_table(table, len(new), corrupt, version, base.pieces) == x.pieces
    table = recompress.encode_table(recompress.with_params(PAIR[1], recompress.expand(PAIR[1])).pieces)
    with pytest.raises(CorruptDelta, match="trailing"):
        recompress.decode_table(table + b"\0", len(PAIR[1]), corrupt, 1, old)
    with pytest.raises(CorruptDelta, match="add up"):
        recompress.decode_table(table, len(PAIR[1]) + 1, corrupt, 1, old)


# ---------------------------------------------------------------- old streams: copies and splices

def test_unchanged_members_are_copied_not_recompressed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    old_m = members(70, 10)
    old, new = make_zip(old_m), make_zip(new_members(old_m))
    base = recompress.expand(old)
    x = recompress.link_to_old(old, base, new, recompress.with_params(new, recompress.expand(new)))
    streams = [p for p in x.pieces if p.kind != recompress.KIND_RAW]
    copied = [p for p in streams if p.source >= 0]
    assert len(copied) == len(streams) - 2  # all but the edited and the added member
    for p in copied:
        src = base.pieces[p.source]
        assert old[src.start:src.start + src.size] == new[p.start:p.start + p.size]
    d = delta.diff(old, new)
    rebuilt = []
    real = recompress.restream
    monkeypatch.setattr(recompress, "restream", lambda piece, content: rebuilt.append(piece) or real(piece, content))
    assert delta.apply(old, d) == new
    assert len(rebuilt) == 2


@pytest.mark.parametrize("maker", ["zlib-9", "zlib-6", "gnu-9"])
def test_a_large_stream_is_spliced_from_the_old_one(maker: str) -> None:
    """An entry on top and three words changed: on patch zlib deflates the stretches
    around the changes only, the rest are the old stream's tokens."""
    content = prose(300_000, 80)
    if maker.startswith("gnu"):
        need(shutil.which("gzip") is not None, "GNU gzip is not installed")
        old, new = gnu_gzip(content, 9), gnu_gzip(edited(content, 81), 9)
    else:
        level = int(maker.split("-")[1])
        old, new = gz(content, level), gz(edited(content, 81), level)
    base = recompress.expand(old)
    x = recompress.link_to_old(old, base, new, recompress.with_params(new, recompress.expand(new)))
    (spliced,) = [p for p in x.pieces if p.kind == recompress.KIND_SPLICED]
    assert spliced.runs and spliced.source >= 0
    deflated = []
    real = recompress._stretch
    def spy(p, view, start, end, count):  # type: ignore[no-untyped-def]
        deflated.append(end - start)
        return real(p, view, start, end, count)
    d = roundtrip(old, new)
    recompress._stretch = spy
    try:
        assert delta.apply(old, d) == new
    finally:
        recompress._stretch = real
    assert 0 < sum(deflated) <= recompress.SPLICE_SAVES * spliced.content_size


def test_hostile_splices_and_sources_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    old, new = golden_pair()
    d = delta.diff(old, new)
    _, _, h, _ = _split(d, old)
    base = recompress.expand(old).pieces
    i = next(i for i, p in enumerate(h.pieces) if p.kind == recompress.KIND_SPLICED)
    j = next(j for j, p in enumerate(h.pieces) if p.source >= 0 and p.kind != recompress.KIND_SPLICED)
    run = h.pieces[i].runs[-1]
    other_size = next(k for k, p in enumerate(base) if p.kind != recompress.KIND_RAW and p.size != h.pieces[j].size)
    bad = {
        "run past the old tokens": (i, h.pieces[i]._replace(runs=h.pieces[i].runs[:-1] + (
            run._replace(old_start=run.old_start + 10**6),))),
        "run past the new tokens": (i, h.pieces[i]._replace(runs=h.pieces[i].runs[:-1] + (
            run._replace(count=run.count + 10**6),))),
        "run at the wrong place": (i, h.pieces[i]._replace(runs=h.pieces[i].runs[:-1] + (
            run._replace(content_at=run.content_at + 1),))),
        "a copy of a stream of another size": (j, h.pieces[j]._replace(source=other_size)),
    }
    for what, (k, piece) in bad.items():
        pieces = list(h.pieces)
        pieces[k] = piece
        hostile = _with_table(d, pieces, old=old)
        with pytest.raises(CorruptDelta):
            delta.apply(old, hostile)
        refused_by_patch(tmp_path, old, hostile)
    # read against an old file without those streams
    table = recompress.encode_table(h.pieces, base)
    only_raw = [p for p in base if p.kind == recompress.KIND_RAW]
    with pytest.raises(CorruptDelta, match="names an old stream"):
        recompress.decode_table(table, len(new), corrupt, 2, only_raw)


LINKED_PAIR = golden_pair()
FUZZ_BASES = {"one gzip": (FUZZ_PAIR, FUZZ_DELTA), "a zip copying and splicing old streams":
              (LINKED_PAIR, delta.diff(*LINKED_PAIR))}
