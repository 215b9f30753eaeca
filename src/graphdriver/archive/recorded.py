"""A layer's changes and diff size from what its apply recorded (issue 15 rule 8).

A layer applied from a tar knows exactly which paths it wrote: the tar-split description keeps
every header (names, types, modes, owners, times, sizes, link names, whiteouts, opaque markers).
:func:`recorded_changes` replays those headers into the layer's final shape (later entries over
earlier ones, hard links sharing an inode, implicit parent directories, whiteouts that hide only
what lies below, opaque and re-created directories) and compares it with the parent's view at the
listed paths only (one lookup each; the listing of a parent directory only where the layer hides
its old contents), with the rules of :func:`.changes.changes_dirs`: a directory compared without
size and mtime, a file alike by stat compared by content, the parents of a change reported as
modified, the layer root never listed.  The result is what the tree walk gives, in O(entries).

A record this model cannot replay exactly (an entry type or whiteout name the apply refuses, a
hard link to nothing, a path beneath a non-directory) raises :class:`Unmodelled`: the caller
walks the tree instead.

Owns the replay of recorded headers.  Imports ``changes``, ``lowerview``, ``pathres``,
``tarstream``, ``whiteout`` and ``idmap``; never ``drivers/``, the store, ``exactdiff`` or the
package root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from ..idmap import IDMap
from .changes import Change, ChangeKind, capability, same_content, same_fs_time, sort_changes
from .lowerview import LowerView
from .pathres import open_beneath
from .tarstream import (
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR_TYPES,
    SYMLINK,
    TarEntry,
    clean_name,
)
from .whiteout import WHITEOUT_META_PREFIX, WHITEOUT_OPAQUE, WHITEOUT_PREFIX

_CAP_XATTR = "security.capability"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TYPE_BITS = {DIRECTORY: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHARDEV: stat.S_IFCHR,
              BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}


class Unmodelled(Exception):
    """The record holds something this replay does not model: walk the tree instead."""


class _Node:
    """A path of the layer as the apply left it.  Hard links share one node (one inode)."""

    __slots__ = ("cap", "gid", "link", "mode", "mtime_ns", "rdev", "size", "uid")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, rdev: int = 0, size: int = 0,
                 mtime_ns: int = 0, cap: bytes = b"", link: str | None = None) -> None:
        self.mode = mode  # 0 for a directory the tar does not list (an implicit parent)
        self.uid, self.gid, self.rdev = uid, gid, rdev
        self.size, self.mtime_ns, self.cap = size, mtime_ns, cap
        self.link = link  # a hard link to the parent's file at this path (not in the tar)

    @property
    def is_dir(self) -> bool:
        return self.mode == 0 or stat.S_ISDIR(self.mode)


class _Layer:
    """The final shape of the layer: its paths, and where it hides what lies below.  (A plain
    class: the dataclasses import, with inspect and ast, cost the first ``changes`` of a
    process ~6 ms.)"""

    __slots__ = ("ghosts", "implicit", "nodes", "opaque", "replaced", "whiteouts")

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        self.replaced: set[str] = set()  # paths once a non-directory of the layer
        self.implicit: set[str] = set()  # directories the layer made unlisted
        #: directories named only as the parents of whiteouts and opaque markers: the apply
        #: makes none of them (a marker with nothing to hide leaves no trace), so each is the
        #: layer's only where the apply left a directory
        self.ghosts: set[str] = set()

    def hides_below(self, path: str) -> bool:
        """Whether the directory *path* of the layer shows nothing of the parent's."""
        return path in self.opaque or path in self.whiteouts or path in self.replaced

    def is_dir(self, path: str) -> bool:
        if not path:
            return True
        node = self.nodes.get(path)
        return node is not None and node.is_dir

    def ensure_parents(self, path: str, *, marker: bool = False) -> None:
        parent = path.rpartition("/")[0]
        missing: list[str] = []
        while parent and parent not in self.nodes:
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        if parent and not self.nodes[parent].is_dir:
            raise Unmodelled(f"{path!r} lies beneath a non-directory")
        for p in missing:
            self.nodes[p] = _Node(0)
            self.implicit.add(p)
        if marker:
            self.ghosts.update(missing)
        else:
            while parent:  # an entry needs them all: made by the apply whatever was below
                self.ghosts.discard(parent)
                parent = parent.rpartition("/")[0]

    def check_hideable(self, path: str) -> None:
        """Before a whiteout or an opaque marker hides what lies below *path*: the appliers
        differ on this layer's entries beneath a directory the layer did not list (one keeps
        them, one removes them with the parent's directory), so such a record is not modelled."""
        prefix = path + "/" if path else ""
        for p in self.implicit:
            if p == path or p.startswith(prefix):
                raise Unmodelled(f"{path or '/'!r} hidden over this layer's implicit {p!r}")

    def put(self, path: str, node: _Node) -> None:
        old = self.nodes.get(path)
        if old is not None and not node.is_dir:
            if old.is_dir:
                prefix = path + "/"
                for p in [p for p in self.nodes if p.startswith(prefix)]:
                    del self.nodes[p]
                    self.implicit.discard(p)
                self.implicit.discard(path)
            self.replaced.add(path)
        elif old is not None and not old.is_dir:
            self.replaced.add(path)
        if old is not None and old.is_dir and node.is_dir:
            old.mode, old.uid, old.gid = node.mode, node.uid, node.gid  # a directory re-listed
            old.mtime_ns, old.cap = node.mtime_ns, node.cap
            self.implicit.discard(path)  # listed now: the layer's own
            return
        self.nodes[path] = node


