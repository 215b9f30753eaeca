"""Size limits for writable layers: a filesystem that cannot grow past the limit.

Two mechanisms (DESIGN.md "Size quotas"):

- **btrfs** (the store is on btrfs): the layer directory ``<id>`` is a subvolume and its qgroup
  gets the limit (``btrfs quota enable`` once, ``btrfs qgroup limit SIZE <id>``).  Writing past
  it fails with EDQUOT.  The subvolume is deleted with the layer.
- **image** (anywhere else): a sparse file ``<id>/quota.img``, formatted ext4 (``mkfs.ext4 -m 0``,
  4 KiB blocks, no resize reserve), sized so that its free space is the limit: ext4 keeps a
  journal, inode tables and a reserve of its own (an 8 MiB image holds under 4 MiB), so the image
  is the limit plus that overhead, checked with ``statvfs`` after formatting and corrected (one
  more format) when the estimate was off. It is attached to a free loop device
  (``LOOP_CTL_GET_FREE`` + ``LOOP_CONFIGURE`` ioctls, with autoclear so the device is released by
  the last unmount) and mounted at ``<id>/quota``. It holds the layer's upper directory
  ``quota/diff`` and overlay's ``quota/work`` (overlay wants both on one filesystem);
  ``<id>/diff`` and ``<id>/work`` are relative symlinks to them, so ``l/<short> -> ../<id>/diff``
  and every path the rest of the store uses keep working. The image is mounted lazily — whenever
  the layer is used (mounted, applied to, diffed, or mounted as a lower of a child) — so a reboot
  or a ``cleanup`` that unmounted it costs nothing. Writing past the limit fails with ENOSPC.

A limit below ``MIN_LIMIT`` (8 MiB) is refused with InvalidArgument: a quota smaller than that
would cost more in ext4 metadata than it holds.

No subprocess runs for a loop device or a mount; ``mkfs.ext4`` and ``btrfs`` are run as commands
(formatting and qgroup administration have no syscall interface).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import GraphDriverError, InvalidArgument, NotSupported
from .fsutil import fs_name
from .idmap import real_root
from .mount import is_mounted, mount, unmount

# ----- loop devices -------------------------------------------------------------------------

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_AUTOCLEAR = 4
_LO_NAME_SIZE = 64

IMAGE_NAME = "quota.img"
MOUNT_NAME = "quota"
#: the smallest size limit a writable layer may have
MIN_LIMIT = 8 << 20


def _loop_config(backing_fd: int, name: bytes, flags: int) -> bytes:
    """struct loop_config {u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]}."""
    import struct

    info = struct.pack(
        "=QQQQQIIII64s64s32s2Q",
        0, 0, 0, 0, 0,  # device, inode, rdevice, offset, sizelimit
        0, 0, 0, flags,  # number, encrypt_type, encrypt_key_size, flags
        name[:_LO_NAME_SIZE - 1], b"", b"", 0, 0,
    )
    return struct.pack("=II", backing_fd, 0) + info + bytes(64)


def loop_attach(image: Path, *, autoclear: bool = True) -> tuple[str, int]:
    """Attach *image* to a free loop device; returns (device path, open device fd).

    The caller keeps the fd open until the device is mounted (autoclear releases the device
    when the last user — the fd or the mount — goes away).
    """
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(64):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                try:
                    dev_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    time.sleep(0.01)  # udev has not made the node yet
                    continue
                config = _loop_config(backing, os.fsencode(image),
                                      LO_FLAGS_AUTOCLEAR if autoclear else 0)
                try:
                    fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)
                except OSError as exc:
                    os.close(dev_fd)
                    if exc.errno == errno.EBUSY:
                        continue  # another process took it between GET_FREE and CONFIGURE
                    raise
                return dev, dev_fd
        finally:
            os.close(ctl)
    finally:
        os.close(backing)
    raise OSError(errno.EBUSY, "no free loop device", str(image))


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices whose backing file is *image* (from /sys/block/loop*/loop/backing_file)."""
    target = os.path.realpath(image)
    out = []
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue
        if backing.removesuffix(" (deleted)") == target:
            out.append(f"/dev/{name}")
    return out


