"""d4c: delta updates for container images (a Python D4C)."""

import os

# numpy's OpenBLAS starts a spinning thread per core at import (~0.15 s of CPU a process,
# measured here) for matrix work d4c never does; one thread, unless the user says otherwise
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
