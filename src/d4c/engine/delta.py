"""Single-file binary deltas: the container format and the public API.

Methods (the diff picks; the patch follows what the delta says):
  SA     suffix-array match scan (bsdiff class): copy+add / insert streams,
         split into segments, each stream column-coded and zstd-compressed.
  PREFIX zstd with the old file as a raw-content prefix ("--patch-from"): the
         fast mode, and a candidate when it happens to be smaller.
  WHOLE  the new file compressed alone, for when the old one does not help.
  RECOMPRESS  for gzip, zip and xz files: one of the above between the files'
         contents, and how to recompress the new content bit-exactly
         (recompress.py).

Large files are cut into segments at content-defined boundaries; each segment
is diffed against a window of the old file centred where its chunks occur in
the old file.  Segment boundaries depend on the sizes and the memory limit only,
never on the thread count, so any number of threads gives the same bytes.
Layout: docs/DELTA.md.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import mmap
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import zstandard

from .. import accel
from . import DEFAULT_LEVEL, DEFAULT_LINK_MBIT, DEFAULT_MEMORY_LIMIT, recompress
from .chunker import cut_points
from ..codec import Cursor, Encoder
from ..errors import CorruptDelta, D4CError, WrongSource
from ..fsutil import atomic_output, open_input
from ..progress import Progress
from ..zstdframes import MAX_WINDOW_LOG, read_bounded
from ..digests import sha256

MAGIC = b"D4C-DLTA"
VERSION = 1
VERSION_RECOMPRESS = 2  # a delta file of method 4 is version 2: a version-1 reader refuses it by its version
VERSION_COMPACT = 3     # method 5: a version-1 or -2 reader refuses it by its version
READ_VERSIONS = (VERSION, VERSION_RECOMPRESS, VERSION_COMPACT)
METHOD_SA, METHOD_PREFIX, METHOD_WHOLE, METHOD_RECOMPRESS, METHOD_SA_COMPACT = 1, 2, 3, 4, 5
METHOD_NAMES = {METHOD_SA: "sa", METHOD_PREFIX: "prefix", METHOD_WHOLE: "whole", METHOD_RECOMPRESS: "recompress",
                METHOD_SA_COMPACT: "sa-compact"}
VERSION_OF_METHOD = {METHOD_SA: VERSION, METHOD_PREFIX: VERSION, METHOD_WHOLE: VERSION,
                     METHOD_RECOMPRESS: VERSION_RECOMPRESS, METHOD_SA_COMPACT: VERSION_COMPACT}
RECOMPRESS_GOOD = 4  # a recompress delta under 1/4 of the new file: the byte-level methods are not tried
PREAMBLE = struct.Struct("<8sHBBIQQ32s32s")  # 96 bytes

FAST_LEVEL = 6
SEGMENT_TARGET = 8 << 20           # files above this are diffed in segments (parallel)
MIN_SEGMENT = 256 << 10
MAX_SEGMENT = SEGMENT_TARGET + (1 << 20)  # what plan_segments can produce, with slack


def max_triples(new_len: int) -> int:
    """At most this many controls per segment: bounds patch memory, and the
    diff falls back to another method rather than exceed it."""
    return new_len // 4 + 16
SA_BYTES_PER_OLD = 6               # suffix array (4) + types (1) + the old bytes (1)
NEW_BYTES_PER_NEW = 3              # new + diff/extra pages touched + output
INT32_LIMIT = (1 << 31) - 2
DIFF_RAW, DIFF_SPARSE, DIFF_CM = 0, 1, 2  # how the add stream is coded
CM_MIN_CHANGES = 1024             # fewer changed bytes: the context-mixing coder is not worth its time
# The coder costs the patcher ~30 ns per binary decision (measured: 20-33 ns on the corpus' binaries,
# 2-core VM); it is used only where the bytes it saves take longer than that to cross a link of
# `link_mbit` (0: the smallest delta, whatever its decode time).  Constants, so output never depends
# on the machine.  The default is the 3G-class link of the thin-link bench.
CM_DECODE_NS = 30
# SA_COMPACT (method 5): the controls and the runs' gaps and lengths as uvarints, for deltas of
# few changes, where byte planes of u64 cost more than they save (git's helper programs: the
# controls 48 -> 26 bytes, the runs 152 -> 134).  Decoded in Python: at most this many values,
# at COMPACT_DECODE_NS each (measured 250-480 ns), weighed against the bytes saved on the link
COMPACT_MAX_VALUES = 4096
COMPACT_MAX_STREAM = 64 << 10
COMPACT_DECODE_NS = 400
CM_GAIN_BOUND = 0.4  # of zstd -3's run-coded stream: the coder saved 20-36 % of it on the corpus' binaries
SMALL_FILE = 256 << 10            # at most this size the zstd prefix delta is tried too
SMALL_FILE_LEVEL = 19
ALIGNED_MAX_CHANGE = 1000         # same-size files with < 1/1000 bytes changed skip the scan
CLUSTER_GAP = 32                  # aligned changes closer than this are one cluster
CLUSTER_MIN = 24                  # a cluster with fewer changed bytes is left as add bytes
CLUSTER_MARGIN = 2048             # old bytes on each side of a cluster its local scan may match


@dataclass(frozen=True)
class Segment:
    old_start: int
    old_len: int
    new_len: int
    hint: int = -1      # where in the old window this segment's content probably starts


@dataclass
class DeltaInfo:
    method: int
    old_size: int
    new_size: int
    old_digest: bytes
    new_digest: bytes

    @property
    def method_name(self) -> str:
        return METHOD_NAMES.get(self.method, str(self.method))


# ---------------------------------------------------------------- diff

def _zstd(level: int, size: int) -> zstandard.ZstdCompressor:
    window = max(10, min(27, (max(size, 1) - 1).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=size, window_log=window, write_content_size=True, write_checksum=False,
        threads=0)
    return zstandard.ZstdCompressor(compression_params=params)


def _compress(data: bytes | memoryview, level: int) -> bytes:
    return _zstd(level, len(data)).compress(data)


def _compress_sparse(data: bytes | memoryview, level: int) -> bytes:
    """zstd for a run-coded add stream, with tables for its short-range repeats (3 MiB, not 49)."""
    size = len(data)
    p = zstandard.ZstdCompressionParameters.from_level(level, source_size=size, write_content_size=True)
    logs = min(SPARSE_ZSTD_TABLES, max(10, (max(size, 1) - 1).bit_length()))
    params = zstandard.ZstdCompressionParameters(
        window_log=min(p.window_log, logs), chain_log=min(p.chain_log, logs), hash_log=min(p.hash_log, logs),
        search_log=p.search_log, min_match=p.min_match, target_length=p.target_length, strategy=p.strategy,
        write_content_size=True, write_checksum=False, threads=0)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


# Each stream is compressed by whichever codec makes it smallest.  Measured on
# Debian binaries: bzip2's BWT beats zstd -19 by ~20% on bsdiff-style add
# streams (git: 67 KB vs 85 KB), lzma wins on run-coded ones; all are stdlib.
CODEC_ZSTD, CODEC_BZ2, CODEC_LZMA, CODEC_STORED = 0, 1, 2, 3
LZMA_MEMLIMIT = 256 << 20


def _lzma_filters(size: int, largest: int = 1 << 26, preset: int = 6,
                  bytewise: bool = False) -> list[dict[str, int]]:
    """bytewise: no position bits and one literal context bit, for run-coded add
    streams, whose fields are not 4-byte aligned (1-4 % smaller on the corpus, same time)."""
    dict_size = max(1 << 12, min(largest, 1 << max(size - 1, 1).bit_length()))
    extra = {"lc": 1, "pb": 0} if bytewise else {}
    if bytewise and preset >= 4:
        # bt3 instead of bt4 (presets 4-9): 12 % less time on the corpus' add streams (24 % on
        # libcrypto's), 0.06 % more bytes; the fast presets' hash chains stay
        extra["mf"] = lzma.MF_BT3
    return [{"id": lzma.FILTER_LZMA1, "preset": preset, "dict_size": dict_size, **extra}]


def _lzma(data: bytes | memoryview, largest: int = 1 << 26, preset: int = 6, bytewise: bool = False,
          nice_len: int | None = None) -> bytes:
    filters = _lzma_filters(len(data), largest, preset, bytewise)
    if nice_len is not None:
        filters[0]["nice_len"] = nice_len
    return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=filters)


# run-coded add streams: gaps, lengths and values repeat at short range; measured on the corpus'
# binaries, a 256 KiB lzma window gives the bytes of a 4 MiB one (libcrypto's delta: 203534 vs
# 203525) with a tenth of the memory (diff peak 75 MiB, not 81-118), and zstd -19 is within 2-6 % of
# lzma (zstd -15: 7-17 %) at the same compression time, decoding 10-20x faster; zstd -17 is within
# 0.05-3 % of -18 (-18: 0.1-0.4 % of -19) in two thirds of its time
SPARSE_DICT = 1 << 18
SPARSE_ZSTD_LEVEL = 17
SPARSE_ZSTD_TABLES = 18  # window, hash and chain logs: level 19's own are 22-23 (33-49 MiB) for the same bytes
# what decoding costs the patcher, in ns per byte of the stream it gives (measured on the corpus'
# add streams, 2-core VM: zstd 0.2-0.3, lzma 1.6-3.9, bzip2 4.3-7.6): with the link rate, the
# add stream's coding is the one that makes a device's update quickest (bytes on the link + decode)
DECODE_NS = {CODEC_ZSTD: 0.5, CODEC_LZMA: 3.5, CODEC_BZ2: 6.5, CODEC_STORED: 0.0}


def _pack_stream(data: bytes, level: int, kind: str = "small", threads: int = 1) -> tuple[int, bytes]:
    """The smallest of _pack_candidates."""
    return min(_pack_candidates(data, level, kind, threads), key=lambda o: (len(o[1]), o[0]))


def _bzip2(data: bytes | memoryview) -> bytes:
    """bzip2 -9's blocks in the smallest block size that holds `data` in one block: the same
    bytes but the header's size digit, a ninth of the memory for a small stream (-9 takes
    7.6 MiB to compress, the peak of a 5 MB binary's diff).  A block holds 100 kB per level,
    less 19 bytes, after the run-length pass, which may grow the data by a quarter."""
    return bz2.compress(data, min(9, len(data) * 5 // 4 // 100_000 + 1))


def _pack_candidates(data: bytes, level: int, kind: str = "small", threads: int = 1,
                     with_bz2: bool = True) -> list[tuple[int, bytes]]:
    """(codec, frame) of each codec likely to win for this kind of stream.

    kind: "raw" (the plain add stream: mostly zeros, bzip2 wins, lzma -9e and
    zstd -19 are slow on it), "sparse" (run-coded add stream: lzma or zstd -19 win),
    "small" (controls, inserts: try everything), "fast" (zstd at `level` only).
    """
    jobs: list[tuple[int, object]] = []
    if kind == "fast":
        jobs = [(CODEC_ZSTD, lambda: _compress(data, level))]
    elif kind == "raw":
        jobs = [(CODEC_BZ2, lambda: _bzip2(data))] if with_bz2 else []
        jobs.append((CODEC_ZSTD, lambda: _compress(data, 3)))
    else:
        sparse = kind == "sparse"
        jobs = [(CODEC_ZSTD, (lambda: _compress_sparse(data, max(level, SPARSE_ZSTD_LEVEL))) if sparse
                 else (lambda: _compress(data, level)))]
        if len(data) >= 64:
            largest = SPARSE_DICT if sparse else 1 << 26
            jobs.append((CODEC_LZMA, lambda: _lzma(data, largest, bytewise=sparse)))
            if kind == "small":
                jobs.append((CODEC_BZ2, lambda: _bzip2(data)))
    if len(data) < 64 or kind == "small":
        # tiny, or incompressible controls and inserts (a changed build id, shifted code): a
        # frame's header costs more than it saves (git's helpers' 129 inserted bytes: 138 as zstd)
        jobs.append((CODEC_STORED, lambda: bytes(data)))
    if threads > 1 and len(data) > (256 << 10):
        with ThreadPoolExecutor(max_workers=min(threads, len(jobs))) as pool:
            results = list(pool.map(lambda job: (job[0], job[1]()), jobs))  # type: ignore[operator]
    else:
        results = [(codec, fn()) for codec, fn in jobs]  # type: ignore[operator]
    return results


# lzma -6 of a run-coded add stream came out 0.894-0.912 x lzma -1's (five corpus binaries) at
# 4-5 x its time: where lzma's slower decoding is not paid for by the bytes -1 lets expect,
# -6 is not run (the probe costs a fifth of it).  Near the break-even either choice costs a
# device alike, so -6 is run only where the expected gain is a quarter above the decoding it
# costs: git's and libsystemd-core's streams (1.03-1.04 x) take zstd, and their diffs skip
# 54-80 ms of lzma
LZMA_PROBE_MIN = 256 << 10
LZMA_PROBE_RATIO = 0.905
LZMA_PROBE_MARGIN = 1.25
# -6's match finder stops at 32-byte matches (its default 64): libcrypto's stream 197 -> 154 ms,
# +1 % bytes (184061 -> 185846); run-coded streams have few long matches worth extending
SPARSE_LZMA_NICE_LEN = 32


def _sparse_candidates(data: bytes, level: int, threads: int, link_mbit: float) -> list[tuple[int, bytes]]:
    """(codec, frame) for the run-coded add stream: zstd, and lzma where it may win."""
    if link_mbit <= 0 or len(data) < LZMA_PROBE_MIN:
        return _pack_candidates(data, level, "sparse", threads)  # bytes are all that count, or it is cheap
    jobs = [lambda: _compress_sparse(data, max(level, SPARSE_ZSTD_LEVEL)),
            lambda: _lzma(data, SPARSE_DICT, preset=1, bytewise=True)]
    if threads > 1:
        with ThreadPoolExecutor(max_workers=2) as pool:
            zstd_frame, probe = pool.map(lambda job: job(), jobs)
    else:
        zstd_frame, probe = (job() for job in jobs)
    out = [(CODEC_ZSTD, zstd_frame), (CODEC_LZMA, probe)]
    bytes_per_second = link_mbit * 1e6 / 8
    slower = (DECODE_NS[CODEC_LZMA] - DECODE_NS[CODEC_ZSTD]) * len(data) * 1e-9
    if (len(zstd_frame) - LZMA_PROBE_RATIO * len(probe)) / bytes_per_second > LZMA_PROBE_MARGIN * slower:
        out.append((CODEC_LZMA, _lzma(data, SPARSE_DICT, bytewise=True, nice_len=SPARSE_LZMA_NICE_LEN)))
    return out


def _unpack_stream(codec: int, frame: bytes | memoryview, usize: int, source: str, what: str) -> bytes:
    """A whole stream at once (the small ones); _StreamReader does the checks."""
    reader = _StreamReader(codec, frame, usize, source, what)
    data = reader.read(usize)
    reader.finish()
    return data


def plan_segments(old: bytes | memoryview, new: bytes | memoryview, memory_limit: int,
                  threads: int = 1) -> list[Segment]:
    """Cut new into segments and give each a window of old to diff against."""
    old_size, new_size = len(old), len(new)
    whole_cost = SA_BYTES_PER_OLD * old_size + NEW_BYTES_PER_NEW * new_size
    if new_size <= SEGMENT_TARGET and whole_cost <= memory_limit and old_size <= INT32_LIMIT:
        return [Segment(0, old_size, new_size, 0)]
    # segment size: at most SEGMENT_TARGET, and small enough that one segment
    # with its old window (segment + 2 margins, margin = segment) fits the limit
    seg = SEGMENT_TARGET
    while seg > MIN_SEGMENT and SA_BYTES_PER_OLD * _window(seg) + NEW_BYTES_PER_NEW * seg > memory_limit:
        seg //= 2
    count = max(1, -(-new_size // seg))
    bounds = _aligned_bounds(new, count)
    offsets = _chunk_offsets(old, new, bounds, threads)
    segments = []
    start = 0
    for end, offset in zip(bounds, offsets):
        length = end - start
        margin = _margin(length)
        lo = max(0, min(old_size, start + offset - margin))
        hi = max(lo, min(old_size, end + offset + margin))
        segments.append(Segment(lo, hi - lo, length, start + offset - lo))
        start = end
    return segments


def _margin(length: int) -> int:
    """Old bytes on each side of a segment's aligned place (the window is centred
    by chunk matching, so the margin only absorbs shifts inside the segment).
    Measured on git's 44 MB data.tar, 2 threads: margin = segment -> 81,243 bytes
    in 8.7 s; segment/4 -> 81,235 in 3.5 s; segment/16 (at least 256 KiB) ->
    81,186 in 2.5 s."""
    return max(length // 16, 1 << 18)


def _window(length: int) -> int:
    return length + 2 * _margin(length)


def _aligned_bounds(new: bytes | memoryview, count: int) -> list[int]:
    """Segment ends near equal sizes, moved to the next content-defined cut."""
    n = len(new)
    if count <= 1:
        return [n]
    bounds = []
    for k in range(1, count):
        target = n * k // count
        window = memoryview(new)[target:min(n, target + (1 << 20))]
        cuts = cut_points(window, 4096, 16384, 65536, final=False)
        bounds.append(target + (int(cuts[0]) if len(cuts) else 0))
    bounds.append(n)
    return sorted(set(b for b in bounds if 0 < b <= n))


def _chunk_offsets(old: bytes | memoryview, new: bytes | memoryview, bounds: list[int],
                   threads: int = 1) -> list[int]:
    """For each segment of new, where its content sits in old (median shift of shared chunks)."""
    def chunks(data: bytes | memoryview) -> list[tuple[int, bytes]]:
        out = []
        start = 0
        view = memoryview(data)
        for end in cut_points(view, 2048, 8192, 65536):
            end = int(end)
            out.append((start, hashlib.blake2b(view[start:end], digest_size=16).digest()))
            start = end
        return out
    if threads > 1:  # both the chunker and blake2b release the GIL
        with ThreadPoolExecutor(max_workers=2) as pool:
            old_chunks, new_chunks = pool.map(chunks, (old, new))
    else:
        old_chunks, new_chunks = chunks(old), chunks(new)
    # only chunks that occur once in old say where things are (runs of zeros do not)
    where: dict[bytes, int] = {}
    for pos, digest in old_chunks:
        where[digest] = -1 if digest in where else pos
    shifts: list[list[int]] = [[] for _ in bounds]
    seg = 0
    for pos, digest in new_chunks:
        while seg < len(bounds) - 1 and pos >= bounds[seg]:
            seg += 1
        if where.get(digest, -1) >= 0:
            shifts[seg].append(where[digest] - pos)
    ratio = len(old) / max(len(new), 1)
    out = []
    start = 0
    for end, s in zip(bounds, shifts):
        out.append(int(np.median(s)) if s else int(start * ratio) - start)
        start = end
    return out


@dataclass
class SegmentDiff:
    ctrl: bytes            # int64 triples
    nd: int                # length of the add (diff) stream
    extra: bytes           # inserted bytes
    starts: np.ndarray     # runs of non-zero diff bytes: starts relative to this segment's diff
    lengths: np.ndarray
    values: bytes
    raw: bytes | None      # the plain diff stream, kept only while it may still win


def _diff_segment(old: memoryview, new: memoryview, hint: int, keep_raw: bool) -> SegmentDiff:
    """One segment: a single copy when it is unchanged at the hinted place, else an SA scan."""
    if new and 0 <= hint and hint + len(new) <= len(old) and old[hint:hint + len(new)] == new:
        ctrl = np.array([0, 0, hint, len(new), 0, 0], dtype="<i8").tobytes()
        empty = np.empty(0, dtype=np.int64)
        return SegmentDiff(ctrl, len(new), b"", empty, empty, b"", bytes(len(new)) if keep_raw else None)
    if len(old) == len(new) and new:
        # same size: often the same layout with a few bytes changed (a rebuilt
        # binary with a new version string); then one copy says it all, no suffix sort
        d = (np.frombuffer(new, dtype=np.uint8) - np.frombuffer(old, dtype=np.uint8)).astype(np.uint8)
        if np.count_nonzero(d) * ALIGNED_MAX_CHANGE < len(d):
            ctrl, d, extra = _realigned(old, new, d)
            starts, lengths = _runs(d)
            return SegmentDiff(ctrl, len(d), extra, starts, lengths, d[np.flatnonzero(d)].tobytes(),
                               d.tobytes() if keep_raw else None)
    kernels = accel.patch
    dtype = np.int32 if len(old) <= INT32_LIMIT else np.int64
    sa = np.empty(len(old) + 1, dtype=dtype)
    if kernels.suffix_array(old, sa) != 0:
        raise MemoryError("suffix array")
    diff_buf = np.empty(len(new), dtype=np.uint8)
    extra_buf = np.empty(len(new), dtype=np.uint8)
    result = kernels.diff(old, new, sa, diff_buf, extra_buf)
    del sa
    if result is None:
        raise MemoryError("match scan")
    ctrl, nd, ne = result
    d = diff_buf[:nd]
    starts, lengths = _runs(d)
    values = d[np.flatnonzero(d)].tobytes()
    return SegmentDiff(ctrl, nd, extra_buf[:ne].tobytes(), starts, lengths, values,
                       d.tobytes() if keep_raw else None)


def _local_scan(old: memoryview, new: memoryview) -> tuple[np.ndarray, np.ndarray, bytes]:
    """The SA scan of a small window: (triples as an (n, 3) array, add bytes, inserts)."""
    kernels = accel.patch
    sa = np.empty(len(old) + 1, dtype=np.int32)
    diff_buf = np.empty(len(new), dtype=np.uint8)
    extra_buf = np.empty(len(new), dtype=np.uint8)
    if kernels.suffix_array(old, sa) != 0 or (result := kernels.diff(old, new, sa, diff_buf, extra_buf)) is None:
        raise MemoryError("local match scan")
    ctrl, nd, ne = result
    return np.frombuffer(ctrl, dtype="<i8").reshape(-1, 3).copy(), diff_buf[:nd], extra_buf[:ne].tobytes()


def _scan_cost(adds: np.ndarray, inserts: int, triples: int) -> int:
    """Roughly what a stretch costs in the compressed streams (changed and
    inserted bytes are near incompressible, a triple a few bytes)."""
    return int(np.count_nonzero(adds)) + inserts + 4 * triples


def _realigned(old: memoryview, new: memoryview, d: np.ndarray) -> tuple[bytes, np.ndarray, bytes]:
    """Same-size files with few changes as one aligned copy, except where the
    changes cluster: a function that grew by a few bytes shifts the code after
    it, and aligned add bytes would spell out every shifted byte.  Each dense
    cluster gets a local SA scan against the old bytes around it, kept where it
    is cheaper.  Returns (int64 triples, add bytes, inserts)."""
    nz = np.flatnonzero(d)
    triples: list[tuple[int, int, int]] = []
    adds: list[np.ndarray] = []
    inserts: list[bytes] = []
    done = 0  # new (and old: aligned) position up to which everything is described
    if len(nz):
        breaks = np.flatnonzero(np.diff(nz) > CLUSTER_GAP) + 1
        for first, last in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(nz)]])):
            if last - first < CLUSTER_MIN:
                continue
            a = max(done, int(nz[first]) - CLUSTER_GAP)
            b = min(len(new), int(nz[last - 1]) + 1 + CLUSTER_GAP)
            lo, hi = max(0, a - CLUSTER_MARGIN), min(len(old), b + CLUSTER_MARGIN)
            local, local_adds, local_inserts = _local_scan(old[lo:hi], new[a:b])
            if _scan_cost(local_adds, len(local_inserts), len(local)) >= _scan_cost(d[a:b], 0, 1):
                continue
            triples.append((a - done, 0, lo - a))  # the aligned copy up to the cluster, then to the window
            adds.append(d[done:a])
            end = lo + int(local[:, 0].sum() + local[:, 2].sum())  # where the local scan leaves the old position
            local[-1, 2] += b - end  # back into alignment after the cluster
            triples.extend(map(tuple, local.tolist()))
            adds.append(local_adds)
            inserts.append(local_inserts)
            done = b
    triples.append((len(new) - done, 0, 0))
    adds.append(d[done:])
    return (np.array(triples, dtype="<i8").tobytes(), np.concatenate(adds).astype(np.uint8), b"".join(inserts))


def _runs(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of non-zero bytes."""
    nz = np.flatnonzero(d)
    if len(nz) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(nz) != 1) + 1
    starts = nz[np.concatenate([[0], breaks])].astype(np.int64)
    ends = nz[np.concatenate([breaks - 1, [len(nz) - 1]])].astype(np.int64) + 1
    return starts, ends - starts


