"""Fixtures for the tar-engine tests (helpers live in tarbuild.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory on tmpfs when there is one (fast, and it has user/trusted xattrs)."""
    base = Path("/dev/shm")
    if base.is_dir() and os.access(base, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="gd-archive-", dir=base))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture(params=["vfs", "overlay"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A vfs and an overlay store (skipped where the driver cannot work), cleaned up after."""
    from graphdriver import open_driver
    from graphdriver.errors import NotSupported

    try:
        d = open_driver(request.param, tmp_path / "root", runroot=tmp_path / "run")
    except NotSupported as exc:
        pytest.skip(f"{request.param}: {exc}")
    yield d
    d.cleanup()
