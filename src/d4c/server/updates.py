"""What the server answers a client that holds some images and wants a tag:
the cheapest path of stored deltas, merged into one delta once and kept in a
byte-budgeted cache, pinned while a plan may still download it."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from typing import Any

from ..digests import path_sha256
from ..diskcache import DiskCache
from ..errors import NotFound
from .store import Artifact, Store

PIN_TIME = 600.0         # seconds a planned payload is kept for its download


# a merged payload: <from id or "base">-<to id>-<sha256>.cdimg; anything else in merged/ is a temp
MERGED_NAME = re.compile(r"^((?:base|[0-9a-f]{64})-[0-9a-f]{64})-([0-9a-f]{64})\.cdimg$")

Merged = tuple[str, str]  # (key: "<from id or base>-<to id>", sha256 of the payload)


def _merged_name(merged: Merged) -> str:
    return f"{merged[0]}-{merged[1]}.cdimg"


def _parse_merged(name: str) -> Merged | None:
    m = MERGED_NAME.match(name)
    return (m.group(1), m.group(2)) if m else None


class Updates:
    """Plans and merged payloads, cached by (from, to) within a byte budget.  A
    payload a plan names is pinned until a client has downloaded it whole or
    `pin_time` has passed, so a concurrent merge cannot evict it in between."""

    def __init__(self, store: Store, cache_limit: int = 8 << 30, threads: int = 2,
                 pin_time: float = PIN_TIME) -> None:
        self.store = store
        # only finished merges have their final name; a temp a crash left is never adopted
        self.cache: DiskCache[Merged] = DiskCache(os.path.join(store.root, "merged"), cache_limit, _merged_name,
                                                  _parse_merged, owns_directory=True)
        self.threads = threads
        self.pin_time = pin_time
        self._lock = threading.Lock()
        self._pins: dict[Merged, tuple[int, float]] = {}   # (downloads outstanding, pinned until)
        self.merges = 0

    def plan(self, tag: str, have: set[str]) -> dict[str, Any]:
        target = self.store.resolve_tag(tag)
        path = self.store.cheapest(target, have)
        if not path:
            return {"tag": tag, "to": "sha256:" + target, "from": "sha256:" + target, "upToDate": True}
        start = path[0].parent
        if len(path) == 1:
            digest, size = path[0].digest, path[0].size
        else:
            digest, size = self._merged(start, target, path)
        return {"tag": tag, "to": "sha256:" + target, "from": ("sha256:" + start) if start else None,
                "dimgs": len(path), "artifacts": [a.digest for a in path], "size": size, "sha256": digest,
                "url": f"/v1/payloads/{digest}", "signatures": self.store.signatures(target)}

    def _merged(self, start: str, target: str, path: list[Artifact]) -> tuple[str, int]:
        key = f"{start or 'base'}-{target}"
        with self.cache.build_lock(key):  # one merge per (from, to), whatever its digest
            found = self._find(key)
            if found:
                return found
            return self._build(key, start, path)

    def _find(self, key: str) -> tuple[str, int] | None:
        """The cached merge for `key`, pinned for the download its plan announces."""
        with self._lock:
            for merged in self.cache.keys():
                if merged[0] == key:
                    size = self.cache.lookup(merged)
                    if size is not None:
                        self._pin(merged)
                        return merged[1], size
        return None

    def _pin(self, merged: Merged) -> None:
        count, _ = self._pins.get(merged, (0, 0.0))
        self._pins[merged] = (count + 1, time.monotonic() + self.pin_time)

    def _pinned(self, merged: Merged, now: float) -> bool:
        count, until = self._pins.get(merged, (0, 0.0))
        if count and until > now:
            return True
        self._pins.pop(merged, None)
        return False

    def downloaded(self, digest: str) -> None:
        """A client has the whole payload: its plan's pin is released."""
        with self._lock:
            for merged, (count, until) in list(self._pins.items()):
                if merged[1] == digest:
                    if count > 1:
                        self._pins[merged] = (count - 1, until)
                    else:
                        del self._pins[merged]

    def _build(self, key: str, start: str, path: list[Artifact]) -> tuple[str, int]:
        """Merge the chain (never touching stored artifacts) into the cache; the
        merge is pinned before the lock is let go, so another plan's eviction
        cannot take it before this plan is answered."""
        from ..image.stack import close_all, open_stack
        from ..image.deltas import merge_stack, patch_image
        self.merges += 1
        below = self.store.chain_to(start) if start else []
        files = [self.store.path(a.digest) for a in below + path]
        tmp = self.cache.temp_path(".partial")
        try:
            stack = open_stack(files[1:], files[0])
            try:
                if start:
                    # every stored body was checked at upload (Store.add), and a device checks
                    # what it loads: checking the copied bodies again would only slow merges
                    merge_stack(stack[len(below) - 1:], tmp, cdimg=True, threads=self.threads, check_copied=False)
                else:
                    patch_image(stack[-1], tmp, cdimg=True, threads=self.threads)
            finally:
                close_all(stack)
            merged = (key, path_sha256(tmp).hexdigest())
            os.rename(tmp, self.cache.path(merged))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with self._lock:
            size = os.path.getsize(self.cache.path(merged))
            self.cache.added(merged, size)
            self._pin(merged)
            # oldest first, down to the budget; pinned payloads stay (the cache may then
            # exceed its budget until their downloads end or their pins expire)
            now = time.monotonic()
            self.cache.evict(keep=(merged,), spared=lambda m: self._pinned(m, now))
        return merged[1], size

    def payload(self, digest: str) -> str:
        """The file holding the bytes named `digest`: an artifact or a merge."""
        try:
            path = self.store.path(digest)
        except NotFound:
            path = ""
        if path and os.path.exists(path):
            return path
        with self._lock:
            for merged in self.cache.keys():
                if merged[1] == digest:
                    if merged in self._pins:  # a download in progress keeps its pin for another pin_time
                        self._pins[merged] = (self._pins[merged][0], time.monotonic() + self.pin_time)
                    return self.cache.path(merged)
        raise NotFound(f"no payload {digest!r} (evicted from the cache: ask for the update again)")
