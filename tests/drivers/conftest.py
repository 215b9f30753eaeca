"""Fixtures of the driver tests: a windowsfilter store, and the Go reference writer of Windows
layer tars, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.drivers.gowin import build_tool

from graphdriver import open_driver


@pytest.fixture(scope="session")
def gowintar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tool = build_tool(tmp_path_factory.mktemp("gowintar"))
    if isinstance(tool, str):
        pytest.skip(tool)
    return tool


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    """A windowsfilter store of its own (the Windows tests' store; cleaned up after)."""
    d = open_driver("windowsfilter", tmp_path / "root", runroot=tmp_path / "run")
    try:
        yield d
    finally:
        d.cleanup()
