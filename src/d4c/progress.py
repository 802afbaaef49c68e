"""A one-line progress display on stderr: only on a terminal, never with --quiet."""

from __future__ import annotations

import sys
import threading
import time

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Counts bytes and items; redraws at most 10 times a second. Thread-safe."""

    def __init__(self, label: str, total_bytes: int = 0, total_items: int = 0) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.bytes = 0
        self.items = 0
        self.enabled = not _quiet and sys.stderr.isatty()
        self._lock = threading.Lock()
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.items += items
            if self.enabled:
                now = time.monotonic()
                if now - self._last >= 0.1:
                    self._last = now
                    self._draw()

    def _draw(self) -> None:
        parts = [self.label]
        if self.total_items:
            parts.append(f"{self.items}/{self.total_items}")
        if self.total_bytes:
            pct = 100.0 * self.bytes / self.total_bytes
            parts.append(f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)} ({pct:.0f}%)")
        elif self.bytes:
            parts.append(human_bytes(self.bytes))
        elapsed = time.monotonic() - self._start
        if elapsed > 0 and self.bytes:
            parts.append(f"{human_bytes(self.bytes / elapsed)}/s")
        sys.stderr.write("\r\x1b[K" + "  ".join(parts))
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()
