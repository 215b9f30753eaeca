"""The package as pip builds it (issue 16, packaging): a license expression and the LICENSE in
the wheel, one version, no C sources shipped, a README that links nothing outside the repository.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if "No matching distribution" in proc.stderr or "connection" in proc.stderr.lower():
            pytest.skip(f"pip cannot fetch the build backend here: {proc.stderr.strip()[-200:]}")
        raise AssertionError(proc.stderr)
    (found,) = out.glob("graphdriver-*.whl")
    return found


def test_wheel_has_license_and_no_c_sources(wheel: Path) -> None:
    import graphdriver

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert not [n for n in names if n.endswith((".c", ".h"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "graphdriver/py.typed" in names
    assert "License-Expression: Apache-2.0" in meta
    assert f"Version: {graphdriver.__version__}" in meta
    assert "Classifier: Operating System :: POSIX :: Linux" in meta
    assert "Requires-Dist: shtab" in meta


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_version_is_written_once() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^version\s*=\s*\"", pyproject, re.M) is None  # no literal version
    assert 'dynamic = ["version"]' in pyproject


def test_readme_links_nothing_outside_the_repository() -> None:
    text = (ROOT / "README.md").read_text()
    assert re.findall(r"https?://", text) == []
    for target in re.findall(r"\]\(([^)#]+)", text):
        assert (ROOT / target).exists(), target
