"""Windows layer tars: a sandbox's diff, i.e. the overlayfs upper directory of a writable
layer written as a Windows layer that hcsshim's importer takes.  Never imports the importer or
a driver.

Rules (read from hcsshim's ``ociwclayer`` importer and exporter, go-winio's ``backuptar`` and
BuildKit's ``winlayers``):

- entries live under ``Files/`` (the sandbox shows only the container's ``C:\\``), in hcsshim's
  exporter order: ``Files`` first, and in every directory its entry, then the deletions in it
  as ``.wh.NAME`` entries, then its contents, names sorted bytewise;
- every entry carries ``MSWINDOWS.fileattr``, ``MSWINDOWS.rawsd`` and
  ``LIBARCHIVE.creationtime``: a path the lower layers hold (modified) keeps the lower file's
  records byte for byte (its security descriptor, attributes, EAs, creation time; a record the
  lower file lacks gets the default below), and its
  alternate data streams follow it as they are below (or as the sandbox rewrote them), with
  the file's times as go-winio writes a stream's header; a new
  path gets :mod:`.defaults`; times are the sandbox file's, as Go's archive/tar writes them
  (``atime``/``ctime`` always, ``mtime`` when it has a fraction).  Writing the diff must not
  change it: the sandbox's directories are listed and its files read with ``O_NOATIME`` (a
  second diff, e.g. after ``image commit`` read the first, gives the same bytes), and a
  symbolic link's access time is its modification time (reading a link sets its access time,
  and no flag prevents that);
- a new symbolic link gets :mod:`.defaults`' link records, REPARSE_POINT|DIRECTORY and a
  directory's mode bit (as go-winio writes a directory link) when its target, a path of the
  sandbox's merged view, is a directory there (one level: a link to a link, a Windows-form or
  an outside target is a file link);
- a deletion (an overlayfs whiteout, or the lower contents of an opaque directory) is a ``.wh.``
  entry; a path whose type changed is a deletion plus an addition, and so is a rename;
- two names of one directory that differ only in case cannot both exist on Windows: refused.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InvalidArgument
from ..export import TarOut
from ..tarwriter import encode_sorted
from ..whiteout import WHITEOUT_PREFIX
from .defaults import new_file_records, pax_time
from .layout import stream_index
from .metadata import read_linkmeta, read_win_xattrs, xattrs_to_pax
from .names import (
    DIR_FLAGS,
    FILE_ATTRIBUTE_DIRECTORY,
    HDR_FILE_ATTRIBUTES,
    HDR_RAW_SECURITY_DESCRIPTOR,
    HDR_SECURITY_DESCRIPTOR,
    MODE_DIR,
    MODE_LNK,
    MODE_REG,
    TIME_KEYS,
    fold,
)
from .view import OPAQUE_XATTR, Source, is_whiteout, lookup, lower_names


@dataclass
class SandboxItem:
    path: str  # "Files/a/b"
    kind: str  # "entry" or "whiteout"
    change: str = ""  # "A" or "C" for an entry
    st: os.stat_result | None = None  # of the sandbox's file
    lower: tuple[Source, os.stat_result] | None = None  # where a modified path comes from
    streams: list[tuple[str, Path, Source | None]] = field(default_factory=list)


_NOATIME = getattr(os, "O_NOATIME", 0)


def _open_quietly(path: Path, flags: int) -> int:
    """Open a sandbox file or directory without changing its access time, which its diff
    carries (``O_NOATIME`` needs the file's owner or root: others open it plainly)."""
    try:
        return os.open(path, flags | _NOATIME)
    except PermissionError:
        return os.open(path, flags)


def _list_quietly(path: Path) -> list[str]:
    fd = _open_quietly(path, DIR_FLAGS)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def walk_sandbox(upper: Path, sources: list[Source], name: str) -> Iterator[SandboxItem]:
    """Everything a sandbox changed, in the order its Windows layer tar lists it."""
    root_st = os.lstat(upper)
    top = next((s for s in sources if s.layer is not None), None)
    yield SandboxItem("Files", "entry", "C", root_st,
                      (top, os.lstat(top.files)) if top is not None else None)
    yield from _walk_dir(upper, sources, "", False, name)


def _walk_dir(upper: Path, sources: list[Source], rel: str, hidden: bool,
              name: str) -> Iterator[SandboxItem]:
    d = upper / rel if rel else upper
    opaque = bool(rel) and _opaque(d)
    hidden = hidden or opaque
    names = sorted(_list_quietly(d), key=os.fsencode)
    stats = {n: os.lstat(d / n) for n in names}
    gone: set[str] = {n for n in names if is_whiteout(stats[n])}
    present = [n for n in names if n not in gone]
    below = set() if (hidden and not opaque) else lower_names(sources, rel)
    if opaque:
        gone |= below
        below = set()
    lowers: dict[str, tuple[Source, os.stat_result] | None] = {}
    for n in present:
        if ":" in n:
            continue
        p = f"{rel}/{n}" if rel else n
        found = None if hidden else lookup(sources, p)
        if found is not None and stat.S_IFMT(found[1].st_mode) != stat.S_IFMT(stats[n].st_mode):
            gone.add(n)  # another kind of file: a deletion, then an addition
            found = None
        lowers[n] = found
    _refuse_case_twins(rel, [n for n in present if ":" not in n],
                       [n for n in below if n not in gone], name)
    for n in sorted(gone, key=os.fsencode):
        yield SandboxItem(f"Files/{rel}/{n}" if rel else f"Files/{n}", "whiteout")
    for n in present:
        if ":" in n:
            main = n.split(":", 1)[0]
            if main not in lowers:
                raise InvalidArgument(f"windowsfilter: sandbox {name}: alternate data stream "
                                      f"{rel + '/' if rel else ''}{n!r} without its file")
            continue
        p = f"{rel}/{n}" if rel else n
        item = SandboxItem(f"Files/{p}", "entry", "C" if lowers[n] else "A", stats[n], lowers[n])
        if not stat.S_ISDIR(stats[n].st_mode) and not stat.S_ISLNK(stats[n].st_mode):
            item.streams = _streams(d, present, n, lowers[n], rel)
        yield item
        if stat.S_ISDIR(stats[n].st_mode):
            yield from _walk_dir(upper, sources, p, hidden or lowers[n] is None, name)


def _streams(d: Path, present: list[str], n: str, lower: tuple[Source, os.stat_result] | None,
             rel: str) -> list[tuple[str, Path, Source | None]]:
    """(stream name, file, the layer it is in) of a file's alternate data streams."""
    out: dict[str, tuple[str, Path, Source | None]] = {}
    if lower is not None and lower[0].layer is not None:
        ldir = lower[0].files / rel if rel else lower[0].files
        dfd = os.open(ldir, DIR_FLAGS)
        try:  # in the order they were imported, as the layer's own diff writes them
            below = sorted((s for s in os.listdir(dfd) if s.startswith(n + ":")),
                           key=lambda s: (stream_index(dfd, s), os.fsencode(s)))
        finally:
            os.close(dfd)
        for s in below:
            out[s[len(n):]] = (s[len(n):], ldir / s, lower[0])
    for s in sorted(present, key=os.fsencode):
        if s.startswith(n + ":"):
            out[s[len(n):]] = (s[len(n):], d / s, None)
    return list(out.values())


def _refuse_case_twins(rel: str, names: list[str], below: list[str], name: str) -> None:
    seen: dict[str, str] = {}
    for n in [*names, *below]:
        key = fold(n)
        other = seen.get(key)
        if other is not None and other != n:
            where = f"Files/{rel}/" if rel else "Files/"
            raise InvalidArgument(
                f"windowsfilter: sandbox {name} holds {where}{other} and {where}{n}, names "
                "that differ only in case (Windows could not import them)")
        seen.setdefault(key, n)


def _times(st: os.stat_result) -> dict[str, bytes]:
    atime = st.st_mtime_ns if stat.S_ISLNK(st.st_mode) else st.st_atime_ns
    out = {"atime": pax_time(atime), "ctime": pax_time(st.st_ctime_ns)}
    if st.st_mtime_ns % 1_000_000_000:
        out["mtime"] = pax_time(st.st_mtime_ns)
    return out


def _lower_records(lower: tuple[Source, os.stat_result], rel: str, is_link: bool) -> dict[
        str, bytes]:
    src, _ = lower
    if src.layer is None:
        return {}
    lfd = os.open(src.layer, DIR_FLAGS)
    try:
        if is_link:
            xattrs = read_linkmeta(lfd).get(f"Files/{rel}", {}) if rel else {}
        else:
            fd = os.open(src.files / rel if rel else src.files,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                xattrs = read_win_xattrs(fd, lfd)
            finally:
                os.close(fd)
    finally:
        os.close(lfd)
    return {k: v for k, v in xattrs_to_pax(xattrs).items() if k not in TIME_KEYS}


def _merged_lstat(upper: Path, sources: list[Source], rel: str) -> os.stat_result | None:
    """What the sandbox's merged view holds at ``rel`` (no link followed), or None."""
    parts = rel.split("/")
    opaque = False
    for i in range(1, len(parts) + 1):
        pre = "/".join(parts[:i])
        try:
            st = os.lstat(upper / pre)
        except (FileNotFoundError, NotADirectoryError):
            found = None if opaque else lookup(sources, rel)
            return found[1] if found is not None else None
        if is_whiteout(st) or (i < len(parts) and not stat.S_ISDIR(st.st_mode)):
            return None
        if i == len(parts):
            return st
        opaque = opaque or _opaque(upper / pre)
    return None


def _link_to_directory(upper: Path, sources: list[Source], rel: str, target: str) -> bool:
    """Whether the link ``rel`` of the sandbox points to a directory of its merged view."""
    if "\\" in target or ":" in target:
        return False  # a Windows path (C:\...): not resolved on Linux
    joined = target if target.startswith("/") else posixpath.join(posixpath.dirname(rel), target)
    path = posixpath.normpath("/" + joined).lstrip("/")
    if posixpath.normpath(joined).startswith(".."):
        return False  # above the container's C:\
    if not path:
        return True  # the root
    st = _merged_lstat(upper, sources, path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def item_records(item: SandboxItem, link_is_dir: bool = False) -> dict[str, bytes]:
    """The PAX records of an entry: the lower file's Windows records, or new ones, and times."""
    st = item.st
    assert st is not None
    rel = item.path[len("Files/"):] if item.path != "Files" else ""
    is_link = stat.S_ISLNK(st.st_mode)
    kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if not is_link
            else "dir-symlink" if link_is_dir else "symlink")
    records = new_file_records(kind, st.st_mtime_ns)
    if item.lower is not None:
        lower = _lower_records(item.lower, rel, is_link)
        if HDR_SECURITY_DESCRIPTOR in lower:  # the legacy SDDL form stands for a rawsd
            del records[HDR_RAW_SECURITY_DESCRIPTOR]
        records.update(lower)  # what the lower file had, defaults only where it had nothing
    return {**records, **_times(st)}


def write_sandbox_tar(out_fd: int, upper: Path, sources: list[Source], name: str,
                      progress: Callable[[int], None] | None = None) -> None:
    """Stream the sandbox's diff as a Windows layer tar to ``out_fd``."""
    out = TarOut(out_fd, progress)
    for item in walk_sandbox(upper, sources, name):
        bname = os.fsencode(item.path)
        if item.kind == "whiteout":
            d, _, base = bname.rpartition(b"/")
            out.add(encode_sorted(d + b"/" + WHITEOUT_PREFIX.encode() + base, b"0", 0, 0, 0, {},
                                  ustar_ok=True))
            continue
        st = item.st
        assert st is not None
        rel = item.path[len("Files/"):] if item.path != "Files" else ""
        full = upper / rel if rel else upper
        mtime = st.st_mtime_ns // 1_000_000_000
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            records = item_records(item, item.lower is None
                                   and _link_to_directory(upper, sources, rel, target))
            attrs = records.get(HDR_FILE_ATTRIBUTES, b"")
            dirbit = MODE_DIR if attrs.isdigit() and int(attrs) & FILE_ATTRIBUTE_DIRECTORY else 0
            out.add(encode_sorted(bname, b"2", MODE_LNK | dirbit, 0, mtime, records,
                                  os.fsencode(target)))
            continue
        records = item_records(item)
        if stat.S_ISDIR(st.st_mode):
            out.add(encode_sorted(bname, b"5", MODE_DIR, 0, mtime, records))
        else:
            fd = _open_quietly(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                out.add(encode_sorted(bname, b"0", MODE_REG, size, mtime, records))
                out.file_data(fd, size)
            finally:
                os.close(fd)
            for sname, spath, src in item.streams:
                _write_stream(out, bname + os.fsencode(sname), spath, src, st)
    out.finish()


def _write_stream(out: TarOut, name: bytes, path: Path, src: Source | None,
                  main: os.stat_result) -> None:
    fd = _open_quietly(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        records: dict[str, bytes] = {}
        if src is not None and src.layer is not None:
            lfd = os.open(src.layer, DIR_FLAGS)
            try:
                records = {k: v for k, v in xattrs_to_pax(read_win_xattrs(fd, lfd)).items()
                           if k not in TIME_KEYS}
            finally:
                os.close(lfd)
        records.update(_times(main))  # go-winio: a stream carries its file's times
        out.add(encode_sorted(name, b"0", MODE_REG, st.st_size, main.st_mtime_ns // 10**9,
                              records))
        out.file_data(fd, st.st_size)
    finally:
        os.close(fd)


def sandbox_size(upper: Path, sources: list[Source], name: str) -> int:
    """Bytes of file data of the sandbox's diff (hcsshim's import size: streams not counted)."""
    return sum(item.st.st_size for item in walk_sandbox(upper, sources, name)
               if item.kind == "entry" and item.st is not None
               and stat.S_ISREG(item.st.st_mode) and item.path != "Files")
