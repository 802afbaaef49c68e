"""Files kept on disk within a byte budget: the bookkeeping that the mount's
cache of rebuilt bodies (llfs/cache.py) and the server's cache of merged
deltas (server/updates.py) share.  What goes in, and when an entry may not go,
is theirs; this is the index, the least recently used order, one build per key
at a time and the cleanup of what a crash left."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, TypeVar

K = TypeVar("K", bound=Hashable)

TEMP_PREFIX = ".tmp-"  # files being written; never adopted


class DiskCache(Generic[K]):
    """One file per key in `directory`, named by `name(key)`, evicted least
    recently used first beyond `limit` bytes.

    At start the files whose names `parse` maps to a key are adopted (a cache
    outlives its process) and temp files are removed; with `owns_directory`
    every other name is removed as well (nothing but this cache writes there),
    else it is left alone (a directory a user named may hold other files).
    Writers write to `temp_path()` and rename to `path(key)`, so a file under a
    key's name is always whole."""

    def __init__(self, directory: str, limit: int, name: Callable[[K], str], parse: Callable[[str], K | None],
                 *, owns_directory: bool = False) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.dir = directory
        self.limit = limit
        self._name = name
        self._lock = threading.Lock()
        self._sizes: OrderedDict[K, int] = OrderedDict()
        self._building: dict[Hashable, threading.Lock] = {}
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            key = None if entry.startswith(TEMP_PREFIX) else parse(entry)
            with contextlib.suppress(OSError):  # gone meanwhile
                if key is not None and os.path.isfile(path):
                    self._sizes[key] = os.path.getsize(path)
                elif entry.startswith(TEMP_PREFIX) or owns_directory:
                    os.unlink(path)

    def path(self, key: K) -> str:
        return os.path.join(self.dir, self._name(key))

    def temp_path(self, suffix: str = "") -> str:
        """A new name to write an entry under before it is renamed to `path`."""
        return os.path.join(self.dir, f"{TEMP_PREFIX}{os.urandom(8).hex()}{suffix}")

    def build_lock(self, key: Hashable) -> threading.Lock:
        """Held while an entry is looked up and built, so concurrent misses build
        it once: by its key, or by what it is known as before it is built."""
        with self._lock:
            return self._building.setdefault(key, threading.Lock())

    def lookup(self, key: K) -> int | None:
        """The size of the entry (now the most recently used), or None."""
        with self._lock:
            if key not in self._sizes:
                return None
            self._sizes.move_to_end(key)
            return self._sizes[key]

    def added(self, key: K, size: int) -> None:
        """`path(key)` now holds a finished entry of `size` bytes."""
        with self._lock:
            self._sizes[key] = size
            self._sizes.move_to_end(key)

    def forget(self, key: K) -> None:
        """Drop `key` from the index (its file is gone or not to be trusted)."""
        with self._lock:
            self._sizes.pop(key, None)

    def discard(self, key: K) -> None:
        """Drop `key` and its file."""
        self.forget(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._sizes)

    def evict(self, keep: Iterable[K] = (), enough: Callable[[], bool] | None = None,
              spared: Callable[[K], bool] | None = None) -> list[K]:
        """Least recently used entries go, except `keep` and those `spared` says
        must stay, until `enough()` (by default: until the rest fit the limit) or
        nothing is left to evict.  An entry still open elsewhere stays readable
        through its descriptor.  Returns the evicted keys."""
        keep = set(keep)
        gone: list[K] = []
        while not (enough() if enough is not None else self.used <= self.limit):
            with self._lock:
                victim = next((k for k in self._sizes if k not in keep and not (spared and spared(k))), None)
                if victim is None:
                    return gone
                del self._sizes[victim]
            gone.append(victim)
            with contextlib.suppress(OSError):  # gone already, or a cache directory gone read-only
                os.unlink(self.path(victim))
        return gone

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._sizes.values())
