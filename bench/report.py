"""Where a benchmark's results go: bench/results/NAME.md (the table, also printed),
NAME.json (its numbers) and NAME.png (its plot, drawn from the numbers)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save(name: str, text: str, data: Any, plot: Callable[[Any, str], None]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    plot(data, os.path.join(RESULTS, f"{name}.png"))
    print(text)
