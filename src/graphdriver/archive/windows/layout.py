"""Windows layer tars: walking a stored layer in hcsshim's exporter's order (for diff, changes
and size), and finding a path as the layer spells it (NTFS's case-insensitive match).  Never
imports the importer or the exporter."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..pathres import open_beneath
from .metadata import read_crosslinks, read_tombstones, read_win_xattrs
from .names import DIR_FLAGS, TOP_DIRS, X_FILEATTR, X_STREAM_INDEX, fold


@dataclass
class LayerItem:
    """One thing a layer holds, in exporter order."""

    path: str  # "Files/a/b" as stored
    kind: str  # "entry" or "whiteout"
    st: os.stat_result | None = None
    streams: list[str] = field(default_factory=list)  # stored names of alternate streams
    link_to: str | None = None  # an earlier name of the same file (hard link)


def stored_path(root_fd: int, rel: str) -> str | None:
    """``rel`` (beneath ``root_fd``) as the layer spells it, matched name by name as NTFS
    does (regardless of case) where each directory on the way holds exactly one match; None
    where one does not (no match, or names that differ only in case)."""
    found: list[str] = []
    for part in rel.split("/"):
        try:
            dfd = open_beneath(root_fd, "/".join(found), DIR_FLAGS) if found else (
                os.dup(root_fd))
        except OSError:
            return None
        try:
            key = fold(part)
            matches = [n for n in os.listdir(dfd) if fold(n) == key]
        finally:
            os.close(dfd)
        if len(matches) != 1:
            return None
        found.append(matches[0])
    return "/".join(found)


def stream_index(dfd: int, name: str) -> int:
    """Where the import put an alternate stream among its file's (the tar's order)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except OSError:
        return 1 << 30
    try:
        return int(os.getxattr(fd, X_STREAM_INDEX))
    except (OSError, ValueError):
        return 1 << 30
    finally:
        os.close(fd)


def sorted_names(fd: int) -> list[str]:
    return sorted(os.listdir(fd), key=os.fsencode)


def walk_layer(layer_fd: int) -> Iterator[LayerItem]:
    """Everything of a layer in hcsshim's export order (see the module docstring)."""
    tombs: dict[str, list[str]] = {}  # fold(parent dir) -> recorded paths
    for t in read_tombstones(layer_fd):
        full = "Files/" + t
        tombs.setdefault(fold(full.rpartition("/")[0]), []).append(full)
    seen: dict[tuple[int, int], str] = {}
    emitted: set[str] = set()
    crosslinks = read_crosslinks(layer_fd)

    def whiteouts(d: str) -> Iterator[LayerItem]:
        key = fold(d)
        emitted.add(key)
        bases = [full.rpartition("/")[2] for full in tombs.get(key, ())]
        for base in sorted(bases, key=os.fsencode):
            yield LayerItem(f"{d}/{base}", "whiteout")

    def walk(d: str, dfd: int) -> Iterator[LayerItem]:
        names = sorted_names(dfd)
        streams: dict[str, list[str]] = {}
        for n in names:
            if ":" in n:
                streams.setdefault(fold(n.split(":", 1)[0]), []).append(n)
        for group in streams.values():
            if len(group) > 1:
                group.sort(key=lambda n: (stream_index(dfd, n), os.fsencode(n)))
        for n in names:
            if ":" in n:
                continue
            st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            rel = f"{d}/{n}"
            link_to = None
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                link_to = seen.get(key)
                if link_to is None:
                    seen[key] = rel
                    link_to = crosslinks.get(rel)
            own = [] if link_to is not None else streams.get(fold(n), [])
            yield LayerItem(rel, "entry", st, own, link_to)
            if stat.S_ISDIR(st.st_mode):
                yield from whiteouts(rel)
                sub = os.open(n, DIR_FLAGS, dir_fd=dfd)
                try:
                    yield from walk(rel, sub)
                finally:
                    os.close(sub)

    for top in TOP_DIRS:
        try:
            fd = os.open(top, DIR_FLAGS, dir_fd=layer_fd)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            st = os.fstat(fd)
            if os.listdir(fd) or X_FILEATTR in read_win_xattrs(fd, layer_fd):
                yield LayerItem(top, "entry", st)
            if top == "Files":
                yield from whiteouts(top)
            yield from walk(top, fd)
            if top == "Files":
                # tombstones whose directory is not in this layer: the recorded spelling
                for key in sorted(set(tombs) - emitted):
                    for full in sorted(tombs[key], key=os.fsencode):
                        yield LayerItem(full, "whiteout")
        finally:
            os.close(fd)