def _replay(entries: Iterable[TarEntry], idmap: IDMap) -> _Layer:
    layer = _Layer()
    for e in entries:
        name = e.name
        if not name:
            continue  # the layer root's own entry: the root is never listed
        parent, _, base = name.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):
            if base == WHITEOUT_OPAQUE:
                layer.ensure_parents(name, marker=True)
                layer.check_hideable(parent)
                layer.opaque.add(parent)
            elif base.startswith(WHITEOUT_META_PREFIX) or base == WHITEOUT_PREFIX:
                raise Unmodelled(f"whiteout name {name!r}")
            else:
                layer.ensure_parents(name, marker=True)
                target = f"{parent}/{base[4:]}" if parent else base[4:]
                layer.check_hideable(target)
                layer.whiteouts.add(target)
            continue
        layer.ensure_parents(name)
        if e.type == HARDLINK:
            target = clean_name(e.raw_linkname)
            node = layer.nodes.get(target)
            if node is None:
                node = _Node(stat.S_IFREG, link=target)
            elif node.is_dir:
                raise Unmodelled(f"hard link {name!r} to a directory")
            layer.put(name, node)
            continue
        kind = stat.S_IFREG if e.type in REGULAR_TYPES else _TYPE_BITS.get(e.type)
        if kind is None:
            raise Unmodelled(f"entry type {e.type!r}")
        uid, gid = (e.uid, e.gid) if idmap.is_identity else idmap.to_host(e.uid, e.gid)
        perm = 0o777 if kind == stat.S_IFLNK else e.mode & 0o7777
        size = e.size if kind == stat.S_IFREG else 0
        if kind == stat.S_IFLNK:
            size = len(e.raw_linkname)
        rdev = os.makedev(e.devmajor, e.devminor) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        layer.put(name, _Node(kind | perm, uid, gid, rdev, size, e.mtime_ns,
                              e.xattrs.get(_CAP_XATTR, b"")))
    return layer


