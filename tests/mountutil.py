"""What tests ask about mounts, on top of graphdriver.mount (the one mountinfo parser)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from graphdriver.mount import is_mounted as is_mountpoint
from graphdriver.mount import mount_points
from graphdriver.mount import unmount as umount

__all__ = ["detach_mounts_under", "is_mountpoint", "mount_points_under", "umount"]


def mount_points_under(path: Path | str) -> set[str]:
    """The mount points at *path* or beneath it."""
    p = os.fspath(path).rstrip("/")
    return {mp for mp in mount_points() if mp == p or mp.startswith(p + "/")}


def detach_mounts_under(path: Path | str) -> None:
    """Detach whatever is still mounted at *path* or beneath it, deepest first (what a failed
    test left), so its directory can be removed."""
    for mp in sorted(mount_points_under(path), key=len, reverse=True):
        with contextlib.suppress(OSError):
            umount(Path(mp), detach=True)
