"""The .pyi stubs of the Cython kernels name exactly what the compiled modules export,
and the pure-Python references (which accel swaps in) export the same API."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest

import d4c
from d4c import accel

KERNELS = ("_patch", "_chunker", "_tables", "_deflate", "_x86")

# What a reference may define beyond the API: _tables_py names the column, error and
# entry-type codes that _tables.pyx keeps as C enums (not importable from the kernel), and so on.
REFERENCE_EXTRAS = {"_tables": re.compile(r"[CET]_[A-Z_]+|NCOL|MAX_ID|MAX_FILE_SIZE"),
                    # _deflate_py names deflate's tables and sizes, which _deflate.pyx keeps in C
                    "_deflate": re.compile(r"[LD](BASE|EXT)|ORDER|[LDB]L?_CODES|HEAP_SIZE|END_BLOCK|MATCH_SHIFT")}
# Parameters of the compiled kernel its reference lacks: _patch_py.diff always uses slack 8.
REFERENCE_MISSING_PARAMS = {("_patch", "diff"): ["slack"]}


def compiled(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"d4c.{name}")
    except ImportError:
        if accel.pure_python():
            pytest.skip("D4C_PUREPYTHON is set and the kernels are not built")
        raise


def stub(name: str) -> ast.Module:
    return ast.parse((Path(d4c.__file__).parent / f"{name}.pyi").read_text())


def stub_api(tree: ast.Module) -> dict[str, ast.AST]:
    """The stub's public top-level definitions (imports and _aliases are not API)."""
    api: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            api[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            api[node.target.id] = node
        elif isinstance(node, ast.Assign):
            api.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return {k: v for k, v in api.items() if not k.startswith("_")}


def module_api(mod: ModuleType) -> set[str]:
    """Public names the module defines itself (not imported modules, typing helpers, __future__)."""
    return {k for k, v in vars(mod).items() if not k.startswith("_") and not isinstance(v, ModuleType)
            and getattr(v, "__module__", mod.__name__) == mod.__name__}


def public(names: Iterable[str]) -> set[str]:
    return {k for k in names if not k.startswith("_")}


def stub_params(node: ast.FunctionDef) -> list[str]:
    a = node.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]


def runtime_params(func: object) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]  # type: ignore[arg-type]


def functions(api: dict[str, ast.AST]) -> dict[str, ast.FunctionDef]:
    """Top-level functions and class methods, as "f" and "Class.m"; a constructor
    (__new__ for a cdef class, __init__ in Python) as "Class"."""
    out: dict[str, ast.FunctionDef] = {}
    for name, node in api.items():
        if isinstance(node, ast.FunctionDef):
            out[name] = node
        elif isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, ast.FunctionDef):
                    out[name if m.name in ("__new__", "__init__") else f"{name}.{m.name}"] = m
    return out


def classes(api: dict[str, ast.AST]) -> dict[str, ast.ClassDef]:
    return {k: v for k, v in api.items() if isinstance(v, ast.ClassDef)}


def lookup(mod: ModuleType, dotted: str) -> object:
    obj: object = mod
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", KERNELS)
def test_stub_matches_compiled_kernel(name: str) -> None:
    mod, api = compiled(name), stub_api(stub(name))
    assert set(api) == module_api(mod)
    for cls, body in classes(api).items():
        assert public(m.name for m in body.body if isinstance(m, ast.FunctionDef)) == public(vars(getattr(mod, cls)))
    for dotted, node in functions(api).items():
        if not isinstance(lookup(mod, dotted), type):  # a cdef class's constructor has no signature to read
            assert stub_params(node) == runtime_params(lookup(mod, dotted)), dotted
    # a stale stub shows first in its API_VERSION
    version = api["API_VERSION"]
    assert isinstance(version, ast.AnnAssign) and isinstance(version.value, ast.Constant)
    assert version.value.value == mod.API_VERSION


@pytest.mark.parametrize("name", KERNELS)
def test_reference_has_the_stubbed_api(name: str) -> None:
    ref, api = importlib.import_module(f"d4c.{name}_py"), stub_api(stub(name))
    names = module_api(ref)
    assert set(api) - names == set(), "the reference lacks these"
    extras = REFERENCE_EXTRAS.get(name)
    assert {n for n in names - set(api) if not (extras and extras.fullmatch(n))} == set(), "not in the stub"
    for cls, body in classes(api).items():
        assert public(m.name for m in body.body if isinstance(m, ast.FunctionDef)) == public(vars(getattr(ref, cls)))
    for dotted, node in functions(api).items():
        want = [p for p in stub_params(node) if p not in REFERENCE_MISSING_PARAMS.get((name, dotted), [])]
        assert runtime_params(lookup(ref, dotted)) == want, dotted
