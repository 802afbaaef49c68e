"""The server's store: uploaded images and deltas (artifacts), tags, and the
cheapest way from what a client holds to what it wants.

Artifacts are files named by their own sha256 in a directory (never modified
once stored); the index is sqlite.  Each artifact is an edge parent -> image
(a base image is an edge from "" -- nothing), weighted by its size in bytes.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import re
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator

from ..image.reader import check_bodies
from ..image.format import format_id
from ..image.stack import read_info_at
from ..errors import EXIT_CORRUPT, BadInput, Conflict, D4CError, NotFound, UsageError
from ..digests import path_sha256
from ..fsutil import fsync_dir

TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:]{0,254}:[A-Za-z0-9_][A-Za-z0-9._\-]{0,127}$")

ARTIFACT_NAME = re.compile(r"^[0-9a-f]{64}\.cdimg$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    digest TEXT PRIMARY KEY,      -- sha256 hex of the file
    image TEXT NOT NULL,          -- hex id of the image it produces
    parent TEXT NOT NULL,         -- hex id it applies to; '' for a full image
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_image ON artifacts(image);
CREATE TABLE IF NOT EXISTS tags (name TEXT PRIMARY KEY, image TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS signatures (
    artifact TEXT NOT NULL,       -- sha256 hex of the artifact the envelope names
    image TEXT NOT NULL,          -- hex id of the image the statement names
    envelope TEXT NOT NULL,       -- the DSSE envelope (docs/SIGNING.md), kept as pushed, not verified here
    PRIMARY KEY (artifact, envelope)
);
CREATE INDEX IF NOT EXISTS signatures_image ON signatures(image);
"""


@dataclass(frozen=True)
class Artifact:
    digest: str
    image: str
    parent: str
    size: int


def check_tag(tag: str) -> str:
    if not TAG.match(tag) or ".." in tag:
        raise UsageError(f"bad tag {tag!r} (NAME:TAG)")
    return tag


