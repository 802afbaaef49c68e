"""What the FUSE server asks of the C library for its threads: malloc arenas
that keep decoded frames' memory, FUSE workers that share one CPU, and pool
threads woken on another CPU than the thread that calls them.  glibc through
ctypes (stdlib); each is a no-op where it is unavailable."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

@functools.cache
def _libc() -> Any:
    """The C library of this process, or None."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_frame_memory() -> bool:
    """Let decoded frames (1 MiB each) reuse memory already touched.  By default
    each of the 30 FUSE threads has its own malloc arena and 1 MiB blocks come
    from fresh mmaps: a FUSE thread's decode of a file's first frame took ~256
    page faults, a third of its time, in half the files (traced).  Two shared
    arenas that keep up to 32 MiB of freed memory avoid that.  Call before the
    FUSE and pool threads start, and `keep_large_blocks` once FUSE serves.
    glibc only; a no-op elsewhere."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    # until then blocks over 128 KiB are mmaps (glibc's default, which it raises
    # by itself after a large free): see keep_large_blocks
    return bool(mallopt(_M_ARENA_MAX, 2) and mallopt(_M_TRIM_THRESHOLD, 32 << 20)
                and mallopt(_M_MMAP_THRESHOLD, 128 << 10))


def keep_large_blocks() -> bool:
    """Serve blocks up to 4 MiB (decoded frames) from the arenas, not from fresh
    mmaps.  Only once the FUSE workers run: set before, their receive buffers
    (~132 KiB each, 30 threads) came from the arenas too and held ~4 MiB of an
    idle server (measured), where as mmaps they stay untouched."""
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, 4 << 20))


class FreeMemoryReturner:
    """Gives the memory that bursts of reads freed back to the system once the
    mount has been quiet for `quiet` seconds (malloc_trim).  While reads go on,
    freed frames stay for the next ones (keep_frame_memory); an idle server
    that had read a tree held ~15 MiB more than before it, ~6-11 of them free
    (measured).  `served()` marks a request; a daemon thread does the rest."""

    def __init__(self, quiet: float = 2.0) -> None:
        self.quiet = quiet
        self._served = False
        self._trim = getattr(_libc(), "malloc_trim", None)

    def served(self) -> None:
        self._served = True

    def start(self) -> None:
        if self._trim is not None:
            threading.Thread(target=self._run, name="d4c-trim", daemon=True).start()

    def _run(self) -> None:
        owed = False  # requests came since the last trim
        while True:
            time.sleep(self.quiet)
            if self._served:
                self._served, owed = False, True
            elif owed:
                owed = False
                self._trim(0)


try:
    ALL_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))  # before any thread is pinned
except (OSError, AttributeError):
    ALL_CPUS = frozenset()


def pin_fuse_workers() -> int | None:
    """Keep the FUSE workers that the calling thread starts next on one CPU (they
    inherit its affinity); which one follows the process id, so the mounts of a
    host spread over its CPUs.  Every request runs on whichever worker the kernel
    wakes, and each one takes the GIL from the last: across CPUs each handoff woke
    a halted vCPU, and a walk of the nginx tree took 1.23 s with 30 workers, 0.94
    with one, 0.99 with 30 on one CPU (this 2-vCPU VM).  Python runs one thread at
    a time anyway; what decodes beside the workers without the GIL (a large file's
    helper, a streaming body's producer) runs anywhere (run_anywhere).  The CPU,
    or None where there is one or no telling."""
    if len(ALL_CPUS) < 2:
        return None
    cpu = sorted(ALL_CPUS)[os.getpid() % len(ALL_CPUS)]
    _set_affinity(0, {cpu})
    return cpu


def run_anywhere() -> None:
    """Let the calling thread run on every CPU again (a thread started by a pinned
    FUSE worker inherits its one CPU)."""
    if ALL_CPUS:
        _set_affinity(0, set(ALL_CPUS))


def current_cpu() -> int:
    """The CPU this thread runs on, or -1 when the C library cannot say."""
    getcpu = getattr(_libc(), "sched_getcpu", None)
    return int(getcpu()) if getcpu is not None else -1


def _set_affinity(tid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except (OSError, AttributeError):
        pass  # a thread that has ended, CPUs taken away by a cpuset, not Linux: only a hint


class WakePool:
    """A thread pool whose `submit_elsewhere` wakes a thread on another CPU than
    the caller's.  Linux queues a woken thread on its waker's CPU when the two
    share a cache, even while another CPU idles, and it stays queued until the
    waker blocks: a llfs reader that called a helper and then decoded its own
    frame left the helper waiting 1-2 ms in its run queue, so the two frames
    were decoded one after the other (perf sched, this 2-CPU VM).  Before
    waking, the pool's idle threads are told to run anywhere but on the
    caller's CPU (busy ones keep theirs); the woken one lets itself run
    anywhere again at once."""

    def __init__(self, name: str, workers: int) -> None:
        self._threads: set[int] = set()  # native ids
        self._busy: set[int] = set()  # of threads running a submit_elsewhere task
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"d4c-{name}", initializer=self._started)
        self._cpus = set(ALL_CPUS)  # not the creating thread's: a FUSE worker's is one CPU

    def _started(self) -> None:
        self._threads.add(threading.get_native_id())
        run_anywhere()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._executor.submit(fn, *args)

    def submit_elsewhere(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        mine = current_cpu()
        if len(self._cpus) < 2 or mine not in self._cpus:
            return self._executor.submit(fn, *args)
        away = self._cpus - {mine}
        for tid in list(self._threads - self._busy):
            _set_affinity(tid, away)
        return self._executor.submit(self._anywhere, fn, *args)

    def _anywhere(self, fn: Callable[..., Any], *args: Any) -> Any:
        me = threading.get_native_id()
        self._busy.add(me)
        try:
            _set_affinity(0, self._cpus)
            return fn(*args)
        finally:
            self._busy.discard(me)
