"""Shared test set-up: capability flags, the CI rule for skips, fixtures."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
# the test folders mirror src/d4c; a few tests share a fixture file of another folder's
# (GOLDEN of image/test_format, say): every folder is importable by module name
for _folder in sorted(os.listdir(os.path.dirname(os.path.abspath(__file__)))):
    if os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), _folder)) and _folder != "data":
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), _folder))

from d4c import accel  # noqa: E402

IN_CI = bool(os.environ.get("CI"))
IS_ROOT = os.geteuid() == 0
HAS_UMOCI = shutil.which("umoci") is not None
HAS_SKOPEO = shutil.which("skopeo") is not None
HAS_BUSYBOX = os.path.exists("/bin/busybox")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"d4c kernels: {accel.describe()}",
            f"root: {IS_ROOT}, umoci: {HAS_UMOCI}, skopeo: {HAS_SKOPEO}, busybox: {HAS_BUSYBOX}, CI: {IN_CI}"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("D4C_") and key not in ("D4C_PUREPYTHON", "D4C_BINARIES", "D4C_DIST"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """cdimgs of the four versions in imagesets.py (index 0..3), converted from OCI layouts."""
    from helpers import convert_tags
    from imagesets import VERSIONS
    from ocibuild import Layout
    tmp = tmp_path_factory.mktemp("versions")
    lay = Layout(str(tmp / "layout"))
    for n, layers in enumerate(VERSIONS, 1):
        lay.tag(lay.image([(members, "gzip") for members in layers]), f"v{n}")
    lay.save()
    return convert_tags(lay.path, [f"v{n}" for n in range(1, len(VERSIONS) + 1)], str(tmp))


@pytest.fixture(scope="session")
def stack(images, tmp_path_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """A base and three deltas in one directory: v1, 1->2, 2->3, 3->4."""
    from helpers import diff_chain
    tmp = tmp_path_factory.mktemp("stack")
    base = str(tmp / "v1.cdimg")
    shutil.copyfile(images[0], base)
    return [base] + diff_chain(images, str(tmp))[1:]


BIG_SIZE = 4 << 20  # incompressible: a push or pull of `big` is many link cuts long


@pytest.fixture(scope="session")
def big(tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    """A base cdimg of ~4 MiB of random bytes (a payload many cuts long)."""
    import json
    import random
    from helpers import run_cli
    tmp = tmp_path_factory.mktemp("big")
    tree = tmp / "tree"
    tree.mkdir()
    rnd = random.Random(24)
    for i in range(4):
        (tree / f"blob{i}").write_bytes(rnd.randbytes(BIG_SIZE // 4))
    config = tmp / "config.json"
    config.write_text(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                                  "rootfs": {"type": "layers", "diff_ids": []}}))
    out = str(tmp / "big.cdimg")
    code, _, err = run_cli("pack", "--in", str(tree), "--config", str(config), "--out", out, "-q")
    assert code == 0, err
    return out
