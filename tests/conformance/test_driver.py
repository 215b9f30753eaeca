"""The conformance suite every driver runs (moby's graphtest, containers/storage's additions).

Each test gets a fresh store of each registered driver (see the ``driver`` fixture) and writes
its layers in that driver's format (``layerfix``: a Linux layer tar for vfs and overlay, a Windows
one for windowsfilter); where the format changes what a case sees, the expectation is written
per format here, never skipped from the product code.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from graphdriver import (
    AlreadyExists,
    ChangeKind,
    CreateOpts,
    InUse,
    InvalidArchive,
    InvalidArgument,
    NotFound,
    NotSupported,
    open_driver,
)
from graphdriver.idmap import real_root
from tests.conformance.layerfix import Layer, layer_format
from tests.conftest import IS_ROOT
from tests.treeutil import diff_snapshots, snapshot

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the conformance suite runs as root "
                                "(or rootless inside `graphdriver unshare`)")


def apply(d: Any, layer_id: str, data: bytes | Layer, tmp: Path) -> int:
    """Apply raw tar bytes, or a ``Layer`` written in the driver's format."""
    path = tmp / f"{layer_id}.tar"
    path.write_bytes(layer_format(d).tar(data) if isinstance(data, Layer) else data)
    with open(path, "rb") as f:
        return int(d.apply_diff(layer_id, None, f))


def tree(d: Any, layer_id: str) -> dict[str, Any]:
    with d.mounted(layer_id) as root:
        return snapshot(root)


def base_tar() -> Layer:
    return (
        Layer()
        .dir("etc")
        .file("etc/hostname", b"base\n")
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .dir("bin")
        .file("bin/sh", b"\x7fELF" + b"x" * 5000, mode=0o755)
        .hardlink("bin/sh2", "bin/sh")
        .symlink("bin/sh3", "/bin/sh")
        .dir("toremove")
        .file("toremove/a", b"a")
        .dir("opaque")
        .file("opaque/old1", b"1")
        .file("opaque/old2", b"2")
        .file("setuid", b"s", mode=0o4755)
        .dir("tmp", mode=0o1777)
        .file("owned", b"o", uid=1234, gid=5678)
    )


def upper_tar() -> Layer:
    return (
        Layer()
        .dir("etc")
        .file("etc/hostname", b"upper\n")
        .file("etc/new", b"new")
        .whiteout("toremove")
        .dir("opaque")
        .opaque("opaque")
        .file("opaque/fresh", b"fresh")
        .whiteout("bin/sh3")
    )


def make_base(d: Any, tmp: Path, layer_id: str = "base") -> None:
    d.create(layer_id)
    apply(d, layer_id, base_tar(), tmp)


# ---- graphtest ---------------------------------------------------------------------------


def test_create_empty(driver: Any) -> None:
    driver.create("empty")
    assert driver.exists("empty")
    with driver.mounted("empty") as root:
        assert root.is_dir()
        assert os.listdir(root) == []
    assert driver.layers() == ["empty"]
    driver.remove("empty")
    assert not driver.exists("empty")
    assert driver.layers() == []


