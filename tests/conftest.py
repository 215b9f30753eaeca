"""Fixtures shared by every test: fresh store roots, a private run root, driver opening."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver import NotSupported, open_driver
from graphdriver.registry import names
from tests.mountutil import detach_mounts_under

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, devices, trusted xattrs)")


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture
def runroot(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    return run


def open_or_skip(name: str, root: Path, runroot: Path, **kw: Any) -> Any:
    try:
        return open_driver(name, root, runroot=runroot, **kw)
    except NotSupported as exc:
        pytest.skip(f"{name} is not supported here: {exc}")


@pytest.fixture
def mount_cleanup() -> Iterator[Callable[[Path], None]]:
    """``mount_cleanup(root)``: whatever is still mounted under root when the test and the
    fixtures using this one are done (a failed test) is detached before tmp removal."""
    roots: list[Path] = []
    yield roots.append
    for root in reversed(roots):
        detach_mounts_under(root)


@pytest.fixture(params=names())
def driver(request: pytest.FixtureRequest, store_root: Path, runroot: Path,
           mount_cleanup: Callable[[Path], None]) -> Iterator[Any]:
    """A fresh store of each registered driver; every mount is undone afterwards."""
    mount_cleanup(store_root)
    d = open_or_skip(request.param, store_root, runroot)
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def gnu_tar() -> str:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    return tar
