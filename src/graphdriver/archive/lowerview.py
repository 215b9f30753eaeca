"""What the merged lower layers of an overlay layer show at a path, read through directory fds.

An overlay apply writes only its layer's own directory (the upper); the OCI rules still depend on
the layers below: a whiteout with nothing below to hide leaves no trace, a directory the layer
does not list keeps the lower directory's metadata when the layer has to create it, and an opaque
marker at a layer's root must white out each lower entry (overlayfs ignores the opaque xattr on a
layer's root).  :class:`LowerView` answers those questions with overlayfs' own merge rules
(nearest layer first; a whiteout or a non-directory ends the merge below it; an opaque directory
ends it after itself) from read-only directory fds of the parent chain, as the confined apply
child gets them.  It never follows a symlink: each path component is checked to be a directory
of the layer before a name beneath it is looked up there.

Owns the lower view.  Imports :mod:`.whiteout` only (a leaf otherwise).
"""

from __future__ import annotations

import os
import stat

from .whiteout import WhiteoutFormat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Sequence

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE_LIMIT = 4096


def _lstat(dir_fd: int, path: str) -> os.stat_result | None:
    try:
        return os.lstat(path, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None


class LowerView:
    """The merged view of read-only layer roots *fds* (nearest first) in *whiteouts*' format."""

    def __init__(self, fds: Sequence[int], whiteouts: WhiteoutFormat) -> None:
        self.fds = list(fds)
        self.whiteouts = whiteouts
        # directory path -> indices of the layers merged there (empty: not a directory)
        self.stacks: dict[str, list[int]] = {"": list(range(len(self.fds)))}

    def _opaque(self, i: int, path: str) -> bool:
        fd = os.open(path, _DIR_FLAGS, dir_fd=self.fds[i])
        try:
            return self.whiteouts.is_opaque(fd)
        finally:
            os.close(fd)

    def _stack(self, path: str) -> list[int]:
        """The layers merged at directory *path* (none when the view has no directory there)."""
        hit = self.stacks.get(path)
        if hit is not None:
            return hit
        if len(self.stacks) > _CACHE_LIMIT:
            self.stacks = {"": self.stacks[""]}
        parts = path.split("/")
        i = len(parts) - 1
        while i > 0 and "/".join(parts[:i]) not in self.stacks:
            i -= 1
        stack = self.stacks["/".join(parts[:i])]
        for j in range(i, len(parts)):
            sub = "/".join(parts[: j + 1])
            merged: list[int] = []
            for layer in stack:
                st = _lstat(self.fds[layer], sub)
                if st is None:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    break  # a whiteout or a non-directory hides everything below it
                merged.append(layer)
                if self._opaque(layer, sub):
                    break
            self.stacks[sub] = stack = merged
        return stack

    def exists(self, path: str) -> bool:
        """Whether the merged view shows anything at *path*."""
        return self.find(path) is not None

    def find(self, path: str) -> tuple[os.stat_result, int] | None:
        """What the merged view shows at *path*: its lstat and the root fd of the layer that
        holds it (the path opens beneath that fd); None when it shows nothing there."""
        parent = path.rpartition("/")[0]
        for layer in self._stack(parent):
            st = _lstat(self.fds[layer], path)
            if st is not None:
                return None if self.whiteouts.is_whiteout(st) else (st, self.fds[layer])
        return None

    def names(self, path: str) -> list[str]:
        """The names the merged view lists in directory *path*."""
        shown: dict[str, bool] = {}
        for layer in self._stack(path):
            fd = os.open(path or ".", _DIR_FLAGS, dir_fd=self.fds[layer])
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        if e.name not in shown:
                            shown[e.name] = not self.whiteouts.is_whiteout(
                                e.stat(follow_symlinks=False))
            finally:
                os.close(fd)
        return [n for n, present in shown.items() if present]

    def open_dir(self, path: str) -> int | None:
        """An fd of the directory the merged view shows at *path* (its top layer's), or None."""
        stack = self._stack(path)
        if not stack:
            return None
        return os.open(path or ".", _DIR_FLAGS, dir_fd=self.fds[stack[0]])
