"""The package's import rules (README, Layout): each part imports only the parts below it.

Every import in src/d4c is read (function-level ones too, relative ones resolved),
so a rule broken anywhere fails here with the file, the line and the rule.
"""

from __future__ import annotations

import ast
import os
import re

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

# part -> the module prefixes that belong to it (longest prefix wins)
PARTS = {
    "kernels": ["d4c._patch", "d4c._chunker", "d4c._tables", "d4c._patch_py", "d4c._chunker_py", "d4c._tables_py"],
    "base": ["d4c", "d4c.errors", "d4c.paths", "d4c.fsutil", "d4c.digests", "d4c.progress", "d4c.codec",
             "d4c.zstdframes", "d4c.accel", "d4c.daemons", "d4c.args", "d4c.parallel", "d4c.records",
             "d4c.diskcache"],
    "engine": ["d4c.engine"],
    "image": ["d4c.image"],
    "oci": ["d4c.oci"],
    "containerd-api": ["d4c.snap.api"],  # generated from containerd's protos
    "containerd": ["d4c.containerd"],
    "llfs": ["d4c.llfs"],
    "snap": ["d4c.snap"],
    "server": ["d4c.server"],
    "cli": ["d4c.cli"],
    "entry": ["d4c.__main__", "d4c.multicall", "d4c.snap.__main__", "d4c.server.__main__"],
}
# what each part may import besides itself
ALLOWED = {
    "kernels": set(),  # kernels know no Python module of d4c
    "base": {"kernels"},
    "engine": {"base", "kernels"},  # bytes and files, never images
    "image": {"base", "kernels", "engine"},  # no FUSE, containerd, snapshotter or server
    "oci": {"base", "engine", "image", "containerd"},
    "containerd-api": set(),
    "containerd": {"base", "containerd-api"},
    "llfs": {"base", "kernels", "engine", "image"},  # knows no snapshotter
    # snap/remote.py: the registry artifacts (oci) and the d4c server's client (server.client)
    "snap": {"base", "engine", "image", "oci", "server", "llfs", "containerd", "containerd-api"},
    "server": {"base", "engine", "image", "oci"},  # never containerd, mounts or the snapshotter
    "cli": {"base", "kernels", "engine", "image", "oci", "containerd", "containerd-api", "llfs", "snap", "server"},
    "entry": {"base", "llfs", "cli", "snap", "server"},
}


def part_of(module: str) -> str:
    best, found = -1, "?"
    for part, prefixes in PARTS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), part
    return found


def module_of(path: str) -> tuple[str, bool]:
    rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
    is_package = rel.endswith(".__init__")
    return (rel[: -len(".__init__")] if is_package else rel), is_package


def imports_of(text: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every d4c import in `text`."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (module if is_package else module.rsplit(".", 1)[0]).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from d4c import x` imports the module d4c.x when there is one
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else target))
    return [(line, m) for line, m in out if m == "d4c" or m.startswith("d4c.")]


def violations(path: str, text: str) -> list[str]:
    module, is_package = module_of(path)
    here = part_of(module)
    found = []
    for line, target in imports_of(text, module, is_package):
        there = part_of(target)
        if there != here and there not in ALLOWED[here]:
            found.append(f"{os.path.relpath(path, SRC)}:{line}: {here} imports {target} ({there})")
    return found


def source_files() -> list[str]:
    out = []
    for root, _, files in os.walk(os.path.join(SRC, "d4c")):
        out += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(out)


MODULES = {module_of(p)[0] for p in source_files()} | {"d4c._patch", "d4c._chunker", "d4c._tables"}


def test_every_module_belongs_to_a_part() -> None:
    assert [p for p in source_files() if part_of(module_of(p)[0]) == "?"] == []


def test_import_rules_hold() -> None:
    found = []
    for path in source_files():
        with open(path) as f:
            found += violations(path, f.read())
    assert found == []


def test_kernels_import_no_d4c_module() -> None:
    for name in ("_patch", "_chunker", "_tables"):
        with open(os.path.join(SRC, "d4c", f"{name}.pyx")) as f:
            text = f.read()
        assert not re.search(r"^\s*(c?import|from)\s+(d4c|\.)", text, re.M), name


def test_a_broken_rule_is_found() -> None:
    """The checker itself: an image module that reaches the CLI or the
    snapshotter, and llfs reaching the snapshotter, are reported."""
    image = os.path.join(SRC, "d4c", "image", "reader.py")
    text = "from ..cli._common import print_table\n\ndef f():\n    from d4c.snap import snapshotter\n"
    assert violations(image, text) == [
        "d4c/image/reader.py:1: image imports d4c.cli._common (cli)",
        "d4c/image/reader.py:4: image imports d4c.snap.snapshotter (snap)"]
    llfs = os.path.join(SRC, "d4c", "llfs", "model.py")
    assert violations(llfs, "from .. import snap\n") == ["d4c/llfs/model.py:1: llfs imports d4c.snap (snap)"]
    assert violations(llfs, "from ..image import format\n") == []
