"""Repair removes only what the store made (issue 12, second item; DESIGN.md "On-disk layout").

A home is made with a marker first; a home without one is adopted only when every entry is
graphdriver's own layout, else refused in one line; a failed driver probe leaves nothing; what
repair cannot explain goes to ``.lost+found/``; a store whose ``meta/`` is gone is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from graphdriver import GraphDriverError, NotSupported, open_driver
from tests.safety.safetyutil import cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the drivers' stores)")


def test_user_data_is_refused_not_deleted(driver_name: str, tmp_path: Path) -> None:
    home = tmp_path / "root" / driver_name
    home.mkdir(parents=True)
    (home / "photos").mkdir()
    (home / "photos" / "cat.jpg").write_bytes(b"precious")
    (home / "notes.txt").write_text("mine")
    res = cli(tmp_path / "root", tmp_path / "run", driver_name, "ls")
    assert res.returncode != 0
    assert "not a graphdriver store" in res.stderr and res.stderr.count("\n") == 1
    assert (home / "photos" / "cat.jpg").read_bytes() == b"precious"
    assert sorted(os.listdir(home)) == ["notes.txt", "photos"]


def test_earlier_store_is_adopted_and_marked(driver_name: str, tmp_path: Path) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("a")
    d.create("b", "a")
    d.cleanup()
    os.unlink(d.home / ".graphdriver-store")  # as an earlier version left it
    (d.home / "lost+found").mkdir()  # an empty ext4 lost+found is ignored
    again = open_driver(driver_name, root, runroot=run)
    assert again.layers() == ["a", "b"]
    assert (d.home / ".graphdriver-store").is_file()


def test_unexplained_directory_goes_to_lost_and_found(driver_name: str, tmp_path: Path) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("keep")
    d.create("orphan")
    (d.home / "meta" / "orphan" / "layer.json").unlink()  # no intent shows the store made it
    again = open_driver(driver_name, root, runroot=run)
    assert again.layers() == ["keep"]
    lost = d.home / ".lost+found"
    assert lost.is_dir() and os.listdir(lost)


def test_missing_meta_is_refused_not_emptied(driver_name: str, tmp_path: Path) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("keep")
    d.cleanup()
    shutil.rmtree(d.home / "meta")
    before = sorted(os.listdir(d.home))
    with pytest.raises(GraphDriverError, match="meta"):
        open_driver(driver_name, root, runroot=run)
    assert sorted(os.listdir(d.home)) == before


def test_failed_probe_leaves_nothing(tmp_path: Path) -> None:
    """A driver that refuses a place (here vfs asked for size quotas) removes the home it made,
    so auto-selection can try the next driver on a clean root."""
    root = tmp_path / "root"
    with pytest.raises(NotSupported):
        open_driver("vfs", root, runroot=tmp_path / "run", options={"size": "1G"})
    assert not (root / "vfs").exists()
