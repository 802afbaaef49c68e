"""Stacks of images: a base and the deltas above it, each read on the one below.

The one place that opens image files by path, follows parent links and checks
each link: the FUSE mount, the snapshotter's store, the server's store, pull
and load all go through it."""

from __future__ import annotations

import os
from typing import Callable, Iterable

from ..errors import CorruptImage, D4CError, MissingBase, NotFound, UsageError, WrongBase
from .format import ImageInfo, format_id, read_info
from .reader import Image

MAX_CHAIN = 4096  # deltas above one base: more is a loop or a hostile store


def resolve_stack(top: str, *, image_dir: str | None = None, chain: list[str] | None = None) -> list[str]:
    """Paths of the images from the base up to `top`.  `chain` lists them
    explicitly (base first, without top); else parents are looked up by id among
    the images in `image_dir` (default: top's directory).  Links are checked
    before anything is mounted."""
    info = read_info_at(top)
    if chain is not None:
        paths = chain + [top]
    else:
        by_id: dict[bytes, str] = {}
        folder = image_dir or os.path.dirname(os.path.abspath(top))
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            raise NotFound(f"cannot list image directory {folder}: {exc.strerror}") from None
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith((".cdimg", ".dimg")) or not os.path.isfile(path):
                continue
            try:
                by_id.setdefault(read_info_at(path).image_id, path)
            except D4CError:
                continue  # not an image we can use: ignore it here
        paths = [top]
        while info.parent_id is not None:
            parent = by_id.get(info.parent_id)
            if parent is None:
                raise MissingBase(paths[-1], format_id(info.parent_id))
            if len(paths) > MAX_CHAIN:
                raise CorruptImage(top, "parent chain does not end")
            paths.append(parent)
            info = read_info_at(parent)
        paths.reverse()
    # every link must match: checked again, cheaply, whichever way the chain came
    for lower, upper in zip(paths, paths[1:]):
        up, low = read_info_at(upper), read_info_at(lower)
        if up.parent_id != low.image_id:
            raise WrongBase(upper, format_id(up.parent_id) if up.parent_id else "(none: a base image)",
                            lower, format_id(low.image_id))
    if read_info_at(paths[0]).parent_id is not None:
        raise MissingBase(paths[0], format_id(read_info_at(paths[0]).parent_id or b""))
    return paths


def read_info_at(path: str, source: str | None = None) -> ImageInfo:
    """The preamble of the image file at `path` (ids, kind, config), checked;
    the header tables are not read.  `source` names it in errors (default: the path)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no such image file: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror}") from None
    try:
        return read_info(fd, source or path)
    finally:
        os.close(fd)


def walk_chain(top: str, parent_of: Callable[[str], str | None], what: str) -> list[str]:
    """Keys from the base up to `top`, following `parent_of` (None or "" ends the
    chain); a chain that does not end is corruption of `what`."""
    chain = [top]
    while True:
        parent = parent_of(chain[-1])
        if not parent:
            break
        if len(chain) > MAX_CHAIN:
            raise CorruptImage(what, "parent chain does not end")
        chain.append(parent)
    chain.reverse()
    return chain


def open_stack(paths: list[str], base: str | None = None, *, preload: bool = False) -> list[Image]:
    """Open images lower -> upper, each on the one before (ids checked).  With
    `base`, it is opened first as the parent of paths[0].  `preload`: the lowest
    image starts decoding its group dictionary while the others open (a merge
    reads its groups to check what it copies)."""
    images: list[Image] = []
    try:
        for path in ([base] if base else []) + paths:
            images.append(Image(path, parent=images[-1] if images else None))
            if preload and len(images) == 1:
                images[0].start_preload()
        return images
    except BaseException:
        close_all(images)
        raise


def close_all(images: Iterable[Image]) -> None:
    for image in images:
        image.close()
