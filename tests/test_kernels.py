"""The Cython kernels: parity with the pure-Python references, pinned chunk points."""

from __future__ import annotations

import hashlib
import importlib
import os
import random

import numpy as np
import pytest

from d4c import _chunker_py, _patch_py, accel, chunker


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