class _Compare:
    """The layer's nodes against the parent's view, with changes_dirs' rules."""

    def __init__(self, layer: _Layer, parent: LowerView | None, root_fd: int,
                 exact_mtime: bool) -> None:
        self.layer = layer
        self.parent = parent
        self.root_fd = root_fd
        self.exact_mtime = exact_mtime
        self.links: dict[str, os.stat_result] = {}
        #: the marker-only parents the apply did not make
        self.absent = {p for p in layer.ghosts if not _is_dir_at(root_fd, p)}

    def find(self, path: str) -> tuple[os.stat_result, int] | None:
        return None if self.parent is None else self.parent.find(path)

    def hidden_region(self, path: str) -> bool:
        """Whether a strict ancestor of *path* hides what lies below it."""
        while path:
            path = path.rpartition("/")[0]
            if self.layer.hides_below(path) and self.layer.is_dir(path):
                return True
        return False

    def link_stat(self, node: _Node) -> os.stat_result:
        assert node.link is not None
        hit = self.find(node.link)
        if hit is None or not stat.S_ISREG(hit[0].st_mode):
            raise Unmodelled(f"hard link to {node.link!r}, which the parent lacks")
        return hit[0]

    def node_stat(self, path: str, node: _Node, pst: os.stat_result) -> _Node | None:
        """The node's attributes to compare, or None when it is the parent's own directory."""
        if node.link is not None:
            st = self.link_stat(node)
            return _Node(st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                         st.st_mtime_ns, _cap_at(self.root_fd, path))
        if node.mode:
            return node
        if not stat.S_ISDIR(pst.st_mode):
            return _Node(stat.S_IFDIR)  # a directory over the parent's non-directory
        if not (path in self.layer.whiteouts or path in self.layer.replaced
                or self.hidden_region(path)):
            return None  # kept or copied up from the parent: its attributes
        st = os.lstat(path, dir_fd=self.root_fd)  # made afresh by the apply
        return _Node(st.st_mode, st.st_uid, st.st_gid, cap=_cap_at(self.root_fd, path))

    def modified(self, path: str, node: _Node, hit: tuple[os.stat_result, int]) -> bool:
        pst, pfd = hit
        mine = self.node_stat(path, node, pst)
        if mine is None:
            return False
        if (mine.mode != pst.st_mode or mine.uid != pst.st_uid or mine.gid != pst.st_gid
                or mine.rdev != pst.st_rdev):
            return True
        if not stat.S_ISDIR(pst.st_mode):
            if mine.size != pst.st_size:
                return True
            if (mine.mtime_ns != pst.st_mtime_ns if self.exact_mtime
                    else not same_fs_time(mine.mtime_ns, pst.st_mtime_ns)):
                return True
        if mine.cap != _cap_at(pfd, path):
            return True
        return (stat.S_ISREG(pst.st_mode) and pst.st_size > 0
                and not same_content(_at(pfd, path), _at(self.root_fd, path)))

    def run(self) -> list[Change]:
        layer = self.layer
        found: dict[str, ChangeKind] = {}
        for path, node in layer.nodes.items():
            if path in self.absent:
                continue
            hit = self.find(path)
            if hit is None:
                found[path] = ChangeKind.ADD
            elif self.modified(path, node, hit):
                found[path] = ChangeKind.MODIFY
        for path in layer.whiteouts:
            parent = path.rpartition("/")[0]
            if (path not in layer.nodes and layer.is_dir(parent) and parent not in self.absent
                    and self.find(path) is not None):
                found[path] = ChangeKind.DELETE
        if self.parent is not None:
            for path in [""] + [p for p, n in layer.nodes.items()
                                if n.is_dir and p not in self.absent]:
                if not ((layer.hides_below(path) and layer.is_dir(path))
                        or self.hidden_region(path)):
                    continue
                for name in self.parent.names(path):
                    child = f"{path}/{name}" if path else name
                    if child not in layer.nodes:
                        found[child] = ChangeKind.DELETE
        for path in list(found):
            parent = path.rpartition("/")[0]
            while parent and parent not in found:
                found[parent] = ChangeKind.MODIFY  # moby: the parents of a change
                parent = parent.rpartition("/")[0]
        return sort_changes([Change("/" + p, k) for p, k in found.items()])

    def size(self, paths: Iterable[str]) -> int:
        """Bytes of the non-directories at *paths*, a hard-linked inode counted once."""
        seen: set[int] = set()
        total = 0
        for path in paths:
            node = self.layer.nodes.get(path)
            if node is None or node.is_dir or id(node) in seen:
                continue
            seen.add(id(node))
            total += self.link_stat(node).st_size if node.link is not None else node.size
        return total


def _is_dir_at(fd: int, path: str) -> bool:
    """Whether *path* beneath *fd* is a directory, reached without following a symlink."""
    try:
        os.close(open_beneath(fd, path, _DIR_FLAGS))
    except OSError:  # missing, beneath a non-directory, or through a symlink
        return False
    return True


def _at(fd: int, path: str) -> str:
    return f"/proc/self/fd/{fd}/{path}"


def _cap_at(fd: int, path: str) -> bytes:
    return capability(_at(fd, path))


class RecordedLayer:
    """A layer's recorded headers replayed, against its parent's view.

    *parent_fds*: read-only roots of the parent's layers, nearest first (one, a whole tree, for
    vfs; the lower chain for overlay), kept in *whiteouts*' format; empty for a base layer.
    *root*: the layer's own directory as the apply wrote it (read only for content where a
    file is alike by stat, and for directories the apply made afresh).  *exact_mtime*: the
    layer's tree began as a copy of the parent's (vfs): mtimes compare to the nanosecond.
    """

    def __init__(self, entries: Iterable[TarEntry], idmap: IDMap, parent: LowerView | None,
                 root: str | os.PathLike[str], exact_mtime: bool) -> None:
        self._layer = _replay(entries, idmap)
        self._parent = parent
        self._root = os.fspath(root)
        self._exact = exact_mtime

    def _compare(self, fd: int) -> _Compare:
        return _Compare(self._layer, self._parent, fd, self._exact)

    def changes(self) -> list[Change]:
        fd = os.open(self._root, _DIR_FLAGS)
        try:
            return self._compare(fd).run()
        finally:
            os.close(fd)

    def changes_size(self, changes: Iterable[Change]) -> int:
        """moby's ChangesSize of *changes* (this layer's), from the recorded sizes."""
        fd = os.open(self._root, _DIR_FLAGS)
        try:
            return self._compare(fd).size(
                c.path[1:] for c in changes if c.kind != ChangeKind.DELETE)
        finally:
            os.close(fd)

    def tree_size(self) -> int:
        """Bytes of every non-directory the layer holds itself (overlay's upper directory)."""
        fd = os.open(self._root, _DIR_FLAGS)
        try:
            return self._compare(fd).size(list(self._layer.nodes))
        finally:
            os.close(fd)
