"""Session fixtures of the image tests: one private registry, one set of private tool paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.regutil import Registry, Tools, registry_running


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with registry_running(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    return Tools(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="session")
def base_layout(tools: Tools) -> Path:
    """An OCI layout made by umoci: ``base`` (2 layers) and ``app`` (base + 1 layer)."""
    from tests.images.regutil import umoci_image

    layout = tools.dir / "layout"
    umoci_image(tools, layout, "base", [
        {"etc/os-release": b"ID=test\n", "bin/sh": b"#!fake shell\n" * 1000},
        {"usr/share/doc/big.txt": bytes(range(256)) * 4096},
    ])
    umoci_image(tools, layout, "app", [{"app/main.py": b"print('hello')\n"}], base="base")
    return layout
