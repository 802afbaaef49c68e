"""sha256, the digest of every body, header and blob in d4c.

OpenSSL's sha256 (hashlib) runs ~1.7 GB/s here (SHA-NI), the interpreter's
builtin ~0.3 GB/s, but loading OpenSSL costs a process ~3.9 MiB.  An idle FUSE
mount server has hashed only image headers: those take `light_sha256`, which
loads nothing, so OpenSSL comes in with the first body a server hashes."""

from __future__ import annotations

import sys
from typing import Any, BinaryIO

CHUNK = 1 << 20


def sha256(data: bytes | bytearray | memoryview = b"") -> Any:
    """OpenSSL's sha256 hasher (loaded at the first call), fed with `data`."""
    import hashlib
    return hashlib.sha256(data)


def light_sha256(data: bytes | bytearray | memoryview) -> Any:
    """For headers, configs and ids (kilobytes): the builtin sha256 unless OpenSSL is loaded already."""
    if "hashlib" not in sys.modules:
        try:
            from _sha256 import sha256 as builtin
        except ImportError:  # an interpreter built without it
            return sha256(data)
        return builtin(data)
    return sha256(data)


def file_sha256(f: BinaryIO, chunk: int = CHUNK) -> Any:
    """The sha256 hasher fed with what is left of the open file `f`."""
    h = sha256()
    for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h


def path_sha256(path: str) -> Any:
    with open(path, "rb") as f:
        return file_sha256(f)
