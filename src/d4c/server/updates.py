"""What the server answers a client that holds some images and wants a tag:
the cheapest path of stored deltas, merged into one delta once and kept in a
byte-budgeted cache, pinned while a plan may still download it."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from ..digests import path_sha256
from ..errors import NotFound
from .store import Artifact, Store

PIN_TIME = 600.0         # seconds a planned payload is kept for its download


# a merged payload: <from id or "base">-<to id>-<sha256>.cdimg; anything else in merged/ is a temp
MERGED_NAME = re.compile(r"^(?:base|[0-9a-f]{64})-[0-9a-f]{64}-[0-9a-f]{64}\.cdimg$")


class Updates:
    """Plans and merged payloads, cached by (from, to) within a byte budget.  A
    payload a plan names is pinned until a client has downloaded it whole or
    `pin_time` has passed, so a concurrent merge cannot evict it in between."""

    def __init__(self, store: Store, cache_limit: int = 8 << 30, threads: int = 2,
                 pin_time: float = PIN_TIME) -> None:
        self.store = store
        self.dir = os.path.join(store.root, "merged")
        os.makedirs(self.dir, exist_ok=True)
        self.limit = cache_limit
        self.threads = threads
        self.pin_time = pin_time
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._cached: OrderedDict[str, int] = OrderedDict()
        self._pins: dict[str, tuple[int, float]] = {}   # name -> (downloads outstanding, pinned until)
        self.merges = 0
        for name in sorted(os.listdir(self.dir)):
            # only finished merges have their final name; a temp a crash left is never adopted
            if MERGED_NAME.match(name):
                self._cached[name[:-6]] = os.path.getsize(os.path.join(self.dir, name))
            else:
                os.unlink(os.path.join(self.dir, name))

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
                "url": f"/v1/payloads/{digest}"}

    def _merged(self, start: str, target: str, path: list[Artifact]) -> tuple[str, int]:
        key = f"{start or 'base'}-{target}"
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            found = self._find(key)
            if found:
                return found
            return self._build(key, start, path)

    def _find(self, key: str) -> tuple[str, int] | None:
        """The cached merge for `key`, pinned for the download its plan announces."""
        with self._lock:
            for name in self._cached:
                if name.startswith(key + "-"):
                    self._cached.move_to_end(name)
                    self._pin(name)
                    return name.rsplit("-", 1)[1], self._cached[name]
        return None

    def _pin(self, name: str) -> None:
        count, _ = self._pins.get(name, (0, 0.0))
        self._pins[name] = (count + 1, time.monotonic() + self.pin_time)

    def _pinned(self, name: str, now: float) -> bool:
        count, until = self._pins.get(name, (0, 0.0))
        if count and until > now:
            return True
        self._pins.pop(name, None)
        return False

    def downloaded(self, digest: str) -> None:
        """A client has the whole payload: its plan's pin is released."""
        with self._lock:
            for name, (count, until) in list(self._pins.items()):
                if name.endswith("-" + digest):
                    if count > 1:
                        self._pins[name] = (count - 1, until)
                    else:
                        del self._pins[name]

    def _build(self, key: str, start: str, path: list[Artifact]) -> tuple[str, int]:
        """Merge the chain (never touching stored artifacts) into the cache; the
        merge is pinned before the lock is let go, so another plan's eviction
        cannot take it before this plan is answered."""
        from ..image.stack import close_all, open_stack
        from ..image.deltas import merge_stack, patch_image
        self.merges += 1
        below = self.store.chain_to(start) if start else []
        files = [self.store.path(a.digest) for a in below + path]
        tmp = os.path.join(self.dir, f".tmp-{uuid.uuid4().hex}.partial")
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
            name = f"{key}-{path_sha256(tmp).hexdigest()}"
            os.rename(tmp, os.path.join(self.dir, name + ".cdimg"))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        with self._lock:
            size = self._cached[name] = os.path.getsize(os.path.join(self.dir, name + ".cdimg"))
            self._pin(name)
            self._evict(keep=name)
        return name.rsplit("-", 1)[1], size

    def _evict(self, keep: str) -> None:
        """Oldest first, down to the budget; pinned payloads stay (the cache may
        then exceed its budget until their downloads end or their pins expire)."""
        now = time.monotonic()
        total = sum(self._cached.values())
        for old in list(self._cached):
            if total <= self.limit:
                break
            if old == keep or self._pinned(old, now):
                continue
            total -= self._cached.pop(old)
            os.unlink(os.path.join(self.dir, old + ".cdimg"))

    def payload(self, digest: str) -> str:
        """The file holding the bytes named `digest`: an artifact or a merge."""
        try:
            path = self.store.path(digest)
        except NotFound:
            path = ""
        if path and os.path.exists(path):
            return path
        with self._lock:
            for name in self._cached:
                if name.endswith("-" + digest):
                    if name in self._pins:  # a download in progress keeps its pin for another pin_time
                        self._pins[name] = (self._pins[name][0], time.monotonic() + self.pin_time)
                    return os.path.join(self.dir, name + ".cdimg")
        raise NotFound(f"no payload {digest!r} (evicted from the cache: ask for the update again)")
