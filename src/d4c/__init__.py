"""d4c: delta updates for container images (a Python D4C)."""

__version__ = "0.1.0"