def loop_detach(dev: str) -> None:
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # not attached
            raise
    finally:
        os.close(fd)


# ----- image mechanism ----------------------------------------------------------------------


def _run(cmd: list[str], what: str) -> None:
    import subprocess

    try:
        proc = subprocess.run(cmd, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise NotSupported(f"{what}: {cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise GraphDriverError(f"{what}: {cmd[0]} failed: {msg[-1] if msg else proc.returncode}")


def image_supported() -> str | None:
    """None when the image mechanism works here, else the reason it does not."""
    if not real_root():
        return "size limits need root (loop devices): not available rootless"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop module missing)"
    import shutil  # here: with bz2 and lzma, ~2 ms of every command that opens a store

    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is not installed (e2fsprogs)"
    return None


def image_path(layer_dir: Path) -> Path:
    return layer_dir / IMAGE_NAME


def image_mount_point(layer_dir: Path) -> Path:
    return layer_dir / MOUNT_NAME


def has_image(layer_dir: Path) -> bool:
    return os.path.lexists(image_path(layer_dir))


def check_size(size: int, what: str) -> None:
    if size < MIN_LIMIT:
        from .units import human_bytes

        raise InvalidArgument(f"{what}: a size limit of {human_bytes(size)} is below the minimum "
                              f"of {human_bytes(MIN_LIMIT)} for a layer quota")


# ----- sizing the image ------------------------------------------------------------------------

_BLOCK = 4096
_INODE_SIZE = 256
_BYTES_PER_INODE = 16384
#: free space beyond the limit, for the layer's own directories (diff/, work/) and extent blocks
_SLACK = 64 << 10
#: ext4's own reserve: 2% of the blocks, at most 4096 of them
_RESERVE_CAP = 4096 * _BLOCK
#: the share of an image's bytes left free after inode tables and ext4's 2% reserve
_USABLE_SHARE = 1 - _INODE_SIZE / _BYTES_PER_INODE - 0.02
#: how far above limit + slack the free space may end up before the image is made again
_TOLERANCE = 256 << 10


def _journal_mib(limit: int) -> int:
    """The journal mkfs.ext4 would pick for a filesystem of about *limit* bytes (4 KiB blocks).

    Given explicitly (``-J size=``), so that the overhead grows smoothly with the image size.
    """
    blocks = limit // _BLOCK
    for below, mib in ((32768, 4), (262144, 16), (524288, 32), (4 << 20, 64)):
        if blocks < below:
            return mib
    return 128


def _image_estimate(limit: int, journal: int) -> int:
    """An image size whose ext4 leaves about ``limit + _SLACK`` bytes free: the journal, one
    inode per 16 KiB, ext4's reserve (2% of the blocks, at most 16 MiB), bitmaps and group
    descriptors come on top (aiming at the middle of the tolerance)."""
    want = limit + _SLACK + _TOLERANCE // 2 + (journal << 20)
    size = int(want / (1 - _INODE_SIZE / _BYTES_PER_INODE))
    size += min(size // 50, _RESERVE_CAP) + size // 4096  # the last: bitmaps, descriptors
    return -(-size // _BLOCK) * _BLOCK


def _format(image: Path, size: int, journal_mib: int, uid: int, gid: int) -> None:
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", str(_BLOCK), "-I", str(_INODE_SIZE),
          "-i", str(_BYTES_PER_INODE), "-J", f"size={journal_mib}", "-O", "^resize_inode",
          "-E", f"root_owner={uid}:{gid}", "-L", "graphdriver", os.fspath(image)], "quota image")


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def create_image(layer_dir: Path, limit: int, uid: int = 0, gid: int = 0) -> Path:
    """Make ``<layer_dir>/quota.img`` (sparse, ext4, *limit* bytes free), mount it, make diff/ and
    work/.  Returns the mount point.  ``<layer_dir>/diff`` and ``work`` are left to the caller
    (symlinks).
    """
    image = image_path(layer_dir)
    if os.path.lexists(image):
        raise GraphDriverError(f"quota image {image} exists already")
    target = image_mount_point(layer_dir)
    target.mkdir(mode=0o700, exist_ok=True)
    journal = _journal_mib(limit)
    size = _image_estimate(limit, journal)
    for _attempt in range(4):
        _format(image, size, journal, uid, gid)
        mount_image(layer_dir)
        # The directories made below and the file data itself come out of the slack.
        excess = _free_bytes(target) - (limit + _SLACK)
        if 0 <= excess <= _TOLERANCE:
            break
        unmount_image(layer_dir)
        # Each byte added to the image brings its share of inode table and reserve with it.
        share = _USABLE_SHARE if size // 50 < _RESERVE_CAP else _USABLE_SHARE + 0.02
        size = -(-int(size - excess / share) // _BLOCK) * _BLOCK
    else:
        raise GraphDriverError(f"quota image: cannot size an ext4 image for {limit} bytes")
    for sub in ("diff", "work"):
        os.mkdir(target / sub, 0o755 if sub == "diff" else 0o700)
        if (uid, gid) != (0, 0):
            os.chown(target / sub, uid, gid)
    lost = target / "lost+found"
    with contextlib.suppress(OSError):
        os.rmdir(lost)
    return target


def mount_image(layer_dir: Path) -> bool:
    """Mount the layer's image at ``<layer_dir>/quota`` unless it is; True when it mounted."""
    target = image_mount_point(layer_dir)
    if is_mounted(target):
        return False
    dev, dev_fd = loop_attach(image_path(layer_dir))
    try:
        mount(dev, target, "ext4", 0, "")
    finally:
        os.close(dev_fd)  # autoclear: the mount now holds the device; unmounting releases it
    return True


def unmount_image(layer_dir: Path) -> None:
    """Unmount the image (the loop device goes with the last unmount: autoclear)."""
    target = image_mount_point(layer_dir)
    while is_mounted(target):
        unmount(target, detach=True)
    # A device left attached without a mount (a crash between attach and mount) is released.
    image = image_path(layer_dir)
    if os.path.lexists(image):
        for dev in loop_devices_of(image):
            with contextlib.suppress(OSError):
                loop_detach(dev)


# ----- btrfs mechanism ----------------------------------------------------------------------

BTRFS_FIRST_FREE_OBJECTID = 256


def is_btrfs(path: Path) -> bool:
    try:
        return fs_name(path) == "btrfs"
    except OSError:
        return False


def btrfs_supported() -> str | None:
    if not real_root():
        return "size limits need root (btrfs qgroups): not available rootless"
    import shutil

    if shutil.which("btrfs") is None:
        return "the btrfs command is not installed (btrfs-progs)"
    return None


def btrfs_enable_quota(home: Path) -> None:
    """``btrfs quota enable`` on the filesystem of *home* (idempotent; a marker avoids repeats)."""
    marker = home / ".btrfs-quota-enabled"
    if marker.exists():
        return
    _run(["btrfs", "quota", "enable", os.fspath(home)], "btrfs quota")
    marker.touch()


def btrfs_create_subvolume(path: Path) -> None:
    _run(["btrfs", "subvolume", "create", os.fspath(path)], "btrfs subvolume")


def btrfs_limit(path: Path, size: int) -> None:
    _run(["btrfs", "qgroup", "limit", str(size), os.fspath(path)], "btrfs qgroup limit")


def is_subvolume(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_ino == BTRFS_FIRST_FREE_OBJECTID and is_btrfs(path)


def btrfs_delete_subvolume(path: Path) -> None:
    _run(["btrfs", "subvolume", "delete", os.fspath(path)], "btrfs subvolume delete")
