"""The image metadata database (images/metadata.py) under several processes."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from graphdriver.images.metadata import MetadataStore
from graphdriver.locking import FileLock


def test_an_open_waits_while_another_process_sets_up_a_new_database(tmp_path: Path) -> None:
    """A new database switches to WAL from SQLite's rollback journal, where a second writer
    gets "database is locked" at once, without the busy wait (two first pulls at once hit it).
    Opening the store waits for the process that is setting it up; that process is played here
    by a connection that does what an open does, under the open's lock."""
    home = tmp_path / "image"
    home.mkdir()
    writing = threading.Event()
    errors: list[BaseException] = []

    def setting_up() -> None:
        try:
            with FileLock(home / "images.db.lock"):
                db = sqlite3.connect(home / "images.db", isolation_level=None, timeout=60)
                db.execute("BEGIN IMMEDIATE")  # still the rollback journal: a new database
                db.execute("CREATE TABLE IF NOT EXISTS setup (a)")
                writing.set()
                time.sleep(0.5)
                db.execute("COMMIT")
                db.execute("PRAGMA journal_mode=WAL")
                db.close()
        except BaseException as exc:  # reported below
            errors.append(exc)
            writing.set()

    other = threading.Thread(target=setting_up)
    other.start()
    writing.wait()
    started = time.monotonic()
    store = MetadataStore(home)
    waited = time.monotonic() - started
    other.join()
    assert not errors, errors
    assert waited >= 0.3, f"the open did not wait for the setup ({waited:.2f} s)"
    assert store.get("sha256:" + "0" * 64) is None
    store.close()
    # and without the lock, SQLite itself refuses at once: what the lock is for
    fresh = tmp_path / "fresh.db"
    holder = sqlite3.connect(fresh, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE t (a)")
    second = sqlite3.connect(fresh, isolation_level=None, timeout=60)
    started = time.monotonic()
    try:
        second.execute("PRAGMA journal_mode=WAL")
        refused = False
    except sqlite3.OperationalError as exc:
        refused = "locked" in str(exc)
    assert refused and time.monotonic() - started < 5
    holder.execute("ROLLBACK")
    holder.close()
    second.close()
