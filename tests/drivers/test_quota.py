"""Size quotas of the overlay driver: loop-mounted ext4 images, and btrfs qgroups.

Both mechanisms are proven on real filesystems: the image one on this machine's own filesystem
(tmp_path), the btrfs one on a freshly made 1 GiB btrfs image mounted in tmp_path.  Writing below
the limit succeeds, past it fails with ENOSPC/EDQUOT, and removing the layer releases what it
held (the loop device and the image; the subvolume).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IS_ROOT
from tests.mountutil import mount_points_under

from graphdriver import CreateOpts, InvalidArgument, NotSupported, open_driver
from graphdriver.fsutil import fs_name
from graphdriver.mount import unmount_all_under
from graphdriver.quota import loop_attach, loop_detach, loop_devices_of

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="loop devices and mounts need root")

MiB = 1 << 20


def _open(root: Path, runroot: Path, **kw: Any) -> Any:
    try:
        return open_driver("overlay", root, runroot=runroot, **kw)
    except NotSupported as exc:
        pytest.skip(f"overlay is not supported here: {exc}")


def _teardown(d: Any, root: Path) -> None:
    with contextlib.suppress(Exception):
        d.cleanup()
    with contextlib.suppress(OSError):
        unmount_all_under(root)


@pytest.fixture
def ext_store(tmp_path: Path, runroot: Path) -> Iterator[Any]:
    if not os.path.exists("/dev/loop-control") or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs loop devices and mkfs.ext4")
    root = tmp_path / "store"
    d = _open(root, runroot)
    if fs_name(d.home) == "btrfs":
        pytest.skip("tmp is on btrfs: the image mechanism is not used there")
    try:
        yield d
    finally:
        _teardown(d, root)


@pytest.fixture
def btrfs_store(tmp_path: Path, runroot: Path) -> Iterator[Any]:
    if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
        pytest.skip("needs btrfs-progs (mkfs.btrfs, btrfs)")
    image = tmp_path / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt = tmp_path / "btrfs"
    mnt.mkdir()
    dev, fd = loop_attach(image)
    try:
        subprocess.run(["mount", "-t", "btrfs", dev, str(mnt)], check=True, capture_output=True)
    finally:
        os.close(fd)  # autoclear: the device goes with the unmount
    d = None
    try:
        d = _open(mnt / "store", runroot)
        yield d
    finally:
        if d is not None:
            _teardown(d, mnt)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        for loop in loop_devices_of(image):
            with contextlib.suppress(OSError):
                loop_detach(loop)


def fill(root: Path, name: str, limit_mib: int) -> int:
    """Write up to *limit_mib* MiB, fsync each MiB; return how many MiB went in before ENOSPC."""
    written = 0
    chunk = os.urandom(MiB)
    with open(root / name, "wb") as f:
        for _ in range(limit_mib):
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            written += 1
    return written


def assert_full(root: Path, name: str, limit_mib: int) -> None:
    with pytest.raises(OSError) as info:
        fill(root, name, limit_mib)
    assert info.value.errno in (errno.ENOSPC, errno.EDQUOT), info.value


# ---- image mechanism ---------------------------------------------------------------------


def test_image_quota_limits_writes_and_rm_releases(ext_store: Any) -> None:
    d = ext_store
    d.create("base")
    (d.home / "base" / "diff" / "f").write_bytes(b"base")
    d.create_rw("c", "base", CreateOpts(storage_opt={"size": "48M"}))
    layer = d.home / "c"
    image = layer / "quota.img"
    assert image.is_file() and os.stat(image).st_size > 48 * MiB  # the limit + ext4's own
    assert os.stat(image).st_blocks * 512 < 48 * MiB  # sparse
    assert os.readlink(layer / "diff") == "quota/diff"
    assert loop_devices_of(image), "the image is attached to a loop device"
    with d.mounted("c") as root:
        assert (root / "f").read_bytes() == b"base"
        assert fill(root, "small", 24) == 24
        assert_full(root, "big", 60)
        (root / "big").unlink()
        assert (d.home / "c" / "diff" / "small").stat().st_size == 24 * MiB
    d.remove("c")
    assert not loop_devices_of(image)
    assert not image.exists() and not layer.exists()
    assert not mount_points_under(d.home)


def test_image_quota_on_base_layer_and_default_size(tmp_path: Path, runroot: Path) -> None:
    if not os.path.exists("/dev/loop-control") or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs loop devices and mkfs.ext4")
    root = tmp_path / "store"
    d = _open(root, runroot, options={"size": "24M"})
    try:
        if fs_name(d.home) == "btrfs":
            pytest.skip("tmp is on btrfs")
        d.create_rw("rw")  # the store's default size applies
        with d.mounted("rw") as r:
            assert r == d.home / "rw" / "quota" / "diff"
            assert_full(r, "big", 40)
        d.create("ro")  # read-only layers never get a quota
        assert not (d.home / "ro" / "quota.img").exists()
    finally:
        _teardown(d, root)


def test_image_remounted_lazily_after_cleanup(ext_store: Any, tmp_path: Path,
                                              runroot: Path) -> None:
    d = ext_store
    d.create_rw("q", None, CreateOpts(storage_opt={"size": "16M"}))
    with d.mounted("q") as root:
        (root / "kept").write_bytes(b"survives")
    d.create_rw("kid", "q")  # like Docker's <id>-init: a quota layer with a child
    d.cleanup()
    image = d.home / "q" / "quota.img"
    assert not loop_devices_of(image) and not mount_points_under(d.home)
    reopened = _open(tmp_path / "store", runroot)
    with reopened.mounted("kid") as root:  # the parent's image comes back as a lower
        assert (root / "kept").read_bytes() == b"survives"
    assert [str(c) for c in reopened.changes("q")] == ["A /kept"]
    assert reopened.diff_size("q") == len(b"survives")
    reopened.cleanup()
    reopened.remove("kid")
    reopened.remove("q")
    assert not loop_devices_of(image)


@pytest.mark.parametrize("limit_mib", [8, 100])
def test_image_quota_holds_exactly_the_limit_of_file_data(ext_store: Any, limit_mib: int) -> None:
    """``--size 8M`` holds 8 MiB of file data (ext4's journal and inode tables come on top), and
    not a MiB more."""
    d = ext_store
    d.create_rw("q", None, CreateOpts(storage_opt={"size": f"{limit_mib}M"}))
    with d.mounted("q") as root:
        assert fill(root, "exact", limit_mib) == limit_mib
        (root / "exact").unlink()
        os.sync()
        assert_full(root, "over", limit_mib + 1)


def test_image_quota_refuses_tiny_size(ext_store: Any) -> None:
    with pytest.raises(InvalidArgument, match="size limit of 1 MiB is below the minimum of 8 MiB"):
        ext_store.create_rw("t", None, CreateOpts(storage_opt={"size": "1M"}))
    assert not ext_store.exists("t") and not (ext_store.home / "t").exists()


def test_size_on_create_is_refused(ext_store: Any) -> None:
    with pytest.raises(InvalidArgument):
        ext_store.create("t", None, CreateOpts(storage_opt={"size": "32M"}))


def test_repair_releases_image_of_half_created_layer(ext_store: Any, tmp_path: Path,
                                                     runroot: Path) -> None:
    d = ext_store
    d.create_rw("q", None, CreateOpts(storage_opt={"size": "16M"}))
    image = d.home / "q" / "quota.img"
    assert loop_devices_of(image)
    shutil.rmtree(d.home / "meta" / "q")  # a crash before the commit point
    _open(tmp_path / "store", runroot)
    assert not loop_devices_of(image) and not (d.home / "q").exists()


# ---- btrfs mechanism ---------------------------------------------------------------------


def test_btrfs_qgroup_limits_writes_and_rm_deletes_subvolume(btrfs_store: Any) -> None:
    d = btrfs_store
    assert fs_name(d.home) == "btrfs"
    assert dict(d.status())["Backing Filesystem"] == "btrfs"
    d.create("base")
    (d.home / "base" / "diff" / "f").write_bytes(b"base")
    d.create_rw("c", "base", CreateOpts(storage_opt={"size": "64M"}))
    layer = d.home / "c"
    assert os.stat(layer).st_ino == 256, "the layer directory is a subvolume"
    assert not (layer / "quota.img").exists()
    show = subprocess.run(["btrfs", "qgroup", "show", "-r", "--raw", str(layer)],
                          capture_output=True, text=True, check=True).stdout
    assert str(64 * MiB) in show
    with d.mounted("c") as root:
        assert (root / "f").read_bytes() == b"base"
        assert fill(root, "small", 32) == 32
        assert_full(root, "big", 100)
    d.remove("c")
    assert not layer.exists()
    subvols = subprocess.run(["btrfs", "subvolume", "list", str(d.home)], capture_output=True,
                             text=True, check=True).stdout
    assert " c\n" not in subvols and "/c\n" not in subvols


def test_btrfs_plain_layers_are_not_subvolumes(btrfs_store: Any) -> None:
    d = btrfs_store
    d.create("base")
    d.create_rw("rw", "base")
    assert os.stat(d.home / "rw").st_ino != 256
    with d.mounted("rw") as root:
        (root / "x").write_bytes(b"x")
    assert [str(c) for c in d.changes("rw")] == ["A /x"]
