"""Type stub of the compiled kernel d4c._deflate (_deflate.pyx); _deflate_py.py is its pure-Python reference."""

from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer

# a Cython typed memoryview takes any uint8 buffer; numpy declares __buffer__ only from Python 3.12 on
_Bytes: TypeAlias = Buffer | NDArray[np.uint8]

API_VERSION: Final = "3"
E_TRUNCATED: Final = -1
E_BAD: Final = -2
E_TOO_MANY: Final = -3
E_NOMEM: Final = -4
E_OVERFLOW: Final = -5

def tokens(stream: _Bytes, max_tokens: int,
           history: int = 0) -> tuple[int, NDArray[np.uint32], NDArray[np.int64], int]:
    """(0 or a negative error, tokens, blocks [n, 2] of (type, token count), bytes of `stream` used);
    distances may reach `history` bytes before the stream."""

def encode(toks: NDArray[np.uint32], blocks: NDArray[np.int64], content: _Bytes,
           capacity: int) -> tuple[int, bytes]:
    """(0 or a negative error, the deflate stream of `toks` cut into `blocks`, at most `capacity` bytes)."""

def common_runs(new: NDArray[np.uint32], old: NDArray[np.uint32], k: int, min_run: int) -> NDArray[np.int64]:
    """(n, 3) of (new start, old start, count): runs of at least min_run equal tokens in new's order,
    found through hashed windows of k tokens; after a run its diagonal is tried first."""
