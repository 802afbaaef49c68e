"""Type stub of the compiled kernel d4c._patch (_patch.pyx); _patch_py.py is its pure-Python reference."""

from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer, Self, disjoint_base

# Cython typed memoryviews take any buffer of the right item type; numpy declares
# __buffer__ only from Python 3.12 on, so arrays are named as well.
_Bytes: TypeAlias = Buffer | NDArray[np.uint8]  # read only: bytes, mmap, memoryview, uint8 array
_OutBytes: TypeAlias = bytearray | memoryview | NDArray[np.uint8]  # written in place
_Index: TypeAlias = Buffer | NDArray[np.int32] | NDArray[np.int64]  # int32 or int64 items
_Controls: TypeAlias = Buffer | NDArray[np.int64]  # int64 triples

API_VERSION: Final = "5"

def suffix_array(text: _Bytes, sa: _Index) -> int:
    """Fill sa (len(text) + 1 entries); 0, or -1 when memory ran out."""

def diff(old: _Bytes, new: _Bytes, sa: _Index, diff_out: _OutBytes, extra_out: _OutBytes,
         slack: int = 8) -> tuple[bytes, int, int] | None:
    """(int64 control triples as bytes, diff length, extra length), or None when memory ran out."""

def apply(old: _Bytes, ctrl: _Controls, diff: _Bytes, extra: _Bytes, out: _OutBytes) -> int:
    """Rebuild new into out; 0, or a negative code -1 .. -6."""

def gather_old(old: _Bytes, ctrl: _Controls, out: _OutBytes) -> int:
    """The old bytes under each add byte into out; 0, or apply's negative codes."""

def scatter_runs(stream: _Bytes, count: int, run: int, pos: int, value: int, begin: int,
                 out: _OutBytes) -> tuple[int, int, int] | int:
    """The runs of a run-coded add stream inside [begin, begin + len(out)) into out:
    (run, pos, value) to continue from, or a negative code -1 .. -3."""

@disjoint_base  # a cdef class with C fields
class AddCoder:
    """The context-mixing coder of the add stream; state carries over between segments."""

    def __new__(cls, encoding: bool, data: bytes | None = None) -> Self: ...  # __cinit__
    def encode(self, diff: _Bytes, old_ctx: _Bytes) -> None: ...
    def decode(self, old_ctx: _Bytes, out: _OutBytes) -> None: ...
    def finish(self) -> bytes: ...
