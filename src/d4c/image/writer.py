"""Writing finished images: entries + spooled bodies -> dimg and/or cdimg files."""

from __future__ import annotations

from typing import Any

from .bodies import BodySpool
from .format import canonical_config, cdimg_preamble, dimg_size_of, encode_header, with_layer_id, write_dimg_to
from ..fsutil import atomic_output
from .tree import Entry


def save_image(entries: list[Entry], spool: BodySpool, *, dimg_path: str | None = None,
               cdimg_path: str | None = None, config: dict[str, Any] | None = None,
               parent_id: bytes | None = None, image_id: bytes | None = None, threads: int = 1) -> bytes:
    """Write the image (canonical entries, bodies in `spool`) to the given paths.

    Returns the image id.  A cdimg needs `config`; its rootfs is rewritten to a
    single layer named by the image id (what `load` registers in containerd).
    A grouped spool (format 2) compresses its group frames here, on `threads`.
    """
    plans = spool.group_bodies(entries, threads) if spool.grouped else []
    header = encode_header(entries, spool.frame_lengths(), plans, spool.dictionary, spool.x86)
    final_id = image_id or header.image_id
    if dimg_path:
        with atomic_output(dimg_path) as out:
            write_dimg_to(out, header, spool.copy_frames, parent_id, final_id)
    if cdimg_path:
        if config is None:
            raise ValueError("a cdimg needs a config")
        config_bytes = canonical_config(with_layer_id(config, final_id))
        with atomic_output(cdimg_path) as out:
            out.write(cdimg_preamble(config_bytes, dimg_size_of(header)))
            write_dimg_to(out, header, spool.copy_frames, parent_id, final_id)
    return final_id
