"""CI smoke run of the benchmark: quick layers, one run per row, into temporary directories.

This catches breakage of bench/ (and of the library calls it makes); it does not judge speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PEERS = ("tar", "bsdtar", "zstd", "containers-storage")


def _shm_dir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir():
        import tempfile

        return Path(tempfile.mkdtemp(prefix="gd-bench-test-", dir=shm))
    return tmp_path / "work"


def test_quick_bench(tmp_path: Path) -> None:
    missing = [p for p in PEERS if shutil.which(p) is None]
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is missing: the quick layers are made with it")
    if os.geteuid() != 0:
        pytest.skip("the bench mounts (containers-storage, overlay): needs root")
    cache = tmp_path / "cache"
    made = subprocess.run(
        [sys.executable, str(BENCH / "make_layers.py"), "--quick", "--cache", str(cache)],
        capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    manifest = json.loads((cache / "quick" / "manifest.json").read_text())
    assert manifest["quick"] is True
    for key in ("rootfs", "npm", "big", "small10k-base", "small10k-change", "rootfs.gz",
                "npm.zst"):
        assert (cache / "quick" / manifest["layers"][key]["file"]).stat().st_size > 0
    # the change layer really has its two whiteouts, checked with GNU tar
    listing = subprocess.run(["tar", "-tf", str(cache / "quick" / "small10k-change.tar")],
                             capture_output=True, text=True, check=True).stdout
    assert listing.count("/.wh.") == 2

    # idempotent: a second build keeps every artifact
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "quick").glob("*.tar*")}
    again = subprocess.run(
        [sys.executable, str(BENCH / "make_layers.py"), "--quick", "--cache", str(cache)],
        capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert before == {p.name: p.stat().st_mtime_ns for p in (cache / "quick").glob("*.tar*")}

    work = _shm_dir(tmp_path)
    out_json = tmp_path / "bench.json"
    try:
        r = subprocess.run(
            [sys.executable, str(BENCH / "run.py"), "--quick", "--cache", str(cache),
             "--workdir", str(work / "w"), "--json", str(out_json)],
            capture_output=True, text=True, timeout=900, check=False)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    header = [ln for ln in lines if ln.startswith("| workload")]
    assert header, r.stdout
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| workload")]
    assert len(rows) >= 20, r.stdout
    for needed in ("apply rootfs", "apply many small files", "apply 1 GB", "gzip", "zstd",
                   "changes: 10 changed files", "diff: 10 changed files", "export a whole rootfs",
                   "-layer chain", "start-up", "the whole command: create + apply", "entries"):
        assert any(needed in ln for ln in rows), needed
    assert "Traceback" not in r.stderr, r.stderr[-3000:]

    report = json.loads(out_json.read_text())
    assert report["quick"] is True and report["runs"] == 1
    table = report["table"]
    assert table and all("ratio" in row for row in table)
    # every peer that is installed produced a time; a missing one says so
    for row in table:
        peer = row["peer"]
        tool = "tar" if peer.startswith("GNU tar") else peer.split()[0]
        if tool in PEERS and tool not in missing:
            assert row["peer_median_s"] is not None, row
        elif tool in PEERS:
            assert (row["peer_note"] or "").startswith("n/a"), row
    assert not any((row["peer_note"] or "").startswith("error") for row in table), table
    # issue 18's rows: the command as a user runs it, and a layer of many entries
    for row in table:
        if "whole command" in row["workload"] or "entries" in row["workload"]:
            assert row["graphdriver_median_s"] is not None, row
    if missing:
        print(f"peers not installed, their rows report n/a: {', '.join(missing)}")
