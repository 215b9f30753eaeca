"""Fixtures shared by every test: fresh store roots, a private run root, driver opening."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver import NotSupported, open_driver
from graphdriver.registry import names

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


@pytest.fixture(params=names())
def driver(request: pytest.FixtureRequest, store_root: Path, runroot: Path) -> Iterator[Any]:
    """A fresh store of each registered driver; every mount is undone afterwards."""
    d = open_or_skip(request.param, store_root, runroot)
    try:
        yield d
    finally:
        d.cleanup()
        # Anything still mounted under the root (a failed test) is detached before tmp removal.
        from tests.mountutil import mount_points_under, umount

        for mp in sorted(mount_points_under(store_root), key=len, reverse=True):
            with contextlib.suppress(OSError):
                umount(Path(mp), detach=True)


@pytest.fixture
def gnu_tar() -> str:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    return tar
