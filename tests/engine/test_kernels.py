"""The Cython kernels: parity with the pure-Python references, pinned chunk points."""

from __future__ import annotations

import hashlib
import importlib
import os
import random

import numpy as np
import pytest

from d4c import _chunker_py, _patch_py, accel
from d4c.engine import chunker


def compiled(name: str):  # type: ignore[no-untyped-def]
    if accel.backend == "python":
        pytest.skip("D4C_PUREPYTHON is set")
    return importlib.import_module(f"d4c.{name}")


def lcg_bytes(n: int, seed: int) -> bytes:
    """Deterministic pseudo-random data (no dependency on Python's random)."""
    out = bytearray(n)
    x = seed
    for i in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        out[i] = x >> 56
    return bytes(out)


def test_compiled_kernels_in_use() -> None:
    """A build that silently fell back to the references would be 100x slower."""
    accel.check()
    assert accel.backend == ("python" if os.environ.get("D4C_PUREPYTHON") else "compiled")


def test_chunker_parity() -> None:
    fast = compiled("_chunker")
    data = lcg_bytes(200_000, 7)
    small, large = chunker._masks(4096)
    for final in (True, False):
        a = np.empty(200, dtype=np.uint64)
        b = np.empty(200, dtype=np.uint64)
        na = fast.find_cuts(data, chunker.GEAR, 1024, 4096, 16384, small, large, a, final)
        nb = _chunker_py.find_cuts(data, chunker.GEAR, 1024, 4096, 16384, small, large, b, final)
        assert na == nb and list(a[:na]) == list(b[:nb])


def test_chunk_points_unchanged() -> None:
    """Future chunker changes must not move cut points: stored deltas depend on them."""
    data = lcg_bytes(1 << 20, 42)
    cuts = chunker.cut_points(data, 2048, 8192, 65536)
    assert int(cuts[-1]) == len(data)
    sizes = np.diff(np.concatenate([[0], cuts]).astype(np.int64))
    assert sizes[:-1].min() >= 2048  # only the last chunk may be short
    assert sizes.max() <= 65536
    assert 4096 < sizes.mean() < 16384
    digest = hashlib.sha256(cuts.astype("<u8").tobytes()).hexdigest()
    assert digest == GOLDEN_CUTS, digest


def test_chunks_are_content_defined() -> None:
    """Inserting bytes early moves only nearby cut points."""
    data = lcg_bytes(300_000, 3)
    a = set(int(x) for x in chunker.cut_points(data, 1024, 4096, 16384))
    b = set(int(x) - 10 for x in chunker.cut_points(b"0123456789" + data, 1024, 4096, 16384))
    assert len(a & b) >= 0.9 * len(a)


GOLDEN_CUTS = "70083492c76a45edfe01e7790f895b376985ee9d9146e86967701d12ca3f7815"


@pytest.mark.parametrize("n", [0, 1, 64, 5000])
def test_add_coder_parity_and_roundtrip(n: int) -> None:
    """The context-mixing add-stream coder: compiled and pure give the same bytes."""
    fast = compiled("_patch")
    rnd = random.Random(n)
    old = np.frombuffer(bytes(rnd.getrandbits(8) for _ in range(n)), dtype=np.uint8)
    diff = np.frombuffer(bytes(rnd.getrandbits(8) if rnd.random() < 0.05 else 0 for _ in range(n)),
                         dtype=np.uint8)
    enc = fast.AddCoder(True)
    enc.encode(diff, old)
    coded = bytes(enc.finish())
    ref = _patch_py.AddCoder(True)
    ref.encode(diff.tobytes(), old.tobytes())
    assert ref.finish() == coded
    out = np.empty(n, dtype=np.uint8)
    fast.AddCoder(False, coded).decode(old, out)
    assert out.tobytes() == diff.tobytes()
    # garbage in: garbage out of the right size, never a crash
    junk = np.empty(n, dtype=np.uint8)
    fast.AddCoder(False, b"\xff" * 7).decode(old, junk)


def test_gather_old_checks_ranges() -> None:
    fast = compiled("_patch")
    old = bytes(range(10))
    out = np.empty(6, dtype=np.uint8)
    assert fast.gather_old(old, np.array([3, 0, 2, 3, 0, 0], dtype=np.int64), out) == 0
    assert out.tobytes() == bytes([0, 1, 2, 5, 6, 7])
    assert fast.gather_old(old, np.array([6, 0, 100], dtype=np.int64), out) == -3
    assert fast.gather_old(old, np.array([3, 0, 8, 3, 0, 0], dtype=np.int64), out) == -3
    assert fast.gather_old(old, np.array([-1, 0, 0], dtype=np.int64), out) == -1
    assert _patch_py.gather_old(old, [3, 0, 2, 3, 0, 0], bytearray(6)) == 0


