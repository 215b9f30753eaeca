"""Fixtures of the safety suite: the drivers that work here, a canary, store paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import NotSupported, open_driver
from graphdriver.registry import names
from tests.safety.safetyutil import Canary


def usable_drivers() -> list[str]:
    return [n for n in ("vfs", "overlay") if n in names()]


@pytest.fixture(params=usable_drivers())
def driver_name(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A driver that can be opened here (skips with the reason otherwise); mounts undone after."""
    name: str = request.param
    probe = tmp_path / "probe"
    try:
        d = open_driver(name, probe / "root", runroot=probe / "run")
        d.cleanup()
    except NotSupported as exc:
        pytest.skip(f"{name} is not supported here: {exc}")
    try:
        yield name
    finally:
        _umount_under(tmp_path)


def _umount_under(path: Path) -> None:
    from graphdriver.mount import unmount_all_under

    unmount_all_under(path)


@pytest.fixture
def canary(tmp_path: Path) -> Canary:
    return Canary(tmp_path)


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    """(store root, run root) of a fresh store."""
    root = tmp_path / "store"
    run = tmp_path / "run"
    root.mkdir()
    run.mkdir()
    return root, run