def _planes(values: np.ndarray) -> bytes:
    """uint64 values as 8 byte planes (all low bytes, then the next, ...):
    high planes are mostly zero and compress to almost nothing."""
    return np.ascontiguousarray(values.astype("<u8").view(np.uint8).reshape(-1, 8).T).tobytes()


def _unplanes(data: bytes | memoryview, count: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8, count=8 * count).reshape(8, count)
    return np.ascontiguousarray(planes.T).view("<u8").reshape(count)


def _zigzag(v: np.ndarray) -> np.ndarray:
    return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return ((z >> np.uint64(1)).astype(np.int64)) ^ -((z & np.uint64(1)).astype(np.int64))


def _encode_controls(triples: np.ndarray) -> bytes:
    """Column-coded: all copy lengths, all insert lengths, all seeks (zig-zag), as byte planes."""
    t = triples.reshape(-1, 3)
    return _planes(t[:, 0]) + _planes(t[:, 1]) + _planes(_zigzag(t[:, 2]))


def _decode_controls(data: bytes, ntriples: int, fail) -> np.ndarray:  # type: ignore[no-untyped-def]
    if len(data) != 24 * ntriples:
        fail("control stream has the wrong size")
    view = memoryview(data)
    n8 = 8 * ntriples
    out = np.empty((ntriples, 3), dtype=np.int64)
    out[:, 0] = _unplanes(view[:n8], ntriples).astype(np.int64)
    out[:, 1] = _unplanes(view[n8:2 * n8], ntriples).astype(np.int64)
    out[:, 2] = _unzigzag(_unplanes(view[2 * n8:], ntriples))
    if ntriples and (out[:, :2].min() < 0):
        fail("negative length in the control stream")
    return out.reshape(-1)


