"""Reading an open image: its entries, and its bodies checked against their
digests in bounded memory (multi-frame bodies stream, deltas rebuild from the
parent image)."""

from __future__ import annotations

import collections
import contextlib
import os
import resource
import threading
from typing import Any, Callable, Iterable, Iterator

import zstandard

from .. import accel
from ..errors import CorruptImage, MissingBase, NotFound, SystemFailure, WrongBase, from_oserror
from .tree import DeltaStep, Entry, EntryType, Storage
from ..zstdframes import MAX_WINDOW_LOG, declared_size, decode_frame, frame_length
from ..digests import sha256
from .format import Group, GroupTable, format_id, pread_exact, read_info, read_tables

STREAM_PIECE = 256 << 10  # body_frames reads a multi-frame body in pieces of this size
ASKED_AHEAD = 3 * STREAM_PIECE  # ... and asks the kernel for this much beyond what it has read
ONE_SHOT_MAX = 64 << 20        # bodies up to this decompress in one call; larger ones stream in bounded memory
GROUP_CACHE = 32 << 20         # decoded group frames an open image keeps (a tree walk decodes each about once)
OPEN_GROUP_STREAMS = 8         # groups decoded in part an image keeps going (each holds <= 1.2 MiB and a zstd context)


def _memory_available() -> int:
    """The machine's memory, or the address-space limit of this process if lower."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        physical = 1 << 40
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return physical if soft == resource.RLIM_INFINITY else min(physical, soft)


class Image:
    """An open dimg or cdimg file: validated header, entries, body streams.

    A delta image's header is coded against its parent's tree, so reading its
    entries needs the parent (an open Image whose id is the delta's parent id);
    without it only `info` is available.
    """

    # what read_body may hold at once (a rebuild holds its source and its result):
    # a file's declared size is not what its image can hold (a 270 KB delta declared 8 GiB)
    memory_limit: int = _memory_available()
    group_cache: int = GROUP_CACHE  # bytes of decoded group frames kept per image (llfs --group-cache)

    def __init__(self, path: str, parent: "Image | None" = None) -> None:
        self.path = path
        self.parent = parent
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no such image file: {path}") from None
        except IsADirectoryError:
            raise NotFound(f"not an image file but a directory: {path}") from None
        except OSError as exc:
            raise from_oserror(exc, "cannot open image") from exc
        try:
            self.info = read_info(self._fd, path)
            self._entries: list[Entry] | None = None
            self.tree_table = b""
            self.groups: GroupTable = GroupTable()
            if self.info.parent_id is not None and parent is not None \
                    and parent.info.image_id != self.info.parent_id:
                raise WrongBase(path, format_id(self.info.parent_id), parent.path,
                                format_id(parent.info.image_id))
            if parent is not None and self.info.parent_id is not None:
                parent.entries  # a parent that cannot be read itself: say which base is missing
            if self.info.parent_id is None or parent is not None:
                self._entries, self.tree_table, self.groups = read_tables(self._fd, path, self.info, parent)
        except BaseException:
            os.close(self._fd)
            raise
        self._by_path: dict[bytes, int] | None = None
        self._by_digest: dict[bytes, int] | None = None
        self._decoded: collections.OrderedDict[int, bytearray] = collections.OrderedDict()  # least recent first
        self._decoded_bytes = 0  # their total
        self._served: dict[int, set[int]] = {}  # cached or streaming group -> its bodies read (this round)
        self._all_served: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, all read
        self._group_bodies: list[int] | None = None  # group -> how many bodies it holds
        self._x86_slices: dict[int, list[tuple[int, int]]] | None = None
        self._streams: collections.OrderedDict[int, _GroupStream] = collections.OrderedDict()  # decoded in part
        self._groups_lock = threading.Lock()
        self._dictionary: zstandard.ZstdCompressionDict | None = None
        self._dictionary_lock = threading.Lock()
        self._preloader: threading.Thread | None = None

    @property
    def is_delta(self) -> bool:
        return self.info.parent_id is not None

    @property
    def entries(self) -> list[Entry]:
        if self._entries is None:
            assert self.info.parent_id is not None
            raise MissingBase(self.path, format_id(self.info.parent_id))
        return self._entries

    # context manager / lifetime
    def close(self) -> None:
        if self._preloader is not None:
            self._preloader.join()  # it reads through the fd closed below
            self._preloader = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        return self._fd

    def lookup(self, path: bytes) -> Entry:
        if self._by_path is None:
            self._by_path = {e.path: i for i, e in enumerate(self.entries)}
        try:
            return self.entries[self._by_path[path.strip(b"/")]]
        except KeyError:
            raise NotFound(f"{path.decode(errors='replace')}: not in image {self.path}") from None

    def index_of_digest(self, digest: bytes) -> int:
        """Index of the first file with this content, or -1."""
        if self._by_digest is None:
            index: dict[bytes, int] = {}  # built aside: readers on other threads never see it half done
            for i, e in enumerate(self.entries):
                if e.type == EntryType.FILE and e.digest is not None:
                    index.setdefault(e.digest, i)
            self._by_digest = index
        return self._by_digest.get(digest, -1)

    def holder(self, entry: Entry) -> Entry:
        """The entry whose storage holds `entry`'s content in this image."""
        return self.entries[entry.shared_with] if entry.storage == Storage.SHARED else entry

    def frame_of(self, entry: Entry) -> tuple[int, int] | None:
        """(offset in the file, length) of the zstd frame holding the content,
        here or in an ancestor; None if content must be rebuilt from a delta."""
        image, e = self.resolve(entry)
        e = image.holder(e)
        if e.storage == Storage.FRAME:
            return image.info.body_offset + e.body_offset, e.body_length
        return None

    def resolve(self, entry: Entry) -> tuple["Image", Entry]:
        """Follow PARENT storage down the stack to the image that stores the content."""
        image, e = self, entry
        while e.storage == Storage.PARENT:
            assert image.parent is not None
            image, e = image.parent, image.parent.entries[image.parent.index_of_digest(e.digest or b"")]
        return image, e

    def open_body(self, entry: Entry) -> "BodyReader | ConvertedBodyReader":
        if entry.x86:
            return ConvertedBodyReader(self, entry)
        return BodyReader(self._fd, self.info.body_offset + entry.body_offset, entry.body_length, entry.size,
                          entry.digest or b"", self.path, entry, across_frames=self.info.multi_frame)

    def body_chunks(self, entry: Entry) -> Iterator[bytes]:
        """A FRAME body in BodyReader.CHUNK pieces, in one chunk and zstd's window
        of memory; its size and digest are checked before the last piece is
        given (CorruptImage there, so a consumer keeps nothing unchecked)."""
        with self.open_body(entry) as reader:
            yield from reader.chunks()

    def stored_chunks(self, entry: Entry) -> Iterator[bytes]:
        """The content of a file this (base) image stores, checked: a stored body
        streams, a grouped one comes whole from its group (at most a frame's size)."""
        if self.holder(entry).storage == Storage.GROUPED:
            yield self.read_body(entry)
            return
        with self.open_body(entry) as body:
            yield from body.chunks()

    def read_body(self, entry: Entry, check: bool = True) -> bytes:
        """The content of a file entry, whatever its storage (delta images
        rebuild it from the parent stack; the digest is checked either way).
        check=False: a body stored whole, whose digest was checked before
        (llfs --verified-bodies), is decoded on its zstd frame checksums only."""
        if entry.size == 0:
            return b""
        image, e = self.resolve(entry)
        e = image.holder(e)
        if e.storage == Storage.FRAME:
            image.check_memory(e, e.size)
            if e.size > ONE_SHOT_MAX:
                with image.open_body(e) as r:
                    return r.read()
            data = b"".join(image.decode_frame(e, frame, n) for frame, n in image.body_frames(e))
            if check:
                image.check_digest(e, data)
            return data
        if e.storage == Storage.GROUPED:
            data, whole = image.group_piece(e)
            if check or not whole:  # a frame decoded only in part has not had its checksum checked
                image.check_digest(e, data)
            return data
        return image._rebuild(e)

    def group_content(self, entry: Entry) -> bytes:
        """The whole decoded content of `entry`'s group frame (see group_piece)."""
        return self._group_range(entry, 0, self.groups[entry.group].usize, None)[0]

    def group_piece(self, entry: Entry) -> tuple[bytes, bool]:
        """`entry`'s body from its group frame, and whether that frame has been decoded
        to its end (so zstd has checked its checksum).  A group is decoded only as far
        as reads need it (_GroupStream), by one thread at a time; once whole, it is kept
        within `group_cache` bytes of decoded groups (_note_read says which go first)."""
        return self._group_range(entry, entry.body_offset, entry.body_offset + entry.size, entry.body_offset)

    def _group_range(self, entry: Entry, start: int, end: int, body: int | None) -> tuple[bytes, bool]:
        """content[start:end] of `entry`'s group, for the body at offset `body` (None: the whole group)."""
        index = entry.group
        with self._groups_lock:
            data = self._decoded.get(index)
            if data is not None:
                self._decoded.move_to_end(index)
                self._note_read(index, body)
                with memoryview(data) as view:
                    return bytes(view[start:end]), True
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = _GroupStream(self, entry)
                while len(self._streams) > OPEN_GROUP_STREAMS:  # a dropped one is decoded again if read again
                    dropped = self._streams.popitem(last=False)[0]
                    if dropped not in self._decoded:
                        self._served.pop(dropped, None)
            else:
                self._streams.move_to_end(index)
        piece, whole = stream.upto(start, end)
        with self._groups_lock:
            if whole is not None:
                if self._streams.get(index) is stream:
                    del self._streams[index]
                if index not in self._decoded:  # another thread may have finished it first
                    self._decoded[index] = whole
                    self._decoded_bytes += len(whole)
                self._decoded.move_to_end(index)
            self._note_read(index, body)
            while self._decoded_bytes > self.group_cache and len(self._decoded) > 1:
                victim = next((g for g in self._all_served if g != index), next(iter(self._decoded)))
                self._decoded_bytes -= len(self._decoded.pop(victim))
                self._all_served.pop(victim, None)
                self._served.pop(victim, None)
        return piece, whole is not None

    def _note_read(self, index: int, body: int | None) -> None:
        """Under _groups_lock: the body at offset `body` of group `index` was read (None:
        the whole group).  A cached group whose bodies have all been read goes first
        when room is needed (a tree walk reads the rest of a group's files later, in
        path order, not group order: with least-recent-first alone the nginx walk
        decoded 1.24 x the grouped content, 1.04 x with this); reading a body again
        starts a new round."""
        served = self._served.setdefault(index, set())
        if body is not None:
            if body in served:
                served.clear()
                self._all_served.pop(index, None)
            served.add(body)
        if index in self._decoded and len(served) >= self._bodies_per_group()[index]:
            self._all_served[index] = None

    def _bodies_per_group(self) -> list[int]:
        """group -> how many distinct bodies it holds, counted once per image."""
        if self._group_bodies is None:
            offsets: list[set[int]] = [set() for _ in range(len(self.groups))]
            for e in self._entries:
                if e.storage == Storage.GROUPED:
                    offsets[e.group].add(e.body_offset)
            self._group_bodies = [len(o) for o in offsets]
        return self._group_bodies

    def _x86_in_groups(self) -> dict[int, list[tuple[int, int]]]:
        """group -> (start, end) of its x86-converted bodies in order, found once per image."""
        if self._x86_slices is None:
            slices: dict[int, list[tuple[int, int]]] = {}
            for e in self.entries:
                if e.x86 and e.storage == Storage.GROUPED:
                    slices.setdefault(e.group, []).append((e.body_offset, e.body_offset + e.size))
            for spans in slices.values():
                spans.sort()
            self._x86_slices = slices
        return self._x86_slices

    def group_dictionary(self, entry: Entry) -> zstandard.ZstdCompressionDict:
        """The dictionary the group frames are coded against: decoded at the first
        group read, kept while the image is open (at most MAX_DICT_USIZE bytes)."""
        with self._dictionary_lock:
            if self._dictionary is None:
                assert self.groups.dictionary is not None
                content = self._decode_whole(self.groups.dictionary, f"{entry.display()}: the group dictionary")
                self._dictionary = zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            return self._dictionary

    def start_preload(self) -> None:
        """Decode the group dictionary on a thread, ahead of the first grouped read,
        which pays its 50-90 ms otherwise (a merge starts it as soon as its base is
        open, while it opens the deltas and plans).  Once per image; close() waits for it."""
        if self.groups.dictionary is not None and self._preloader is None and self._fd >= 0:
            self._preloader = threading.Thread(target=self.preload_dictionary, name="d4c-dictionary", daemon=True)
            self._preloader.start()

    def preload_dictionary(self) -> None:
        """Decode the group dictionary now, if the image has one.  A failure is
        left for the first grouped read to report, with the file it was for."""
        if self.groups.dictionary is None:
            return
        grouped = next((e for e in self.entries if e.storage == Storage.GROUPED), None)
        if grouped is not None:
            with contextlib.suppress(Exception):  # the read that needs it tries again and reports
                self.group_dictionary(grouped)

    def _decode_whole(self, group: Group, what: str, dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
        """A group or dictionary frame, which must declare and give exactly its usize."""
        try:
            frame = self.group_frame(group)
            data = decode_frame(memoryview(frame), group.usize, dictionary=dictionary)
        except (ValueError, zstandard.ZstdError) as exc:
            raise CorruptImage(self.path, f"{what} does not decompress ({exc})") from None
        if len(data) != group.usize:
            raise CorruptImage(self.path, f"{what} has the wrong size")
        return data

    def group_frame(self, group: Group) -> bytes:
        """The compressed frame of a group (or of the dictionary); ValueError unless it
        declares exactly the group's usize."""
        frame = pread_exact(self._fd, group.csize, self.info.body_offset + group.offset, self.path)
        if declared_size(memoryview(frame), 0, group.usize) != group.usize:
            raise ValueError("the frame declares another size than its group")
        return frame

    def check_memory(self, entry: Entry, need: int) -> None:
        if need > self.memory_limit:
            raise SystemFailure(f"{self.path}: {entry.display()}: rebuilding it needs {need} bytes of memory, "
                                f"more than the limit of {self.memory_limit} (--memory-limit)")

    def check_body(self, entry: Entry) -> None:
        """Check one body this image stores (FRAME or DELTA) against its size and
        digest: a stored body streams in bounded memory whatever its size, a delta
        is rebuilt from the parent stack.  CorruptImage when it does not match."""
        if entry.storage == Storage.FRAME and entry.size > ONE_SHOT_MAX:
            for _ in self.body_chunks(entry):
                pass
        elif entry.storage in (Storage.FRAME, Storage.DELTA, Storage.GROUPED):
            self.read_body(entry)

    def body_frames(self, entry: Entry) -> Iterator[tuple[memoryview, int]]:
        """The compressed frames of a FRAME body of at most ONE_SHOT_MAX bytes,
        with their content sizes (one frame unless the image is multi-frame).
        Each frame comes as soon as it has been read: the kernel is asked to
        read a few pieces ahead, and decoding the first frames overlaps reading
        the rest (llfs reads start cold).  Not thread-safe: llfs advances it
        under a lock."""
        length, start = entry.body_length, self.info.body_offset + entry.body_offset
        if not self.info.multi_frame:
            yield memoryview(pread_exact(self._fd, length, start, self.path)), entry.size
            return
        # Small bodies: the kernel's own readahead of the image (bodies lie in path order)
        # serves a tree walk in ~150 disk reads, not one per file.  Larger ones are asked
        # for a piece at a time, ASKED_AHEAD beyond the read: asked whole, the body was
        # one disk request (up to 4 MiB here) that the first frame waited for, and the
        # asking itself (~0.5 ms per MiB) delayed the first read.
        asked = 0 if length > STREAM_PIECE else length
        buf = memoryview(bytearray(length))
        got = pos = total = 0
        try:
            while pos < length:
                if total == entry.size:  # the content is complete; only empty frames could follow
                    raise ValueError("data after the last frame")
                n = frame_length(buf[pos:got], partial=True)
                if n < 0:
                    if got == length:
                        raise ValueError("truncated frame")
                    while asked < min(length, got + ASKED_AHEAD):
                        os.posix_fadvise(self._fd, start + asked, min(STREAM_PIECE, length - asked),
                                         os.POSIX_FADV_WILLNEED)
                        asked += STREAM_PIECE
                    read = os.preadv(self._fd, [buf[got:min(length, got + STREAM_PIECE)]], start + got)
                    if read <= 0:
                        raise CorruptImage(self.path, "file is truncated")
                    got += read
                    continue
                frame = buf[pos:pos + n]
                declared = declared_size(frame, total, entry.size)
                total += declared
                pos += n
                yield frame, declared
            if total != entry.size:
                raise ValueError(f"frames hold {total} bytes, expected {entry.size}")
        except ValueError as exc:
            raise CorruptImage(self.path, f"{entry.display()}: body does not decompress ({exc})") from None

    def decode_frame(self, entry: Entry, frame: memoryview, size: int) -> bytes:
        """One frame of body_frames, decompressed in one call.  zstd checks the
        frame's checksum; the sha256 digest is check_digest's job, so a reader can
        overlap it with serving the data."""
        try:
            data = decode_frame(frame, size)
        except (ValueError, zstandard.ZstdError) as exc:
            raise CorruptImage(self.path, f"{entry.display()}: body does not decompress ({exc})") from None
        return accel.x86.decoded(data) if entry.x86 else data  # each frame was converted on its own

    def check_digest(self, entry: Entry, data: bytes | memoryview) -> None:
        if sha256(data).digest() != entry.digest:
            raise CorruptImage(self.path, f"{entry.display()}: content digest mismatch")

    def read_delta_payload(self, step: DeltaStep) -> bytes:
        return pread_exact(self._fd, step.length, self.info.body_offset + step.offset, self.path)

    def _rebuild(self, entry: Entry) -> bytes:
        from ..engine import delta  # the engine is only needed for delta images
        assert self.parent is not None and entry.storage == Storage.DELTA
        source = self.parent.entries[entry.delta_source]
        sizes = [source.size] + [step.size for step in entry.delta_steps]
        self.check_memory(entry, max(a + b for a, b in zip(sizes, sizes[1:])))
        data = self.parent.read_body(source)
        size, digest = source.size, source.digest or b""
        for step in entry.delta_steps:
            info = delta.DeltaInfo(step.method, size, step.size, digest, step.digest)
            data = bytes(delta.apply_payload(data, info, self.read_delta_payload(step),
                                             source=f"{self.path}: {entry.display()}"))
            size, digest = step.size, step.digest
        return data


def stored_bodies(image: Image) -> list[Entry]:
    """The entries whose bodies `image` stores itself (not its parents'), grouped
    bodies in group order (a check decodes each group once)."""
    own = [e for e in image.entries if e.storage in (Storage.FRAME, Storage.DELTA, Storage.GROUPED)]
    return sorted(own, key=lambda e: (e.storage == Storage.GROUPED, e.group, e.body_offset))


def check_bodies(image: Image, threads: int = 1, checked: Callable[[int], None] | None = None) -> None:
    """Check every body `image` stores itself: what the snapshotter's load and
    the server's upload make sure of before they keep an image.  zstd, sha256
    and the patch kernel release the GIL, so threads help.  `checked` is told
    the size of each body once it passed (from the checking thread)."""
    from ..parallel import run_parallel

    def check(e: Entry) -> None:
        image.check_body(e)
        if checked is not None:
            checked(e.size)
    run_parallel(check, stored_bodies(image), threads)


class _GroupStream:
    """A group frame decoded as far as reads have needed.  The first read decodes up
    to the end of its body (half the group on average: a cold read of one small file),
    the next one decodes the rest, so a walk still decodes each byte once.  zstd checks
    the frame's checksum at its end: until then read_body checks each body's digest.
    x86-converted bodies are decoded in place once all their bytes are there."""

    def __init__(self, image: Image, entry: Entry) -> None:
        self._image, self._entry = image, entry
        self._group = image.groups[entry.group]
        self._lock = threading.Lock()
        self._buf = bytearray(self._group.usize)  # the group's content, decoded into place
        self._filled = 0  # bytes of it decoded so far
        self._reader: Any = None
        self._reads = 0
        self._slices = image._x86_in_groups().get(entry.group, [])
        self._converted = 0  # slices decoded so far

    def upto(self, start: int, end: int) -> tuple[bytes, bytearray | None]:
        """content[start:end], and the whole content once the frame has been decoded to its end."""
        with self._lock:
            if self._filled < self._group.usize:
                try:
                    self._decode_to(end)
                except (ValueError, zstandard.ZstdError) as exc:
                    what = f"{self._entry.display()}: its group frame"
                    raise CorruptImage(self._image.path, f"{what} does not decompress ({exc})") from None
            with memoryview(self._buf) as view:
                piece = bytes(view[start:end])
            done = self._reader is None and self._filled == self._group.usize
            return piece, (self._buf if done else None)  # not written again once whole: kept as it is

    def _decode_to(self, end: int) -> None:
        group = self._group
        if self._reader is None:
            image = self._image
            frame = image.group_frame(group)
            dictionary = image.group_dictionary(self._entry) if image.groups.dictionary is not None else None
            self._reader = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << MAX_WINDOW_LOG) \
                .stream_reader(frame)
        self._reads += 1
        want = end if self._reads == 1 else group.usize  # zstd decodes a block at a time (bodies.BLOCK_MIN)
        with memoryview(self._buf) as view:
            while self._filled < want:
                got = self._reader.readinto(view[self._filled:want])
                if not got:
                    raise ValueError("the frame ends before its group does")
                self._filled += got
        if self._filled == group.usize:
            if self._reader.read(1):  # the end of the frame, where zstd checks its checksum
                raise ValueError("the frame decodes larger than its group")
            self._reader.close()
            self._reader = None
        while self._converted < len(self._slices) and self._slices[self._converted][1] <= self._filled:
            accel.x86.decode(self._buf, *self._slices[self._converted])
            self._converted += 1


class BodyReader:
    """Streams one file body out of its zstd frame and verifies size and digest.

    Memory use is bounded by zstd's window (at most 128 MiB for hostile frames,
    8 MiB for ours) whatever the file size.
    """

    CHUNK = 1 << 20

    def __init__(self, fd: int, offset: int, length: int, size: int, digest: bytes,
                 source: str, entry: Entry, across_frames: bool = False) -> None:
        self._section = _Section(fd, offset, length)
        self._reader = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG).stream_reader(
            self._section, read_size=min(max(length, 1), self.CHUNK), read_across_frames=across_frames,
            closefd=False)
        self._size = size
        self._digest = digest
        self._hash = sha256()
        self._seen = 0
        self._done = False
        self._source = source
        self._entry = entry

    def _fail(self, reason: str) -> None:
        raise CorruptImage(self._source, f"{self._entry.display()}: {reason}")

    def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        want = self._size - self._seen if n is None or n < 0 else n
        parts = []
        while want > 0:
            try:
                chunk = self._reader.read(min(want, self.CHUNK))
            except zstandard.ZstdError as exc:
                self._fail(f"body does not decompress ({exc})")
            if not chunk:
                self._finish()
                break
            self._seen += len(chunk)
            if self._seen > self._size:
                self._fail("body is larger than its recorded size")
            self._hash.update(chunk)
            parts.append(chunk)
            want -= len(chunk)
        if self._seen == self._size and not self._done:
            # make sure the frame really ends here
            try:
                extra = self._reader.read(1)
            except zstandard.ZstdError as exc:
                self._fail(f"body does not decompress ({exc})")
            if extra:
                self._fail("body is larger than its recorded size")
            self._finish()
        return b"".join(parts)

    def _finish(self) -> None:
        self._done = True
        if self._seen != self._size:
            self._fail(f"body has {self._seen} bytes, expected {self._size}")
        if self._hash.digest() != self._digest:
            self._fail("content digest mismatch")

    def chunks(self) -> Iterable[bytes]:
        while True:
            chunk = self.read(self.CHUNK)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "BodyReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConvertedBodyReader:
    """BodyReader's read/chunks/close for an x86-converted body (at most MAX_X86_BODY):
    a frame at a time, each decoded on its own; size and digest are checked before
    the last bytes are given."""

    CHUNK = BodyReader.CHUNK

    def __init__(self, image: Image, entry: Entry) -> None:
        self._image, self._entry = image, entry
        self._frames = image.body_frames(entry)
        self._hash = sha256()
        self._pending = memoryview(b"")
        self._decoded = 0

    def _next_frame(self) -> bool:
        item = next(self._frames, None)
        if item is None:
            return False
        data = self._image.decode_frame(self._entry, *item)
        self._hash.update(data)
        self._decoded += len(data)
        if self._decoded == self._entry.size:
            next(self._frames, None)  # body_frames' end-of-body checks
            if self._hash.digest() != self._entry.digest:
                raise CorruptImage(self._image.path, f"{self._entry.display()}: content digest mismatch")
        self._pending = memoryview(data)
        return True

    def read(self, n: int = -1) -> bytes:
        want = self._entry.size if n is None or n < 0 else n
        parts = []
        while want > 0 and (len(self._pending) or self._next_frame()):
            take = self._pending[:want]
            parts.append(bytes(take))
            self._pending = self._pending[len(take):]
            want -= len(take)
        return b"".join(parts)

    def chunks(self) -> Iterable[bytes]:
        while chunk := self.read(self.CHUNK):
            yield chunk

    def close(self) -> None:
        self._frames.close()  # type: ignore[attr-defined]

    def __enter__(self) -> "ConvertedBodyReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Section:
    """A read-only window of a file descriptor, read with pread (thread-safe)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.pos, self.end = fd, offset, offset + length

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.end - self.pos
        n = min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data
