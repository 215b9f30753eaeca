"""Change detection: what differs between a layer's tree and its parent's.

- ``changes_dirs(new, old)``: moby's ChangesDirs rules exactly, result sorted by path.
- ``changes_size(root, changes)``: moby's ChangesSize; ``tree_size(root)``: moby's
  directory.Size (an overlay layer's ``diff``); one size rule for both (``stats_size``).
- ``overlay_changes(upper, lowers)``: the same answer for an overlay layer, read from its upper
  directory without walking the lowers.

Beyond moby: a regular file whose size and mtime agree is still compared by content where it may
have been rewritten (issue 15 rule 8): in an overlay upper (it is there, so it was written), and
in a tree copied from the old one (vfs) unless it is the very copy made then (its inode and
ctime as recorded at the copy, ``unchanged_copies``); such a tree's non-directory mtimes are
compared to the nanosecond (both sides hold the same times, nothing was truncated by a tar).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Generator, Iterable
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple

from ..errors import from_oserror
from ..fsutil import raise_open_files_limit, walk_lstat
from ..idmap import IDENTITY, IDMap
from .pathres import open_beneath
from .whiteout import OVERLAY, WhiteoutFormat


class ChangeKind(IntEnum):
    """moby's numbers, kept on every wire: MODIFY=0 ("C"), ADD=1 ("A"), DELETE=2 ("D")."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    @property
    def letter(self) -> str:
        return "CAD"[self.value]


class Change(NamedTuple):
    """One changed path, absolute inside the layer ("/etc/passwd"), and how it changed."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind.letter} {self.path}"


# --------------------------------------------------------------------------------------------
# Comparison (moby pkg/archive changes.go, changes_linux.go, changes_unix.go)
# --------------------------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CAP_XATTR = "security.capability"
_NS = 1_000_000_000


def same_fs_time(a_ns: int, b_ns: int) -> bool:
    """moby's sameFsTime: equal, or the same second when either has no sub-second part."""
    return a_ns == b_ns or (
        a_ns // _NS == b_ns // _NS and (a_ns % _NS == 0 or b_ns % _NS == 0)
    )


def stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    """moby's statDifferent: mode, uid, gid, rdev; and for non-directories size and mtime."""
    if (
        old.st_mode != new.st_mode
        or old.st_uid != new.st_uid
        or old.st_gid != new.st_gid
        or old.st_rdev != new.st_rdev
    ):
        return True
    if stat.S_ISDIR(old.st_mode):
        return False
    return old.st_size != new.st_size or not same_fs_time(old.st_mtime_ns, new.st_mtime_ns)


_PROC_FD = os.path.isdir("/proc/self/fd")


def _at(dir_fd: int | None, name: str, full: str) -> str:
    """A short path naming *name* in an open directory (so depth never hits PATH_MAX)."""
    return f"/proc/self/fd/{dir_fd}/{name}" if _PROC_FD and dir_fd is not None else full