def _decode_compact_controls(data: bytes, ntriples: int, fail) -> np.ndarray:  # type: ignore[no-untyped-def]
    """SA_COMPACT's controls: per triple, copy and insert length (uvarints) and seek (svarint)."""
    cur = Cursor(data, fail)
    values = []
    for _ in range(ntriples):
        values += (cur.uvarint(), cur.uvarint(), cur.svarint())
    if cur.remaining():
        fail("control stream has the wrong size")
    return np.array(values, dtype=np.int64)


def _planar_runs(data: bytes, max_runs: int, fail) -> bytes:  # type: ignore[no-untyped-def]
    """SA_COMPACT's run-coded add stream (count, then gap and length per run as uvarints,
    then the bytes) in the layout RunReader reads."""
    cur = Cursor(data, fail)
    count = cur.uvarint()
    if 2 * count > max_runs:
        fail("sparse diff stream: bad run count")
    fields = [cur.uvarint() for _ in range(2 * count)]
    gaps = np.array(fields[0::2], dtype=np.int64)
    lengths = np.array(fields[1::2], dtype=np.int64)
    return struct.pack("<Q", count) + _planes(gaps) + _planes(lengths) + bytes(data[cur.pos:])


def _encode_runs(starts: np.ndarray, lengths: np.ndarray, values: bytes) -> bytes:
    """The add stream as runs of non-zero bytes: run count, gaps and lengths
    (byte planes), then the bytes.  Most diff bytes are zero, so this is much
    smaller than the stream itself, before and after compression."""
    return struct.pack("<Q", len(starts)) + _planes(_run_gaps(starts, lengths)) + _planes(lengths) + values


