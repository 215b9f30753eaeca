"""``-o PATH`` writes into what is there (devices, FIFOs, sockets, a symlink's target) and replaces
only regular files, atomically (issue 12: ``diff -o /dev/null`` once replaced /dev/null)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT
from tests.treeutil import TarBuilder

LAYER = TarBuilder().dir("d").file("d/f", b"payload" * 1000).bytes()


def _gd(tmp_path: Path, *args: str,
        stdout: int | None = None) -> subprocess.CompletedProcess[bytes]:
    base = [sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root"),
            "--runroot", str(tmp_path / "run"), "--driver", "vfs"]
    return subprocess.run([*base, *args], capture_output=stdout is None, stdout=stdout,
                          stderr=subprocess.PIPE if stdout is not None else None, timeout=60,
                          cwd=tmp_path)  # a wrong "-o -" would make ./- here, not in the tree


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    assert _gd(tmp_path, "create", "a").returncode == 0
    src = tmp_path / "layer.tar"
    src.write_bytes(LAYER)
    proc = _gd(tmp_path, "apply", "a", str(src))
    assert proc.returncode == 0, proc.stderr
    return tmp_path


def _names(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "check.tar"
    path.write_bytes(data)
    with tarfile.open(path) as tf:
        return tf.getnames()


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a character device needs root")
def test_character_device_stays_a_device(layer: Path) -> None:
    dev_null = layer / "null"
    os.mknod(dev_null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    proc = _gd(layer, "diff", "a", "-o", str(dev_null))
    assert proc.returncode == 0, proc.stderr
    st = os.lstat(dev_null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert [p.name for p in layer.iterdir() if p.name.startswith(".null")] == []


@pytest.mark.skipif(not IS_ROOT, reason="mknod of a character device needs root")
def test_dev_null_is_still_a_device(layer: Path) -> None:
    """The machine's /dev/null, checked by stat around a run — which happens only once a private
    mknod copy came through unharmed, so broken code never gets to replace the real one."""
    copy = layer / "null-copy"
    os.mknod(copy, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert _gd(layer, "diff", "a", "-o", str(copy)).returncode == 0
    if not stat.S_ISCHR(os.lstat(copy).st_mode):
        pytest.fail("-o replaced a character device: not trying the real /dev/null")
    before = os.stat("/dev/null")
    proc = _gd(layer, "diff", "a", "-o", "/dev/null")
    after = os.stat("/dev/null")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_fifo_with_a_reader(layer: Path) -> None:
    fifo = layer / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc = _gd(layer, "diff", "a", "-o", str(fifo))
    reader.join(30 if stat.S_ISFIFO(os.lstat(fifo).st_mode) else 0)  # daemon: never blocks exit
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert "d/f" in _names(got[0], layer)


def test_unix_socket_is_written_into(layer: Path) -> None:
    path = layer / "s.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(30)
    got = bytearray()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while chunk := conn.recv(65536):
                got.extend(chunk)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    proc = _gd(layer, "diff", "a", "-o", str(path))
    t.join(30 if stat.S_ISSOCK(os.lstat(path).st_mode) else 0)
    srv.close()
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert "d/f" in _names(bytes(got), layer)


def test_symlink_writes_where_it_points(layer: Path) -> None:
    target = layer / "real.tar"
    target.write_bytes(b"old")
    target.chmod(0o600)
    link = layer / "link.tar"
    link.symlink_to("real.tar")
    proc = _gd(layer, "diff", "a", "-o", str(link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == "real.tar"
    assert "d/f" in _names(target.read_bytes(), layer)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_regular_file_replaced_atomically_or_kept(layer: Path) -> None:
    out = layer / "out.tar"
    out.write_bytes(b"previous")
    assert _gd(layer, "diff", "a", "-o", str(out)).returncode == 0
    assert "d/f" in _names(out.read_bytes(), layer)
    out.write_bytes(b"previous")
    proc = _gd(layer, "diff", "missing", "-o", str(out))
    assert proc.returncode != 0
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in layer.iterdir() if p.name.startswith(".out")) == []
    new = layer / "new.tar"
    assert _gd(layer, "diff", "a", "-o", str(new)).returncode == 0
    assert "d/f" in _names(new.read_bytes(), layer)


def test_dash_is_stdout(layer: Path) -> None:
    out = layer / "stdout.tar"
    with open(out, "wb") as f:
        proc = _gd(layer, "diff", "a", "-o", "-", stdout=f.fileno())
    assert proc.returncode == 0, proc.stderr
    assert "d/f" in _names(out.read_bytes(), layer)
    assert not (layer / "-").exists()
