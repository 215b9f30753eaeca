"""Fixtures of the driver tests: the Go reference writer of Windows layer tars, built once per
test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.drivers.gowin import build_tool


@pytest.fixture(scope="session")
def gowintar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tool = build_tool(tmp_path_factory.mktemp("gowintar"))
    if isinstance(tool, str):
        pytest.skip(tool)
    return tool