def _run_gaps(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Zero bytes before each run: from the end of the previous one (from 0 for the first)."""
    return starts - np.concatenate([[0], (starts + lengths)[:-1]]).astype(np.int64)


class RunReader:
    """A run-coded add stream read one segment at a time (accel.patch.scatter_runs):
    every run must lie inside one segment, and the runs and their bytes must be used
    up exactly by the end."""

    def __init__(self, blob: bytes, fail) -> None:  # type: ignore[no-untyped-def]
        if len(blob) < 8:
            fail("sparse diff stream truncated")
        (self.count,) = struct.unpack_from("<Q", blob)
        if self.count > (len(blob) - 8) // 17:
            fail("sparse diff stream: bad run count")
        self.blob, self.fail = blob, fail
        self.nvalues = len(blob) - 8 - 16 * self.count
        self.run = self.pos = self.value = 0

    def read(self, begin: int, length: int) -> np.ndarray:
        """The add stream bytes [begin, begin+length), the next segment's."""
        out = np.zeros(length, dtype=np.uint8)
        state = accel.patch.scatter_runs(self.blob, self.count, self.run, self.pos, self.value, begin, out)
        if isinstance(state, int):
            self.fail({-1: "sparse diff stream: run outside the stream", -2: "sparse diff stream: a run "
                       "crosses a segment"}.get(state, "sparse diff stream: runs do not match the bytes"))
        self.run, self.pos, self.value = state
        return out

    def finish(self) -> None:
        if self.run != self.count:
            self.fail("sparse diff stream: run outside the stream")
        if self.value != self.nvalues:
            self.fail("sparse diff stream: runs do not match the bytes")


_mmap_threshold_fixed = False


def _fix_mmap_threshold() -> None:
    """A diff allocates and frees buffers of megabytes (suffix arrays, streams, codec
    state).  glibc raises its mmap threshold to the size of each mapped block freed, so
    later ones stay in the heap and the peak grows (libcrypto's diff: 80 MiB, 75 with the
    threshold fixed at glibc's default, at the same speed).  Elsewhere (llfs' frame
    buffers) the heap's reuse is kept: only a process that diffs fixes it."""
    global _mmap_threshold_fixed
    if _mmap_threshold_fixed:
        return
    _mmap_threshold_fixed = True
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, ImportError):
        return  # not glibc: nothing to fix
    mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, its default value; setting it stops the raising


def diff_payload(old: bytes | memoryview, new: bytes | memoryview, *, level: int = DEFAULT_LEVEL,
                 threads: int = 1, memory_limit: int = DEFAULT_MEMORY_LIMIT, fast: bool = False,
                 expand: bool = True, link_mbit: float = DEFAULT_LINK_MBIT, compact: bool = True) -> tuple[int, bytes]:
    """(method, payload) of the smallest delta that turns old into new: what an
    image stores (its tree holds the sizes and digests a delta file's preamble
    carries).  `fast` uses zstd's prefix mode only; `expand` tries the contents
    of compressed files (RECOMPRESS); `link_mbit` weighs bytes against decode
    time (CM_DECODE_NS); `compact` allows SA_COMPACT (not inside RECOMPRESS)."""
    accel.kernel("_patch")
    _fix_mmap_threshold()
    old, new = memoryview(old).cast("B"), memoryview(new).cast("B")
    if not 1 <= level <= 22:
        raise D4CError(f"compression level {level} out of range 1..22")
    if fast:
        return METHOD_PREFIX, _prefix_payload(old, new, min(level, FAST_LEVEL) if level == DEFAULT_LEVEL else level)
    if link_mbit < 0:
        raise D4CError(f"link rate {link_mbit} Mbit/s is negative")
    options = dict(level=level, threads=threads, memory_limit=memory_limit, link_mbit=link_mbit)
    inside = _recompress_payload(old, new, options) if expand and recompress.looks_compressed(new) else None
    if inside is not None and len(inside) * RECOMPRESS_GOOD < len(new):
        return METHOD_RECOMPRESS, inside
    sa = _sa_payload(old, new, level, threads, memory_limit, link_mbit, compact=compact)
    candidates = [sa] if sa is not None else []
    if inside is not None:
        candidates.append((METHOD_RECOMPRESS, inside))
    # the scan found little (e.g. a re-compressed .gz): zstd's own matching with
    # the old file as prefix, or the new file alone, may be smaller
    poor = not candidates or PREAMBLE.size + len(candidates[0][1]) > len(new) // 4
    if poor:
        candidates.append((METHOD_WHOLE, _compress(new, level)))
    if len(old) and (poor or len(new) <= SMALL_FILE) and 6 * len(old) + 3 * len(new) <= memory_limit:
        # small files: the suffix-array delta's fixed cost (segment table, three
        # streams) is most of its size, one zstd frame against the old file is
        # often smaller (measured: dpkg status 126 -> 62 bytes); cheap at this size
        prefix_level = max(level, SMALL_FILE_LEVEL) if len(new) <= SMALL_FILE else level
        candidates.append((METHOD_PREFIX, _prefix_payload(old, new, prefix_level)))
    return min(candidates, key=lambda c: len(c[1]))


