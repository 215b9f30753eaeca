"""Nothing can brick a store: a 2000-level tree is copied, compared, exported and removed by
iterative, fd-based walkers (issue 12, third item; RecursionError before)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graphdriver import open_driver
from graphdriver.fsutil import copy_tree, remove_tree

DEPTH = 2000
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the drivers' stores)")


def make_deep(root: Path, depth: int = DEPTH) -> None:
    """``d/d/.../d/f``, *depth* directories deep, made by fd (no path is longer than a name)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", 0o755, dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"deep\n")
        os.link("f", "hard", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink("f", "link", dir_fd=fd)
        os.close(out)
    finally:
        os.close(fd)


def deepest(root: Path, depth: int = DEPTH) -> os.stat_result:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        assert os.readlink("link", dir_fd=fd) == "f"
        assert os.stat("hard", dir_fd=fd).st_ino == os.stat("f", dir_fd=fd).st_ino
        return os.stat("f", dir_fd=fd)
    finally:
        os.close(fd)


def test_copy_and_remove_a_deep_tree(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_deep(src)
    copy_tree(src, dst)
    assert deepest(dst).st_size == 5
    assert deepest(dst).st_nlink == 2
    remove_tree(dst)
    remove_tree(src)
    assert os.listdir(tmp_path) == []


def test_deep_layer_through_the_store(driver_name: str, tmp_path: Path) -> None:
    """create --parent, changes, diff and rm of a 2000-deep tree on each driver."""
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("deep")
    with d.mounted("deep") as top:
        make_deep(top)
    d.create("child", "deep")
    with d.mounted("child") as top:
        assert deepest(top).st_size == 5
    changes = d.changes("deep")
    assert len(changes) == DEPTH + 3
    with d.diff("deep") as stream:
        total = 0
        while chunk := stream.read(1 << 20):
            total += len(chunk)
    assert total > DEPTH * 512
    d.remove("child")
    d.remove("deep")
    assert d.layers() == []
    again = open_driver(driver_name, root, runroot=run)  # the store still opens
    assert again.layers() == []
    again.cleanup()
