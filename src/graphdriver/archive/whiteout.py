"""Whiteout names in layer tars, and their overlayfs form on disk.

In a tar (moby's pkg/archive, AUFS heritage):
- ``dir/.wh.NAME`` deletes ``dir/NAME`` of the layers below;
- ``dir/.wh..wh..opq`` makes ``dir`` opaque: what lower layers had there is hidden;
- other ``.wh..wh.*`` names are AUFS metadata (``.wh..wh.plnk``, ``.wh..wh.aufs``) and are not
  part of the tree.
On an overlay upper directory the same facts are a character device 0/0 named ``NAME`` and the
directory xattr ``trusted.overlay.opaque=y``.
"""

from __future__ import annotations

import os
import stat

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
WHITEOUT_LINK_DIR = ".wh..wh.plnk"

OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."

WHITEOUT_PREFIX_B = WHITEOUT_PREFIX.encode()
WHITEOUT_META_PREFIX_B = WHITEOUT_META_PREFIX.encode()
WHITEOUT_OPAQUE_B = WHITEOUT_OPAQUE.encode()


def is_whiteout_name(base: str) -> bool:
    """``.wh.NAME`` (not the opaque marker, not AUFS metadata)."""
    return base.startswith(WHITEOUT_PREFIX) and not base.startswith(WHITEOUT_META_PREFIX)


def whiteout_target(base: str) -> str:
    """``.wh.NAME`` -> ``NAME``."""
    return base[len(WHITEOUT_PREFIX):]


def whiteout_name(base: str) -> str:
    """``NAME`` -> ``.wh.NAME``."""
    return WHITEOUT_PREFIX + base


def is_overlay_whiteout(st: os.stat_result) -> bool:
    """An overlayfs whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
