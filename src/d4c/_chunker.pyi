"""Type stub of the compiled kernel d4c._chunker (_chunker.pyx); _chunker_py.py is its pure-Python reference."""

from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer

# Cython typed memoryviews take any buffer of the right item type; numpy declares
# __buffer__ only from Python 3.12 on, so arrays are named as well.
_Bytes: TypeAlias = Buffer | NDArray[np.uint8]
_Gear: TypeAlias = Buffer | NDArray[np.uint64]  # 256 uint64 entries
_Cuts: TypeAlias = memoryview | NDArray[np.uint64]  # uint64, written in place

API_VERSION: Final = "1"

def find_cuts(data: _Bytes, gear: _Gear, min_size: int, avg_size: int, max_size: int, mask_small: int,
              mask_large: int, out: _Cuts, final: bool) -> int:
    """Write chunk end offsets into out; return how many (without final, not the last chunk)."""
