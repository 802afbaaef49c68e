"""llfs: the cache of rebuilt bodies: bounded, checked, and making room on a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess

import pytest

from conftest import IS_ROOT
from helpers import need

from d4c.errors import CorruptImage
from d4c.llfs import model as llfs_model
from d4c.llfs.cache import BodyCache


def test_cache_refuses_wrong_bodies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = BodyCache(str(tmp_path / "c"), 1 << 20)
    with pytest.raises(CorruptImage):
        cache.open(b"\1" * 32, 6, lambda: b"hello")
    assert os.listdir(tmp_path / "c") == []


def cached_body(cache: BodyCache, data: bytes, built: list[bytes]) -> bytes:
    """The content the cache serves for `data`, noting each time it had to build it."""
    digest = hashlib.sha256(data).digest()
    fd = cache.open(digest, len(data), lambda: built.append(data) or data)
    try:
        return os.pread(fd, len(data) + 1, 0)
    finally:
        os.close(fd)


def test_cache_checks_bodies_of_an_earlier_mount(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good, torn = b"kept intact " * 1000, b"torn by a crash " * 1000
    built: list[bytes] = []
    first = BodyCache(str(tmp_path / "c"), 1 << 20)
    assert cached_body(first, good, built) == good and cached_body(first, torn, built) == torn
    assert len(built) == 2
    path = first.path(hashlib.sha256(torn).digest())
    with open(path, "r+b") as f:  # same size, other bytes: only the digest can tell
        f.write(b"\0" * 4096)
    later = BodyCache(str(tmp_path / "c"), 1 << 20)  # the next mount on this cache directory
    assert cached_body(later, good, built) == good and len(built) == 2  # reused, not rebuilt
    assert cached_body(later, torn, built) == torn and len(built) == 3  # rebuilt, not served torn
    with open(path, "rb") as f:
        assert f.read() == torn
    assert cached_body(later, torn, built) == torn and len(built) == 3
    assert [n for n in os.listdir(tmp_path / "c") if n.startswith(".tmp-")] == []


def test_cache_body_evicted_at_once_is_still_served(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Another thread's eviction may unlink a body the moment it is written: the
    caller reads it all the same (an fd opened before the rename)."""
    rename = os.rename

    def rename_then_evicted(src: str, dst: str) -> None:
        rename(src, dst)
        os.unlink(dst)

    monkeypatch.setattr(llfs_model.os, "rename", rename_then_evicted)
    body = b"evicted before its reader opened it " * 100
    assert cached_body(BodyCache(str(tmp_path / "c"), 1 << 20), body, []) == body


def test_cache_makes_room_on_a_full_disk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    need(IS_ROOT, "a small tmpfs for a full disk needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        cache = BodyCache(str(small / "c"), 1 << 30)  # the disk fills long before the limit
        built: list[bytes] = []
        one, two = os.urandom(150_000), os.urandom(150_000)
        assert cached_body(cache, one, built) == one
        assert cached_body(cache, two, built) == two  # the disk was full: the first body made room
        assert not os.path.exists(cache.path(hashlib.sha256(one).digest()))
        with pytest.raises(OSError) as info:  # more than eviction could free: a clear error ...
            cached_body(cache, os.urandom(300_000), built)
        assert info.value.errno == errno.ENOSPC and "body cache" in str(info.value)
        assert os.path.exists(cache.path(hashlib.sha256(two).digest()))  # ... and the cache kept
        assert [n for n in os.listdir(small / "c") if n.startswith(".tmp-")] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---------------------------------------------------------------- real mounts
