"""Fuzzing the image reader: any bytes give an image or a D4CError, never a crash."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_format import GOLDEN

from d4c.dimg import Image, decode_header
from d4c.errors import D4CError

with open(GOLDEN, "rb") as _f:
    SEED = _f.read()

FUZZ = settings(max_examples=int(os.environ.get("D4C_FUZZ_EXAMPLES", "400")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow], derandomize=False)


def _read_all(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".cdimg") as f:
        f.write(data)
        f.flush()
        try:
            with Image(f.name) as image:
                for e in image.entries:
                    if e.size:
                        image.read_body(e)
        except D4CError:
            pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_images(mutations: list[tuple[int, int]]) -> None:
    data = bytearray(SEED)
    for pos, value in mutations:
        data[pos] = value
    _read_all(bytes(data))


@FUZZ
@given(st.integers(0, len(SEED)), st.binary(max_size=64))
def test_spliced_images(cut: int, junk: bytes) -> None:
    _read_all(SEED[:cut] + junk + SEED[cut + len(junk):])


@FUZZ
@given(st.binary(max_size=512))
def test_header_decoder_on_random_tables(table: bytes) -> None:
    """The table decoder sees bytes past every digest check: it must hold alone."""
    try:
        decode_header(table, "fuzz", 0)
    except D4CError:
        pass
