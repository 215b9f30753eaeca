"""windowsfilter's import runs as a job of the confined runner (archive/confine.py): signals
roll it back, its progress reaches the caller, its errors keep their class, a failed chroot
stops it."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.childproc import feed_until_started, is_gone
from tests.drivers.wintar_build import WinTarBuilder, base_layer

from graphdriver import InvalidArchive, open_driver

SRC = str(Path(__file__).resolve().parents[2] / "src")

IMPORT_FROM_STDIN = r"""
import sys
sys.path[:0] = [{src!r}]
from graphdriver import open_driver
from graphdriver.errors import GraphDriverError
d = open_driver("windowsfilter", sys.argv[1], runroot=sys.argv[2])
d.create("layer1")
print("dir", d.metadata("layer1")["dir"], flush=True)
try:
    d.apply_diff("layer1", None, 0)
except GraphDriverError as exc:
    print(type(exc).__name__, exc, flush=True)
    sys.exit(exc.exit_code)
print("finished", flush=True)
"""


def _many_files(n: int) -> bytes:
    b = WinTarBuilder().dir("Files")
    for i in range(n):
        b.file(f"Files/f{i}", os.urandom(100))
    return b.bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_import_rolls_it_back(tmp_path: Path, sig: int) -> None:
    root, run = tmp_path / "root", tmp_path / "run"
    data = _many_files(50)
    proc = subprocess.Popen(
        [sys.executable, "-c", IMPORT_FROM_STDIN.format(src=SRC), str(root), str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline().decode().split()
        assert line[0] == "dir", line
        layer = Path(line[1])
        # every entry, not the end of the archive
        kids = feed_until_started(proc, data[:-1024], layer / ".staging/Files/f49")
        proc.send_signal(sig)
        proc.wait(timeout=120)  # the input stays open: the import cannot finish by itself
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.startswith(b"Interrupted "), (out, err)
    assert proc.returncode == 130
    assert all(is_gone(pid) for pid in kids)
    assert not (layer / ".staging").exists()
    d = open_driver("windowsfilter", root, runroot=run)
    try:
        assert d.exists("layer1")  # not left incomplete: the next open kept it
        assert os.listdir(layer / "Files") == []
        d.apply_diff("layer1", None, io.BytesIO(data))  # and it still takes the whole tar
        assert len(os.listdir(layer / "Files")) == 50
    finally:
        d.cleanup()


def test_progress_of_an_import_reaches_the_callback(store: Any) -> None:
    data = base_layer()
    store.create("base")
    seen: list[int] = []
    store.apply_diff("base", None, io.BytesIO(data), progress=seen.append)
    assert seen, "no progress came back from the import child"
    assert seen == sorted(seen) and 0 < seen[-1] <= len(data)


def test_an_import_error_keeps_its_class_and_message(store: Any) -> None:
    store.create("layer1")
    evil = WinTarBuilder().dir("Files").file("Files/../escape", b"x").bytes()
    with pytest.raises(InvalidArchive,
                       match=r"^invalid Windows layer: entry 'Files/\.\./escape' is outside"):
        store.apply_diff("layer1", None, io.BytesIO(evil))
    assert os.listdir(Path(store.metadata("layer1")["dir"]) / "Files") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the chroot needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_a_chroot_that_fails_stops_the_import(tmp_path: Path) -> None:
    """It carried on unconfined before; now it is refused and the layer kept as it was."""
    root, run = tmp_path / "root", tmp_path / "run"
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_chroot", "--inh-caps", "-sys_chroot", "--",
         sys.executable, "-c", IMPORT_FROM_STDIN.format(src=SRC), str(root), str(run)],
        input=base_layer(), capture_output=True, timeout=120)
    lines = proc.stdout.decode().splitlines()
    assert lines[-1].startswith("PermissionDenied "), (lines, proc.stderr)
    assert "cannot chroot into" in lines[-1]
    assert proc.returncode != 0
    layer = Path(lines[0].split()[1])
    assert os.listdir(layer / "Files") == []
    assert not (layer / ".staging").exists()