def same_content(a: str, b: str) -> bool:
    """Whether two regular files of the same size hold the same bytes."""
    fa = os.open(a, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fb = os.open(b, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            while True:
                ca = os.read(fa, 1 << 20)
                cb = os.read(fb, 1 << 20)
                if ca != cb:
                    return False
                if not ca:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _rewritten(old: os.stat_result, new: os.stat_result, old_path: str, new_path: str) -> bool:
    """Two regular files alike by stat (size, mtime): whether the new one's bytes differ."""
    return (stat.S_ISREG(new.st_mode) and stat.S_ISREG(old.st_mode) and new.st_size > 0
            and not same_content(old_path, new_path))


def capability(path: str) -> bytes:
    try:
        return os.getxattr(path, _CAP_XATTR, follow_symlinks=False)
    except OSError:
        return b""  # moby ignores the error: no capability


def _scan(fd: int) -> dict[str, os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return {e.name: e for e in it}


def _entry_stat(entry: os.DirEntry[str]) -> os.stat_result | None:
    """lstat of a listed name; None when it is not there (moby's walker skips those)."""
    try:
        return entry.stat(follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def sort_changes(changes: list[Change]) -> list[Change]:
    changes.sort(key=lambda c: os.fsencode(c.path))
    return changes


_Walk = Generator["_Walk", None, None]
"""A directory's comparison: yields the comparison of each subdirectory to run before it goes on
(so tree depth costs heap, not Python stack)."""


def _drive(top: _Walk) -> None:
    """Run a directory comparison and every subdirectory comparison it yields, depth first."""
    stack = [top]
    try:
        while stack:
            try:
                child = next(stack[-1])
            except StopIteration:
                stack.pop()
                continue
            stack.append(child)
    finally:
        for gen in reversed(stack):
            gen.close()  # runs their finally blocks: descriptors are closed


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}"


def _compare_dirs(
    new_fd: int,
    old_fd: int | None,
    new_root: str,
    old_root: str,
    path: str,
    same_dev: bool,
    out: list[Change],
    copies: frozenset[tuple[int, int]] | None = None,
) -> _Walk:
    """The children half of moby's addChanges for a directory of the new tree.

    *old_fd* is the same directory in the old tree, or None when the old tree has no directory
    there (absent, or not a directory): then every child is added.
    """
    new_children = _scan(new_fd)
    old_children = _scan(old_fd) if old_fd is not None else {}
    if same_dev and old_children:
        # changes_linux.go's walker: a name with the same inode on the same device in both trees
        # is the same file; it is not collected at all (nor its subtree).
        for name in [n for n, e in new_children.items() if n in old_children]:
            if new_children[name].inode() == old_children[name].inode():
                del new_children[name]
                del old_children[name]

    for name, entry in new_children.items():
        child = _join(path, name)
        nst = _entry_stat(entry)
        old_entry = old_children.pop(name, None)
        ost = _entry_stat(old_entry) if old_entry is not None else None
        if nst is None:
            # Listed but not there (gone meanwhile, or an overlay whiteout a readdir shows).
            if ost is not None:
                out.append(Change(child, ChangeKind.DELETE))
            continue
        if ost is None:
            out.append(Change(child, ChangeKind.ADD))
            added = True
        elif stat_different(ost, nst) or capability(
            _at(old_fd, name, old_root + child)
        ) != capability(_at(new_fd, name, new_root + child)) or (
            copies is not None and not stat.S_ISDIR(nst.st_mode) and (
                ost.st_mtime_ns != nst.st_mtime_ns
                or ((nst.st_ino, nst.st_ctime_ns) not in copies and _rewritten(
                    ost, nst, _at(old_fd, name, old_root + child),
                    _at(new_fd, name, new_root + child))))):
            out.append(Change(child, ChangeKind.MODIFY))
            added = True
        else:
            added = False
        if not stat.S_ISDIR(nst.st_mode):
            continue
        start = len(out)
        child_new = os.open(name, _DIR_FLAGS, dir_fd=new_fd)
        child_old: int | None = None
        try:
            if ost is not None and stat.S_ISDIR(ost.st_mode) and old_fd is not None:
                child_old = os.open(name, _DIR_FLAGS, dir_fd=old_fd)
            yield _compare_dirs(
                child_new,
                child_old,
                new_root,
                old_root,
                child,
                ost is not None and ost.st_dev == nst.st_dev,
                out,
                copies,
            )
        finally:
            os.close(child_new)
            if child_old is not None:
                os.close(child_old)
        if len(out) > start and not added:
            # Something inside changed: the directory itself is listed (moby PR 13590).
            out.append(Change(child, ChangeKind.MODIFY))

    for name, entry in old_children.items():
        if _entry_stat(entry) is not None:
            out.append(Change(_join(path, name), ChangeKind.DELETE))


def changes_dirs(
    new: str | Path, old: str | Path | None, idmap: IDMap = IDENTITY,
    unchanged_copies: frozenset[tuple[int, int]] | None = None,
) -> list[Change]:
    """moby's ChangesDirs(new, old), sorted by path; ``old=None`` lists everything as ADD.

    *unchanged_copies*: *new* began as a copy of *old*, and these (inode, ctime ns) pairs are
    its regular files as copied; mtimes are then compared to the nanosecond, and a file alike
    by stat but not in the set is compared by content.

    Ownership is compared as stored on disk (both trees belong to the same store, so *idmap*
    does not change the outcome; it is accepted for symmetry with the other tar-engine calls).
    """
    del idmap
    raise_open_files_limit()  # two directory fds per level
    new_s, old_s = os.fspath(new), os.fspath(old) if old is not None else ""
    out: list[Change] = []
    try:
        new_fd = os.open(new_s, _DIR_FLAGS)
    except OSError as exc:
        raise from_oserror(exc, "changes") from exc
    old_fd: int | None = None
    try:
        same_dev = False
        if old is not None:
            old_fd = os.open(old_s, _DIR_FLAGS)
            same_dev = os.fstat(old_fd).st_dev == os.fstat(new_fd).st_dev
        _drive(_compare_dirs(new_fd, old_fd, new_s, old_s, "", same_dev, out,
                             unchanged_copies))
    except OSError as exc:
        raise from_oserror(exc, "changes") from exc
    finally:
        os.close(new_fd)
        if old_fd is not None:
            os.close(old_fd)
    return sort_changes(out)


def changes_size(root: str | Path, changes: list[Change]) -> int:
    """moby's ChangesSize: bytes of ADD/MODIFY non-directories, a hard-linked inode once."""
    try:
        parents = _ParentDirs(root)
    except OSError as exc:
        raise from_oserror(exc, "diff size") from exc
    with parents:
        return stats_size(parents.lstat(c.path) for c in changes if c.kind != ChangeKind.DELETE)


def tree_size(root: str | Path) -> int:
    """moby's directory.Size: bytes of every non-directory beneath *root*, an inode once."""
    return stats_size(walk_lstat(root))


def stats_size(stats: Iterable[os.stat_result | None]) -> int:
    """Bytes of the non-directories among *stats* (None: unreadable, skipped), a
    multiply-linked inode counted once: the one size rule of ``changes_size`` and
    ``tree_size``."""
    size = 0
    seen: set[tuple[int, int]] = set()
    for st in stats:
        if st is None or stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        size += st.st_size
    return size


class _ParentDirs:
    """lstat of paths beneath a root at any depth: through the parent directory's fd (opened
    beneath the root, in pieces past PATH_MAX), the last parent kept open for its siblings."""

    def __init__(self, root: str | Path) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.parent = ""
        self.parent_fd = self.root_fd

    def __enter__(self) -> _ParentDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop()
        os.close(self.root_fd)

    def _drop(self) -> None:
        if self.parent_fd != self.root_fd:
            os.close(self.parent_fd)
        self.parent, self.parent_fd = "", self.root_fd

    def lstat(self, path: str) -> os.stat_result | None:
        """None when it cannot be read (moby logs and goes on)."""
        parent, _, name = path.strip("/").rpartition("/")
        try:
            if parent != self.parent:
                self._drop()
                if parent:
                    self.parent_fd = open_beneath(self.root_fd, parent)
                    self.parent = parent
            return os.lstat(name, dir_fd=self.parent_fd)
        except OSError:
            return None


# --------------------------------------------------------------------------------------------
# Overlay: the upper directory against its lower stack, without walking the lowers
# --------------------------------------------------------------------------------------------


class _Lower(NamedTuple):
    st: os.stat_result
    path: str
    stack: list[str]
    """The lower directories merged at this path (nearest first), when it is a directory."""


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _lower_lookup(stack: list[str], name: str, wf: WhiteoutFormat) -> _Lower | None:
    """What the merged lower view shows at ``dir/name``, given the directories merged at dir."""
    for i, d in enumerate(stack):
        top_path = _join(d, name)
        top = _lstat(top_path)
        if top is None:
            continue
        if wf.is_whiteout(top):
            return None
        if not stat.S_ISDIR(top.st_mode):
            return _Lower(top, top_path, [])
        merged = [top_path]
        if not wf.is_opaque(top_path):
            for below in stack[i + 1 :]:
                p = _join(below, name)
                st = _lstat(p)
                if st is None:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    break  # a whiteout or a non-directory ends the merge
                merged.append(p)
                if wf.is_opaque(p):
                    break
        return _Lower(top, top_path, merged)
    return None


def _lower_names(stack: list[str], wf: WhiteoutFormat) -> list[str]:
    """Names the merged lower view lists in a directory merged from *stack*."""
    decided: dict[str, bool] = {}
    for d in stack:
        with os.scandir(d) as it:
            for e in it:
                if e.name not in decided:
                    decided[e.name] = not wf.is_whiteout(e.stat(follow_symlinks=False))
    return [n for n, present in decided.items() if present]


def _compare_upper(
    upper_fd: int,
    upper_root: str,
    path: str,
    stack: list[str],
    hidden: bool,
    out: list[Change],
    wf: WhiteoutFormat,
) -> _Walk:
    """Children of an upper directory.  *hidden*: the merged view shows no lower content here
    (this directory or an ancestor is opaque), so what the lowers have and upper lacks is gone."""
    present: set[str] = set()
    for entry in _scan(upper_fd).values():
        name = entry.name
        child = _join(path, name)
        try:
            ust = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if wf.is_whiteout(ust):
            if not hidden and stack and _lower_lookup(stack, name, wf) is not None:
                out.append(Change(child, ChangeKind.DELETE))
            continue
        present.add(name)
        lower = _lower_lookup(stack, name, wf) if stack else None
        if lower is None:
            out.append(Change(child, ChangeKind.ADD))
            added = True
        elif stat_different(lower.st, ust) or capability(lower.path) != capability(
            _at(upper_fd, name, upper_root + child)
        ) or _rewritten(lower.st, ust, lower.path, _at(upper_fd, name, upper_root + child)):
            out.append(Change(child, ChangeKind.MODIFY))
            added = True
        else:
            added = False
        if not stat.S_ISDIR(ust.st_mode):
            continue
        start = len(out)
        child_stack = lower.stack if lower is not None else []
        child_hidden = hidden or wf.is_opaque(_at(upper_fd, name, upper_root + child))
        fd = os.open(name, _DIR_FLAGS, dir_fd=upper_fd)
        try:
            yield _compare_upper(fd, upper_root, child, child_stack, child_hidden, out, wf)
        finally:
            os.close(fd)
        if len(out) > start and not added:
            out.append(Change(child, ChangeKind.MODIFY))
    if hidden and stack:
        for name in _lower_names(stack, wf):
            if name not in present:
                out.append(Change(_join(path, name), ChangeKind.DELETE))


def overlay_changes(upper: str | Path, lowers: list[Path] | list[str],
                    whiteout_format: WhiteoutFormat = OVERLAY) -> list[Change]:
    """Changes of an overlay upper directory against its lowers (nearest first), whose
    whiteouts and opaque markers are kept in *whiteout_format*.

    Equal to ``changes_dirs(merged, lower_merged)`` of the mounted views, but reads only the
    upper tree plus single lookups of its paths in the lowers (and the listing of lower
    directories that an opaque upper directory hides).  A whiteout is a DELETE only when a
    lower layer shows something there (moby's OverlayChanges would list every whiteout).
    """
    raise_open_files_limit()  # a directory fd per level
    upper_s = os.fspath(upper)
    stack = [os.fspath(p) for p in lowers]
    out: list[Change] = []
    try:
        fd = os.open(upper_s, _DIR_FLAGS)
    except OSError as exc:
        raise from_oserror(exc, "overlay changes") from exc
    try:
        _drive(_compare_upper(fd, upper_s, "", stack, False, out, whiteout_format))
    except OSError as exc:
        raise from_oserror(exc, "overlay changes") from exc
    finally:
        os.close(fd)
    return sort_changes(out)
