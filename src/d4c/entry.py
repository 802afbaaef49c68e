"""Entry points of the binaries that later issues fill (snapshotter, server).

Until then they say so plainly instead of pretending to run.
"""

from __future__ import annotations

import sys

from . import __version__
from .errors import EXIT_UNSUPPORTED


def placeholder(prog: str, issue: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["version"]):
        print(f"{prog} {__version__}")
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {prog} [--version]\n\n{prog} is not implemented yet (issue {issue}).")
        return 0
    print(f"{prog}: not implemented yet (issue {issue})", file=sys.stderr)
    return EXIT_UNSUPPORTED
