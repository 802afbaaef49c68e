"""An image from any source (source.py) flattened into a cdimg and/or dimg:
the work of `convert`, which `publish` does for every version it pushes."""

from __future__ import annotations

import logging
import os

from ..image.bodies import BodySpool
from ..image.writer import save_image
from .flatten import Flattener
from .source import Platform, RemoteOptions, ResolvedImage, open_source

log = logging.getLogger(__name__)


def convert_image(ref: str, platform: Platform, options: RemoteOptions, out_dir: str, *, level: int,
                  threads: int, cdimg: bool = True, dimg: bool = False, grouped: bool = False,
                  excludes: tuple[str, ...] = ()) -> tuple[bytes, ResolvedImage]:
    """Write OUT_DIR/image.cdimg (and/or image.dimg) of `ref`; (image id, what was resolved)."""
    with open_source(ref, platform, options) as source:
        resolved = source.resolve()
        os.makedirs(out_dir, exist_ok=True)
        with BodySpool(out_dir, level, grouped) as spool:
            flat = Flattener(spool, threads)
            try:
                flat.flatten(resolved.layers, ref)
            finally:
                flat.close()
            for path in excludes:
                if not flat.remove(path):
                    log.warning("--excludes %s: not in the image", path)
            image_id = save_image(
                flat.entries(), spool,
                dimg_path=os.path.join(out_dir, "image.dimg") if dimg else None,
                cdimg_path=os.path.join(out_dir, "image.cdimg") if cdimg else None,
                config=resolved.config, threads=threads)
    return image_id, resolved
