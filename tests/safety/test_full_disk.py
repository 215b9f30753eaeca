"""Full disk: a store on an 8 MiB tmpfs; an apply (and a vfs copy) bigger than it.

The command must fail with one clear NoSpace line, leave no half layer (the target as it was,
no scratch leftovers, no incomplete marker), and the store must stay usable afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.safety.safetyutil import (
    Canary,
    Layout,
    assert_one_line_error,
    cli,
    cli_ok,
    make_layer_tar,
    store_tree,
    tmpfs,
)
from tests.treeutil import TarBuilder, diff_snapshots

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")


def _healthy(root: Path, run: Path, driver: str) -> list[str]:
    listing = cli_ok(root, run, driver, "ls", "-q").split()
    problems = Layout(root, driver).problems(listing)
    assert not problems, "; ".join(problems)
    return listing


def test_apply_bigger_than_the_disk(driver_name: str, tmp_path: Path, canary: Canary) -> None:
    big = tmp_path / "big.tar"
    make_layer_tar(big, seed=3, megabytes=16, files=40)
    small = tmp_path / "small.tar"
    TarBuilder().dir("etc").file("etc/hello", b"hello\n" * 100).write(small)
    run = tmp_path / "run"
    with tmpfs(tmp_path / "small-fs", "8m") as root:
        layout = Layout(root, driver_name)
        cli_ok(root, run, driver_name, "create", "base")
        cli_ok(root, run, driver_name, "apply", "base", str(small))
        cli_ok(root, run, driver_name, "create", "top", "--parent", "base")
        before = store_tree(root)
        res = cli(root, run, driver_name, "apply", "top", str(big))
        assert res.returncode != 0, "a 16 MiB layer fitted on an 8 MiB filesystem"
        line = assert_one_line_error(res.stderr, "apply on a full disk")
        assert "NoSpace" in line, line
        after = store_tree(root)
        assert not diff_snapshots(before, after), "half layer left: " + "; ".join(
            diff_snapshots(before, after)[:6])
        assert "top" in _healthy(root, run, driver_name)
        # Still usable: the space came back and new layers work.
        cli_ok(root, run, driver_name, "create", "again", "--parent", "base")
        cli_ok(root, run, driver_name, "apply", "again", str(small))
        assert (layout.layer_tree("again") / "etc" / "hello").read_bytes() == b"hello\n" * 100
        cli_ok(root, run, driver_name, "rm", "top")
        assert sorted(_healthy(root, run, driver_name)) == ["again", "base"]
        cli(root, run, driver_name, "cleanup")
    canary.check()


def test_vfs_copy_bigger_than_the_disk(tmp_path: Path, canary: Canary) -> None:
    """vfs copies the parent: a child that does not fit is absent afterwards, not half made."""
    mid = tmp_path / "mid.tar"
    make_layer_tar(mid, seed=4, megabytes=5, files=30)
    run = tmp_path / "run"
    with tmpfs(tmp_path / "small-fs", "8m") as root:
        cli_ok(root, run, "vfs", "create", "base")
        cli_ok(root, run, "vfs", "apply", "base", str(mid))
        before = store_tree(root)
        res = cli(root, run, "vfs", "create", "child", "--parent", "base")
        assert res.returncode != 0
        assert "NoSpace" in assert_one_line_error(res.stderr, "create on a full disk")
        assert not diff_snapshots(before, store_tree(root)), "half a child left behind"
        assert _healthy(root, run, "vfs") == ["base"]
        cli_ok(root, run, "vfs", "create", "empty")
        assert sorted(_healthy(root, run, "vfs")) == ["base", "empty"]
    canary.check()