def _run_stream(runs: list[tuple[int, int]], values: bytes) -> bytes:
    """A run-coded add stream (docs/DELTA.md) of (start, length) runs."""
    from d4c.engine.delta import _encode_runs
    return _encode_runs(np.array([s for s, _ in runs], dtype=np.int64),
                        np.array([n for _, n in runs], dtype=np.int64), values)


def test_scatter_runs_parity_over_segments() -> None:
    fast = compiled("_patch")
    rng = random.Random(5)
    size, runs, at = 5000, [], 0
    while True:
        at += rng.randrange(0, 90)
        length = rng.randrange(1, 40)
        if at + length > size:
            break
        runs.append((at, length))
        at += length
    values = bytes(rng.randrange(1, 256) for _ in range(sum(n for _, n in runs)))
    stream = _run_stream(runs, values)
    expected = bytearray(size)
    for (start, length), offset in zip(runs, np.cumsum([0] + [n for _, n in runs])):
        expected[start:start + length] = values[offset:offset + length]
    # segments cut where no run is open, as the encoder does
    cuts = sorted({0, size} | {s for s, _ in rng.sample(runs, 12)})
    for module in (fast, _patch_py):
        state, got = (0, 0, 0), bytearray()
        for begin, end in zip(cuts, cuts[1:]):
            out = np.zeros(end - begin, dtype=np.uint8)
            state = module.scatter_runs(stream, len(runs), *state, begin, out)
            assert isinstance(state, tuple)
            got += out.tobytes()
        assert got == expected and state[0] == len(runs) and state[2] == len(values)
    # a cut inside a run: -2 from both
    start = next(s for s, n in runs if n > 1)
    for module in (fast, _patch_py):
        assert module.scatter_runs(stream, len(runs), 0, 0, 0, 0, np.zeros(start + 1, dtype=np.uint8)) == -2


def test_run_reader_refuses_what_does_not_add_up() -> None:
    from d4c.engine.delta import RunReader

    def fail(reason: str) -> None:
        raise ValueError(reason)

    stream = _run_stream([(2, 3), (10, 2)], b"abcde")
    reader = RunReader(stream, fail)
    assert reader.read(0, 8).tobytes() == b"\0\0abc\0\0\0"
    with pytest.raises(ValueError, match="outside the stream"):
        reader.finish()  # the run at 10 was never read
    assert RunReader(stream, fail).read(0, 12).tobytes()[10:] == b"de"
    with pytest.raises(ValueError, match="do not match the bytes"):
        RunReader(stream[:-1], fail).read(0, 12)  # values short by one
    with pytest.raises(ValueError, match="bad run count"):
        RunReader(b"\xff" * 8 + stream[8:], fail)
    with pytest.raises(ValueError, match="run outside the stream"):
        RunReader(_run_stream([(2, 0), (5, 1)], bytes(17)), fail).read(0, 8)  # an empty run
    long_reader = RunReader(stream + b"x", fail)
    long_reader.read(0, 12)
    with pytest.raises(ValueError, match="do not match the bytes"):
        long_reader.finish()  # a value byte left over


def _sa_inputs() -> list[bytes]:
    """Inputs that reach every SA-IS path: recursion (repeats), one-symbol runs,
    the extreme byte values, and plain noise."""
    return [b"", b"\x00", b"\xff", b"ab", b"ba", b"aaaa", b"\x00" * 50, b"\xff" * 33,
            b"mississippi", b"abracadabra" * 9, b"ab" * 40 + b"a", b"\x00\xff" * 20 + b"\x00",
            bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 2,
            b"".join(bytes([i % 3]) * (i % 7 + 1) for i in range(300)),
            lcg_bytes(3000, 7), bytes(b % 4 for b in lcg_bytes(2000, 11)),
            (lcg_bytes(97, 3) * 20)[:1500] + lcg_bytes(50, 5)]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_suffix_array_parity(dtype) -> None:  # type: ignore[no-untyped-def]
    """The SA-IS kernel against a plain sort of the suffixes (the order is unique)."""
    kernels = compiled("_patch")
    for text in _sa_inputs():
        want = np.empty(len(text) + 1, dtype=dtype)
        _patch_py.suffix_array(text, want)
        got = np.full(len(text) + 1, -7, dtype=dtype)
        assert kernels.suffix_array(text, got) == 0
        assert np.array_equal(got, want), text[:40]