def diff(old: bytes | memoryview, new: bytes | memoryview, *, level: int = DEFAULT_LEVEL,
         threads: int = 1, memory_limit: int = DEFAULT_MEMORY_LIMIT, fast: bool = False,
         link_mbit: float = DEFAULT_LINK_MBIT) -> bytes:
    """A delta file that turns old into new: diff_payload behind a preamble with
    both sizes and digests, so the file checks its source and its result alone."""
    old, new = memoryview(old).cast("B"), memoryview(new).cast("B")
    options = dict(level=level, threads=threads, memory_limit=memory_limit, fast=fast, link_mbit=link_mbit)
    if threads > 1 and len(old) + len(new) >= SEGMENT_TARGET:
        # the digests are serial work: hash on the side while the segments are scanned
        with ThreadPoolExecutor(max_workers=1) as pool:
            digests = pool.submit(lambda: (sha256(old).digest(), sha256(new).digest()))
            method, payload = diff_payload(old, new, **options)  # type: ignore[arg-type]
            old_digest, new_digest = digests.result()
    else:
        method, payload = diff_payload(old, new, **options)  # type: ignore[arg-type]
        old_digest, new_digest = sha256(old).digest(), sha256(new).digest()
    return _preamble(method, len(old), len(new), old_digest, new_digest) + payload


def _preamble(method: int, old_size: int, new_size: int, old_digest: bytes, new_digest: bytes) -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION_OF_METHOD[method], method, 0, 0, old_size, new_size, old_digest, new_digest)


def _recompress_payload(old: memoryview, new: memoryview, options: dict[str, float]) -> bytes | None:
    """The RECOMPRESS payload, when some stream of `new` is re-created by this zlib/lzma."""
    expanded = recompress.expand(new)
    if not expanded.compressed:
        return None
    expanded = recompress.with_params(new, expanded)
    if not expanded.compressed:
        return None  # no stream re-creates: the bytes are all there is
    base = recompress.expand(old)
    expanded = recompress.link_to_old(old, base, new, expanded)
    method, inner = diff_payload(base.content, expanded.content, expand=False, compact=False,
                                 **options)  # type: ignore[arg-type]
    return recompress.encode_header(base, expanded, method) + inner


def _prefix_payload(old: memoryview, new: memoryview, level: int) -> bytes:
    window = max(10, min(30, (len(old) + len(new)).bit_length()))
    # the default tables of low levels are far too small to index a large
    # prefix: size them for the old file (measured: 5 MB file, level 6, 4 MB -> 2 KB)
    tables = max(17, min(25, len(old).bit_length() + 1))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(new), window_log=window, hash_log=tables, chain_log=tables,
        enable_ldm=True, write_content_size=True, threads=0)
    prefix = zstandard.ZstdCompressionDict(bytes(old), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=prefix).compress(new)


def _cm_encode(old: memoryview, segments: list[Segment], parts: Iterable[SegmentDiff]) -> bytes:
    """The add stream through the context-mixing coder, segment by segment
    (parts may be a lazy sequence: the coder takes each as soon as it exists)."""
    kernels = accel.patch
    coder = kernels.AddCoder(True)
    for s, part in zip(segments, parts):
        if not part.nd:
            continue
        ctx = np.empty(part.nd, dtype=np.uint8)
        rc = kernels.gather_old(old[s.old_start:s.old_start + s.old_len], np.frombuffer(part.ctrl, dtype="<i8"), ctx)
        assert rc == 0, rc  # our own controls
        coder.encode(np.frombuffer(part.raw or b"", dtype=np.uint8), ctx)
    return bytes(coder.finish())


RAW_CANDIDATE_LIMIT = 64 << 20  # above this the plain add stream is not kept as a candidate


