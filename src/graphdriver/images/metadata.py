"""The image metadata store: ``ROOT/image/<driver>/images.db`` (SQLite from the standard library).

Owns images (config, manifest, the store layer ids = chain IDs), tags, repo digests and which
compressed blob produced which layer.  Every change is one SQLite transaction: the commit point
(WAL journal, ``synchronous=FULL``), so a crash leaves each image absent or complete and a tag
never points at a missing image.  Several processes share the file (SQLite's own locking, a
busy timeout; the opening serialised by a file lock).  Imports only ``errors`` and
``locking``; never a driver, never the network.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GraphDriverError, InvalidArgument, NotFound
from ..locking import FileLock

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,            -- sha256:<config digest>
    config BLOB NOT NULL,
    manifest BLOB,                  -- the manifest it was pulled/loaded with (NULL: committed)
    manifest_type TEXT,
    layers TEXT NOT NULL,           -- JSON list of store layer ids (chain ID hex), base first
    size INTEGER NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT PRIMARY KEY,          -- docker.io/library/busybox:latest
    image_id TEXT NOT NULL REFERENCES images(id)
);
CREATE TABLE IF NOT EXISTS repo_digests (
    image_id TEXT NOT NULL REFERENCES images(id),
    name TEXT NOT NULL,             -- docker.io/library/busybox@sha256:<manifest digest>
    PRIMARY KEY (image_id, name)
);
CREATE TABLE IF NOT EXISTS blobs (
    diff_id TEXT NOT NULL,          -- the uncompressed layer
    digest TEXT NOT NULL,           -- the compressed blob that produced it
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    source TEXT NOT NULL,           -- registry/repository it came from ('' when loaded)
    PRIMARY KEY (diff_id, digest, source)
);
CREATE INDEX IF NOT EXISTS tags_by_image ON tags(image_id);
"""


@dataclass(frozen=True)
class ImageRecord:
    id: str
    config: bytes
    manifest: bytes | None
    manifest_type: str | None
    layers: list[str]
    size: int
    added: float


@dataclass(frozen=True)
class BlobSource:
    diff_id: str
    digest: str
    media_type: str
    size: int
    source: str


