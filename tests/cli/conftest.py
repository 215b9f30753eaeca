"""The command's tests: ``GD`` runs ``python -m graphdriver`` against one store; the ``gd`` fixture
gives one per driver (vfs, overlay), skipped where the driver does not work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class GD:
    """Runs ``python -m graphdriver`` against one store."""

    def __init__(self, root: Path, runroot: Path, driver: str) -> None:
        self.driver = driver
        self.base = [sys.executable, "-m", "graphdriver", "--root", str(root),
                     "--runroot", str(runroot), "--driver", driver]

    def run(self, *args: str, input: bytes | None = None, ok: bool = True,
            ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run([*self.base, *args], input=input, capture_output=True, timeout=120)
        if ok and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr.decode()}")
        return proc

    def out(self, *args: str, **kw: Any) -> str:
        return self.run(*args, **kw).stdout.decode()

    def fails(self, *args: str, input: bytes | None = None, code: int | None = None) -> str:
        proc = self.run(*args, input=input, ok=False)
        assert proc.returncode != 0, f"{args} should have failed"
        if code is not None:
            assert proc.returncode == code, proc.stderr
        err = proc.stderr.decode()
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"want one line on stderr, got: {err!r}"
        assert "Traceback" not in err
        return lines[0]


@pytest.fixture(params=["vfs", "overlay"])
def gd(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from graphdriver import NotSupported, open_driver

    root, run = tmp_path / "root", tmp_path / "run"
    try:
        d = open_driver(request.param, root, runroot=run)
    except NotSupported as exc:
        pytest.skip(f"{request.param}: {exc}")
    g = GD(root, run, request.param)
    yield g
    d.cleanup()


