"""The overlay driver tried as a new user would, through the command only.

Apply a root filesystem layer (the benchmark cache's debootstrap rootfs with
GRAPHDRIVER_REAL_ROOTFS=1, which takes minutes; else a generated tree), create 20 layers on top,
mount the top in one process and unmount it from another, write through a ``--rw`` layer, list
its changes, write its diff, re-apply the diffs in a second store and get the same tree.  Native
diffs (the default) and a naive one (against a grandparent) are both re-applied and compared.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IS_ROOT
from tests.mountutil import mount_points_under
from tests.treeutil import diff_snapshots, snapshot

from graphdriver import NotSupported, open_driver
from graphdriver.mount import unmount_all_under

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="overlay mounts need root")

ROOTFS = Path("/var/cache/graphdriver-bench/rootfs.tar")
SRC = str(Path(__file__).resolve().parents[2] / "src")


class GD:
    def __init__(self, root: Path, run: Path) -> None:
        self.base = [sys.executable, "-m", "graphdriver", "--root", str(root), "--runroot",
                     str(run), "--driver", "overlay"]
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, *sys.path]))

    def __call__(self, *args: str, stdin: Any = None) -> str:
        proc = subprocess.run([*self.base, *args], capture_output=True, stdin=stdin,
                              env=self.env, timeout=600, check=False)
        assert proc.returncode == 0, f"{args}: {proc.stderr.decode()}"
        return proc.stdout.decode()


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[GD, GD, Path]]:
    run = tmp_path / "run"
    opened = []
    for name in ("one", "two"):
        try:
            opened.append(open_driver("overlay", tmp_path / name, runroot=run))
        except NotSupported as exc:
            pytest.skip(f"overlay is not supported here: {exc}")
    try:
        yield GD(tmp_path / "one", run), GD(tmp_path / "two", run), tmp_path
    finally:
        for d in opened:
            with contextlib.suppress(Exception):
                d.cleanup()
        with contextlib.suppress(OSError):
            unmount_all_under(tmp_path)


def _rootfs(tmp: Path) -> Path:
    if os.environ.get("GRAPHDRIVER_REAL_ROOTFS") == "1" and ROOTFS.is_file():
        return ROOTFS
    tree = tmp / "gen"
    for i in range(40):
        d = tree / f"usr/lib/pkg{i}"
        d.mkdir(parents=True)
        for j in range(25):
            (d / f"f{j}").write_bytes(os.urandom(200 + 37 * j))
        os.symlink(f"pkg{i}/f0", tree / f"usr/lib/link{i}")
    (tree / "etc").mkdir()
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    out = tmp / "gen.tar"
    with tarfile.open(out, "w") as tar:
        for p in sorted(tree.iterdir()):
            tar.add(p, arcname=p.name)
    return out


def seconds(snap: dict[str, Any]) -> dict[str, Any]:
    """Layer tars keep whole-second mtimes (moby's rule): compare at that precision."""
    return {k: (*v[:4], v[4] // 10**9 if v[4] is not None else None, *v[5:])
            for k, v in snap.items()}


@pytest.mark.slow
def test_new_user_walkthrough(stores: tuple[GD, GD, Path]) -> None:
    gd, other, tmp = stores
    rootfs = _rootfs(tmp)
    gd("create", "base")
    assert int(gd("apply", "base", str(rootfs))) > 0
    parent = "base"
    for i in range(20):
        lid = f"layer{i:02d}"
        gd("create", lid, "--parent", parent)
        layer_tar = tmp / f"{lid}.tar"
        with tarfile.open(layer_tar, "w") as tar:
            data = f"layer {i}\n".encode()
            info = tarfile.TarInfo(f"etc/layer{i:02d}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if i == 5:
                gone = tarfile.TarInfo("etc/.wh.layer02")
                tar.addfile(gone)
        gd("apply", lid, str(layer_tar))
        parent = lid
    # Mount the top in this process's child, unmount it from another.
    path = Path(gd("mount", "layer19").strip())
    assert (path / "etc/layer00").read_text() == "layer 0\n"
    assert not (path / "etc/layer02").exists()
    assert (path / "etc/passwd").exists()
    gd("unmount", "layer19")
    assert str(path) not in {mp for mp in mount_points_under(tmp)}

    gd("create", "ctr", "--parent", "layer19", "--rw")
    root = Path(gd("mount", "ctr").strip())
    (root / "etc/passwd").write_text("changed\n")
    (root / "newdir").mkdir()
    (root / "newdir/file").write_bytes(b"new")
    os.unlink(root / "etc/layer07")
    gd("unmount", "ctr")
    changes = gd("changes", "ctr").splitlines()
    assert {"C /etc", "C /etc/passwd", "D /etc/layer07", "A /newdir", "A /newdir/file"} == set(
        changes)
    assert int(gd("diff-size", "ctr")) == len("changed\n") + len(b"new")

    # Re-apply every layer's diff (the native ones) in a second store: the same trees.  The
    # command writes the top diff; the library streams the others (to keep the test short).
    one = open_driver("overlay", tmp / "one", runroot=tmp / "run")
    two = open_driver("overlay", tmp / "two", runroot=tmp / "run")
    prev = None
    for lid in ["base", *[f"layer{i:02d}" for i in range(20)]]:
        two.create(lid, prev)
        with one.diff(lid) as stream:
            two.apply_diff(lid, None, stream)
        prev = lid
    out = tmp / "ctr.diff.tar"
    gd("diff", "ctr", "-o", str(out))
    other("create", "ctr", "--parent", "layer19")
    other("apply", "ctr", str(out))
    a = Path(gd("mount", "ctr").strip())
    b = Path(other("mount", "ctr").strip())
    try:
        assert diff_snapshots(seconds(snapshot(a)), seconds(snapshot(b))) == []
    finally:
        gd("unmount", "ctr")
        other("unmount", "ctr")

    # The naive diff against a grandparent (not the recorded parent) re-applies to the same tree.
    naive = tmp / "ctr.naive.tar"
    if _has_parent_flag(gd):
        gd("diff", "ctr", "--parent", "layer18", "-o", str(naive))
        other("create", "ctr2", "--parent", "layer18")
        other("apply", "ctr2", str(naive))
        a = Path(gd("mount", "ctr").strip())
        b = Path(other("mount", "ctr2").strip())
        try:
            assert diff_snapshots(seconds(snapshot(a)), seconds(snapshot(b))) == []
        finally:
            gd("unmount", "ctr")
            other("unmount", "ctr2")
    gd("cleanup")
    other("cleanup")


def _has_parent_flag(gd: GD) -> bool:
    proc = subprocess.run([*gd.base, "diff", "--help"], capture_output=True, env=gd.env,
                          check=False)
    return b"--parent" in proc.stdout
