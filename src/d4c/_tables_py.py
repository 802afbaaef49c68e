"""Pure-Python reference of _tables.pyx: the same rows and errors, much slower.

Used when D4C_PUREPYTHON=1 and by the parity tests.
"""

from __future__ import annotations

from typing import Any

import array

API_VERSION = "1"

(C_PATH_OFF, C_PATH_LEN, C_TYPE, C_PLAIN, C_LINK, C_MODE, C_UID, C_GID, C_MTIME, C_XATTR_OFF, C_NXATTR,
 C_SIZE, C_DATA_OFF, C_DATA_LEN, C_MAJOR, C_MINOR) = range(16)
NCOL = 16
(E_TRUNCATED, E_NONCANONICAL, E_VARINT_LONG, E_PATH_LONG, E_ORDER, E_TYPE, E_ROOT, E_LINK, E_OWNER,
 E_XATTR_COUNT, E_XATTR_LONG, E_SIZE, E_SYMLINK_LONG, E_DEVICE) = range(1, 15)
T_FILE, T_DIR, T_SYMLINK, T_HARDLINK, T_CHARDEV, T_BLOCKDEV, T_FIFO = range(1, 8)
MAX_ID = 0xFFFFFFFF
MAX_FILE_SIZE = (1 << 63) - 1


class _Stop(Exception):
    def __init__(self, code: int, value: int = 0) -> None:
        self.code, self.value = code, value


class _Reader:
    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos, self.end = buf, pos, len(buf)

    def uv(self) -> int:
        result = shift = 0
        while True:
            if self.pos >= self.end:
                raise _Stop(E_TRUNCATED)
            b = self.buf[self.pos]
            self.pos += 1
            if shift == 63 and b > 1:
                raise _Stop(E_VARINT_LONG)
            result |= (b & 0x7F) << shift
            if b < 0x80:
                if b == 0 and shift:
                    raise _Stop(E_NONCANONICAL)
                return result
            shift += 7

    def span(self, limit: int, err_long: int) -> tuple[int, int]:
        n = self.uv()
        if n > limit:
            raise _Stop(err_long, n)
        if n > self.end - self.pos:
            raise _Stop(E_TRUNCATED)
        start = self.pos
        self.pos += n
        return start, n


def _plain(path: bytes, max_name: int) -> bool:
    if not path or len(path) > max_name or b"\0" in path:
        return False
    return all(part not in (b"", b".", b"..") for part in path.split(b"/"))


def scan_tree(buf: Any, pos: int, count: int, max_path: int, max_name: int, max_xattr_name: int,
              max_xattr_value: int, max_symlink: int) -> tuple[memoryview, int, int, int, int]:
    data = bytes(buf)
    table = [[0] * NCOL for _ in range(count)]
    r = _Reader(data, pos)
    prev: bytes | None = None
    index = 0
    try:
        for index in range(count):
            row = table[index]
            row[C_PATH_LEN] = -1
            off, n = r.span(max_path, E_PATH_LONG)
            path = data[off:off + n]
            row[C_PATH_OFF], row[C_PATH_LEN], row[C_PLAIN] = off, n, _plain(path, max_name)
            if prev is not None and not prev < path:
                raise _Stop(E_ORDER)
            prev = path
            if r.pos >= r.end:
                raise _Stop(E_TRUNCATED)
            t = data[r.pos]
            r.pos += 1
            if not T_FILE <= t <= T_FIFO:
                raise _Stop(E_TYPE, t)
            row[C_TYPE] = t
            if (index == 0) != (n == 0 and t == T_DIR):
                raise _Stop(E_ROOT if index == 0 else E_ORDER)
            if t == T_HARDLINK:
                link = r.uv()
                if link >= index or table[link][C_TYPE] in (T_DIR, T_HARDLINK):
                    raise _Stop(E_LINK, link)
                row[C_LINK] = link
                continue
            mode, uid, gid, z = r.uv(), r.uv(), r.uv(), r.uv()
            if mode > 0o7777 or uid > MAX_ID or gid > MAX_ID:
                raise _Stop(E_OWNER)
            row[C_MODE], row[C_UID], row[C_GID] = mode, uid, gid
            row[C_MTIME] = (z >> 1) if not z & 1 else -(z >> 1) - 1
            nx = r.uv()
            if nx > (r.end - r.pos) // 2:
                raise _Stop(E_XATTR_COUNT, nx)
            row[C_XATTR_OFF], row[C_NXATTR] = r.pos, nx
            for _ in range(nx):
                r.span(max_xattr_name, E_XATTR_LONG)
                r.span(max_xattr_value, E_XATTR_LONG)
            if t == T_FILE:
                size = r.uv()
                if size > MAX_FILE_SIZE:
                    raise _Stop(E_SIZE, size)
                if r.end - r.pos < 32:
                    raise _Stop(E_TRUNCATED)
                row[C_SIZE], row[C_DATA_OFF], row[C_DATA_LEN] = size, r.pos, 32
                r.pos += 32
            elif t == T_SYMLINK:
                row[C_DATA_OFF], row[C_DATA_LEN] = r.span(max_symlink, E_SYMLINK_LONG)
            elif t in (T_CHARDEV, T_BLOCKDEV):
                major, minor = r.uv(), r.uv()
                if major > MAX_ID or minor > MAX_ID:
                    raise _Stop(E_DEVICE)
                row[C_MAJOR], row[C_MINOR] = major, minor
    except _Stop as stop:
        return _rows(table), r.pos, stop.code, index, stop.value
    return _rows(table), r.pos, 0, count, 0


def _rows(table: list[list[int]]) -> memoryview:
    """The rows as the compiled kernel gives them: an int64 memoryview, (count, NCOL)."""
    flat = array.array("q", [v for row in table for v in row])
    return memoryview(flat).cast("B").cast("q", (len(table), NCOL)) if table else memoryview(flat)
