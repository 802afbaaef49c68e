"""Running one function over many items on a few threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def run_parallel(fn, items: list, threads: int) -> None:  # type: ignore[no-untyped-def]
    """Run fn over items on `threads` threads; the first error propagates."""
    if threads <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="d4c") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
