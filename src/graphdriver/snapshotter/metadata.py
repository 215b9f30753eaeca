"""The snapshotter's records: containerd's snapshot model in SQLite, ``ROOT/snapshotter/<driver>/``.

One row per snapshot: its key (containerd's arbitrary string), its kind (View, Active,
Committed, with containerd's numbers), its parent's key, its labels, its creation and update
times in nanoseconds, and the graphdriver layer behind it.  Each change a call makes is one
transaction — the call's commit point (DESIGN.md rule 6).  Layers are created before their row
and removed after it, so a crash leaves at most a layer without a row, which start-up repair
removes (service.py).

It owns the schema and the queries; it never imports the driver, the service or gRPC.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # containerd.services.snapshots.v1.Kind
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}
DB_NAME = "metadata.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key     TEXT PRIMARY KEY,
    layer   TEXT NOT NULL UNIQUE,
    kind    INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    parent  TEXT NOT NULL DEFAULT '',
    labels  TEXT NOT NULL DEFAULT '{}',
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots (parent);
"""
_COLUMNS = "key, layer, kind, parent, labels, created, updated"


class Snapshot:
    """One row: a snapshot and the layer behind it (times in nanoseconds since the epoch)."""

    __slots__ = ("created", "key", "kind", "labels", "layer", "parent", "updated")

    def __init__(self, key: str, layer: str, kind: int, parent: str, labels: dict[str, str],
                 created: int, updated: int) -> None:
        self.key = key
        self.layer = layer
        self.kind = kind
        self.parent = parent
        self.labels = labels
        self.created = created
        self.updated = updated

    @classmethod
    def _from_row(cls, row: tuple[str, str, int, str, str, int, int]) -> Snapshot:
        key, layer, kind, parent, labels, created, updated = row
        return cls(key, layer, kind, parent, dict(json.loads(labels)), created, updated)

    def __repr__(self) -> str:
        return f"Snapshot(key={self.key!r}, layer={self.layer!r}, kind={self.kind})"


class Metadata:
    """The database of one snapshotter store; safe to share between the server's threads."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / DB_NAME
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed call survives a power cut
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Metadata]:
        """``with meta.transaction():`` — every change inside is committed at once, or none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ----- reading -------------------------------------------------------------------------

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?",
                                   (key,)).fetchone()
        return Snapshot._from_row(row) if row else None

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY key").fetchall()
        return [Snapshot._from_row(r) for r in rows]

    def children(self, key: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT key FROM snapshots WHERE parent = ? ORDER BY key",
                                    (key,)).fetchall()
        return [r[0] for r in rows]

    # ----- writing (inside a transaction) --------------------------------------------------

    def insert(self, snap: Snapshot) -> None:
        self._db.execute(
            f"INSERT INTO snapshots ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (snap.key, snap.layer, snap.kind, snap.parent, _labels_json(snap.labels),
             snap.created, snap.updated),
        )

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE key = ?", (key,))

    def delete_layer(self, layer: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE layer = ?", (layer,))

    def commit(self, key: str, name: str, labels: dict[str, str], now: int) -> None:
        """An active snapshot becomes the committed snapshot *name* (its layer stays)."""
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created = ?, updated = ?"
            " WHERE key = ?",
            (name, COMMITTED, _labels_json(labels), now, now, key),
        )

    def set_labels(self, key: str, labels: dict[str, str], now: int) -> None:
        self._db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE key = ?",
                         (_labels_json(labels), now, key))


def _labels_json(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, ensure_ascii=False)
