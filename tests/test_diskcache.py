"""diskcache.DiskCache: adoption at start, least recently used eviction, spared entries."""

from __future__ import annotations

import os

from d4c.diskcache import TEMP_PREFIX, DiskCache


def _cache(directory: str, limit: int, owns: bool = False) -> DiskCache[str]:
    return DiskCache(directory, limit, lambda k: k + ".bin", lambda n: n[:-4] if n.endswith(".bin") else None,
                     owns_directory=owns)


def _put(cache: DiskCache[str], key: str, size: int) -> None:
    tmp = cache.temp_path()
    assert os.path.basename(tmp).startswith(TEMP_PREFIX)
    with open(tmp, "wb") as f:
        f.write(b"x" * size)
    os.rename(tmp, cache.path(key))
    cache.added(key, size)


def test_adopts_entries_and_removes_temps(tmp_path) -> None:
    d = str(tmp_path / "c")
    cache = _cache(d, 100)
    _put(cache, "a", 10)
    for name in (TEMP_PREFIX + "half", "notes.txt"):
        (tmp_path / "c" / name).write_bytes(b"?")
    again = _cache(d, 100)
    assert again.keys() == ["a"] and again.lookup("a") == 10
    assert sorted(os.listdir(d)) == ["a.bin", "notes.txt"]  # a user's file stays
    _cache(d, 100, owns=True)
    assert os.listdir(d) == ["a.bin"]  # in its own directory, anything else is a leftover


def test_least_recently_used_goes_first(tmp_path) -> None:
    cache = _cache(str(tmp_path), 30)
    for key in "abc":
        _put(cache, key, 10)
    assert cache.lookup("a") == 10  # a is now the most recent
    _put(cache, "d", 10)
    assert cache.evict(keep=("d",)) == ["b"]
    assert cache.keys() == ["c", "a", "d"] and cache.used == 30
    assert not os.path.exists(cache.path("b"))


def test_spared_and_kept_entries_stay_over_budget(tmp_path) -> None:
    cache = _cache(str(tmp_path), 5)
    for key in "abc":
        _put(cache, key, 10)
    assert cache.evict(keep=("c",), spared=lambda k: k == "a") == ["b"]
    assert cache.keys() == ["a", "c"] and cache.used == 20  # nothing else may go


def test_one_build_lock_per_key(tmp_path) -> None:
    cache = _cache(str(tmp_path), 5)
    assert cache.build_lock("k") is cache.build_lock("k")
    assert cache.build_lock("k") is not cache.build_lock("j")


def test_discard_and_forget(tmp_path) -> None:
    cache = _cache(str(tmp_path), 100)
    _put(cache, "a", 1)
    _put(cache, "b", 1)
    cache.forget("a")
    assert cache.lookup("a") is None and os.path.exists(cache.path("a"))
    cache.discard("b")
    assert cache.lookup("b") is None and not os.path.exists(cache.path("b"))
