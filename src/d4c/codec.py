"""Varint encoding and a bounds-checked cursor for decoding untrusted bytes.

Every read checks the remaining length first, so a hostile header can never
make us allocate or slice beyond what it actually contains.
"""

from __future__ import annotations

from typing import Callable

MAX_VARINT_BYTES = 10  # enough for 64 bits


class Encoder:
    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, value: int) -> None:
        self.buf.append(value)

    def uvarint(self, value: int) -> None:
        if value < 0:
            raise ValueError("uvarint of a negative number")
        while value >= 0x80:
            self.buf.append((value & 0x7F) | 0x80)
            value >>= 7
        self.buf.append(value)

    def svarint(self, value: int) -> None:
        """Zig-zag signed varint (mtimes before 1970 exist in images)."""
        self.uvarint((value << 1) if value >= 0 else ((-value << 1) - 1))

    def blob(self, data: bytes) -> None:
        self.uvarint(len(data))
        self.buf += data

    def raw(self, data: bytes) -> None:
        self.buf += data

    def getvalue(self) -> bytes:
        return bytes(self.buf)


class Cursor:
    """Reads from `data`; calls `fail(reason)` (which must raise) on any violation."""

    __slots__ = ("data", "pos", "end", "fail")

    def __init__(self, data: bytes | memoryview, fail: Callable[[str], None]) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.fail = fail

    def remaining(self) -> int:
        return self.end - self.pos

    def u8(self) -> int:
        if self.pos >= self.end:
            self.fail("truncated")
        v = self.data[self.pos]
        self.pos += 1
        return v

    def uvarint(self, limit: int = (1 << 63) - 1) -> int:
        pos = self.pos
        if pos < self.end:  # most values fit one byte: the fast path decodes headers ~2x faster
            b = self.data[pos]
            if b < 0x80:
                self.pos = pos + 1
                if b > limit:
                    self.fail(f"value {b} out of range")
                return b
        result = 0
        shift = 0
        data = self.data
        for _ in range(MAX_VARINT_BYTES):
            if self.pos >= self.end:
                self.fail("truncated")
            b = data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and shift:
                    self.fail("non-canonical varint")
                if result > limit:
                    self.fail(f"value {result} out of range")
                return result
            shift += 7
        self.fail("varint too long")
        return 0  # unreachable

    def svarint(self) -> int:
        z = self.uvarint((1 << 64) - 1)
        return (z >> 1) if not z & 1 else -((z + 1) >> 1)

    def raw(self, n: int) -> bytes:
        if n < 0 or n > self.end - self.pos:
            self.fail("truncated")
        v = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return v

    def blob(self, limit: int) -> bytes:
        n = self.uvarint()
        if n > limit:
            self.fail(f"length {n} exceeds limit {limit}")
        return self.raw(n)
