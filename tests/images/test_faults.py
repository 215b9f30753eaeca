"""Registry faults met through a loopback proxy in front of the real registry: 429 with
Retry-After (waited for, then retried), 5xx (retried, then one clear error), 403, a manifest that
is not JSON, a blob the registry lacks — each one line from the command, nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.errors import RegistryError, Unauthorized
from graphdriver.images.client import RegistryClient
from tests.images.faultproxy import Fault, FaultProxy
from tests.images.regutil import Registry, Tools, push_layout


@pytest.fixture(scope="module")
def image(registry: Registry, tools: Tools, base_layout: Path) -> str:
    return push_layout(tools, base_layout, "base", registry, "faults/base").split("/", 1)[1]


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    p = FaultProxy(registry.port, [])
    try:
        yield p
    finally:
        p.stop()


def _pull(proxy: FaultProxy, image: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root"),
                           "--runroot", str(tmp_path / "run"), "--driver", "vfs", "image",
                           "pull", "-q", f"{proxy.host}/{image}"],
                          capture_output=True, text=True, timeout=300, check=False)


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_429_retry_after_is_honoured(proxy: FaultProxy, image: str) -> None:
    proxy.faults.append(Fault("GET", "/manifests/", 429, headers={"Retry-After": "1"}))
    repo, tag = image.split(":")
    with RegistryClient(proxy.host) as client:
        start = time.monotonic()
        client.get_manifest(repo, tag)
        assert time.monotonic() - start >= 1.0
    assert proxy.faults[0].hits == 1


def test_5xx_is_retried_then_one_error(proxy: FaultProxy, image: str, tmp_path: Path) -> None:
    proxy.faults.append(Fault("GET", "/manifests/", 503, times=-1))
    repo, tag = image.split(":")
    with RegistryClient(proxy.host, retries=2, backoff=0.01) as client, \
            pytest.raises(RegistryError, match="503"):
        client.get_manifest(repo, tag)
    assert proxy.faults[0].hits == 3
    assert "503" in _one_line(_pull(proxy, image, tmp_path))


def test_403_not_json_and_missing_blob(proxy: FaultProxy, image: str, tmp_path: Path) -> None:
    proxy.faults.append(Fault("GET", "/manifests/", 403, body=b'{"errors":[{"code":"DENIED",'
                                                              b'"message":"no access"}]}'))
    repo, tag = image.split(":")
    with RegistryClient(proxy.host) as client, pytest.raises(Unauthorized, match="DENIED"):
        client.get_manifest(repo, tag)
    proxy.faults[:] = [Fault("GET", "/manifests/", 200, body=b"<html>not a manifest</html>",
                             headers={"Content-Type": "text/html"})]
    assert "not JSON" in _one_line(_pull(proxy, image, tmp_path))
    proxy.faults[:] = [Fault("GET", "/blobs/sha256:", 404, times=-1)]
    assert "404" in _one_line(_pull(proxy, image, tmp_path))
    listed = subprocess.run([sys.executable, "-m", "graphdriver", "--root",
                             str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
                             "--driver", "vfs", "image", "ls", "-q"],
                            capture_output=True, text=True, check=True)
    assert listed.stdout == ""