def test_create_base(driver: Any, tmp_path: Path, gnu_tar: str) -> None:
    make_base(driver, tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    (tmp_path / "base.tar").write_bytes(base_tar().linux_tar())
    subprocess.run([gnu_tar, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf",
                    str(tmp_path / "base.tar"), "-C", str(ref)], check=True)
    if layer_format(driver).unix_metadata:
        got = tree(driver, "base")
        assert diff_snapshots(snapshot(ref), got) == []
        return
    # A Windows layer carries no modes, owners or Unix times: the view holds the same names,
    # contents, link targets and hard-link groups as GNU tar's extraction of the Linux tar.
    with driver.mounted("base") as root:
        got = snapshot(root, mtimes=False, metadata=False)
    assert diff_snapshots(snapshot(ref, mtimes=False, metadata=False), got) == []


def test_create_snap(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    if layer_format(driver).writable_layers:
        driver.create("snap", "base")
    else:  # only a sandbox takes writes; a read-only layer's view refuses them
        with driver.mounted("base") as root, pytest.raises(OSError) as refused:
            (root / "added").write_text("in base")
        assert refused.value.errno == errno.EROFS
        driver.create_rw("snap", "base")
    assert driver.parent("snap") == "base"
    base, snap = tree(driver, "base"), tree(driver, "snap")
    if not layer_format(driver).sandbox_keeps_hardlinks:  # each name a copy of its own
        base = {path: entry[:6] for path, entry in base.items()}
    assert diff_snapshots(base, snap) == []
    with driver.mounted("snap") as root:
        (root / "added").write_text("in snap")
    with driver.mounted("snap") as root:
        assert (root / "added").read_text() == "in snap"
    with driver.mounted("base") as root:
        assert not (root / "added").exists()


def test_create_rw_snap(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    driver.create_rw("ctr", "base")
    with driver.mounted("ctr") as root:
        (root / "etc/hostname").write_text("container\n")
        os.unlink(root / "etc/passwd")
    changes = driver.changes("ctr")
    # a sandbox names paths as its layer stores them (windowsfilter: "Files/...", its root too)
    stored = layer_format(driver).stored
    parents = [stored("")] if stored("") != "" else []
    assert [(c.path, c.kind) for c in changes] == [
        *[(p, ChangeKind.MODIFY) for p in parents],
        (stored("etc") if parents else "/etc", ChangeKind.MODIFY),
        (stored("etc/hostname") if parents else "/etc/hostname", ChangeKind.MODIFY),
        (stored("etc/passwd") if parents else "/etc/passwd", ChangeKind.DELETE),
    ]


def test_deep_layer_read(driver: Any, tmp_path: Path) -> None:
    """128 layers, each adding one file (through get; by an apply where read-only layers take
    no writes); the top sees them all."""
    parent = None
    for i in range(128):
        layer_id = f"deep{i:03d}"
        driver.create(layer_id, parent)
        if layer_format(driver).writable_layers:
            with driver.mounted(layer_id) as root:
                (root / f"file{i:03d}").write_bytes(b"%d" % i)
        else:
            apply(driver, layer_id, Layer().file(f"file{i:03d}", b"%d" % i), tmp_path)
        parent = layer_id
    with driver.mounted("deep127") as root:
        names = sorted(os.listdir(root))
        assert names == [f"file{i:03d}" for i in range(128)]
        for i in (0, 63, 127):
            assert (root / f"file{i:03d}").read_bytes() == b"%d" % i


def test_diff_apply(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    driver.create("upper", "base")
    size = apply(driver, "upper", upper_tar(), tmp_path)
    assert size == len(b"upper\n") + len(b"new") + len(b"fresh")
    with driver.diff("upper") as stream:
        diff_bytes = stream.read()
    driver.create("copy", "base")
    apply(driver, "copy", diff_bytes, tmp_path)
    assert diff_snapshots(tree(driver, "upper"), tree(driver, "copy")) == []
    assert driver.changes("copy") == driver.changes("upper")
    assert driver.diff_size("copy") == driver.diff_size("upper")


# windowsfilter's read-only layer reports every path its tar holds as changed, the deleted ones
# as deleted, by their names in the tar (hcsshim's layer format has no "added")
WINDOWS_UPPER_CHANGES = [
    ("Files", ChangeKind.MODIFY),
    ("Files/bin", ChangeKind.MODIFY),
    ("Files/bin/sh3", ChangeKind.DELETE),
    ("Files/etc", ChangeKind.MODIFY),
    ("Files/etc/hostname", ChangeKind.MODIFY),
    ("Files/etc/new", ChangeKind.MODIFY),
    ("Files/opaque", ChangeKind.MODIFY),
    ("Files/opaque", ChangeKind.DELETE),
    ("Files/opaque/fresh", ChangeKind.MODIFY),
    ("Files/toremove", ChangeKind.DELETE),
]


def test_changes(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    driver.create("upper", "base")
    apply(driver, "upper", upper_tar(), tmp_path)
    fmt = layer_format(driver)
    got = [(c.path, c.kind) for c in driver.changes("upper")]
    if not fmt.unix_metadata:
        assert got == WINDOWS_UPPER_CHANGES
    else:
        assert got == [
            ("/bin", ChangeKind.MODIFY),
            ("/bin/sh3", ChangeKind.DELETE),
            ("/etc", ChangeKind.MODIFY),
            ("/etc/hostname", ChangeKind.MODIFY),
            ("/etc/new", ChangeKind.ADD),
            ("/opaque", ChangeKind.MODIFY),
            ("/opaque/fresh", ChangeKind.ADD),
            ("/opaque/old1", ChangeKind.DELETE),
            ("/opaque/old2", ChangeKind.DELETE),
            ("/toremove", ChangeKind.DELETE),
        ]
    # A layer without a parent: everything is added, the root is never listed.
    base = driver.changes("base")
    assert all(c.kind == fmt.added for c in base)
    assert "/" not in [c.path for c in base]
    passwd = "/etc/passwd" if fmt.unix_metadata else fmt.stored("etc/passwd")
    assert passwd in [c.path for c in base]


def test_diff_size(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    driver.create("upper", "base")
    apply(driver, "upper", upper_tar(), tmp_path)
    assert driver.diff_size("upper") == len(b"upper\n") + len(b"new") + len(b"fresh")
    # A hard-linked inode counts once; a symlink counts its target's length (moby's ChangesSize;
    # hcsshim's import counts file data only).
    symlink = len("/bin/sh") if layer_format(driver).symlinks_sized else 0
    assert driver.diff_size("base") == symlink + sum(
        len(x) for x in (b"base\n", b"root:x:0:0:root:/root:/bin/sh\n", b"a", b"1", b"2", b"s",
                         b"o")
    ) + 5004


def test_diff_of_base_is_whole_tree(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    with driver.diff("base") as stream:
        data = stream.read()
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = {m.name.rstrip("/") for m in tf.getmembers()}
        links = {m.name: m.linkname for m in tf.getmembers() if m.islnk()}
    stored = layer_format(driver).stored
    assert {stored(n) for n in ("etc/passwd", "bin/sh", "bin/sh2", "bin/sh3", "tmp",
                                "owned")} <= names
    assert links == {stored("bin/sh2"): stored("bin/sh")}


# ---- containers/storage's additions: whiteout and opaque echo rounds ---------------------


ROUNDS = [
    Layer().dir("a").file("a/1", b"1").file("a/2", b"2").dir("a/sub").file("a/sub/x", b"x"),
    Layer().dir("a").opaque("a").file("a/3", b"3"),
    Layer().dir("a").whiteout("a/3").file("a/4", b"4").dir("b").file("b/y", b"y"),
    Layer().whiteout("a").file("a", b"now a file"),
    Layer().whiteout("a").dir("a").file("a/again", b"again"),
]


def test_echo_rounds(driver: Any, tmp_path: Path) -> None:
    """Each round: apply, diff, re-apply the diff on a twin chain, compare trees and changes."""
    parent = None
    twin_parent = None
    for i, round_tar in enumerate(ROUNDS):
        layer, twin = f"echo{i}", f"twin{i}"
        driver.create(layer, parent)
        apply(driver, layer, round_tar, tmp_path)
        with driver.diff(layer) as stream:
            data = stream.read()
        driver.create(twin, twin_parent)
        apply(driver, twin, data, tmp_path)
        assert diff_snapshots(tree(driver, layer), tree(driver, twin)) == [], f"round {i}"
        assert driver.changes(twin) == driver.changes(layer), f"round {i}"
        parent, twin_parent = layer, twin
    with driver.mounted(parent) as root:
        assert sorted(os.listdir(root)) == ["a", "b"]
        assert os.listdir(root / "a") == ["again"]


def test_list_layers(driver: Any) -> None:
    ids = ["l1", "l2", "l3"]
    parent = None
    for layer_id in ids:
        driver.create(layer_id, parent)
        parent = layer_id
    assert driver.layers() == ids
    assert [driver.parent(i) for i in ids] == [None, "l1", "l2"]


# ---- reference counts, removal, errors ---------------------------------------------------


def test_mount_refcount(driver: Any) -> None:
    driver.create("m")
    p1 = driver.get("m")
    p2 = driver.get("m")
    assert p1 == p2
    assert driver.mount_count("m") == 2
    driver.put("m")
    with pytest.raises(InUse):
        driver.remove("m")
    driver.put("m")
    assert driver.mount_count("m") == 0
    driver.put("m")  # put without get is harmless
    assert driver.mount_count("m") == 0
    driver.remove("m")


def test_mount_in_one_process_unmount_in_another(driver: Any, store_root: Path,
                                                 runroot: Path) -> None:
    driver.create("x")
    cmd = [sys.executable, "-m", "graphdriver", "--root", str(store_root), "--runroot",
           str(runroot), "--driver", driver.name]
    out = subprocess.run([*cmd, "mount", "x"], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == str(driver.get("x"))
    assert driver.mount_count("x") == 2
    driver.put("x")
    subprocess.run([*cmd, "unmount", "x"], check=True)
    assert driver.mount_count("x") == 0
    driver.remove("x")


def test_remove_refused_with_children(driver: Any) -> None:
    driver.create("p")
    driver.create("c", "p")
    with pytest.raises(InUse):
        driver.remove("p")
    driver.remove("c")
    driver.remove("p")


def test_errors(driver: Any, tmp_path: Path) -> None:
    driver.create("one")
    with pytest.raises(AlreadyExists):
        driver.create("one")
    with pytest.raises(NotFound):
        driver.create("two", "missing")
    assert not driver.exists("two")
    for bad in ("", "-x", "a/b", "..", "x" * 97, "l", "y-removing", "a b"):
        with pytest.raises(InvalidArgument):
            driver.create(bad)
    with pytest.raises(NotFound):
        driver.get("missing")
    with pytest.raises(NotFound):
        driver.remove("missing")
    with pytest.raises(NotFound):
        apply(driver, "missing", base_tar(), tmp_path)
    with pytest.raises(InvalidArgument):
        driver.create("ro", None, CreateOpts(storage_opt={"size": "1G"}))
    with pytest.raises(InvalidArgument):
        driver.create_rw("rw", None, CreateOpts(storage_opt={"nonsense": "1"}))
    assert driver.layers() == ["one"]


def test_rejected_apply_leaves_layer_as_it_was(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    driver.create("upper", "base")
    apply(driver, "upper", upper_tar(), tmp_path)
    before = tree(driver, "upper")
    good = layer_format(driver).tar(
        Layer().file("etc/hostname", b"changed").file("zzz", b"z" * 100000))
    truncated = good[: len(good) // 2 + 100]
    with pytest.raises(InvalidArchive):
        apply(driver, "upper", truncated, tmp_path)
    assert driver.exists("upper")
    assert diff_snapshots(before, tree(driver, "upper")) == []


def test_apply_refused_with_children_or_mounted(driver: Any, tmp_path: Path) -> None:
    make_base(driver, tmp_path)
    driver.create("kid", "base")
    with pytest.raises(InUse):
        apply(driver, "base", upper_tar(), tmp_path)
    with driver.mounted("kid"), pytest.raises(InUse):
        apply(driver, "kid", upper_tar(), tmp_path)


def test_quota(driver: Any) -> None:
    if not driver.supports_quota:
        pytest.skip(f"{driver.name} has no size quotas")
    if not real_root():  # rootless: loop devices need root (DESIGN.md rule 7)
        with pytest.raises(NotSupported, match="not available rootless") as refused:
            driver.create_rw("q", None, CreateOpts(storage_opt={"size": "64M"}))
        assert "\n" not in str(refused.value)
        assert not driver.exists("q")
        return
    driver.create_rw("q", None, CreateOpts(storage_opt={"size": "64M"}))
    with driver.mounted("q") as root:
        with open(root / "small", "wb") as f:
            f.write(os.urandom(16 << 20))
        with pytest.raises(OSError) as info, open(root / "big", "wb") as f:
            for _ in range(80):
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
    driver.remove("q")


# ---- repair (DESIGN.md rule 1) -------------------------------------------------------------


def test_repair_on_open(driver: Any, store_root: Path, runroot: Path, tmp_path: Path) -> None:
    driver.create("keep")
    driver.create("norecord")
    driver.create("halfapplied")
    (driver.home / "meta" / "norecord" / "layer.json").unlink()
    driver.meta.mark_incomplete("halfapplied", "apply")
    assert not driver.exists("halfapplied")
    leftovers_before = set(os.listdir(driver.home))
    reopened = open_driver(driver.name, store_root, runroot=runroot)
    if driver.apply_journal:
        # an interrupted apply is rolled back (here: nothing had been applied), never deleted
        assert reopened.layers() == ["halfapplied", "keep"]
        with reopened.mounted("halfapplied") as root:
            assert os.listdir(root) == []
        reopened.remove("halfapplied")
    assert reopened.layers() == ["keep"]
    for layer_id in ("norecord", "halfapplied"):
        assert not reopened.exists(layer_id)
        for path in reopened._layer_paths(layer_id):
            assert not os.path.lexists(path), path
        assert not (reopened.home / "meta" / layer_id).exists()
    assert not any(n.endswith("-removing") for n in os.listdir(reopened.home))
    assert leftovers_before  # the home was populated before repair ran
    reopened.create("norecord")  # the id is usable again
