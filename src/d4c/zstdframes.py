"""Decompressing untrusted zstd data without letting it expand beyond what was declared."""

from __future__ import annotations

import zstandard


def read_bounded(data: bytes | memoryview, usize: int, *, max_window_log: int = 27,
                 prefix: zstandard.ZstdCompressionDict | None = None, across_frames: bool = False) -> bytes:
    """At most usize + 1 bytes of the decompressed data: a bomb is detected, never
    expanded.  The caller compares the length with usize; zstandard.ZstdError
    propagates for the caller to name.  Windows beyond 2^max_window_log are refused
    (they would reserve that much memory)."""
    dctx = zstandard.ZstdDecompressor(dict_data=prefix, max_window_size=1 << max_window_log)
    parts: list[bytes] = []
    got = 0
    with dctx.stream_reader(bytes(data), read_across_frames=across_frames) as reader:
        while got <= usize:
            chunk = reader.read(min(usize + 1 - got, 1 << 24))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    return b"".join(parts)
