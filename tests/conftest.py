"""Shared test set-up: capability flags, the CI rule for skips, fixtures."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

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
        if key.startswith("D4C_") and key not in ("D4C_PUREPYTHON", "D4C_BINARIES"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """cdimgs of the four versions in imagesets.py (index 0..3), converted from OCI layouts."""
    from helpers import run_cli
    from imagesets import VERSIONS
    from ocibuild import Layout
    tmp = tmp_path_factory.mktemp("versions")
    lay = Layout(str(tmp / "layout"))
    for n, layers in enumerate(VERSIONS, 1):
        lay.tag(lay.image([(members, "gzip") for members in layers]), f"v{n}")
    lay.save()
    out = []
    for n in range(1, len(VERSIONS) + 1):
        code, _, err = run_cli("convert", "--image", f"oci:{lay.path}:v{n}", "--output", str(tmp / f"v{n}"),
                               "--cdimg", "-q")
        assert code == 0, err
        out.append(str(tmp / f"v{n}" / "image.cdimg"))
    return out


@pytest.fixture(scope="session")
def stack(images, tmp_path_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """A base and three deltas in one directory: v1, 1->2, 2->3, 3->4."""
    from helpers import run_cli
    tmp = tmp_path_factory.mktemp("stack")
    paths = [str(tmp / "v1.cdimg")]
    shutil.copyfile(images[0], paths[0])
    for i in range(3):
        paths.append(str(tmp / f"d{i + 1}{i + 2}.cdimg"))
        code, _, err = run_cli("cdimg", "diff", "--oldCdimg", images[i], "--newCdimg", images[i + 1],
                               "--outCdimg", paths[-1], "-q")
        assert code == 0, err
    return paths
