"""Snapshot and image metadata in sqlite (stdlib): one file, atomic transactions.

The schema is small on purpose: containerd owns the meaning of keys, parents
and labels; we keep what a restart needs to rebuild every mount.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

KIND_VIEW, KIND_ACTIVE, KIND_COMMITTED = 1, 2, 3
KIND_NAMES = {KIND_VIEW: "view", KIND_ACTIVE: "active", KIND_COMMITTED: "committed"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    image TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    parent TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL,
    signer TEXT NOT NULL DEFAULT ''
);
"""


@dataclass
class Snapshot:
    id: int
    key: str
    parent: str
    kind: int
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    image: str = ""          # hex id of the image an llfs mount serves in this snapshot's fs


@dataclass
class StoredImage:
    id: str                  # hex
    parent: str              # hex, "" for a base
    size: int
    signer: str = ""         # the trusted key (its id) whose signature was checked when it was stored, or ""


class Metadata:
    """Thread-safe access to the database; `transaction()` for atomic changes."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(images)")}
        if "signer" not in columns:  # a store made before signatures
            self._db.execute("ALTER TABLE images ADD COLUMN signer TEXT NOT NULL DEFAULT ''")
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # snapshots
    @staticmethod
    def _row(row: tuple) -> Snapshot:  # type: ignore[type-arg]
        return Snapshot(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7])

    _COLUMNS = "id, key, parent, kind, labels, created_ns, updated_ns, image"

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def children(self, key: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM snapshots WHERE parent = ?", (key,)).fetchone()[0]

    def insert(self, db: sqlite3.Connection, key: str, parent: str, kind: int, labels: dict[str, str],
               image: str = "") -> Snapshot:
        now = time.time_ns()
        cur = db.execute("INSERT INTO snapshots (key, parent, kind, labels, created_ns, updated_ns, image) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (key, parent, kind, json.dumps(labels, sort_keys=True),
                                                          now, now, image))
        return Snapshot(int(cur.lastrowid or 0), key, parent, kind, labels, now, now, image)

    @staticmethod
    def commit(db: sqlite3.Connection, snap: Snapshot, name: str, labels: dict[str, str]) -> None:
        db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated_ns = ? WHERE id = ?",
                   (name, KIND_COMMITTED, json.dumps(labels, sort_keys=True), time.time_ns(), snap.id))

    @staticmethod
    def set_labels(db: sqlite3.Connection, snap: Snapshot, labels: dict[str, str]) -> int:
        now = time.time_ns()
        db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                   (json.dumps(labels, sort_keys=True), now, snap.id))
        return now

    @staticmethod
    def delete(db: sqlite3.Connection, snap: Snapshot) -> None:
        db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))

    # images
    def image(self, image_id: str) -> StoredImage | None:
        with self._lock:
            row = self._db.execute("SELECT id, parent, size, signer FROM images WHERE id = ?", (image_id,)).fetchone()
        return StoredImage(*row) if row else None

    def images(self) -> list[StoredImage]:
        with self._lock:
            return [StoredImage(*r) for r in self._db.execute("SELECT id, parent, size, signer FROM images").fetchall()]

    @staticmethod
    def add_image(db: sqlite3.Connection, image: StoredImage) -> None:
        db.execute("INSERT OR IGNORE INTO images (id, parent, size, signer) VALUES (?, ?, ?, ?)",
                   (image.id, image.parent, image.size, image.signer))

    @staticmethod
    def delete_image(db: sqlite3.Connection, image_id: str) -> None:
        db.execute("DELETE FROM images WHERE id = ?", (image_id,))
