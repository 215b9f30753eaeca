"""The graphdriver plugin protocol, spoken as dockerd speaks it: HTTP/1.1 POSTs on a unix socket,
an empty Host header, no Content-Type, a chunked ApplyDiff body, concurrent requests.

The server runs as ``graphdriver serve`` in its own process (as dockerd would find it), over the
vfs driver (always available) and the overlay driver where the kernel allows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self._path)


class Client:
    def __init__(self, sock: str) -> None:
        self.sock = sock

    def _conn(self) -> UnixHTTP:
        return UnixHTTP(self.sock)

    def raw(self, method: str, body: Any = b"", chunked: bool = False,
            query: str = "") -> tuple[int, bytes]:
        conn = self._conn()
        try:
            conn.putrequest("POST", f"/{method}{query}", skip_host=True,
                            skip_accept_encoding=True)
            conn.putheader("Host", "")  # as Go's plugin client over a unix socket
            conn.putheader("Accept", "application/vnd.docker.plugins.v1.2+json")
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                for piece in body:
                    conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                conn.send(body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def call(self, method: str, **args: Any) -> dict[str, Any]:
        status, data = self.raw(method, json.dumps(args).encode())
        obj: dict[str, Any] = json.loads(data) if data else {}
        if status != 200:
            raise RuntimeError(f"{method}: {status} {obj.get('Err')}")
        return obj


@pytest.fixture(params=["vfs", "overlay"])
def plugin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Client, Path]]:
    name = request.param
    if name == "overlay" and os.geteuid() != 0:
        pytest.skip("overlay needs root")
    sock = tmp_path / "gd.sock"
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphdriver", "--runroot", str(tmp_path / "run"),
         "--driver", name, "serve", "--socket", str(sock), "--name", "gdtest"],
        env=env, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.skip(f"the plugin did not start with {name}: {err.strip()[-300:]}")
        client = Client(str(sock))
        home = tmp_path / "home" / "gdtest"
        try:
            client.call("GraphDriver.Init", Home=str(home), Opts=[], UIDMaps=[], GIDMaps=[])
        except RuntimeError as exc:
            if "NotSupported" in str(exc) or "not supported" in str(exc):
                pytest.skip(str(exc))
            raise
        yield client, home
        client.call("GraphDriver.Cleanup")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
            ended = f"exited with {proc.returncode} after SIGTERM"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ended = "killed: still running 10 s after SIGTERM"
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        from graphdriver.mount import unmount_all_under

        with contextlib.suppress(OSError):
            unmount_all_under(tmp_path)
    assert not sock.exists(), f"the socket is removed on exit; the server {ended}: {err[-1500:]}"


def make_layer_tar(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    out = tmp_path / f"{name}.tar"
    if shutil.which("tar"):
        subprocess.run(["tar", "--format=posix", "-cf", str(out), "-C", str(src), "."],
                       check=True)
    else:
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
            t.add(src, ".")
    return out


def pieces(path: Path, size: int = 70_000) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            b = f.read(size)
            if not b:
                return
            yield b


def test_activate_and_capabilities(plugin: tuple[Client, Path]) -> None:
    client, home = plugin
    assert client.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    caps = client.call("GraphDriver.Capabilities")
    assert caps["Capabilities"]["ReproducesExactDiffs"] is True
    status = client.call("GraphDriver.Status")["Status"]
    assert ["Layers", "0"] in status
    assert home.is_dir(), "Init's Home is where the store lives"


def test_layer_lifecycle_and_exact_diff(plugin: tuple[Client, Path], tmp_path: Path) -> None:
    client, _home = plugin
    big = os.urandom(3 << 20)
    base = make_layer_tar(tmp_path, "base", {"etc/os-release": b"ID=test\n", "bin/big": big})
    client.call("GraphDriver.Create", ID="base")
    status, data = client.raw("GraphDriver.ApplyDiff", pieces(base), chunked=True,
                              query="?id=base&parent=")
    assert status == 200, data
    assert json.loads(data)["Size"] == len(big) + len(b"ID=test\n")
    assert client.call("GraphDriver.Exists", ID="base") == {"Exists": True}
    assert client.call("GraphDriver.Exists", ID="nope") == {"Exists": False}

    status, tar = client.raw("GraphDriver.Diff", json.dumps({"ID": "base"}).encode())
    assert status == 200
    assert hashlib.sha256(tar).hexdigest() == hashlib.sha256(base.read_bytes()).hexdigest()

    client.call("GraphDriver.Create", ID="top", Parent="base")
    top = make_layer_tar(tmp_path, "top", {"etc/motd": b"hi\n"})
    status, data = client.raw("GraphDriver.ApplyDiff", pieces(top), chunked=True,
                              query="?id=top&parent=base")
    assert status == 200, data
    status, tar = client.raw("GraphDriver.Diff", json.dumps({"ID": "top", "Parent": "base"})
                             .encode())
    assert tar == top.read_bytes()

    client.call("GraphDriver.CreateReadWrite", ID="ctr-init", Parent="top")
    client.call("GraphDriver.CreateReadWrite", ID="ctr", Parent="ctr-init")
    path = Path(client.call("GraphDriver.Get", ID="ctr", MountLabel="")["Dir"])
    assert (path / "etc" / "motd").read_bytes() == b"hi\n"
    assert (path / "bin" / "big").stat().st_size == len(big)
    (path / "new").write_bytes(b"new file\n")
    (path / "etc" / "os-release").unlink()
    changes = client.call("GraphDriver.Changes", ID="ctr", Parent="ctr-init")["Changes"]
    assert {"Path": "/new", "Kind": 1} in changes
    assert {"Path": "/etc/os-release", "Kind": 2} in changes
    assert client.call("GraphDriver.DiffSize", ID="ctr", Parent="ctr-init")["Size"] == 9
    meta = client.call("GraphDriver.GetMetadata", ID="ctr")["Metadata"]
    assert isinstance(meta, dict)
    # the rw layer's diff is a new tar (no tar-split): read it with tarfile
    status, tar = client.raw("GraphDriver.Diff", json.dumps({"ID": "ctr", "Parent": "ctr-init"})
                             .encode())
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        names = set(t.getnames())
    assert "new" in names and "etc/.wh.os-release" in names
    client.call("GraphDriver.Put", ID="ctr")

    for layer in ("ctr", "ctr-init", "top", "base"):
        client.call("GraphDriver.Remove", ID=layer)
    client.call("GraphDriver.Remove", ID="base")  # missing: still fine
    assert client.call("GraphDriver.Exists", ID="base") == {"Exists": False}


def test_errors_are_json_with_non_200(plugin: tuple[Client, Path], tmp_path: Path) -> None:
    client, _home = plugin
    status, data = client.raw("GraphDriver.Create", json.dumps({"ID": "x", "Parent": "missing"})
                              .encode())
    assert status != 200 and "missing" in json.loads(data)["Err"]
    client.call("GraphDriver.Create", ID="x")
    status, data = client.raw("GraphDriver.ApplyDiff", [b"not a tar" * 100], chunked=True,
                              query="?id=x&parent=")
    assert status != 200
    err = json.loads(data)["Err"]
    assert err and "\n" not in err
    status, data = client.raw("GraphDriver.Get", json.dumps({"ID": "absent"}).encode())
    assert status != 200 and json.loads(data)["Err"]
    status, data = client.raw("GraphDriver.Bogus", b"{}")
    assert status == 404


def test_concurrent_requests(plugin: tuple[Client, Path], tmp_path: Path) -> None:
    client, _home = plugin
    tars = [make_layer_tar(tmp_path, f"l{i}", {f"f{i}": os.urandom(200_000)}) for i in range(6)]

    def one(i: int) -> str:
        lid = f"layer{i}"
        client.call("GraphDriver.Create", ID=lid)
        status, data = client.raw("GraphDriver.ApplyDiff", pieces(tars[i]), chunked=True,
                                  query=f"?id={lid}&parent=")
        assert status == 200, data
        status, tar = client.raw("GraphDriver.Diff", json.dumps({"ID": lid}).encode())
        assert tar == tars[i].read_bytes()
        return lid

    with ThreadPoolExecutor(6) as pool:
        done = list(pool.map(one, range(6)))
    status = dict((k, v) for k, v in client.call("GraphDriver.Status")["Status"])
    assert status["Layers"] == "6"
    for lid in done:
        client.call("GraphDriver.Remove", ID=lid)


def test_bodies_chunked_or_sized(plugin: tuple[Client, Path], tmp_path: Path) -> None:
    client, _home = plugin
    body = json.dumps({"ID": "sized"}).encode()
    status, data = client.raw("GraphDriver.Create", [body[:3], body[3:7], body[7:]],
                              chunked=True)
    assert status == 200, data
    tar = make_layer_tar(tmp_path, "sized", {"x": b"y" * 5000})
    status, data = client.raw("GraphDriver.ApplyDiff", tar.read_bytes(), query="?id=sized")
    assert status == 200 and json.loads(data)["Size"] == 5000
    status, out = client.raw("GraphDriver.Diff", json.dumps({"ID": "sized"}).encode())
    assert out == tar.read_bytes()
