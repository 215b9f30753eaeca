"""Mount reference counts, kept in the run root so every process of a store shares them.

One small file per layer (``<runroot>/<store key>/counts/<id>``) holds the count.  Callers change
a count only while holding that layer's lock, so a read-modify-write needs no lock of its own;
the file is replaced atomically, so a reader never sees half a number.  The run root is a tmpfs
cleared at boot; a store reconciles the counts with the mount table when it opens.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import TYPE_CHECKING
from .fsutil import atomic_write
from .logs import get_logger

log = get_logger("graphdriver")

if TYPE_CHECKING:
    import hashlib
else:
    try:  # the same sha256 without loading OpenSSL, which hashlib does (start-up time)
        import _sha256 as hashlib
    except ImportError:  # Python 3.12 renamed it
        import hashlib


_warned: list[bool] = []  # the fallback run root is named once a process


def default_runroot() -> Path:
    """``/run/graphdriver`` for the real root; rootless ``$XDG_RUNTIME_DIR/graphdriver``, else
    a private directory in /tmp (with a warning: it does not go away at logout)."""
    from .idmap import host_uid, real_root

    if real_root():
        return Path("/run/graphdriver")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "graphdriver"
    private = Path(f"/tmp/graphdriver-run-{host_uid()}")
    try:
        os.mkdir(private, 0o700)
    except FileExistsError as exc:
        st = os.lstat(private)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            from .errors import PermissionDenied

            raise PermissionDenied(f"{private} is not a private directory of yours; set "
                                   "XDG_RUNTIME_DIR or --runroot") from exc
    if not _warned:
        _warned.append(True)
        log.warning("XDG_RUNTIME_DIR is not set: the run root is %s", private)
    return private


class RefCounts:
    """Per-layer mount counts of one store (one driver home)."""

    def __init__(self, runroot: Path, home: Path) -> None:
        key = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
        self.dir = runroot / key / "counts"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Leave a note of whose counts these are, for a human looking at the run root.
        note = self.dir.parent / "home"
        if not note.exists():
            atomic_write(note, str(home.resolve()).encode() + b"\n", fsync=False)

    def _path(self, layer_id: str) -> Path:
        return self.dir / layer_id

    def get(self, layer_id: str) -> int:
        """The count; a count file that is not a regular file (a FIFO, a directory, a link) is
        replaced by nothing (0) rather than followed, blocked on or failed over."""
        path = self._path(layer_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError:  # a symlink (ELOOP), something unreadable
            self._replace(path)
            return 0
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                text = b""
                bad = True
            else:
                text = os.read(fd, 64)
                bad = False
        finally:
            os.close(fd)
        if bad:
            self._replace(path)
            return 0
        try:
            return max(0, int(text))
        except ValueError:
            return 0

    def _replace(self, path: Path) -> None:
        from .fsutil import remove_tree

        log.warning("mount count %s was not a regular file: replaced", path)
        remove_tree(path)

    def set(self, layer_id: str, count: int) -> None:
        path = self._path(layer_id)
        if os.path.lexists(path) and not path.is_symlink() and not path.is_file():
            self._replace(path)
        if count <= 0:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, b"%d\n" % count, fsync=False)

    def increment(self, layer_id: str) -> int:
        count = self.get(layer_id) + 1
        self.set(layer_id, count)
        return count

    def decrement(self, layer_id: str) -> int:
        """Lower the count; a put without a get leaves it at zero (harmless)."""
        count = max(0, self.get(layer_id) - 1)
        self.set(layer_id, count)
        return count

    def all(self) -> dict[str, int]:
        counts = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return {}
        for name in names:
            if name.startswith("."):
                continue
            count = self.get(name)
            if count > 0:
                counts[name] = count
        return counts
