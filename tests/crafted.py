"""Building hostile images byte by byte (valid digests, bad content)."""

from __future__ import annotations

import hashlib

import zstandard

from d4c.codec import Encoder
from d4c.image.format import dimg_preamble, image_id_of

SHA_HELLO = hashlib.sha256(b"hello").digest()


def entry(enc: Encoder, path: bytes, etype: int, *, mode: int = 0o755, xattrs: list | None = None,
          extra: bytes = b"") -> None:
    enc.blob(path)
    enc.u8(etype)
    if etype == 4:  # hardlink: only the index
        enc.raw(extra)
        return
    enc.uvarint(mode)
    enc.uvarint(0)
    enc.uvarint(0)
    enc.svarint(0)
    enc.uvarint(len(xattrs or []))
    for name, value in xattrs or []:
        enc.blob(name)
        enc.blob(value)
    enc.raw(extra)


def file_extra(size: int, digest: bytes) -> bytes:
    e = Encoder()
    e.uvarint(size)
    e.raw(digest)
    return e.getvalue()


def blob(data: bytes) -> bytes:
    e = Encoder()
    e.blob(data)
    return e.getvalue()


def uv(n: int) -> bytes:
    e = Encoder()
    e.uvarint(n)
    return e.getvalue()


def tree(*entries: tuple) -> bytes:
    """entries: (path, type, kwargs) -- root is added first."""
    enc = Encoder()
    enc.uvarint(len(entries) + 1)
    entry(enc, b"", 2)
    for path, etype, kw in entries:
        entry(enc, path, etype, **kw)
    return enc.getvalue()


def dimg(tree_table: bytes, storage: bytes = b"", body: bytes = b"", *, usize: int | None = None,
         comp: bytes | None = None) -> bytes:
    table = tree_table + storage
    comp = comp if comp is not None else zstandard.ZstdCompressor().compress(table)
    pre = dimg_preamble(comp, len(table) if usize is None else usize, len(body),
                        image_id_of(tree_table), None)
    return pre + comp + body


def frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)
