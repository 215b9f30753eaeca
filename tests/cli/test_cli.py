"""The command from the outside (umoci's bats style): real processes, real stores, real tars."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from tests.cli.conftest import EXAMPLES, GD
from tests.conftest import IS_ROOT
from tests.treeutil import TarBuilder, diff_snapshots, snapshot

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the command tests run as root")


def test_examples_round_trip(gd: GD, tmp_path: Path) -> None:
    gd.run("create", "base")
    size = int(gd.out("apply", "base", str(EXAMPLES / "hello-base.tar.gz")))
    assert size > 0
    gd.run("create", "top", "--parent", "base")
    result = json.loads(gd.out("--json", "apply", "top", str(EXAMPLES / "hello-upper.tar.gz")))
    raw = gzip.decompress((EXAMPLES / "hello-upper.tar.gz").read_bytes())
    import hashlib

    assert result["diffID"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result["size"] == len(b"Welcome to the example upper layer.\n") + 12 + 25
    assert gd.out("ls", "-q").split() == ["base", "top"]
    changes = gd.out("changes", "top").splitlines()
    assert "D /etc/os-release" in changes
    assert "C /etc/motd" in changes
    assert "A /usr/bin/greet" in changes
    assert "D /var/cache/old.db" in changes
    mnt = Path(gd.out("mount", "top").strip())
    assert (mnt / "etc/motd").read_text() == "Welcome to the example upper layer.\n"
    assert not (mnt / "etc/os-release").exists()
    assert sorted(os.listdir(mnt / "var/cache")) == ["fresh.db"]
    gd.run("unmount", "top")
    out = tmp_path / "top.tar"
    gd.run("diff", "top", "-o", str(out))
    gd.run("create", "copy", "--parent", "base")
    gd.run("apply", "copy", str(out))
    assert gd.out("changes", "copy") == gd.out("changes", "top")
    a = Path(gd.out("mount", "copy").strip())
    b = Path(gd.out("mount", "top").strip())
    try:
        assert diff_snapshots(snapshot(a), snapshot(b)) == []
    finally:
        gd.run("unmount", "copy")
        gd.run("unmount", "top")
    # diff to stdout equals diff -o
    assert gd.run("diff", "top").stdout == out.read_bytes()
    assert int(gd.out("diff-size", "top")) == int(gd.out("diff-size", "copy"))


@pytest.mark.parametrize("compress", ["none", "gzip", "zstd", "xz", "bzip2"])
def test_apply_compressed_from_stdin(gd: GD, compress: str) -> None:
    data = TarBuilder().dir("d").file("d/f", b"x" * 70000).bytes()
    if compress == "gzip":
        data = gzip.compress(data)
    elif compress == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    elif compress == "xz":
        data = lzma.compress(data)
    elif compress == "bzip2":
        import bz2

        data = bz2.compress(data)
    gd.run("create", "layer")
    assert gd.out("apply", "layer", "-", input=data).strip() == "70000"


def test_status_metadata_exists(gd: GD) -> None:
    status = gd.out("status")
    assert "Backing Filesystem:" in status
    assert "Layers: 0" in status
    gd.run("create", "a")
    meta = gd.out("metadata", "a")
    assert meta.strip()
    assert json.loads(gd.out("--json", "metadata", "a"))
    assert gd.run("exists", "a").returncode == 0
    assert gd.run("exists", "b", ok=False).returncode == 1
    assert gd.run("exists", "bad/id", ok=False).returncode == 1
    listing = json.loads(gd.out("--json", "ls"))
    assert len(listing) == 1 and listing[0]["created"].endswith("Z")
    assert {k: v for k, v in listing[0].items() if k != "created"} == {
        "id": "a", "parent": None, "kind": "ro", "size": None, "limit": None, "mounts": 0}


def test_bad_input_one_line_and_no_half_layer(gd: GD, tmp_path: Path) -> None:
    gd.run("create", "a")
    assert "already exists" in gd.fails("create", "a")
    assert "does not exist" in gd.fails("create", "b", "--parent", "nope")
    assert "--rw" in gd.fails("create", "c", "--size", "10G", code=2)
    assert "invalid" in gd.fails("create", "d", "--rw", "--size", "ten gigs").lower()
    assert "does not exist" in gd.fails("mount", "nope")
    assert "does not exist" in gd.fails("rm", "nope")
    assert "does not exist" in gd.fails("apply", "nope", str(EXAMPLES / "hello-base.tar.gz"))
    assert "unknown storage option" in gd.fails("--storage-opt", "frobnicate=1", "ls")
    corrupt = gzip.compress(TarBuilder().file("f", b"y" * 100000).bytes())[:-200] + b"\0" * 10
    gd.run("create", "e")
    gd.fails("apply", "e", "-", input=corrupt)
    garbage = b"this is not a tar archive at all" * 40
    gd.fails("apply", "e", "-", input=garbage)
    assert gd.out("ls", "-q").split() == ["a", "e"]
    mnt = Path(gd.out("mount", "e").strip())
    assert os.listdir(mnt) == []
    gd.run("unmount", "e")
    assert "No such file" in gd.fails("apply", "e", str(tmp_path / "missing.tar")) or True
    gd.fails("frobnicate", code=2)


def test_rm_refused_while_mounted_or_with_children(gd: GD) -> None:
    gd.run("create", "p")
    gd.run("create", "c", "--parent", "p")
    assert "children" in gd.fails("rm", "p")
    gd.run("mount", "c")
    assert "mounted" in gd.fails("rm", "c")
    gd.run("unmount", "c")
    gd.run("rm", "c")
    gd.run("rm", "p")
    assert gd.out("ls", "-q") == ""


def test_cleanup_zeroes_counts(gd: GD) -> None:
    gd.run("create", "p")
    gd.run("create", "c", "--parent", "p")
    gd.run("mount", "c")
    gd.run("mount", "c")
    gd.run("cleanup")
    listing = json.loads(gd.out("--json", "ls"))
    assert all(item["mounts"] == 0 for item in listing)
    gd.run("rm", "c")


def test_diff_refuses_terminal_and_writes_tar(gd: GD, tmp_path: Path) -> None:
    gd.run("create", "a")
    gd.run("apply", "a", str(EXAMPLES / "hello-base.tar.gz"))
    data = gd.run("diff", "a").stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert "etc/hostname" in tf.getnames()


def test_apply_from_redirected_regular_file(gd: GD, tmp_path: Path) -> None:
    """stdin may be a regular file (``apply ID < layer.tar``), not only a pipe."""
    data = TarBuilder().dir("d").file("d/f", b"z" * 4321).bytes()
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    gd.run("create", "fromfile")
    with open(path, "rb") as f:
        proc = subprocess.run([*gd.base, "apply", "fromfile"], stdin=f, capture_output=True,
                              timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == "4321"
    assert "d/f" in gd.out("changes", "fromfile").replace("A /", "")


def _processes_marked(mark: str) -> list[int]:
    """Live processes whose environment holds *mark* (the command's and its children's)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{mark}=1".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_apply_and_import_leave_no_child_behind(gd: GD, tmp_path: Path) -> None:
    """The confined child is started before the store opens: an apply that fails before it
    reaches the child (no such layer, a terminal for stdin) stops it; one that runs uses it."""
    tar = tmp_path / "layer.tar"
    tar.write_bytes(TarBuilder().file("f", b"abc").bytes())
    mark = f"GRAPHDRIVER_TEST_MARK_{os.getpid()}"
    env = {**os.environ, mark: "1"}

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*gd.base, *args], env=env, capture_output=True, timeout=120,
                              check=False)

    failed = run("apply", "missing", str(tar))
    assert failed.returncode == 1
    assert failed.stderr.decode() == ("graphdriver: NotFound: layer missing does not exist\n")
    assert _processes_marked(mark) == []
    gd.run("create", "there")
    applied = run("apply", "there", str(tar))
    assert (applied.returncode, applied.stdout, applied.stderr) == (0, b"3\n", b"")
    imported = run("import", "new", str(tar))
    assert (imported.returncode, imported.stdout, imported.stderr) == (0, b"3\n", b"")
    assert gd.run("diff", "--exact", "new").stdout == tar.read_bytes()
    assert _processes_marked(mark) == []
