"""Type stub of the compiled kernel d4c._x86 (_x86.pyx); _x86_py.py is its pure-Python reference."""

from typing import Final

from typing_extensions import Buffer

API_VERSION: Final = "1"

def encode(buf: Buffer, start: int, end: int) -> None:
    """Branch targets of buf[start:end] made absolute, in place."""

def decode(buf: Buffer, start: int, end: int) -> None:
    """The inverse of encode, in place."""

def decoded(data: Buffer) -> bytes:
    """decode of a copy of `data` (the whole of it), as bytes."""
