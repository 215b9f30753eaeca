"""Whiteouts: how a layer says "deleted" and "opaque", in a tar and on a store's disk.

Owns the whiteout names of layer tars and the :class:`WhiteoutFormat` objects that say how a
store keeps the same facts on disk; every other module asks these instead of testing format
names.  A leaf: imports only the standard library (the store's class attribute holds a format,
so light commands load this module).

In a tar (moby's pkg/archive, AUFS heritage), whatever the store:
- ``dir/.wh.NAME`` deletes ``dir/NAME`` of the layers below;
- ``dir/.wh..wh..opq`` makes ``dir`` opaque: what lower layers had there is hidden;
- other ``.wh..wh.*`` names are AUFS metadata (``.wh..wh.plnk``, ``.wh..wh.aufs``) and are not
  part of the tree.
On disk, per format:
- :data:`NAIVE` (vfs, windowsfilter): a whiteout deletes, an opaque marker empties; nothing is
  kept, and a diff is computed by comparing trees;
- :data:`OVERLAY`: overlayfs's form, a character device 0/0 named ``NAME`` and the directory
  xattr ``trusted.overlay.opaque=y``;
- :data:`OVERLAY_USERXATTR`: the same with ``user.overlay.opaque=y`` (rootless overlayfs
  mounted with ``userxattr``).
"""

from __future__ import annotations

import os
import stat

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
WHITEOUT_LINK_DIR = ".wh..wh.plnk"

WHITEOUT_PREFIX_B = WHITEOUT_PREFIX.encode()
WHITEOUT_META_PREFIX_B = WHITEOUT_META_PREFIX.encode()
WHITEOUT_OPAQUE_B = WHITEOUT_OPAQUE.encode()

_OPAQUE_VALUE = b"y"


class WhiteoutFormat:
    """How a store keeps whiteouts and opaque markers on disk (see the module docstring).

    ``kept``: whiteouts stay on disk as overlayfs reads them (else an apply deletes);
    ``xattr_prefix``: overlayfs's own xattrs in this format's namespace (``trusted.overlay.`` or
    ``user.overlay.``), never exported, and refused from a tar where ``kept``;
    ``opaque_xattr``: the opaque marker's xattr name, or None where nothing is kept.
    """

    __slots__ = ("kept", "name", "opaque_xattr", "xattr_prefix")

    def __init__(self, name: str, xattr_namespace: str | None) -> None:
        self.name = name
        self.kept = xattr_namespace is not None
        self.xattr_prefix = f"{xattr_namespace or 'trusted.'}overlay."
        self.opaque_xattr = f"{self.xattr_prefix}opaque" if self.kept else None

    def __repr__(self) -> str:
        return f"<WhiteoutFormat {self.name}>"

    # ---- on disk -------------------------------------------------------------------------------
    def is_whiteout(self, st: os.stat_result) -> bool:
        """Whether a stat result is a kept whiteout (a character device 0/0)."""
        return self.kept and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    def write_whiteout(self, dir_fd: int, name: str) -> None:
        """Create the whiteout for ``name`` in the directory ``dir_fd`` (nothing is there)."""
        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)

    def is_opaque(self, path: str | int) -> bool:
        """Whether the directory (a path, not followed, or an fd) carries the opaque marker."""
        if self.opaque_xattr is None:
            return False
        try:
            if isinstance(path, int):
                return os.getxattr(path, self.opaque_xattr) == _OPAQUE_VALUE
            return os.getxattr(path, self.opaque_xattr, follow_symlinks=False) == _OPAQUE_VALUE
        except OSError:
            return False

    def is_opaque_value(self, xattrs: dict[str, bytes]) -> bool:
        """Whether a directory's xattrs (as read) hold the opaque marker."""
        return self.opaque_xattr is not None and xattrs.get(self.opaque_xattr) == _OPAQUE_VALUE

    def mark_opaque(self, dir_fd: int) -> None:
        """Set the opaque marker on the directory ``dir_fd``."""
        assert self.opaque_xattr is not None, "nothing opaque is kept in the naive format"
        os.setxattr(dir_fd, self.opaque_xattr, _OPAQUE_VALUE)

    def is_private_xattr(self, name: str) -> bool:
        """An xattr of overlayfs's own in this format's namespace (``trusted.overlay.*`` or
        ``user.overlay.*``): not part of a layer's content."""
        return name.startswith(self.xattr_prefix)


NAIVE = WhiteoutFormat("naive", None)
OVERLAY = WhiteoutFormat("overlay", "trusted.")
OVERLAY_USERXATTR = WhiteoutFormat("overlay-userxattr", "user.")

#: the formats by name: how the confined child is told which one to use
FORMATS = {f.name: f for f in (NAIVE, OVERLAY, OVERLAY_USERXATTR)}
