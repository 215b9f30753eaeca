"""The children index (``meta/<parent>/children``) never loses or invents a child.

A child's entry is written before the record that makes it a layer and dropped after its meta
directory is gone, so a crash leaves at most an entry too many; a reader checks every entry
against the child's record, and repair (every open) rewrites each index from the records.  The
crashes are real: a process SIGKILLs itself at the step named, then the store is reopened.
An index that is absent (a store of an older graphdriver) or unreadable is rebuilt or bypassed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graphdriver import InUse, open_driver
from tests.safety.safetyutil import cli_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the drivers' stores)")


def _crash_at(driver: str, root: Path, run: Path, step: str, action: str) -> None:
    """Run *action* on the store in a child that SIGKILLs itself when ``MetaDir.<step>`` is
    entered (before it does anything) or, for ``after:<step>``, once it has returned."""
    when, _, name = step.rpartition(":")
    script = textwrap.dedent(f"""
        import os, signal
        from graphdriver import open_driver
        from graphdriver.layers import MetaDir
        real = getattr(MetaDir, {name!r})
        def crash(self, *args, **kwargs):
            if {when!r} != "after":
                os.kill(os.getpid(), signal.SIGKILL)
            real(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(MetaDir, {name!r}, crash)
        d = open_driver({driver!r}, {str(root)!r}, runroot={str(run)!r})
    """) + action
    proc = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _index(root: Path, driver: str, parent: str) -> list[str]:
    path = root / driver / "meta" / parent / "children"
    return path.read_text().split() if path.exists() else []


def test_index_follows_create_and_remove(driver_name: str, tmp_path: Path) -> None:
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("base")
    d.create_rw("b", "base")
    d.create("a", "base")
    assert _index(root, driver_name, "base") == ["a", "b"]
    assert d.children("base") == ["a", "b"]
    with pytest.raises(InUse):
        d.remove("base")
    d.remove("a")
    assert _index(root, driver_name, "base") == ["b"]
    d.remove("b")
    assert not (root / driver_name / "meta" / "base" / "children").exists()
    d.remove("base")


def test_crash_after_the_entry_before_the_record(driver_name: str, tmp_path: Path) -> None:
    """The entry names a child that never became a layer: not listed, dropped by repair."""
    root, run = tmp_path / "store", tmp_path / "run"
    open_driver(driver_name, root, runroot=run).create("base")
    _crash_at(driver_name, root, run, "after:add_child", 'd.create("kid", "base")')
    assert _index(root, driver_name, "base") == ["kid"]  # the state the crash left
    d = open_driver(driver_name, root, runroot=run)  # repair
    assert d.layers() == ["base"]
    assert d.children("base") == []
    assert _index(root, driver_name, "base") == []
    d.remove("base")


def test_crash_before_the_entry_is_dropped(driver_name: str, tmp_path: Path) -> None:
    """A removed child whose entry stayed: not listed, and the parent can be removed."""
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("base")
    d.create("kid", "base")
    _crash_at(driver_name, root, run, "drop_child", 'd.remove("kid")')
    assert _index(root, driver_name, "base") == ["kid"]
    assert d.children("base") == []  # checked against the records, before any repair
    d.remove("base")


def test_crash_in_a_staged_commit(driver_name: str, tmp_path: Path) -> None:
    """commit_new_layer killed between the entry and the rename: no child, before or after."""
    root, run = tmp_path / "store", tmp_path / "run"
    open_driver(driver_name, root, runroot=run).create("base")
    action = ('import io, tarfile\n'
              'b = io.BytesIO()\n'
              'tarfile.open(fileobj=b, mode="w").close()\n'
              'b.seek(0)\n'
              'd.commit_new_layer("base", b, layer_id_for=lambda _: "kid", made_by="image")')
    _crash_at(driver_name, root, run, "after:add_child", action)
    d = open_driver(driver_name, root, runroot=run)
    assert d.layers() == ["base"]
    assert d.children("base") == []
    d.remove("base")


def test_id_reused_under_another_parent(driver_name: str, tmp_path: Path) -> None:
    """A stale entry whose id now belongs to another parent's child is not a child."""
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("base")
    d.create("other")
    d.create("kid", "base")
    _crash_at(driver_name, root, run, "drop_child", 'd.remove("kid")')
    d.create("kid", "other")
    assert "kid" in _index(root, driver_name, "base")
    assert d.children("base") == []
    assert d.children("other") == ["kid"]
    d.remove("base")


@pytest.mark.parametrize("how", ["absent", "garbage", "a-directory"])
def test_lost_index_never_loses_a_child(driver_name: str, tmp_path: Path, how: str) -> None:
    """An index that is gone (an older graphdriver's store) or unreadable: the child is still
    found (the records are scanned), and the next open rebuilds the index."""
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("base")
    d.create("kid", "base")
    index = root / driver_name / "meta" / "base" / "children"
    index.unlink()
    if how == "garbage":
        index.write_bytes(b"\xff\x00 ../etc\n")
    elif how == "a-directory":
        index.mkdir()
    if how != "absent":
        assert d.children("base") == ["kid"]
        with pytest.raises(InUse):
            d.remove("base")
    again = open_driver(driver_name, root, runroot=run)  # repair rebuilds
    assert _index(root, driver_name, "base") == ["kid"]
    with pytest.raises(InUse):
        again.remove("base")
    again.remove("kid")
    again.remove("base")