def _cm_decisions(parts: list[SegmentDiff]) -> int:
    """Binary decisions the context-mixing coder makes for these add streams: one per
    block of 32, one per byte of a changed block, eight per changed byte."""
    total = 0
    for part in parts:
        raw = np.frombuffer(part.raw or b"", dtype=np.uint8)
        blocks = -(-len(raw) // 32)
        padded = np.zeros(blocks * 32, dtype=np.uint8)
        padded[:len(raw)] = raw
        changed = int(padded.reshape(-1, 32).any(axis=1).sum())
        total += blocks + 32 * changed + 8 * int(np.count_nonzero(raw))
    return total


def _cm_pays(saved_bytes: float, decisions: int, link_mbit: float) -> bool:
    return link_mbit <= 0 or saved_bytes * 8 / (link_mbit * 1e6) > decisions * CM_DECODE_NS * 1e-9


BZ2_SAMPLE = 900_000      # one bzip2 block, made of pieces spread over the stream
BZ2_SAMPLE_PIECES = 9
BZ2_SAMPLE_MIN = 3 * BZ2_SAMPLE
BZ2_SAMPLE_MARGIN = 0.1   # how much smaller than the sample's rate the whole may come out


def _bz2_may_pay(raw: bytes, best_seconds: float, link_mbit: float) -> bool:
    """Whether bzip2 of the plain add stream can beat the best coding so far on link plus
    decode time.  A large stream is judged by a one-block sample, a third of the work or
    less (on the corpus' binaries of 3-5 MB the sample's rate was 3-8 % above the whole's;
    one block from the middle was off by up to 67 %), since bzip2 is a sixth of the diff
    time of a 5 MB binary and did not win on any of them at 5 Mbit/s."""
    if link_mbit <= 0 or len(raw) < BZ2_SAMPLE_MIN:
        return True
    piece = BZ2_SAMPLE // BZ2_SAMPLE_PIECES
    step = len(raw) // BZ2_SAMPLE_PIECES
    sample = b"".join(raw[i * step:i * step + piece] for i in range(BZ2_SAMPLE_PIECES))
    rate = len(_bzip2(sample)) / len(sample)
    estimate = rate * len(raw) * (1 - BZ2_SAMPLE_MARGIN)
    return estimate * 8 / (link_mbit * 1e6) + DECODE_NS[CODEC_BZ2] * len(raw) * 1e-9 < best_seconds


def _sa_payload(old: memoryview, new: memoryview, level: int, threads: int, memory_limit: int,
                link_mbit: float = DEFAULT_LINK_MBIT, compact: bool = True) -> tuple[int, bytes] | None:
    """(METHOD_SA or, where it is quicker on the link, METHOD_SA_COMPACT, payload); `compact`
    False for a RECOMPRESS payload's inner delta (method 5 is not one of version 2's)."""
    segments = plan_segments(old, new, memory_limit, threads)
    per_segment = SA_BYTES_PER_OLD * max(s.old_len for s in segments) + NEW_BYTES_PER_NEW * SEGMENT_TARGET
    workers = max(1, min(threads, len(segments), memory_limit // max(per_segment, 1)))
    new_starts = np.cumsum([0] + [s.new_len for s in segments]).tolist()
    keep_raw = len(new) <= RAW_CANDIDATE_LIMIT

    progress = Progress("diffing", total_bytes=len(new)) if len(segments) > 1 else None

    def one(i: int) -> SegmentDiff:
        s = segments[i]
        part = _diff_segment(old[s.old_start:s.old_start + s.old_len],
                             new[new_starts[i]:new_starts[i] + s.new_len], s.hint, keep_raw)
        if progress:
            progress.advance(s.new_len, 1)
        return part

    early_cm = None
    try:
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="d4c-diff") as pool, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="d4c-cm") as coder:
                scans = [pool.submit(one, i) for i in range(len(segments))]
                if keep_raw:
                    # the coder's state runs through the segments in order: code each as
                    # soon as it and those before it are scanned, while later ones still are
                    # (wasted only when too little changed for the coder to be used)
                    early_cm = coder.submit(_cm_encode, old, segments, (f.result() for f in scans))
                parts = [f.result() for f in scans]
                if early_cm is not None:
                    early_cm.result()  # raises here, inside the pools, if it failed
        else:
            parts = [one(i) for i in range(len(segments))]
    finally:
        if progress:
            progress.done()
    for s, part in zip(segments, parts):
        if len(part.ctrl) // 24 > max_triples(s.new_len):
            return None  # pathological input: let another method win
    enc = Encoder()
    enc.uvarint(len(segments))
    for s, part in zip(segments, parts):
        for v in (s.old_start, s.old_len, s.new_len, len(part.ctrl) // 24, part.nd, len(part.extra)):
            enc.uvarint(v)
    dpos = np.cumsum([0] + [p.nd for p in parts]).tolist()
    starts = np.concatenate([p.starts + dpos[i] for i, p in enumerate(parts)]).astype(np.int64)
    lengths = np.concatenate([p.lengths for p in parts]).astype(np.int64)
    sparse = _encode_runs(starts, lengths, b"".join(p.values for p in parts))
    use_cm = keep_raw and len(lengths) and int(lengths.sum()) >= CM_MIN_CHANGES
    quick = _pack_stream(sparse, 3, "fast", threads) if use_cm else None
    decisions = _cm_decisions(parts) if use_cm and link_mbit > 0 else 0
    if quick is not None and not _cm_pays(CM_GAIN_BOUND * len(quick[1]), decisions, link_mbit):
        use_cm = False  # even its best gain would not pay for its decoding: not even tried
    diff_options: list[tuple[int, bytes, tuple[int, bytes], float]] = []  # mode, stream, (codec, frame), ns
    if use_cm:
        blob = early_cm.result() if early_cm is not None else _cm_encode(old, segments, parts)
        diff_options.append((DIFF_CM, blob, (CODEC_STORED, blob), decisions * CM_DECODE_NS))
    # when the context-mixing coder clearly wins (binaries: the fast setting of the
    # general codecs is 1.5x larger or more) and bytes are all that count, skip their
    # slow settings: measured on the corpus, same total size and 25% less diff time.
    # Otherwise try them all (weighing the coder needs its real rivals).
    cm_clearly_wins = quick is not None and use_cm and link_mbit <= 0 and len(quick[1]) >= 1.5 * len(blob)
    if cm_clearly_wins:
        diff_options.append((DIFF_SPARSE, sparse, quick, 0.0))
    else:
        diff_options += [(DIFF_SPARSE, sparse, c, DECODE_NS[c[0]] * len(sparse))
                         for c in _sparse_candidates(sparse, level, threads, link_mbit)]

    def cost(option: tuple[int, bytes, tuple[int, bytes], float]) -> tuple[float, int, int]:
        """Bytes only (link 0), or the seconds they take on the link plus their decoding."""
        size = len(option[2][1])
        if link_mbit <= 0:
            return (size, option[0], option[2][0])
        return (size * 8 / (link_mbit * 1e6) + option[3] * 1e-9, size, option[0])
    if not cm_clearly_wins and keep_raw and len(sparse) > dpos[-1] // 8:  # dense changes: the plain stream may win
        raw = b"".join(p.raw or b"" for p in parts)
        with_bz2 = _bz2_may_pay(raw, cost(min(diff_options, key=cost))[0], link_mbit)
        diff_options += [(DIFF_RAW, raw, c, DECODE_NS[c[0]] * len(raw))
                         for c in _pack_candidates(raw, level, "raw", threads, with_bz2)]
    diff_mode, diff_stream, diff_packed, _ = min(diff_options, key=cost)
    extra = b"".join(p.extra for p in parts)
    # column-coded per segment, so the patcher can stream the controls segment by segment
    ctrl = b"".join(_encode_controls(np.frombuffer(p.ctrl, dtype="<i8")) for p in parts)
    packed_extra = _pack_stream(extra, level, "small", threads)
    head = enc.getvalue()
    plain = head + _streams_part(diff_mode, [ctrl, diff_stream, extra],
                                 [_pack_stream(ctrl, level), diff_packed, packed_extra])
    if not compact:
        return METHOD_SA, plain
    runs = (starts, lengths, b"".join(p.values for p in parts)) if diff_mode == DIFF_SPARSE else None
    small = _compact_streams(parts, diff_mode, diff_stream, diff_packed, runs, level)
    if small is None:
        return METHOD_SA, plain
    (ctrl_c, diff_c), (packed_ctrl, packed_diff), values = small
    packed_c = head + _streams_part(diff_mode, [ctrl_c, diff_c, extra], [packed_ctrl, packed_diff, packed_extra])
    saved = len(plain) - len(packed_c)
    if saved > 0 and (link_mbit <= 0 or saved * 8 / (link_mbit * 1e6) > values * COMPACT_DECODE_NS * 1e-9):
        return METHOD_SA_COMPACT, packed_c
    return METHOD_SA, plain


def _streams_part(diff_mode: int, streams: list[bytes], packed: list[tuple[int, bytes]]) -> bytes:
    """diff_mode, the three stream descriptors and their frames (docs/DELTA.md, SA)."""
    enc = Encoder()
    enc.u8(diff_mode)
    for stream, (codec, frame) in zip(streams, packed):
        enc.u8(codec)
        enc.uvarint(len(stream))
        enc.uvarint(len(frame))
    return enc.getvalue() + b"".join(frame for _, frame in packed)


def _compact_streams(parts: list[SegmentDiff], diff_mode: int, diff_stream: bytes, diff_packed: tuple[int, bytes],
                     runs: tuple[np.ndarray, np.ndarray, bytes] | None, level: int
                     ) -> tuple[tuple[bytes, bytes], tuple[tuple[int, bytes], tuple[int, bytes]], int] | None:
    """((controls, diff stream), their (codec, frame)s, values to decode) coded as
    SA_COMPACT, or None where that is not allowed (too many values, a large diff stream)."""
    triples = sum(len(p.ctrl) // 24 for p in parts)
    nruns = len(runs[0]) if runs is not None else 0
    values = 3 * triples + 2 * nruns
    if values > COMPACT_MAX_VALUES:
        return None
    enc = Encoder()
    for p in parts:
        for copy, insert, seek in np.frombuffer(p.ctrl, dtype="<i8").reshape(-1, 3).tolist():
            enc.uvarint(copy)
            enc.uvarint(insert)
            enc.svarint(seek)
    ctrl = enc.getvalue()
    if runs is None:
        return (ctrl, diff_stream), (_pack_stream(ctrl, level), diff_packed), values
    starts, lengths, run_values = runs
    gaps = _run_gaps(starts, lengths)
    enc = Encoder()
    enc.uvarint(nruns)
    for gap, length in zip(gaps.tolist(), lengths.tolist()):
        enc.uvarint(gap)
        enc.uvarint(length)
    enc.raw(run_values)
    stream = enc.getvalue()
    if len(stream) > COMPACT_MAX_STREAM:  # the bound readers apply to this stream
        return None
    return (ctrl, stream), (_pack_stream(ctrl, level), _pack_stream(stream, level)), values


# ---------------------------------------------------------------- patch

def read_delta_info(delta: bytes | memoryview, source: str = "delta") -> DeltaInfo:
    if len(delta) < PREAMBLE.size:
        raise CorruptDelta(source, "too short")
    magic, version, method, r1, r2, old_size, new_size, od, nd = PREAMBLE.unpack_from(delta)
    if magic != MAGIC:
        raise CorruptDelta(source, "not a d4c delta (bad magic)")
    if version not in READ_VERSIONS:
        raise CorruptDelta(source, f"format version {version} is not supported (this d4c reads "
                           f"{', '.join(map(str, READ_VERSIONS))})")
    if method not in METHOD_NAMES or r1 or r2 or VERSION_OF_METHOD[method] != version:
        raise CorruptDelta(source, f"unknown method {method} (format version {version})")
    return DeltaInfo(method, old_size, new_size, od, nd)


def default_max_size(old_size: int, delta_size: int) -> int:
    """How large a result we accept without being told: generous, but bounded."""
    return max(1 << 30, 64 * (old_size + delta_size))


class _StreamReader:
    """Reads a compressed stream piecewise, so a raw add stream as large as the new
    file is never held whole: patch memory stays old + new + one segment."""

    def __init__(self, codec: int, frame: bytes | memoryview, usize: int, source: str, what: str) -> None:
        self.codec, self.usize, self.source, self.what = codec, usize, source, what
        self.frame = bytes(frame)
        self.got = 0
        self.pending = b""
        self.fed = False
        if codec == CODEC_ZSTD:
            self.reader = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG).stream_reader(
                self.frame, read_across_frames=False)
        elif codec == CODEC_BZ2:
            self.dec: bz2.BZ2Decompressor | lzma.LZMADecompressor = bz2.BZ2Decompressor()
        elif codec == CODEC_LZMA:
            self.dec = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT)
        elif codec != CODEC_STORED:
            raise CorruptDelta(source, f"{what}: unknown codec {codec}")

    def _fail(self, reason: str = "has the wrong size") -> None:
        raise CorruptDelta(self.source, f"{self.what} {reason}")

    def read(self, n: int) -> bytes:
        if n > self.usize - self.got:
            self._fail()
        parts: list[bytes] = []
        want = n
        try:
            while want:
                if self.codec == CODEC_STORED:
                    chunk = self.frame[self.got:self.got + want]
                elif self.codec == CODEC_ZSTD:
                    chunk = self.reader.read(want)
                else:
                    if self.dec.eof:
                        chunk = b""
                    else:
                        chunk = self.dec.decompress(b"" if self.fed else self.frame, max_length=want)
                        self.fed = True
                if not chunk:
                    self._fail()
                parts.append(chunk)
                self.got += len(chunk)
                want -= len(chunk)
        except (zstandard.ZstdError, OSError, ValueError, EOFError, lzma.LZMAError) as exc:
            self._fail(f"does not decompress ({exc})")
        return b"".join(parts)

    def finish(self) -> None:
        if self.got != self.usize:
            self._fail()
        if self.codec in (CODEC_BZ2, CODEC_LZMA):
            try:
                extra = b"" if self.dec.eof else self.dec.decompress(b"" if self.fed else self.frame, max_length=1)
            except (OSError, ValueError, EOFError, lzma.LZMAError) as exc:
                self._fail(f"does not decompress ({exc})")
            if extra or not self.dec.eof or self.dec.unused_data:
                self._fail()
        elif self.codec == CODEC_ZSTD:
            try:
                if self.reader.read(1):
                    self._fail()
            except zstandard.ZstdError as exc:
                self._fail(f"does not decompress ({exc})")


def _decompress(frame: bytes | memoryview, usize: int, source: str, what: str,
                prefix: zstandard.ZstdCompressionDict | None = None) -> bytes:
    # our frames use windows up to 2^27 (2^30 with the old file as prefix): refuse more
    try:
        out = read_bounded(frame, usize, max_window_log=30 if prefix else MAX_WINDOW_LOG, prefix=prefix)
    except zstandard.ZstdError as exc:
        raise CorruptDelta(source, f"{what} does not decompress ({exc})") from None
    if len(out) != usize:
        raise CorruptDelta(source, f"{what} has the wrong size")
    return out


def apply(old: bytes | memoryview, delta: bytes | memoryview, *, max_size: int | None = None,
          source: str = "delta") -> bytes:
    """Rebuild the new file; checks the old digest first and the new one last."""
    return bytes(apply_to_buffer(old, delta, max_size=max_size, source=source))


def apply_to_buffer(old: bytes | memoryview, delta: bytes | memoryview, *, max_size: int | None = None,
                    source: str = "delta") -> memoryview:
    """Like apply(), without the final copy: memory stays old + new (+ the delta)."""
    delta = memoryview(delta).cast("B")
    info = read_delta_info(delta, source)
    limit = default_max_size(len(old), len(delta)) if max_size is None else max_size
    return apply_payload(old, info, delta[PREAMBLE.size:], max_size=limit, source=source)


def apply_payload(old: bytes | memoryview, info: DeltaInfo, payload: bytes | memoryview, *,
                  max_size: int | None = None, source: str = "delta") -> memoryview:
    """Rebuild the new file from a payload of diff_payload and what `info` says of
    it (an image's tree, or a delta file's preamble), checked against its digest;
    at most `max_size` bytes (default info.new_size)."""
    new = rebuild_unchecked(old, info, payload, max_size=max_size, source=source)
    check_result(old, info, new, source)
    return new


def rebuild_unchecked(old: bytes | memoryview, info: DeltaInfo, payload: bytes | memoryview, *,
                      max_size: int | None = None, source: str = "delta") -> memoryview:
    """The result before its digest check (check_result, which the caller owes):
    apply_files writes it while it is hashed.  Where the payload does not apply, a
    wrong old file is the better explanation, and is given when it is one."""
    accel.kernel("_patch")
    old, payload = memoryview(old).cast("B"), memoryview(payload).cast("B")
    limit = info.new_size if max_size is None else max_size
    if info.new_size > limit:
        raise CorruptDelta(source, f"declares a result of {info.new_size} bytes (limit {limit})")
    if info.method != METHOD_WHOLE and info.old_size != len(old):
        raise _wrong_source(info, source)
    try:
        if info.method == METHOD_RECOMPRESS:
            return memoryview(_apply_recompress(old, payload, info.new_size, source))
        return _rebuild(old, info.method, payload, info.new_size, source)
    except CorruptDelta:
        if not _old_is_right(old, info):
            raise _wrong_source(info, source) from None
        raise


def check_result(old: bytes | memoryview, info: DeltaInfo, new: memoryview, source: str = "delta") -> None:
    """The rebuilt file must have its digest; the old file is hashed only to say
    which of the two was wrong (a right result proves the old file was right)."""
    if sha256(new).digest() != info.new_digest:
        if not _old_is_right(memoryview(old).cast("B"), info):
            raise _wrong_source(info, source)
        raise CorruptDelta(source, "result does not match its digest")


def _old_is_right(old: memoryview, info: DeltaInfo) -> bool:
    return info.method == METHOD_WHOLE or sha256(old).digest() == info.old_digest


def _wrong_source(info: DeltaInfo, source: str) -> WrongSource:
    return WrongSource(source, f"expected {info.old_size} bytes with sha256 {info.old_digest.hex()[:16]}...")


def _rebuild(old: memoryview, method: int, payload: memoryview, new_size: int, source: str) -> memoryview:
    """The result of a byte-level payload (no digest checks: the caller's)."""
    if method == METHOD_WHOLE:
        return memoryview(_decompress(payload, new_size, source, "body"))
    if method == METHOD_PREFIX:
        prefix = zstandard.ZstdCompressionDict(bytes(old), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return memoryview(_decompress(payload, new_size, source, "body", prefix))
    if method in (METHOD_SA, METHOD_SA_COMPACT):
        return memoryview(_apply_sa(old, payload, DeltaInfo(method, len(old), new_size, b"", b""), source))
    raise CorruptDelta(source, f"unknown method {method}")


def _apply_recompress(old: memoryview, payload: memoryview, new_size: int, source: str) -> bytearray:
    """Expand the old file, patch the expanded content, recompress the streams.
    A zlib that deflates otherwise than the diff's is refused before any work."""
    def fail(reason: str) -> None:
        raise CorruptDelta(source, reason)

    base = recompress.expand(old)
    header = recompress.decode_header(payload, base, new_size, fail)
    if recompress.uses_zlib(header.pieces) and header.fingerprint != recompress.zlib_fingerprint():
        raise CorruptDelta(source, f"this zlib ({zlib.ZLIB_RUNTIME_VERSION}) deflates otherwise than the one the "
                           "delta was made with (fingerprints differ): it cannot rebuild the file bit-exactly")
    if header.old_size != len(base.content) or header.old_tag != recompress.content_tag(base.content):
        raise CorruptDelta(source, "the old file's content is not what the delta was made against")
    content_size = sum(p.content_size for p in header.pieces)
    content = _rebuild(memoryview(base.content), header.inner_method, payload[header.inner_at:], content_size,
                       source)
    if len(content) != content_size:
        raise CorruptDelta(source, "expanded content has the wrong size")
    return recompress.reassemble(header.pieces, content, fail, old, base.pieces)


_APPLY_ERRORS = {-1: "negative length", -2: "output overflow", -3: "copy outside the old file",
                 -4: "diff stream exhausted", -5: "insert stream exhausted",
                 -6: "streams not consumed exactly"}


def _apply_sa(old: memoryview, payload: memoryview, info: DeltaInfo, source: str) -> np.ndarray:
    def fail(reason: str) -> None:
        raise CorruptDelta(source, reason)

    cur = Cursor(payload, fail)
    nseg = cur.uvarint(max(1, info.new_size))
    segments = []
    total_new = total_ctrl = total_d = total_e = 0
    for _ in range(nseg):
        s = [cur.uvarint() for _ in range(6)]
        o_start, o_len, n_len, nctrl, nd, ne = s
        if o_start + o_len > len(old):
            fail("segment window outside the old file")
        if nd + ne != n_len or nctrl > max_triples(n_len) or n_len > MAX_SEGMENT:
            fail("segment sizes out of range")
        segments.append(s)
        total_new += n_len
        total_ctrl += nctrl
        total_d += nd
        total_e += ne
    if total_new != info.new_size:
        fail("segments do not add up to the result size")
    diff_mode = cur.u8()
    if diff_mode not in (DIFF_RAW, DIFF_SPARSE, DIFF_CM):
        fail("unknown diff stream coding")
    compact = info.method == METHOD_SA_COMPACT
    if compact and 3 * total_ctrl > COMPACT_MAX_VALUES:
        fail("compact controls: too many triples")
    diff_limit = {DIFF_RAW: total_d, DIFF_SPARSE: 8 + 17 * total_d, DIFF_CM: 2 * total_d + 1024}[diff_mode]
    if compact and diff_mode == DIFF_SPARSE:
        diff_limit = min(COMPACT_MAX_STREAM, 10 + 21 * total_d)
    ctrl_limit = 30 * total_ctrl if compact else 24 * total_ctrl
    sizes = [(cur.u8(), cur.uvarint(limit), cur.uvarint()) for limit in (ctrl_limit, diff_limit, total_e)]
    codecs = [c for c, _, _ in sizes]
    sizes = [(u, c) for _, u, c in sizes]
    if (not compact and sizes[0][0] != 24 * total_ctrl) or sizes[2][0] != total_e \
            or (diff_mode == DIFF_RAW and sizes[1][0] != total_d):
        fail("stream sizes do not match the segments")
    pos = cur.pos
    frames = []
    for usize, csize in sizes:
        if csize > len(payload) - pos:
            fail("truncated")
        frames.append(payload[pos:pos + csize])
        pos += csize
    if pos != len(payload):
        fail("trailing bytes")
    ctrl_reader: _StreamReader | None = None
    if compact:
        controls = _decode_compact_controls(_unpack_stream(codecs[0], frames[0], sizes[0][0], source,
                                                           "control stream"), total_ctrl, fail)
    else:
        ctrl_reader = _StreamReader(codecs[0], frames[0], sizes[0][0], source, "control stream")
    runs = raw_reader = cm_decoder = None
    if diff_mode == DIFF_SPARSE:
        blob = _unpack_stream(codecs[1], frames[1], sizes[1][0], source, "diff stream")
        runs = RunReader(_planar_runs(blob, COMPACT_MAX_VALUES - 3 * total_ctrl, fail) if compact else blob, fail)
    elif diff_mode == DIFF_CM:
        cm_decoder = accel.patch.AddCoder(False, _unpack_stream(codecs[1], frames[1], sizes[1][0], source,
                                                                "diff stream"))
    else:
        raw_reader = _StreamReader(codecs[1], frames[1], sizes[1][0], source, "diff stream")
    extra_reader = _StreamReader(codecs[2], frames[2], sizes[2][0], source, "insert stream")
    out = np.empty(info.new_size, dtype=np.uint8)
    kernels = accel.patch
    dpos = epos = npos = tpos = 0
    for o_start, o_len, n_len, nctrl, nd, ne in segments:
        if ctrl_reader is None:
            seg_ctrl = controls[3 * tpos:3 * (tpos + nctrl)]
            tpos += nctrl
        else:
            seg_ctrl = _decode_controls(ctrl_reader.read(24 * nctrl), nctrl, fail)
        if runs is not None:
            seg_diff = runs.read(dpos, nd)
        elif cm_decoder is not None:
            ctx = np.empty(nd, dtype=np.uint8)
            rc = kernels.gather_old(old[o_start:o_start + o_len], seg_ctrl, ctx)
            if rc != 0:
                fail(_APPLY_ERRORS.get(rc, f"patch error {rc}"))
            seg_diff = np.empty(nd, dtype=np.uint8)
            cm_decoder.decode(ctx, seg_diff)
        else:
            assert raw_reader is not None
            seg_diff = np.frombuffer(raw_reader.read(nd), dtype=np.uint8)
        rc = kernels.apply(old[o_start:o_start + o_len], seg_ctrl, seg_diff, extra_reader.read(ne),
                           out[npos:npos + n_len])
        if rc != 0:
            fail(_APPLY_ERRORS.get(rc, f"patch error {rc}"))
        dpos += nd
        epos += ne
        npos += n_len
    for reader in (ctrl_reader, extra_reader, raw_reader, runs):
        if reader is not None:
            reader.finish()
    return out


# ---------------------------------------------------------------- files

def _map(path: str) -> tuple[memoryview, object]:
    """The file's bytes, memory-mapped (empty files get an empty view)."""
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(b""), None
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    return memoryview(m), m


def diff_files(old_path: str, new_path: str, out_path: str, **kwargs: object) -> int:
    old, m1 = _map(old_path)
    new, m2 = _map(new_path)
    try:
        data = diff(old, new, **kwargs)  # type: ignore[arg-type]
    finally:
        old.release()
        new.release()
        _close_maps(m1, m2)
    with atomic_output(out_path) as f:
        f.write(data)
    return len(data)


OVERLAP_WRITE_MIN = 4 << 20  # results from this size on are written while they are hashed


def apply_files(old_path: str, delta_path: str, out_path: str, *, max_size: int | None = None) -> None:
    """Patch into `out_path`: the result is written (to a temp name) while it is
    hashed, and renamed into place only when its digest is right."""
    old, m1 = _map(old_path)
    delta, m2 = _map(delta_path)
    try:
        info = read_delta_info(delta, delta_path)
        limit = default_max_size(len(old), len(delta)) if max_size is None else max_size
        new = rebuild_unchecked(old, info, delta[PREAMBLE.size:], max_size=limit, source=delta_path)
        with atomic_output(out_path) as f:
            if len(new) < OVERLAP_WRITE_MIN:  # a thread costs more than the overlap saves
                check_result(old, info, new, delta_path)
                f.write(new)
                return
            with ThreadPoolExecutor(max_workers=1) as pool:
                written = pool.submit(f.write, new)
                try:
                    check_result(old, info, new, delta_path)
                finally:
                    written.result()
    finally:
        old.release()
        delta.release()
        _close_maps(m1, m2)


def _close_maps(*maps: object) -> None:
    for m in maps:
        if m is not None:
            try:
                m.close()  # type: ignore[attr-defined]
            except BufferError:
                pass  # a view is still referenced (an exception's frames): the GC unmaps it
