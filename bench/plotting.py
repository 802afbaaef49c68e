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


def bars(ax: Any, labels: list[str], values: list[float], color: Any, xlabel: str) -> None:
    """Horizontal bars, one labelled row each, first row on top."""
    ax.barh(range(len(values)), values, color=color)
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)


def save_figure(plt: Any, fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
