"""Pure-Python reference of the `_x86` kernel (same bytes; slow: for tests).  An opcode
left unconverted keeps the next three from converting (see _x86.pyx)."""

from __future__ import annotations

API_VERSION = "1"


def _convert(buf: bytearray, start: int, end: int, forward: bool) -> None:
    if not 0 <= start <= end <= len(buf):
        raise ValueError(f"range {start}..{end} outside a buffer of {len(buf)} bytes")
    i, kept = start, start - 4  # the last opcode left unconverted
    while i + 5 <= end:
        call, jump = buf.find(b"\xe8", i, end - 4), buf.find(b"\xe9", i, end - 4)
        i = min((j for j in (call, jump) if j >= 0), default=-1)
        if i < 0:
            return
        if buf[i + 4] not in (0, 0xFF) or i - kept <= 3:
            kept = i
            i += 1
            continue
        value = int.from_bytes(buf[i + 1:i + 5], "little")
        at = i - start + 5
        value = (value + at if forward else value - at) & 0x1FFFFFF
        if value & 0x1000000:
            value |= 0xFE000000
        buf[i + 1:i + 5] = value.to_bytes(4, "little")
        i += 5


def encode(buf: bytearray, start: int, end: int) -> None:
    """Branch targets of buf[start:end] made absolute, in place."""
    _convert(buf, start, end, True)


def decode(buf: bytearray, start: int, end: int) -> None:
    """The inverse of encode, in place."""
    _convert(buf, start, end, False)


def decoded(data: bytes) -> bytes:
    """decode of a copy of `data` (the whole of it), as bytes."""
    buf = bytearray(data)
    _convert(buf, 0, len(buf), False)
    return bytes(buf)
