"""The one place the benchmarks get matplotlib: optional (requirements-bench.txt,
installed by `make bench`), drawn headless.  Without it a benchmark still writes
its tables and says why there is no plot."""

from __future__ import annotations

import sys
from typing import Any


def pyplot(what: str) -> Any:
    """matplotlib.pyplot on the Agg backend, or None (and a line on stderr)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{what}: matplotlib is missing (pip install -r requirements-bench.txt): no plot", file=sys.stderr)
        return None
    return plt


def target_line(ax: Any, value: float, label: str, vertical: bool = False) -> None:
    """A dashed line at an issue's target, labelled in the legend."""
    (ax.axvline if vertical else ax.axhline)(value, color="#c33", linestyle="--", linewidth=1, label=label)