class Store:
    def __init__(self, root: str, backend=None, threads: int = 1) -> None:  # type: ignore[no-untyped-def]
        """`backend`: a RegistryBackend shared by replicas; None keeps everything here.
        `threads`: for the body check of an upload."""
        self.backend = backend
        self.threads = threads
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, "artifacts")
        self.tmp = os.path.join(self.root, "tmp")
        for d in (self.dir, self.tmp):
            os.makedirs(d, exist_ok=True)
        for name in os.listdir(self.tmp):  # uploads a crash interrupted
            os.unlink(os.path.join(self.tmp, name))
        for name in os.listdir(self.dir):  # fetches from the shared registry a crash interrupted
            if not ARTIFACT_NAME.match(name):
                os.unlink(os.path.join(self.dir, name))
        self._db = sqlite3.connect(os.path.join(self.root, "index.db"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()
        if backend is not None:
            self.sync()

    def path(self, digest: str) -> str:
        """The artifact's local file (fetched from the shared registry the first time)."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise NotFound(f"no artifact {digest!r}")
        path = os.path.join(self.dir, digest + ".cdimg")
        if self.backend is not None and not os.path.exists(path):
            with self._lock:
                known = self._db.execute("SELECT 1 FROM artifacts WHERE digest = ?", (digest,)).fetchone()
            if known:
                self.backend.fetch(digest, path)
        return path

    def sync(self) -> None:
        """Take in what other replicas stored in the shared registry."""
        artifacts, tags = self.backend.listing()
        with self._transaction():
            for row in artifacts:
                self._db.execute("INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?)", row)
            for name, image in tags.items():
                self._db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?)", (name, image))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One sqlite transaction (the connection is in autocommit mode): an
        artifact and its tag are stored together or not at all.  A full disk
        is an OSError(ENOSPC), as it is for the files."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
                raise

    def temp_path(self) -> str:
        return os.path.join(self.tmp, uuid.uuid4().hex)

    # ---------------------------------------------------------------- writes
    def add(self, tmp: str, tag: str | None = None, envelope: bytes | None = None) -> Artifact:
        """Adopt an uploaded file (already fully written to `tmp`): checked as a
        cdimg whose parent the store knows, every body checked as `load` checks
        it (a corrupt copy must never be served in place of a good one), stored
        under its digest, with its signature `envelope` when it came with one
        (it must name this file and its image; devices verify it, the server
        holds no keys).  Idempotent; `tmp` is gone afterwards, whatever happens."""
        from ..image.stack import close_all, open_stack
        from ..image.signing import check_envelope_form
        try:
            if tag is not None:
                check_tag(tag)
            statement = check_envelope_form(envelope, "upload: the signature") if envelope is not None else None
            info = read_info_at(tmp, "upload")
            if info.kind != "cdimg":
                raise BadInput("upload: not a cdimg (a dimg has no config to run)")
            image, parent = info.image_id.hex(), info.parent_id.hex() if info.parent_id else ""
            if parent and not self._artifacts_for(parent) and self.backend is not None:
                self.sync()
            if parent and not self._artifacts_for(parent):
                raise Conflict(f"upload: a delta of {format_id(info.parent_id or b'')}, which this server "
                               "does not have: push that image first")
            # the whole header, read against its parent's tree (ids, entries), and every body
            below = [self.path(a.digest) for a in self.chain_to(parent)] if parent else []
            stack = open_stack(below[1:] + [tmp], below[0] if below else None)
            try:
                check_bodies(stack[-1], self.threads)
            finally:
                close_all(stack)
            digest = path_sha256(tmp).hexdigest()
            artifact = Artifact(digest, image, parent, os.path.getsize(tmp))
            if statement is not None and (statement.artifact, statement.size, statement.image) != \
                    ("sha256:" + digest, artifact.size, format_id(info.image_id)):
                raise BadInput("upload: the signature names another file or image")
            with self._lock:
                final = os.path.join(self.dir, digest + ".cdimg")
                placed = not os.path.exists(final)  # a stored file is never replaced
                if placed:
                    os.rename(tmp, final)
                    fsync_dir(self.dir)  # before the index names it: a power loss keeps both or neither
                try:
                    if self.backend is not None:  # shared first: a replica may answer the next request
                        self.backend.add_artifact(final, image, parent, digest, artifact.size)
                        if tag:
                            self.backend.set_tag(tag, image)
                    with self._transaction():
                        self._db.execute("INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?)",
                                         (digest, image, parent, artifact.size))
                        if envelope is not None:
                            self._db.execute("INSERT OR IGNORE INTO signatures VALUES (?, ?, ?)",
                                             (digest, image, envelope.decode()))
                        if tag:
                            self._db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?)", (check_tag(tag), image))
                except BaseException:
                    if placed:  # nothing of a failed upload is kept: no file the index does not know
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(final)
                    raise
            return artifact
        except D4CError as exc:  # named as the client knows it, not by our temp path
            if exc.exit_code == EXIT_CORRUPT and not isinstance(exc, BadInput):
                raise BadInput(str(exc).replace(tmp, "upload")) from None
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # ---------------------------------------------------------------- reads
    def _artifacts_for(self, image: str) -> list[Artifact]:
        with self._lock:
            rows = self._db.execute("SELECT digest, image, parent, size FROM artifacts WHERE image = ? "
                                    "ORDER BY size, digest", (image,)).fetchall()
        return [Artifact(*r) for r in rows]

    def signatures(self, image: str) -> list[str]:
        """The envelopes pushed with the artifacts that give `image` (any of them
        vouches for the image a merged delta must prove to give)."""
        with self._lock:
            rows = self._db.execute("SELECT envelope FROM signatures WHERE image = ? ORDER BY artifact, envelope",
                                    (image,)).fetchall()
        return [r[0] for r in rows]

    def artifacts(self) -> list[Artifact]:
        with self._lock:
            rows = self._db.execute("SELECT digest, image, parent, size FROM artifacts ORDER BY digest").fetchall()
        return [Artifact(*r) for r in rows]

    def tags(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT name, image FROM tags ORDER BY name").fetchall())

    def resolve_tag(self, tag: str) -> str:
        for attempt in range(2):
            with self._lock:
                row = self._db.execute("SELECT image FROM tags WHERE name = ?", (check_tag(tag),)).fetchone()
            if row is not None:
                return row[0]
            if self.backend is None or attempt:
                break
            self.sync()  # another replica may have it
        raise NotFound(f"unknown tag {tag}")

    def cheapest(self, target: str, have: set[str]) -> list[Artifact]:
        """The artifacts (lowest first) that take a client holding `have` to
        `target` with the fewest bytes; from nothing if it holds no ancestor.
        Dijkstra backwards from the target over parent edges; ties go to fewer
        hops, then to the smaller digests, so the answer is deterministic."""
        if target in have:
            return []
        best: dict[str, tuple[int, int, tuple[str, ...]]] = {target: (0, 0, ())}
        queue: list[tuple[int, int, tuple[str, ...], str]] = [(0, 0, (), target)]
        found: tuple[int, int, tuple[str, ...]] | None = None
        digests: dict[str, Artifact] = {}
        while queue:
            cost, hops, path, node = heapq.heappop(queue)
            if best.get(node, (cost, hops, path)) < (cost, hops, path):
                continue
            if node == "" or node in have:
                found = (cost, hops, path)
                break
            for a in self._artifacts_for(node):
                digests[a.digest] = a
                key = (cost + a.size, hops + 1, path + (a.digest,))
                if a.parent not in best or key < best[a.parent]:
                    best[a.parent] = key
                    heapq.heappush(queue, (*key, a.parent))
        if found is None:
            raise NotFound(f"no way to image {format_id(bytes.fromhex(target))} from what the client holds")
        return [digests[d] for d in reversed(found[2])]

    def chain_to(self, image: str) -> list[Artifact]:
        """Artifacts from a full image up to `image` (the cheapest such chain):
        what opening `image`'s tree needs."""
        return self.cheapest(image, set())

    def close(self) -> None:
        self._db.close()

