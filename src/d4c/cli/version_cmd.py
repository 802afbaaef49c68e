"""ctr-cli version: the version and which kernels run."""

from __future__ import annotations

import argparse
import sys

from .. import __version__, accel
from ..image.format import DELTA_FORMAT_VERSION, FORMAT_VERSION


def register(sub, groups, common) -> None:  # type: ignore[no-untyped-def]
    p = sub.add_parser("version", parents=[common], help="print the version and the kernel backend")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(f"ctr-cli {__version__}")
    print(f"image format: {FORMAT_VERSION} (base images), {DELTA_FORMAT_VERSION} (delta images)")
    print(f"kernels: {accel.describe()}")
    print(f"python: {sys.version.split()[0]}{' (frozen)' if getattr(sys, 'frozen', False) else ''}")
    return 0
