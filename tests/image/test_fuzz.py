"""Fuzzing the image reader: any bytes give an image or a D4CError, never a crash."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import run_cli
from test_format import GOLDEN
from test_grouped import GOLDEN_V2, GOLDEN_V2_DICT
from test_x86 import GOLDEN_V2_X86
from test_hostile import MINUS_ONE, image_of

from d4c.image.reader import Image
from d4c.image.format import decode_tables
from d4c.errors import D4CError
from d4c.image.tree import Entry, EntryType

with open(GOLDEN, "rb") as _f:
    SEED = _f.read()
with open(GOLDEN_V2, "rb") as _f:
    SEED_V2 = _f.read()  # format 2: bodies in a group frame
with open(GOLDEN_V2_DICT, "rb") as _f:
    SEED_V2_DICT = _f.read()  # format 2: group frames coded against a dictionary frame
with open(GOLDEN_V2_X86, "rb") as _f:
    SEED_V2_X86 = _f.read()  # format 2: x86 programs stored converted, grouped and in frames

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


@pytest.mark.parametrize("seed", [SEED, SEED_V2, SEED_V2_DICT, SEED_V2_X86],
                         ids=["format 1", "format 2", "format 2 dictionary", "format 2 x86"])
@FUZZ
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_images(seed: bytes, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(seed)
    for pos, value in mutations:
        data[pos % len(data)] = value
    _read_all(bytes(data))


@FUZZ
@given(st.integers(0, len(SEED)), st.binary(max_size=64))
def test_spliced_images(cut: int, junk: bytes) -> None:
    _read_all(SEED[:cut] + junk + SEED[cut + len(junk):])


@FUZZ
@given(st.binary(max_size=512))
def test_header_decoder_on_random_tables(table: bytes) -> None:
    """The table decoder sees bytes past every digest check: it must hold alone."""
    for grouped, dictionary, x86 in ((False, False, False), (True, False, False), (True, True, False),
                                     (True, True, True)):
        try:
            decode_tables(table, "fuzz", 0, grouped=grouped, dictionary=dictionary, x86=x86)
        except D4CError:
            pass


# ---------------------------------------------------------------- crafted trees
# Entries that lie in the ways the field found: sizes that do not match their
# digest (or another file's size for the same digest), owner -1, device numbers
# Linux cannot hold, deep directory chains.  Whatever is drawn, an image either
# refuses with a D4CError or holds only what unpack and the mount can honour.

_CONTENTS = [b"hello", b"x" * 700, b""]
_OWNERS = st.sampled_from([0, 1000, MINUS_ONE - 1, MINUS_ONE])
_DEVICES = st.tuples(st.sampled_from([0, 1, 4095, 4096, 1 << 31, MINUS_ONE]),
                     st.sampled_from([0, 3, (1 << 20) - 1, 1 << 20, MINUS_ONE]))


@st.composite
def crafted_trees(draw) -> tuple[list[Entry], dict[bytes, bytes]]:  # type: ignore[no-untyped-def]
    depth = draw(st.integers(0, 1500))
    chain = [b"/".join([b"d"] * n) for n in range(1, depth + 1)]
    deepest = chain[-1] + b"/" if chain else b""
    entries = [Entry(b"", EntryType.DIR, uid=draw(_OWNERS), gid=draw(_OWNERS))]
    entries += [Entry(p, EntryType.DIR, mode=0o700) for p in chain]
    bodies = {}
    for k in range(draw(st.integers(0, 4))):
        content = draw(st.sampled_from(_CONTENTS))
        claimed = draw(st.sampled_from([len(content), len(content) + 5, 0, 1 << 40]))
        digest = hashlib.sha256(draw(st.sampled_from(_CONTENTS))).digest()
        path = deepest + b"f%d" % k
        entries.append(Entry(path, EntryType.FILE, mode=0o4755, uid=draw(_OWNERS), gid=draw(_OWNERS),
                             size=claimed, digest=digest))
        bodies[path] = content
    if draw(st.booleans()):
        entries.append(Entry(deepest + b"zdev", EntryType.CHARDEV, uid=draw(_OWNERS), rdev=draw(_DEVICES)))
    return entries, bodies


@FUZZ
@given(crafted_trees())
def test_crafted_trees_are_refused_or_honest(tree_and_bodies) -> None:  # type: ignore[no-untyped-def]
    entries, bodies = tree_and_bodies
    data = image_of(entries, bodies)
    with tempfile.NamedTemporaryFile(suffix=".dimg") as f:
        f.write(data)
        f.flush()
        try:
            with Image(f.name) as image:
                sizes: dict[bytes | None, int] = {}
                for e in image.entries:
                    assert MINUS_ONE not in (e.uid, e.gid)
                    assert e.rdev[0] < 4096 and e.rdev[1] < 1 << 20
                    if e.type == EntryType.FILE:
                        assert sizes.setdefault(e.digest, e.size) == e.size
                        if e.size:
                            image.read_body(e)  # only an honest body gets past this
        except D4CError:
            pass


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 40))
@given(crafted_trees())
def test_crafted_trees_unpack_or_leave_nothing(tree_and_bodies) -> None:  # type: ignore[no-untyped-def]
    """Unpacked, an image gives exactly its owners (never root for -1) or one
    line and nothing on disk, however deep its tree."""
    entries, bodies = tree_and_bodies
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "x.dimg")
        with open(path, "wb") as f:
            f.write(image_of(entries, bodies))
        code, _, err = run_cli("unpack", "--dimg", path, "--out", os.path.join(tmp, "out"), "-q")
        if code:
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert sorted(os.listdir(tmp)) == ["x.dimg"]
        elif os.geteuid() == 0:
            for e in entries:
                if e.type == EntryType.FILE:
                    st_ = os.lstat(os.path.join(tmp, "out", e.path.decode()))
                    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (e.uid, e.gid, e.mode)
    finally:
        subprocess.run(["rm", "-rf", tmp], check=True)  # shutil.rmtree recurses: a deep tree is too deep for it
