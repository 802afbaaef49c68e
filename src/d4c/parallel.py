"""Running one function over many items on a few threads."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator


def run_parallel(fn, items: list, threads: int) -> None:  # type: ignore[no-untyped-def]
    """Run fn over items on `threads` threads; the first error propagates."""
    with in_background(fn, items, threads) as wait:
        wait()


@contextlib.contextmanager
def in_background(fn, items: list, threads: int) -> Iterator[Callable[[], None]]:  # type: ignore[no-untyped-def]
    """run_parallel's work, started on `threads` threads while the caller goes on; the
    function given waits for it (the first error propagates).  Leaving the block cancels
    what has not started.  One thread or one item: the work runs when waited for."""
    if threads <= 1 or len(items) <= 1:
        def run_here() -> None:
            for item in items:
                fn(item)
        yield run_here
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="d4c") as pool:
        futures = [pool.submit(fn, item) for item in items]

        def wait() -> None:
            for fut in futures:
                fut.result()
        try:
            yield wait
        finally:
            for fut in futures:
                fut.cancel()
