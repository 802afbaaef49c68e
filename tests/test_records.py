"""records.Record: the equality, repr and replace that the image tree relies on."""

from __future__ import annotations

import pytest

from d4c.image.tree import DeltaStep, Entry, EntryType


def test_equal_by_fields_and_type() -> None:
    a = Entry(b"etc/x", EntryType.FILE, size=3, digest=b"d")
    assert a == Entry(b"etc/x", EntryType.FILE, size=3, digest=b"d")
    assert a != Entry(b"etc/x", EntryType.FILE, size=4, digest=b"d")
    assert a != DeltaStep(1, 2)
    with pytest.raises(TypeError):
        hash(a)  # mutable records are not dict keys


def test_defaults_are_not_shared() -> None:
    a, b = Entry(b"a", EntryType.DIR), Entry(b"b", EntryType.DIR)
    a.xattrs[b"user.k"] = b"v"
    a.delta_steps.append(DeltaStep(1, 2))
    assert b.xattrs == {} and b.delta_steps == []


def test_replace_copies_and_checks_names() -> None:
    a = Entry(b"f", EntryType.FILE, size=1)
    b = a.replace(size=2)
    assert (a.size, b.size, b.path) == (1, 2, b"f")
    with pytest.raises(TypeError):
        a.replace(sise=2)


def test_repr_names_every_field() -> None:
    text = repr(DeltaStep(3, 10, size=5))
    assert text.startswith("DeltaStep(method=3, length=10, size=5,") and "key=None" in text