class MetadataStore:
    """One SQLite database per driver; connections are per thread (sqlite3's rule)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = home / "images.db"
        # Processes open the database one at a time: a new one switches to WAL from the
        # rollback journal, where SQLite answers a second process that wants to write "database
        # is locked" at once (its deadlock rule: no busy wait), e.g. two first pulls together.
        with FileLock(home / "images.db.lock"):
            self._db = self._connect()
            try:
                self._db.executescript(SCHEMA)  # idempotent; executescript commits by itself
            except sqlite3.DatabaseError as exc:
                self._db.close()
                raise GraphDriverError(f"image metadata {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise GraphDriverError(f"image metadata {self.path}: {exc}") from exc
        return db

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: the one commit point of every change."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise GraphDriverError(f"image metadata {self.path}: {exc}") from exc
        try:
            yield db
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            db.execute("ROLLBACK")
            raise GraphDriverError(f"image metadata {self.path}: {exc}") from exc
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # ----- reading -------------------------------------------------------------------------

    def _row(self, row: Any) -> ImageRecord:
        return ImageRecord(str(row[0]), bytes(row[1]),
                           None if row[2] is None else bytes(row[2]),
                           None if row[3] is None else str(row[3]),
                           list(json.loads(str(row[4]))), int(row[5]), float(row[6]))

    _COLUMNS = "id, config, manifest, manifest_type, layers, size, added"

    def get(self, image_id: str) -> ImageRecord | None:
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM images WHERE id = ?",
                               (image_id,)).fetchone()
        return None if row is None else self._row(row)

    def images(self) -> list[ImageRecord]:
        rows = self._db.execute(f"SELECT {self._COLUMNS} FROM images ORDER BY added DESC")
        return [self._row(r) for r in rows.fetchall()]

    def ids_with_prefix(self, hex_prefix: str) -> list[str]:
        rows = self._db.execute("SELECT id FROM images WHERE id >= ? AND id < ?",
                                (f"sha256:{hex_prefix}", f"sha256:{hex_prefix}\x7f"))
        return [str(r[0]) for r in rows.fetchall()]

    def tag_target(self, name: str) -> str | None:
        row = self._db.execute("SELECT image_id FROM tags WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def digest_target(self, name: str) -> str | None:
        row = self._db.execute("SELECT image_id FROM repo_digests WHERE name = ?",
                               (name,)).fetchone()
        return None if row is None else str(row[0])

    def tags_of(self, image_id: str) -> list[str]:
        rows = self._db.execute("SELECT name FROM tags WHERE image_id = ? ORDER BY name",
                                (image_id,))
        return [str(r[0]) for r in rows.fetchall()]

    def repo_digests_of(self, image_id: str) -> list[str]:
        rows = self._db.execute("SELECT name FROM repo_digests WHERE image_id = ? ORDER BY name",
                                (image_id,))
        return [str(r[0]) for r in rows.fetchall()]

    def all_tags(self) -> list[tuple[str, str]]:
        rows = self._db.execute("SELECT name, image_id FROM tags ORDER BY name")
        return [(str(a), str(b)) for a, b in rows.fetchall()]

    def blob_sources(self, diff_id: str) -> list[BlobSource]:
        rows = self._db.execute(
            "SELECT diff_id, digest, media_type, size, source FROM blobs WHERE diff_id = ?",
            (diff_id,))
        return [BlobSource(str(a), str(b), str(c), int(d), str(e))
                for a, b, c, d, e in rows.fetchall()]

    def layers_in_use(self) -> set[str]:
        out: set[str] = set()
        for (layers,) in self._db.execute("SELECT layers FROM images").fetchall():
            out.update(json.loads(str(layers)))
        return out

    # ----- writing (each one transaction) ----------------------------------------------------

    def add_image(self, rec: ImageRecord, tags: list[str], repo_digests: list[str],
                  blobs: list[BlobSource]) -> None:
        """The image, its tags (moved from any other image), repo digests and blob sources."""
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO images ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET manifest = COALESCE(excluded.manifest, manifest),"
                " manifest_type = COALESCE(excluded.manifest_type, manifest_type)",
                (rec.id, rec.config, rec.manifest, rec.manifest_type, json.dumps(rec.layers),
                 rec.size, rec.added or time.time()))
            for name in tags:
                db.execute("INSERT OR REPLACE INTO tags (name, image_id) VALUES (?, ?)",
                           (name, rec.id))
            for name in repo_digests:
                db.execute("DELETE FROM repo_digests WHERE name = ?", (name,))
                db.execute("INSERT INTO repo_digests (image_id, name) VALUES (?, ?)",
                           (rec.id, name))
            for b in blobs:
                db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?)",
                           (b.diff_id, b.digest, b.media_type, b.size, b.source))

    def add_blob_sources(self, blobs: list[BlobSource]) -> None:
        with self.transaction() as db:
            for b in blobs:
                db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?)",
                           (b.diff_id, b.digest, b.media_type, b.size, b.source))

    def tag(self, image_id: str, name: str) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                raise NotFound(f"image {image_id} does not exist")
            db.execute("INSERT OR REPLACE INTO tags (name, image_id) VALUES (?, ?)",
                       (name, image_id))

    def untag(self, name: str) -> str:
        """Remove a tag; returns the image it named."""
        with self.transaction() as db:
            row = db.execute("SELECT image_id FROM tags WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no such image: {name}")
            db.execute("DELETE FROM tags WHERE name = ?", (name,))
            return str(row[0])

    def remove_image(self, image_id: str, *, force: bool) -> None:
        with self.transaction() as db:
            tags = [r[0] for r in db.execute("SELECT name FROM tags WHERE image_id = ?",
                                             (image_id,)).fetchall()]
            if len(tags) > 1 and not force:
                raise InvalidArgument(f"image {image_id[7:19]} is referenced by several tags "
                                      f"({', '.join(tags[:3])}): use --force")
            db.execute("DELETE FROM tags WHERE image_id = ?", (image_id,))
            db.execute("DELETE FROM repo_digests WHERE image_id = ?", (image_id,))
            if db.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount == 0:
                raise NotFound(f"image {image_id} does not exist")

