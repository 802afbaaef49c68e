"""Image deltas: diff two images into a delta image, patch it back, merge chains.

A delta image (FORMAT.md, version 2) holds the complete tree of the new image
and, per file, where its content comes from: nothing stored when the parent has
that content anywhere (moved, renamed, duplicated files included), a binary
delta against the best source file of the parent, or the whole file.  Merging
makes no delta anew: deltas of deltas become chains of steps applied in order
(what it carries over is checked, so the base's bodies are read for that).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .. import engine
from .bodies import DEFAULT_FORMAT, READ_CHUNK, BodySpool, base_level
from .format import (MAX_DELTA_STEPS, DeltaHeaderCoder, canonical_config, cdimg_preamble, dimg_size_of,
                     encode_delta_header, with_layer_id, write_dimg_to)
from .reader import ONE_SHOT_MAX, Image
from .stack import close_all
from ..errors import CorruptImage, UsageError
from ..fsutil import atomic_output
from ..parallel import in_background, run_parallel
from ..progress import Progress
from .tree import DeltaStep, Entry, EntryType, Storage
from .writer import save_image

MODES = ("binary-diff", "file-diff")
ENCODINGS = {"d4c": "d4c", "bsdiffx": "d4c", "fast": "fast", "xdelta3": "fast", "mixed": "mixed"}
MIXED_FAST_ABOVE = 512 << 20     # `mixed`: the original switched to xdelta3 above 512 MiB
MIN_DIFF_MEMORY = 16 << 20       # a diff's working set below this cannot hold one small segment: store whole
DEFAULT_FRAME_LEVEL = 19         # whole files in a delta: made once, shipped many times


@dataclass
class DiffOptions:
    mode: str = "binary-diff"
    encoding: str = "d4c"
    level: int = DEFAULT_FRAME_LEVEL
    delta_level: int = engine.DEFAULT_LEVEL
    threads: int = 1
    memory_limit: int = engine.DEFAULT_MEMORY_LIMIT
    link_mbit: float = engine.DEFAULT_LINK_MBIT  # bytes against decode time (delta.CM_DECODE_NS)


@dataclass
class Decision:
    """What a delta image does with one file (for show, stat and tests)."""

    path: str
    kind: str            # empty, parent, shared, frame, delta
    size: int
    stored: int          # bytes in the delta's body section
    source: str | None = None
    steps: int = 0


# ---------------------------------------------------------------- source choice

_DIGITS = re.compile(rb"[0-9]+")


class SourceFinder:
    """Picks the file of the old image a new file is diffed against: the same
    path, else a renamed version in the same directory (digits ignored, so
    libfoo.so.1.2 finds libfoo.so.1.3), else the same name elsewhere, else a
    similar name elsewhere; among several, the closest in size."""

    def __init__(self, old: Image) -> None:
        self.old = old
        self.by_path: dict[bytes, int] = {}
        self.tables: list[dict[Any, list[int]]] = [{}, {}, {}]
        for i, e in enumerate(old.entries):
            target = i if e.type == EntryType.FILE else (
                e.link if e.type == EntryType.HARDLINK and old.entries[e.link].type == EntryType.FILE else -1)
            if target < 0 or old.entries[target].size == 0:
                continue
            self.by_path[e.path] = target
            for table, key in zip(self.tables, self._keys(e)):
                table.setdefault(key, []).append(target)

    @staticmethod
    def _keys(e: Entry) -> tuple[Any, ...]:
        stem = _DIGITS.sub(b"#", e.name)
        return (e.parent, stem), e.name, stem

    def find(self, e: Entry) -> int:
        same = self.by_path.get(e.path)
        if same is not None:
            return same
        for table, key in zip(self.tables, self._keys(e)):
            candidates = table.get(key)
            if candidates:
                entries = self.old.entries
                return min(candidates, key=lambda j: (abs(entries[j].size - e.size), entries[j].path))
        return -1


# ---------------------------------------------------------------- writing

def _copy_entries(entries: Iterable[Entry]) -> list[Entry]:
    """Fresh entries with the tree fields only (storage is decided anew)."""
    return [Entry(e.path, e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs, e.size, e.digest, e.target,
                  e.link, e.rdev) for e in entries]


def _write_delta(entries: list[Entry], parent: Image, spool: BodySpool, new: Image, coder: DeltaHeaderCoder,
                 out_path: str, config_bytes: bytes | None, before_commit: Callable[[], None] | None = None) -> int:
    """`entries` are copies of `new`'s with the storage decided: its checked
    tree table is written as it is (so the delta has `new`'s id).  `before_commit`
    runs once all is written, before the rename: an error there leaves no output."""
    header = encode_delta_header(entries, parent, spool.frame_lengths(), new.tree_table, coder)
    with atomic_output(out_path) as out:
        if config_bytes is not None:
            out.write(cdimg_preamble(config_bytes, dimg_size_of(header)))
        write_dimg_to(out, header, spool.copy_frames, parent.info.image_id, new.info.image_id)
        if before_commit is not None:
            before_commit()
        return out.tell()


def _config_bytes(image: Image, cdimg: bool) -> bytes | None:
    if not cdimg:
        return None
    if image.info.config is None:
        raise UsageError(f"{image.path} is a dimg: a cdimg output needs the config of a cdimg")
    return canonical_config(with_layer_id(image.info.config, image.info.image_id))


def _add_content(spool: BodySpool, data: bytes, what: str) -> None:
    """A whole body, fed in the chunks convert uses (the frame is the same either way)."""
    spool.add_chunks((data[i:i + READ_CHUNK] for i in range(0, len(data), READ_CHUNK)), len(data), what)


def _stream_content(spool: BodySpool, image: Image, entry: Entry, what: str) -> None:
    """A whole body into the spool in bounded memory, whatever its size: a stored
    body streams (checked on the way), a delta is rebuilt (Image.read_body bounds
    that by its memory limit)."""
    stored, e = image.resolve(entry)
    e = stored.holder(e)
    if e.storage == Storage.FRAME and e.size > ONE_SHOT_MAX:
        spool.add_chunks(stored.body_chunks(e), e.size, what)
    else:  # small bodies decode in one call, faster than a stream
        _add_content(spool, image.read_body(entry), what)


def _storage_plan(entries: list[Entry], in_parent: Callable[[bytes], bool]) -> list[int]:
    """EMPTY / PARENT / SHARED for what needs no body; returns the indices whose
    content must be stored (the first file of each such content)."""
    first: dict[bytes, int] = {}
    todo = []
    for i, e in enumerate(entries):
        if e.type != EntryType.FILE:
            continue
        assert e.digest is not None
        if e.size == 0:
            e.storage = Storage.EMPTY
        elif in_parent(e.digest):
            e.storage = Storage.PARENT
        elif e.digest in first:
            e.storage, e.shared_with = Storage.SHARED, first[e.digest]
        else:
            first[e.digest] = i
            todo.append(i)
    return todo


# ---------------------------------------------------------------- diff

def diff_images(old: Image, new: Image, out_path: str, *, cdimg: bool,
                options: DiffOptions | None = None) -> list[Decision]:
    """Write the delta old -> new; returns the per-file decisions."""
    from ..engine import delta
    options = options or DiffOptions()
    if options.mode not in MODES:
        raise UsageError(f"unknown --mode {options.mode!r} (binary-diff or file-diff)")
    encoding = ENCODINGS.get(options.encoding)
    if encoding is None:
        raise UsageError(f"unknown --deltaEncoding {options.encoding!r} ({', '.join(ENCODINGS)})")
    for image in (old, new):
        if image.is_delta:
            raise UsageError(f"{image.path} is a delta image: diff needs two full images "
                             "(patch the delta onto its base first)")
    config_bytes = _config_bytes(new, cdimg)
    coder = DeltaHeaderCoder(old.tree_table, len(new.tree_table))
    entries = _copy_entries(new.entries)
    todo = _storage_plan(entries, lambda d: old.index_of_digest(d) >= 0)
    finder = SourceFinder(old)
    threads = max(1, options.threads)
    per_worker_memory = max(64 << 20, options.memory_limit // threads)
    budget = MemoryBudget(options.memory_limit)
    # biggest first: the long diffs start early and the threads finish together
    todo.sort(key=lambda i: -entries[i].size)
    progress = Progress("diffing", total_bytes=sum(entries[i].size for i in todo))

    with BodySpool(level=options.level) as spool, progress:
        def one(i: int) -> None:
            e = entries[i]
            source = finder.find(e) if options.mode == "binary-diff" else -1
            # both bodies and the diff's working set count against --memory-limit,
            # over all threads (a shared budget): what does not fit even alone is
            # stored whole, streamed, so what a file declares never sizes an allocation
            # (an 850 KB image declaring a 16 GiB file took 5.7 GB under --memory-limit 256M)
            bodies = e.size + old.entries[source].size if source >= 0 else 0
            work = min(per_worker_memory, options.memory_limit - bodies)
            if source < 0 or work < MIN_DIFF_MEMORY:
                _stream_content(spool, new, new.entries[i], e.display())
                e.storage = Storage.FRAME
                progress.advance(e.size, 1)
                return
            with budget.held(bodies + work):
                content = new.read_body(new.entries[i])
                src = old.entries[source]
                fast = encoding == "fast" or (encoding == "mixed" and e.size > MIXED_FAST_ABOVE)
                method, payload = delta.diff_payload(old.read_body(src), content, level=options.delta_level,
                                                     threads=1, memory_limit=work, fast=fast,
                                                     link_mbit=options.link_mbit)
                if method != delta.METHOD_WHOLE:
                    key = (e.digest, 0)
                    spool.add_raw(key, payload)
                    e.storage, e.delta_source = Storage.DELTA, source
                    e.delta_steps = [DeltaStep(method, len(payload), e.size, e.digest or b"", key=key)]
                    progress.advance(e.size, 1)
                    return
                _add_content(spool, content, e.display())
            e.storage = Storage.FRAME
            progress.advance(e.size, 1)

        run_parallel(one, todo, threads)
        _write_delta(entries, old, spool, new, coder, out_path, config_bytes)
    return decisions(entries, old)


_KIND_NAMES = {k: k.name.lower() for k in Storage}


class MemoryBudget:
    """Bytes that threads hold at once, at most `limit`: a thread waits until its
    share fits beside the others' (one that fits alone always gets in at last)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def held(self, n: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def decisions(entries: list[Entry], parent: Image | None) -> list[Decision]:
    out = []
    file_type, frame, delta_kind = EntryType.FILE, Storage.FRAME, Storage.DELTA
    parent_entries = parent.entries if parent is not None else None
    for e in entries:
        if e.type is not file_type:
            continue
        kind, steps = e.storage, e.delta_steps
        stored = e.body_length if kind is frame else sum(s.length for s in steps)
        source = None
        if kind is delta_kind and parent_entries is not None:
            source = parent_entries[e.delta_source].display()
        out.append(Decision(e.display(), _KIND_NAMES[kind], e.size, stored, source, len(steps)))
    return out


# ---------------------------------------------------------------- patch

def patch_image(top: Image, out_path: str, *, cdimg: bool, image_format: int = DEFAULT_FORMAT,
                level: int | None = None, threads: int = 1) -> bytes:
    """Write the full image that `top` (opened on its parent stack) describes:
    the same bytes convert writes for that tree in `image_format` at `level`
    (that format's default when None).  Returns its id."""
    config = None
    if cdimg:
        if top.info.config is None:
            raise UsageError(f"{top.path} is a dimg: write --outDimg, or patch a cdimg")
        config = top.info.config
    entries = _copy_entries(top.entries)
    todo = _storage_plan(entries, lambda d: False)
    progress = Progress("patching", total_bytes=sum(entries[i].size for i in todo))
    with BodySpool(level=base_level(image_format, level), grouped=image_format == 2) as spool, progress:
        def one(i: int) -> None:
            _stream_content(spool, top, top.entries[i], entries[i].display())
            progress.advance(entries[i].size, 1)

        run_parallel(one, sorted(todo, key=lambda i: -entries[i].size), threads)
        image_id = save_image(entries, spool, cdimg_path=out_path if cdimg else None,
                              dimg_path=None if cdimg else out_path, config=config, threads=threads)
    if image_id != top.info.image_id:  # cannot happen unless this code is wrong: the tree is checked
        os.unlink(out_path)
        raise CorruptImage(top.path, "patched image does not have the delta's image id")
    return image_id


# ---------------------------------------------------------------- merge

@dataclass
class _Origin:
    """Where a content comes from, seen from the merge's base."""

    kind: str                          # "base", "frame", "chain", "rebuild"
    image: Image | None = None         # frame / rebuild: the image storing it
    entry: Entry | None = None
    source: int = -1                   # base, chain: index of the file in the base
    steps: list[tuple[Image, DeltaStep]] = field(default_factory=list)


class _Resolver:
    def __init__(self, stack: list[Image]) -> None:
        self.stack = stack            # stack[0] is the base, stack[k].parent is stack[k - 1]
        self.base = stack[0]

    def origin(self, level: int, e: Entry) -> _Origin:
        while True:
            image = self.stack[level]
            if level == 0:
                return _Origin("base", source=self.base.index_of_digest(e.digest or b""))
            found = self.base.index_of_digest(e.digest or b"")
            if found >= 0:
                return _Origin("base", source=found)
            h = image.holder(e)
            if h.storage == Storage.PARENT:
                parent = self.stack[level - 1]
                level, e = level - 1, parent.entries[parent.index_of_digest(h.digest or b"")]
                continue
            if h.storage == Storage.FRAME:
                return _Origin("frame", image, h)
            if h.storage != Storage.DELTA:
                raise CorruptImage(image.path, f"{e.display()}: no content")
            src = self.stack[level - 1].entries[h.delta_source]
            below = self.origin(level - 1, src)
            steps = [(image, s) for s in h.delta_steps]
            if below.kind == "base":
                return _Origin("chain", source=below.source, steps=steps)
            if below.kind == "chain" and len(below.steps) + len(steps) <= MAX_DELTA_STEPS:
                return _Origin("chain", source=below.source, steps=below.steps + steps)
            return _Origin("rebuild", image, h)


def _check_batches(base: Image, copied: list[tuple[int, _Origin]]) -> list[list[int]]:
    """The copied bodies to check in batches, one per group of the base that chains start
    from, largest first: a thread decodes a group once for its batch while the other
    checks another (in tree order, threads waited on each other's decodes)."""
    by_group: dict[int, list[int]] = {}
    alone: list[list[int]] = []
    for i, o in copied:
        source = base.holder(base.entries[o.source]) if o.kind == "chain" else None
        if source is not None and source.storage == Storage.GROUPED:
            by_group.setdefault(source.group, []).append(i)
        else:
            alone.append([i])
    return sorted(by_group.values(), key=len, reverse=True) + alone


def merge_stack(stack: list[Image], out_path: str, *, cdimg: bool, level: int = DEFAULT_FRAME_LEVEL,
                threads: int = 1, rediff: bool = False, config_from: Image | None = None,
                check_copied: bool = True) -> list[Decision]:
    """Merge the deltas stack[1:] (each on the one before) into one delta on
    stack[0].  Without `rediff` deltas are chained, not diffed again; with it,
    chained files are diffed afresh against the base (smaller, slower).
    `check_copied`: every body carried over as stored is checked first (a chain
    by applying it to the base's file), since nothing else would check it before
    a patch or a mount; False only for inputs whose bodies were checked when they
    were stored."""
    base, top = stack[0], stack[-1]
    if check_copied:
        lowest = base
        while lowest.parent is not None:
            lowest = lowest.parent
        lowest.start_preload()  # the checks' group reads wait for the dictionary otherwise
    config_bytes = _config_bytes(config_from or top, cdimg)
    entries = _copy_entries(top.entries)
    todo = _storage_plan(entries, lambda d: base.index_of_digest(d) >= 0)
    resolver = _Resolver(stack)
    origins = [(i, resolver.origin(len(stack) - 1, top.entries[i])) for i in todo]
    # frames and chains are copied as stored; the rest (and with `rediff` longer chains) is rebuilt
    copied = [(i, o) for i, o in origins
              if o.kind == "frame" or (o.kind == "chain" and not (rediff and len(o.steps) > 1))]
    progress = Progress("merging", total_items=len(todo))

    def check(i: int) -> None:
        image, e = top.resolve(top.entries[i])
        image.check_body(image.holder(e))

    batches = _check_batches(base, copied) if check_copied else []
    # the checks start first and run while the delta is written; it is renamed into place only once all passed
    with in_background(lambda batch: [check(i) for i in batch], batches, threads) as checked, \
            BodySpool(level=level) as spool, progress:
        coder = DeltaHeaderCoder(base.tree_table, len(top.tree_table))

        def copy(i: int, o: _Origin) -> None:
            """Frames and chains are copied as stored, straight from the images
            when the delta is written."""
            e = entries[i]
            if o.kind == "frame":
                assert o.image is not None and o.entry is not None
                spool.add_ref(e.digest, o.image.fd, o.image.info.body_offset + o.entry.body_offset,
                              o.entry.body_length)
                e.storage = Storage.FRAME
            else:
                e.storage, e.delta_source = Storage.DELTA, o.source
                for k, (image, step) in enumerate(o.steps):
                    key = (e.digest, k)
                    spool.add_ref(key, image.fd, image.info.body_offset + step.offset, step.length)
                    e.delta_steps.append(DeltaStep(step.method, step.length, step.size, step.digest, key=key))
            progress.advance(0, 1)

        def rebuild(item: tuple[int, _Origin]) -> None:
            from ..engine import delta  # only a chain that must be diffed again needs the engine
            i, o = item
            e = entries[i]
            content = top.read_body(top.entries[i])
            if o.kind == "chain":  # rediff
                method, payload = delta.diff_payload(base.read_body(base.entries[o.source]), content, threads=1)
                if method != delta.METHOD_WHOLE:
                    spool.add_raw((e.digest, 0), payload)
                    e.storage, e.delta_source = Storage.DELTA, o.source
                    e.delta_steps = [DeltaStep(method, len(payload), e.size, e.digest or b"",
                                               key=(e.digest, 0))]
                    progress.advance(0, 1)
                    return
            _add_content(spool, content, e.display())
            e.storage = Storage.FRAME
            progress.advance(0, 1)

        for i, o in copied:
            copy(i, o)
        kept = {i for i, _ in copied}
        run_parallel(rebuild, [(i, o) for i, o in origins if i not in kept], threads)
        made: list[Decision] = []

        def finish() -> None:
            made.extend(decisions(entries, base))  # while the last checks run
            checked()
        _write_delta(entries, base, spool, top, coder, out_path, config_bytes, before_commit=finish)
    return made


def merge_bisect(stack: list[Image], out_path: str, *, cdimg: bool, threads: int = 1,
                 level: int = DEFAULT_FRAME_LEVEL) -> list[Decision]:
    """The original's bisect mode: merge each half of the chain (sibling halves in
    parallel) into temporary deltas, then the two results.  Same content as
    merge_stack; kept so runs stay comparable with the original's."""
    if len(stack) <= 3:
        return merge_stack(stack, out_path, cdimg=cdimg, level=level, threads=threads)
    with tempfile.TemporaryDirectory(prefix="d4c-merge-", dir=os.path.dirname(os.path.abspath(out_path))) as tmp:
        names = iter(range(1 << 30))
        opened: list[Image] = []

        def halves(lo: int, hi: int) -> tuple[Image, Image]:
            """stack[lo] -> stack[mid] and stack[mid] -> stack[hi] as open deltas."""
            mid = (lo + hi) // 2
            with ThreadPoolExecutor(max_workers=2) as pool:
                lower_f, upper_f = pool.submit(merged, lo, mid), pool.submit(merged, mid, hi)
                lower_path, upper_path = lower_f.result(), upper_f.result()
            lower = Image(lower_path, parent=stack[lo])
            opened.append(lower)
            upper = Image(upper_path, parent=lower)
            opened.append(upper)
            return lower, upper

        def merged(lo: int, hi: int) -> str:
            """The path of a delta from stack[lo] to stack[hi] (lo < hi)."""
            if hi - lo == 1:
                return stack[hi].path
            out = os.path.join(tmp, f"{next(names)}.dimg")
            merge_stack([stack[lo], *halves(lo, hi)], out, cdimg=False, level=level, threads=threads)
            return out

        try:
            return merge_stack([stack[0], *halves(0, len(stack) - 1)], out_path, cdimg=cdimg, level=level,
                               threads=threads, config_from=stack[-1])
        finally:
            close_all(opened)


