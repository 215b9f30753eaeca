"""What tests ask about mounts, on top of graphdriver.mount's one mountinfo parser."""

from __future__ import annotations

import os
from pathlib import Path

from graphdriver.mount import mount_points


def mount_points_under(path: Path | str) -> set[str]:
    """The mount points at *path* or beneath it."""
    p = os.fspath(path).rstrip("/")
    return {mp for mp in mount_points() if mp == p or mp.startswith(p + "/")}
