"""One ctr-cli command in a fresh process, timed around the call only (not
interpreter start-up, as bench.runner does for the delta tools): prints
`seconds peak_rss_kib`.  Usage: python -m bench.cli_runner ARGS..."""

from __future__ import annotations

import contextlib
import io
import sys
import time

from .runner import vmhwm_kib


def main() -> int:
    from d4c.cli import main as cli_main
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(sys.argv[1:])
    secs = time.perf_counter() - start
    if rc:
        return rc
    print(f"{secs:.4f} {vmhwm_kib()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
