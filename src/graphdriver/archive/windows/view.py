"""Windows layer tars: a stored layer as overlayfs lower layers, and looking paths up through a
stack of them (a sandbox's copy-on-write view of its image).  Never imports the importer, the
exporter or a driver.

A stored layer's ``Files`` is almost an overlayfs lower layer as it is; what it lacks is said by
its *view*, ``<layer>/view-<inode of Files>``: a directory of whiteouts (0/0 character devices,
in directories spelled as below) stacked right above ``Files``:

- every alternate data stream ``name:stream`` of ``Files`` (streams are not part of the view;
  a sandbox's diff takes a modified file's streams from the layer it came from);
- every tombstone, in the spelling each lower layer gives the deleted path (Windows names match
  regardless of case, overlayfs names do not);
- every lower name that this layer spells differently (``Foo.txt`` here over ``foo.txt`` below).

A directory spelled differently here and below cannot be merged by overlayfs (nor a tombstone
of a directory this layer adds back): :class:`ViewConflict`, and the caller copies instead.
The view is built once per layer (its chain below never changes) and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from ...errors import NotSupported
from ...fsutil import remove_tree
from .metadata import read_tombstones
from .names import DIR_FLAGS, fold

VIEW = "view"
OPAQUE_XATTR = "trusted.overlay.opaque"


class ViewConflict(NotSupported):
    """The layer cannot be an overlayfs lower layer of its chain (names spelled differently)."""


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _whiteout(root: Path, rel: str) -> None:
    parent, _, name = rel.rpartition("/")
    d = root / parent if parent else root
    d.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mknod(d / name, stat.S_IFCHR | 0o600, 0)


def _spell(files: Path, parts: list[str]) -> str | None:
    """``parts`` as spelled beneath ``files`` (matched regardless of case), or None."""
    cur = files
    out: list[str] = []
    for part in parts:
        try:
            names = os.listdir(cur)
        except (FileNotFoundError, NotADirectoryError):
            return None
        key = fold(part)
        match = next((n for n in sorted(names) if fold(n) == key and ":" not in n), None)
        if match is None:
            return None
        out.append(match)
        cur = cur / match
    return "/".join(out)


def build_view(layer: Path, lowers: list[Path]) -> Path:
    """``<layer>/view-<inode of Files>`` for the layer over ``lowers`` (layer directories,
    nearest first): an import that replaces ``Files`` makes the old view stale, and it goes."""
    files = layer / "Files"
    view = layer / f"{VIEW}-{os.stat(files).st_ino}"
    if view.is_dir():
        return view
    for old in os.listdir(layer):
        if old.startswith(VIEW + "-"):
            remove_tree(layer / old)
    tmp = layer / f".{VIEW}.{os.getpid()}.{threading.get_ident()}"
    os.mkdir(tmp, 0o755)
    try:
        lower_files = [lw / "Files" for lw in lowers]
        lfd = os.open(layer, DIR_FLAGS)
        try:
            tombstones = read_tombstones(lfd)
        finally:
            os.close(lfd)
        for t in tombstones:
            parts = t.split("/")
            for spelled in {s for lf in lower_files if (s := _spell(lf, parts)) is not None}:
                here = files / spelled
                if here.is_dir() and not here.is_symlink():
                    raise ViewConflict(f"windowsfilter: {layer.name} deletes and adds back the "
                                       f"directory {spelled!r}")
                if not os.path.lexists(here):
                    _whiteout(tmp, spelled)
        _walk(files, lower_files, "", tmp, layer.name)
        try:
            os.rename(tmp, view)
        except OSError as exc:  # built meanwhile by another sandbox's creation
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(tmp)
    except BaseException:
        if os.path.lexists(tmp):
            remove_tree(tmp)
        raise
    return view


def _walk(files: Path, lower_files: list[Path], rel: str, view: Path, layer: str) -> None:
    here = files / rel if rel else files
    below: dict[str, dict[str, bool]] = {}  # fold -> lower spelling -> is a directory
    for lf in lower_files:
        d = lf / rel if rel else lf
        try:
            with os.scandir(d) as it:
                for e in it:
                    if ":" not in e.name:
                        below.setdefault(fold(e.name), {}).setdefault(
                            e.name, e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
    with os.scandir(here) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        path = f"{rel}/{e.name}" if rel else e.name
        if ":" in e.name:
            _whiteout(view, path)
            continue
        is_dir = e.is_dir(follow_symlinks=False)
        for other, other_dir in below.get(fold(e.name), {}).items():
            if other == e.name:
                continue
            if is_dir and other_dir:
                raise ViewConflict(f"windowsfilter: layer {layer} spells the directory "
                                   f"{path!r} as {other!r} below")
            _whiteout(view, f"{rel}/{other}" if rel else other)
        if is_dir:
            _walk(files, lower_files, path, view, layer)


@dataclass
class Source:
    """One lower layer of a sandbox, nearest first: a stored layer (``files`` = its Files,
    ``whiteouts`` = its view, ``layer`` = its directory, for side files and streams) or a
    writable parent's upper directory (whiteouts and opaque directories inside ``files``)."""

    files: Path
    whiteouts: Path | None
    layer: Path | None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def lookup(sources: list[Source], rel: str) -> tuple[Source, os.stat_result] | None:
    """The nearest source holding ``rel`` (a path of the merged view), or None."""
    parts = rel.split("/")
    for src in sources:
        for i in range(1, len(parts) + 1):
            pre = "/".join(parts[:i])
            if src.whiteouts is not None:
                st = _lstat(src.whiteouts / pre)
                if st is not None and is_whiteout(st):
                    return None
            st = _lstat(src.files / pre)
            if st is None:
                break
            if is_whiteout(st) or (i < len(parts) and not stat.S_ISDIR(st.st_mode)):
                return None
            if i == len(parts):
                return src, st
            if src.whiteouts is None and _opaque(src.files / pre):
                return None
    return None


def lower_names(sources: list[Source], rel: str) -> set[str]:
    """The names of directory ``rel`` of the merged view of ``sources``."""
    out: set[str] = set()
    hidden: set[str] = set()
    for src in sources:
        if src.whiteouts is not None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                hidden.update(os.listdir(src.whiteouts / rel if rel else src.whiteouts))
        d = src.files / rel if rel else src.files
        st = _lstat(d)
        if st is None or not stat.S_ISDIR(st.st_mode):
            if st is not None:
                break
            continue
        with os.scandir(d) as it:
            for e in it:
                if e.name in hidden or ":" in e.name:
                    continue
                if is_whiteout(e.stat(follow_symlinks=False)):
                    hidden.add(e.name)
                    continue
                out.add(e.name)
        if src.whiteouts is None and rel and _opaque(d):
            break
    return out
