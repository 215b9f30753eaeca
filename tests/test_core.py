"""Registry selection, locks, reference counts, ids, signals over a commit: the shared
machinery on its own."""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from graphdriver import InvalidArgument, NotSupported, open_driver
from graphdriver.errors import GraphDriverError
from graphdriver.layers import validate_id
from graphdriver.locking import FileLock
from graphdriver.refcount import RefCounts
from graphdriver.registry import names
from graphdriver.store import LayerStore, signals_redelivered
from tests.treeutil import TarBuilder


def test_registry_prefers_overlay_then_vfs_and_never_windowsfilter() -> None:
    order = names()
    assert order.index("overlay") < order.index("vfs")
    assert order[-1] == "windowsfilter"


def test_auto_selection_uses_the_home_in_use(tmp_path: Path) -> None:
    run = tmp_path / "run"
    d = open_driver("vfs", tmp_path / "root", runroot=run)
    d.create("x")
    again = open_driver(None, tmp_path / "root", runroot=run)
    assert again.name == "vfs"
    assert again.exists("x")


def test_two_homes_in_use_is_an_error_that_says_choose(tmp_path: Path) -> None:
    run = tmp_path / "run"
    open_driver("vfs", tmp_path / "root", runroot=run).create("x")
    other = tmp_path / "root" / "overlay" / "meta" / "y"
    other.mkdir(parents=True)
    with pytest.raises(InvalidArgument, match="--driver"):
        open_driver(None, tmp_path / "root", runroot=run)


def test_auto_selection_on_an_empty_root_picks_a_working_driver(tmp_path: Path) -> None:
    d = open_driver(None, tmp_path / "root", runroot=tmp_path / "run")
    assert d.name in ("overlay", "vfs")


def test_unknown_driver_and_unknown_option(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown driver"):
        open_driver("zfs2", tmp_path, runroot=tmp_path / "run")
    with pytest.raises(InvalidArgument, match="Frob"):
        open_driver("vfs", tmp_path, {"Frob": "1"}, runroot=tmp_path / "run")


def test_size_option_keys_are_case_insensitive_and_vfs_refuses_quotas(tmp_path: Path) -> None:
    with pytest.raises(NotSupported):
        open_driver("vfs", tmp_path, {"SIZE": "10G"}, runroot=tmp_path / "run")
    with pytest.raises(InvalidArgument, match="invalid size"):
        open_driver("vfs", tmp_path, {"Size": "ten"}, runroot=tmp_path / "run")


@pytest.mark.parametrize("good", ["a", "A9", "0" * 64 + "-init", "x.y_z-1", "x" * 96])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", "-a", ".a", "_a", "a/b", "a b", "é", "x" * 97, "l", "meta",
                                 "locks", "a-removing", "a\n"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_id(bad)


def test_file_lock_excludes_threads_and_processes(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    held = FileLock(path)
    held.acquire()
    other = FileLock(path)
    assert not other.acquire(blocking=False)
    code = ("import fcntl,sys,os; fd=os.open(sys.argv[1], os.O_RDWR);"
            "fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True)
    assert proc.returncode != 0  # another process cannot take it either
    got = threading.Event()

    def waiter() -> None:
        with FileLock(path):
            got.set()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    assert not got.is_set()
    held.release()
    t.join(5)
    assert got.is_set()


def test_refcounts_are_shared_between_objects_and_never_negative(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    a = RefCounts(tmp_path / "run", home)
    b = RefCounts(tmp_path / "run", home)
    assert a.increment("x") == 1
    assert b.increment("x") == 2
    assert a.all() == {"x": 2}
    assert b.decrement("x") == 1
    assert a.decrement("x") == 0
    assert a.decrement("x") == 0
    assert a.all() == {}
    assert not any(os.scandir(a.dir))


def test_one_rule_says_which_driver_a_home_belongs_to(tmp_path: Path) -> None:
    from graphdriver.registry import drivers_using

    home = tmp_path / "home"  # one home for every driver, as a plugin's Init gives
    (home / "meta").mkdir(parents=True)
    assert drivers_using(lambda _n: home) == []  # no layer record: nobody's yet
    (home / "meta" / "layer1").mkdir()
    assert drivers_using(lambda _n: home) == names()  # records, no layout: any may own them
    (home / "dir").mkdir()
    assert drivers_using(lambda _n: home) == ["vfs"]  # vfs's layout
    (home / "dir").rmdir()
    (home / "l").mkdir()
    assert drivers_using(lambda _n: home) == ["overlay"]
    assert drivers_using(lambda _n: home, ["vfs"]) == []


def _vfs_with_layer(tmp_path: Path) -> Any:
    d = open_driver("vfs", tmp_path / "root", runroot=tmp_path / "run")
    d.create("a")
    return d


@pytest.mark.parametrize("inside_an_operation", [False, True], ids=["apply", "pull"])
def test_a_signal_during_a_layers_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture,
                                         inside_an_operation: bool) -> None:
    """SIGINT while a layer commits: the commit completes either way.  A lone apply then
    returns (the signal is logged and dropped: its work is done); inside
    ``signals_redelivered`` (a pull's or load's layers) the signal is delivered once the commit
    is done and stops the operation."""
    caplog.set_level(logging.WARNING, logger="graphdriver")
    d = _vfs_with_layer(tmp_path)
    finish = LayerStore._finish_apply

    def finish_after_a_signal(self: LayerStore, rec: object) -> None:
        signal.raise_signal(signal.SIGINT)  # held: the commit is under way
        finish(self, rec)  # type: ignore[arg-type]

    monkeypatch.setattr(LayerStore, "_finish_apply", finish_after_a_signal)
    layer = io.BytesIO(TarBuilder().file("hello", b"hi\n").bytes())
    if inside_an_operation:
        with pytest.raises(KeyboardInterrupt), signals_redelivered():
            d.apply_diff("a", None, layer)
    else:
        d.apply_diff("a", None, layer)
        assert "arrived while the layer was being committed" in caplog.text
    assert d.exists("a")
    with d.mounted("a") as root:
        assert (Path(root) / "hello").read_bytes() == b"hi\n"
    d.cleanup()


def test_a_signal_during_a_failing_commit_leaves_the_error(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT while a layer's commit fails, inside ``signals_redelivered``: the apply is rolled
    back and its own error stops the operation (not KeyboardInterrupt)."""
    d = _vfs_with_layer(tmp_path)

    def decide_fails(self: LayerStore, rec: object, result: object) -> None:
        signal.raise_signal(signal.SIGINT)  # held: the commit is under way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LayerStore, "_decide_apply", decide_fails)
    layer = io.BytesIO(TarBuilder().file("empty").bytes())
    with pytest.raises(GraphDriverError, match="space"), signals_redelivered():
        d.apply_diff("a", None, layer)
    with d.mounted("a") as root:
        assert not (Path(root) / "empty").exists()  # rolled back
    d.cleanup()
