"""containerd's own snapshotter conformance suite (``snapshots/testsuite`` of containerd 1.6, from
Debian's golang-github-containerd-containerd-dev) through containerd's ``snapshots/proxy`` gRPC
client: against `graphdriver snapshotter` (a server per case, overlay and vfs), and against
containerd's own overlayfs snapshotter served by ``contrib/snapshotservice`` — the same harness
(``suite/suite_test.go``), which proves it.  The harness is built once per test session, offline,
in GOPATH mode."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT

from .snaputil import SRC

GOPATH = Path("/usr/share/gocode")
TESTSUITE = GOPATH / "src/github.com/containerd/containerd/snapshots/testsuite"
HARNESS = Path(__file__).parent / "suite" / "suite_test.go"
CASES = 21  # the suite's cases in 1.6; Rename is skipped upstream on overlay ("some kernels")


@pytest.fixture(scope="session")
def suite_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not IS_ROOT:
        pytest.skip("containerd's snapshotter suite mounts: needs root")
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (Debian: golang-go)")
    if not TESTSUITE.is_dir():
        pytest.skip(f"no {TESTSUITE} (Debian: golang-github-containerd-containerd-dev)")
    work = tmp_path_factory.mktemp("gosuite")
    pkg = work / "gopath" / "src" / "gdsuite"
    pkg.mkdir(parents=True)
    shutil.copy(HARNESS, pkg)
    env = {**os.environ, "GOPATH": f"{work / 'gopath'}:{GOPATH}", "GO111MODULE": "off",
           "GOFLAGS": "", "GOPROXY": "off", "GOCACHE": str(work / "cache"),
           "CGO_ENABLED": os.environ.get("CGO_ENABLED", "1")}
    binary = work / "suite.test"
    build = subprocess.run(["go", "test", "-c", "-o", str(binary), "."], cwd=pkg, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    return binary


def run_suite(binary: Path, backend: str, command: str = "") -> dict[str, str]:
    """{case: PASS|FAIL|SKIP} from the suite's verbose output."""
    args = [str(binary), "-backend", backend, "-test.v", "-test.timeout", "15m",
            "-test.parallel", "4"]
    if command:
        args += ["-command", command]
    proc = subprocess.run(args, env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                          text=True, timeout=1200, cwd=binary.parent)
    results = dict((m.group(2), m.group(1)) for m in
                   re.finditer(r"^\s+--- (PASS|FAIL|SKIP): TestSnapshotter/(\S+)",
                                proc.stdout, re.M))
    failed = [c for c, r in results.items() if r == "FAIL"]
    assert proc.returncode == 0 and not failed, f"failed: {failed}\n{proc.stdout[-6000:]}"
    return results


def check(results: dict[str, str]) -> None:
    assert len(results) == CASES, results
    assert [c for c, r in results.items() if r == "SKIP"] == ["Rename"]
    assert sum(r == "PASS" for r in results.values()) == CASES - 1


def test_harness_passes_against_containerds_overlayfs(suite_binary: Path) -> None:
    check(run_suite(suite_binary, "overlay"))


@pytest.mark.parametrize("driver", ["overlay", "vfs"])
def test_containerds_suite_passes_against_graphdriver(suite_binary: Path, driver: str) -> None:
    check(run_suite(suite_binary, "graphdriver",
                    f"{sys.executable} -m graphdriver --driver {driver}"))