def test_match_scan_parity() -> None:
    """The bsdiff-class scan against its reference: the same triples and streams, also where
    runs of failed searches make it step faster (new bytes between moved pieces), and the
    triples rebuild the new file."""
    kernels = compiled("_patch")
    rnd = random.Random(11)
    old = lcg_bytes(30_000, 5)
    pieces = [old[i:i + 3000] for i in range(0, 30_000, 3000)]
    rnd.shuffle(pieces)
    cases = [(old, b"".join(p + rnd.randbytes(rnd.randrange(0, 600)) for p in pieces)),
             (old, old[:10_000] + bytes(b ^ 1 for b in old[10_000:10_400]) + old[10_400:]),
             (old, rnd.randbytes(5000)), (b"", b"abc"), (old, b"")]
    for a, b in cases:
        sa = np.empty(len(a) + 1, dtype=np.int32)
        assert kernels.suffix_array(a, sa) == 0
        got_d, got_e = np.zeros(len(b), np.uint8), np.zeros(len(b), np.uint8)
        want_d, want_e = bytearray(len(b)), bytearray(len(b))
        got = kernels.diff(a, b, sa, got_d, got_e)
        want = _patch_py.diff(a, b, sa, want_d, want_e)
        assert got == want
        ctrl, nd, ne = got
        out = np.zeros(len(b), np.uint8)
        assert kernels.apply(a, np.frombuffer(ctrl, "<i8"), got_d[:nd], got_e[:ne], out) == 0
        assert out.tobytes() == b


def _tree_table() -> bytes:
    """Every entry type, xattrs, a pre-1970 mtime, the largest ids and sizes."""
    from d4c.image.format import encode_tree
    from d4c.image.tree import Entry, EntryType as T
    digest = hashlib.sha256(b"x").digest()
    entries = [Entry(b"", T.DIR, mode=0o755),
               Entry(b"a", T.FILE, mode=0o4755, uid=2**32 - 1, gid=7, mtime_ns=-5, size=(1 << 63) - 1,
                     digest=digest, xattrs={b"security.capability": b"\x01" * 20, b"user.z": b""}),
               Entry(b"a.link", T.HARDLINK, link=1),
               Entry(b"dev", T.DIR, mtime_ns=1_700_000_000_123_456_789),
               Entry(b"dev/null", T.CHARDEV, mode=0o666, rdev=(1, 3)),
               Entry(b"dev/sda", T.BLOCKDEV, rdev=(2**32 - 1, 0)),
               Entry(b"dev/zz", T.FIFO),
               Entry(b"etc", T.DIR),
               Entry(b"etc/..hidden", T.FILE, size=3, digest=digest),
               Entry(b"etc/l", T.SYMLINK, mode=0o777, target=b"../a" * 100)]
    return encode_tree(entries)


def _scan(module, table: bytes):  # type: ignore[no-untyped-def]
    from d4c.codec import Cursor
    from d4c.image.tree import MAX_NAME, MAX_PATH, MAX_SYMLINK, MAX_XATTR_NAME, MAX_XATTR_VALUE
    cur = Cursor(table, lambda reason: None)
    count = cur.uvarint()
    rows, end, err, at, value = module.scan_tree(table, cur.pos, min(count, len(table)), MAX_PATH, MAX_NAME,
                                                  MAX_XATTR_NAME, MAX_XATTR_VALUE, MAX_SYMLINK)
    return rows.tolist(), end, err, at, value


def test_tree_scan_parity() -> None:
    """Same rows and the same first error for a valid table and 3,000 damaged ones
    (flipped bytes, truncations, huge varints)."""
    from d4c import _tables_py
    fast = compiled("_tables")
    table = _tree_table()
    good = _scan(fast, table)
    assert good == _scan(_tables_py, table) and good[2] == 0 and good[1] == len(table)
    rng = random.Random(5)
    errors = set()
    for trial in range(3000):
        bad = bytearray(table)
        if trial % 3 == 0:
            bad = bad[:rng.randrange(1, len(bad))]
        elif trial % 3 == 1:
            bad[rng.randrange(1, len(bad))] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        else:
            at = rng.randrange(1, len(bad))
            bad[at:at] = b"\xff" * rng.randrange(1, 11) + bytes([rng.randrange(3)])
        result = _scan(fast, bytes(bad))
        assert result == _scan(_tables_py, bytes(bad)), trial
        errors.add(result[2])
    assert len(errors) >= 8, errors  # the damage reached most checks, not one
