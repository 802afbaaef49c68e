"""Type stub of the compiled kernel d4c._tables (_tables.pyx); _tables_py.py is its pure-Python reference."""

from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer

# a Cython typed memoryview takes any uint8 buffer; numpy declares __buffer__ only from Python 3.12 on
_Bytes: TypeAlias = Buffer | NDArray[np.uint8]

API_VERSION: Final = "1"

def scan_tree(buf: _Bytes, pos: int, count: int, max_path: int, max_name: int, max_xattr_name: int,
              max_xattr_value: int, max_symlink: int) -> tuple[memoryview, int, int, int, int]:
    """(rows: int64 memoryview of shape (count, 16), end, error code or 0, failing index, offending value)."""
