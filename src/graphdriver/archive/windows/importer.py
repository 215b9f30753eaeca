"""Windows layer tars: import, i.e. apply a Windows layer tar into a layer directory (go-winio
backuptar semantics, hcsshim's importer rules).  Never imports the exporter."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import posixpath
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ...errors import GraphDriverError, InvalidArchive, UnsafeArchive, from_oserror
from ...fsutil import copy_file_data
from ..pathres import open_beneath
from ..tarstream import DIRECTORY, HARDLINK, REGULAR_TYPES, SYMLINK, TarEntry, TarReader
from ..whiteout import WHITEOUT_META_PREFIX, WHITEOUT_PREFIX
from .layout import sorted_names
from .metadata import (
    adopt_side_files,
    bad_archive,
    format_tombstones,
    pax_to_xattrs,
    read_crosslinks,
    read_linkmeta,
    read_tombstones,
    read_win_xattrs,
    set_win_xattrs,
    write_small_file,
)
from .names import (
    CROSSLINKS,
    DIR_FLAGS,
    LINKMETA,
    MODE_REG,
    MUTATED_FILES,
    NEW_FILE,
    NEW_FILE_RW,
    TOMBSTONES,
    TOP_DIRS,
    X_EMPTY_MODE,
    X_STREAM_INDEX,
    fold,
)


@dataclass
class _Dir:
    names: dict[str, str] = field(default_factory=dict)  # fold(name) -> stored name


class Importer:
    """Applies a Windows layer tar beneath ``root_fd`` (the new layer's directory).

    ``parent_fds`` are the parent layers' directories, nearest first: where hard-link targets
    under ``Files/`` are looked for when this layer does not have them (hcsshim's AddLink).
    Every path is resolved beneath its root without following symlinks.
    """

    def __init__(self, root_fd: int, parent_fds: list[int]) -> None:
        self.root = root_fd
        self.parents = parent_fds
        self.size = 0
        self._dirs: dict[str, _Dir] = {}
        self.tombstones = read_tombstones(root_fd)
        self._tomb_keys = {fold(t) for t in self.tombstones}
        self.linkmeta = read_linkmeta(root_fd)
        self.crosslinks = read_crosslinks(root_fd)
        self._dir_times: list[tuple[str, int, int]] = []
        self._last_main: tuple[str, str] | None = None  # (parent dir, stored name)
        self._stream_index: dict[tuple[str, str], int] = {}
        self._cached: tuple[str, int] | None = None  # the last directory opened, kept open
        for top in ("Files",):
            with contextlib.suppress(FileExistsError):
                os.mkdir(top, 0o755, dir_fd=root_fd)
        self._has_uvm = _lookup_in(root_fd, "", "UtilityVM") is not None
        self._name_max = os.fpathconf(root_fd, "PC_NAME_MAX")

    # -- the utility VM of a diff layer (hcsshim's initUtilityVM) ------------------------------
    def _init_uvm(self) -> None:
        """A diff layer that touches the utility VM starts from a clone of its parent's.

        As hcsshim does (Server 2016 has no layered utility VM): files are hard links to the
        parent's, directories and symlinks are copies, the BCD files (which the Windows import
        rewrites) are copied.  A base layer (no parents) writes its utility VM itself.
        """
        if self._has_uvm or not self.parents:
            return
        self._has_uvm = True
        top = self._resolve_dir(["UtilityVM"], "UtilityVM", create_top=True)
        for parent in self.parents:
            try:
                sfd = open_beneath(parent, "UtilityVM/Files", DIR_FLAGS)
            except OSError:
                continue
            try:
                if _lookup_in(self.root, top, "Files") is None:
                    dfd = self._open_dir(top)
                    try:
                        os.mkdir("Files", 0o755, dir_fd=dfd)
                    finally:
                        os.close(dfd)
                    self._dirs.pop(top, None)
                dst = open_beneath(self.root, f"{top}/Files", DIR_FLAGS)
                try:
                    _copy_dir_meta(sfd, dst)
                    self._clone_uvm(sfd, dst, f"{top}/Files", read_linkmeta(parent))
                    adopt_side_files(parent, self.root)
                finally:
                    os.close(dst)
            finally:
                os.close(sfd)
            return

    def _clone_uvm(self, sfd: int, dfd: int, rel: str,
                   linkmeta: dict[str, dict[str, bytes]]) -> None:
        for n in sorted_names(sfd):
            st = os.stat(n, dir_fd=sfd, follow_symlinks=False)
            path = f"{rel}/{n}"
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(n, 0o755, dir_fd=dfd)
                s2 = os.open(n, DIR_FLAGS, dir_fd=sfd)
                d2 = os.open(n, DIR_FLAGS, dir_fd=dfd)
                try:
                    _copy_dir_meta(s2, d2)
                    self._clone_uvm(s2, d2, path, linkmeta)
                    os.utime(d2, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(s2)
                    os.close(d2)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(n, dir_fd=sfd), n, dir_fd=dfd)
                if path in linkmeta:
                    self.linkmeta[path] = linkmeta[path]
            elif path.split(":", 1)[0] in MUTATED_FILES:
                src = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
                try:
                    out = os.open(n, NEW_FILE, 0o644, dir_fd=dfd)
                    try:
                        copy_file_data(src, out, st.st_size)
                        set_win_xattrs(out, read_win_xattrs(src), replace=False)
                        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                    finally:
                        os.close(out)
                finally:
                    os.close(src)
            elif stat.S_ISREG(st.st_mode):
                os.link(n, n, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    # -- names --------------------------------------------------------------------------------
    def _index(self, d: str) -> _Dir:
        entry = self._dirs.get(d)
        if entry is None:
            fd = self._open_dir(d)
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
            entry = _Dir({fold(n): n for n in names})
            self._dirs[d] = entry
        return entry

    def _open_dir(self, d: str, root: int | None = None) -> int:
        """A new descriptor of directory ``d`` beneath the root (the caller closes it).

        Entries come directory by directory, so the last directory of this layer is kept open
        and handed out as a dup (cheaper than resolving the path again).
        """
        if root is None and self._cached is not None and self._cached[0] == d:
            return os.dup(self._cached[1])
        try:
            fd = open_beneath(self.root if root is None else root, d, DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise UnsafeArchive(f"path {d!r} goes through a symbolic link") from exc
            if exc.errno == errno.ENOTDIR:
                with contextlib.suppress(OSError):
                    st = os.stat(d, dir_fd=self.root if root is None else root,
                                 follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise UnsafeArchive(f"path {d!r} goes through a symbolic link") from exc
                raise bad_archive(f"path {d!r} goes through a file") from exc
            raise
        if root is None:
            self._drop_cached()
            self._cached = (d, os.dup(fd))
        return fd

    def _drop_cached(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _lookup(self, d: str, name: str) -> str | None:
        return self._index(d).names.get(fold(name))

    def _resolve_dir(self, parts: list[str], name: str, root: int | None = None,
                     create_top: bool = False) -> str:
        """The stored spelling of the existing directory ``parts`` (case-insensitive).

        ``create_top``: a missing top directory (Files, Hives, UtilityVM) is made.
        """
        if root is not None:
            return _resolve_in(root, parts, name)
        cur = ""
        for part in parts:
            real = self._lookup(cur, part)
            if real is None:
                if cur == "" and part in TOP_DIRS and create_top:
                    os.mkdir(part, 0o755, dir_fd=self.root)
                    self._index("").names[fold(part)] = part
                    real = part
                else:
                    raise bad_archive(f"{name}: parent directory {'/'.join(parts)!r} is missing")
            cur = f"{cur}/{real}" if cur else real
        return cur

    def _forget(self, d: str, stored: str) -> None:
        self._drop_cached()  # the removed name may have been (or held) the cached directory
        idx = self._dirs.get(d)
        if idx is not None:
            idx.names.pop(fold(stored), None)
        prefix = f"{d}/{stored}" if d else stored
        for key in [k for k in self._dirs if k == prefix or k.startswith(prefix + "/")]:
            del self._dirs[key]
        for table in (self.linkmeta, self.crosslinks):
            for key in [k for k in table if k == prefix or k.startswith(prefix + "/")]:
                del table[key]

    def _remove(self, d: str, dfd: int, stored: str, with_streams: bool = True) -> None:
        """Remove ``d/stored`` (a tree if a directory) and, for a file, its alternate streams."""
        st = os.stat(stored, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(stored, dir_fd=dfd)
        else:
            os.unlink(stored, dir_fd=dfd)
        self._forget(d, stored)
        if with_streams:
            key = fold(stored) + ":"
            for k, n in list(self._index(d).names.items()):
                if k.startswith(key):
                    os.unlink(n, dir_fd=dfd)
                    self._forget(d, n)

    # -- entries ------------------------------------------------------------------------------
    def apply(self, reader: TarReader, progress: Callable[[int], None] | None = None) -> int:
        try:
            for entry in reader:
                self._entry(reader, entry)
                if progress is not None:
                    progress(reader.bytes_read)
            self.finish()
        finally:
            self._drop_cached()
        return self.size

    def _split(self, entry: TarEntry) -> list[str]:
        name = entry.name
        shown = entry.raw_name.decode("utf-8", "replace")  # as in the tar: "./x", not "x"
        if "\\" in name:
            raise bad_archive(f"{shown!r}: backslash in an entry name")
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts):
            if ".." in parts:
                raise UnsafeArchive(f"entry {shown!r} leaves the layer")
            raise bad_archive(f"entry {shown!r}: a Windows layer holds only entries under Files/, "
                              "Hives/ and UtilityVM/ (no root entry, no ./ prefix)")
        if parts[0] not in TOP_DIRS:
            raise bad_archive(f"entry {shown!r} is outside Files/, Hives/ and UtilityVM/")
        for part in parts:
            size = len(part.encode("utf-8", "surrogateescape"))
            if size > self._name_max:
                raise bad_archive(
                    f"{shown[:60]!r}...: a name of {size} bytes does not fit this filesystem "
                    f"(NAME_MAX {self._name_max}; NTFS allows 255 UTF-16 units)")
        return parts

    def _check_uvm_entry(self, name: str, parts: list[str]) -> None:
        """hcsshim's legacyLayerWriter: in a diff layer, an entry under ``UtilityVM`` (other
        than a deletion) comes after the ``UtilityVM`` entry and lies under ``UtilityVM/Files``.
        """
        if not self.parents or len(parts) == 1:
            return
        if not self._has_uvm:
            raise bad_archive(f"{name}: missing UtilityVM directory (no UtilityVM entry before it)")
        if parts[1] != "Files":
            raise bad_archive(f"{name}: invalid UtilityVM layer (outside UtilityVM/Files)")

    def _entry(self, reader: TarReader, entry: TarEntry) -> None:
        parts = self._split(entry)
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._last_main = None
            self._whiteout(entry.name, parts)
            return
        if parts[0] == "UtilityVM":
            self._check_uvm_entry(entry.name, parts)
        if entry.type == HARDLINK:
            self._last_main = None
            self._hardlink(entry, parts)
        elif ":" in base:
            self._stream(reader, entry, parts)
        elif entry.type == DIRECTORY or entry.type in REGULAR_TYPES or entry.type == SYMLINK:
            self._add(reader, entry, parts)
        else:
            raise bad_archive(f"{entry.name}: entry type {entry.type!r} has no Windows meaning")

    def _whiteout(self, name: str, parts: list[str]) -> None:
        base = parts[-1]
        if base.startswith(WHITEOUT_META_PREFIX):
            raise bad_archive(f"{name}: opaque and AUFS whiteouts are not part of Windows layers")
        target = base[len(WHITEOUT_PREFIX):]
        in_files = parts[0] == "Files" and len(parts) >= 2
        in_uvm = parts[0] == "UtilityVM" and len(parts) >= 3 and parts[1] == "Files"
        if not (in_files or in_uvm) or not target:
            raise bad_archive(f"invalid tombstone {name}")
        if not self.parents:
            raise bad_archive(f"{name}: a base layer cannot have deletions (it has no parent)")
        if in_uvm:
            self._init_uvm()
        try:
            d = self._resolve_dir(parts[:-1], name)
        except InvalidArchive:
            d = None
        if d is not None and (stored := self._lookup(d, target)) is not None:
            dfd = self._open_dir(d)
            try:
                self._remove(d, dfd, stored)
            finally:
                os.close(dfd)
            target = stored
        elif in_uvm:
            raise bad_archive(f"{name}: deletes a UtilityVM path that does not exist")
        if in_files:
            rel_dir = (d.split("/", 1)[1] if d and "/" in d else "") if d is not None else (
                "/".join(parts[1:-1]))
            rel = f"{rel_dir}/{target}" if rel_dir else target
            if fold(rel) not in self._tomb_keys:
                self._tomb_keys.add(fold(rel))
                self.tombstones.append(rel)

    def _hardlink(self, entry: TarEntry, parts: list[str]) -> None:
        name = entry.name
        target = posixpath.normpath(entry.linkname.replace("\\", "/")) if entry.linkname else ""
        tparts = target.split("/")
        if not target or target.startswith("/") or ".." in tparts or "." in tparts:
            raise UnsafeArchive(f"hard link {name} -> {entry.linkname!r} leaves the layer")

        def under_files(p: list[str]) -> bool:
            return (p[0] == "Files" and len(p) >= 2) or (
                p[0] == "UtilityVM" and len(p) >= 3 and p[1] == "Files")

        if not under_files(parts) or not under_files(tparts):
            raise bad_archive(f"invalid hard link in layer: {name} -> {target}")
        roots = [self.root] + (self.parents if tparts[0] == "Files" else [])
        src: tuple[int, str, str] | None = None  # (root fd, dir, stored name)
        for i, r in enumerate(roots):
            try:
                tdir = self._resolve_dir(tparts[:-1], name, None if i == 0 else r)
                tname = (self._lookup(tdir, tparts[-1]) if i == 0
                         else _lookup_in(r, tdir, tparts[-1]))
            except (InvalidArchive, FileNotFoundError, NotADirectoryError):
                continue
            if tname is not None:
                src = (r, tdir, tname)
                break
        if src is None:
            raise bad_archive(f"failed to find link target for {name!r} -> {target!r}")
        r, tdir, tname = src
        d = self._resolve_dir(parts[:-1], name, create_top=True)
        sfd = self._open_dir(tdir, r)
        dfd = self._open_dir(d)
        try:
            st = os.stat(tname, dir_fd=sfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise bad_archive(f"hard link {name} -> {target}: the target is a directory")
            stored = self._lookup(d, parts[-1])
            if stored is not None:
                self._remove(d, dfd, stored)
            new = stored or parts[-1]
            os.link(tname, new, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            self._index(d).names[fold(new)] = new
            if r != self.root:
                # a link into a parent layer: diff writes it back as a link, as it came
                self.crosslinks[f"{d}/{new}"] = f"{tdir}/{tname}"
                adopt_side_files(r, self.root)
            if stat.S_ISLNK(st.st_mode):
                meta = (self.linkmeta if r == self.root else read_linkmeta(r)).get(
                    f"{tdir}/{tname}")
                if meta is not None:
                    self.linkmeta[f"{d}/{new}"] = meta
            # A Windows file's streams belong to the file: the new name gets them too.
            key = fold(tname) + ":"
            for other in sorted(os.listdir(sfd)):
                if fold(other).startswith(key):
                    sname = new + other[len(tname):]
                    os.link(other, sname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                    self._index(d).names[fold(sname)] = sname
        finally:
            os.close(sfd)
            os.close(dfd)

    def _add(self, reader: TarReader, entry: TarEntry, parts: list[str]) -> None:
        name = entry.name
        xattrs = pax_to_xattrs(entry.pax, name)
        if parts[0] == "UtilityVM":
            self._init_uvm()
        if len(parts) == 1:  # a top directory itself: its metadata
            if entry.type != DIRECTORY:
                raise bad_archive(f"{name} must be a directory")
            d, stored = "", self._resolve_dir(parts, name, create_top=True)
        else:
            d = self._resolve_dir(parts[:-1], name, create_top=True)
            stored = self._lookup(d, parts[-1]) or parts[-1]
        rel = f"{d}/{stored}" if d else stored
        dfd = self._open_dir(d)
        try:
            exists = self._lookup(d, stored) is not None
            if exists:
                st = os.stat(stored, dir_fd=dfd, follow_symlinks=False)
                if entry.type != DIRECTORY or not stat.S_ISDIR(st.st_mode):
                    self._remove(d, dfd, stored)
                    exists = False
            atime = entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns
            if entry.type == DIRECTORY:
                if not exists:
                    os.mkdir(stored, 0o755, dir_fd=dfd)
                    self._index(d).names[fold(stored)] = stored
                fd = os.open(stored, DIR_FLAGS, dir_fd=dfd)
                try:
                    set_win_xattrs(fd, xattrs, replace=True, layer_fd=self.root)
                finally:
                    os.close(fd)
                self._dir_times.append((rel, atime, entry.mtime_ns))
            elif entry.type == SYMLINK:
                os.symlink(entry.linkname, stored, dir_fd=dfd)
                self._index(d).names[fold(stored)] = stored
                self.linkmeta[rel] = xattrs
                os.utime(stored, ns=(atime, entry.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            else:
                flags = NEW_FILE if name not in MUTATED_FILES else NEW_FILE_RW
                fd = os.open(stored, flags, 0o644, dir_fd=dfd)
                self._index(d).names[fold(stored)] = stored
                try:
                    reader.copy_data(entry, fd)
                    if entry.size == 0 and entry.type_bits == MODE_REG:
                        xattrs[X_EMPTY_MODE] = b"1"  # go-winio saw a data stream: keep its mode
                    set_win_xattrs(fd, xattrs, replace=False, layer_fd=self.root)
                    os.utime(fd, ns=(atime, entry.mtime_ns))
                    bak = MUTATED_FILES.get(name)
                    if bak is not None:
                        self._backup(fd, entry.size, bak)
                finally:
                    os.close(fd)
                self.size += entry.size
            self._last_main = (d, stored)
        finally:
            os.close(dfd)

    def _backup(self, fd: int, size: int, bak: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bak, dir_fd=self.root)
        out = os.open(bak, NEW_FILE, 0o644, dir_fd=self.root)
        try:
            copy_file_data(fd, out, size)
        finally:
            os.close(out)

    def _stream(self, reader: TarReader, entry: TarEntry, parts: list[str]) -> None:
        name = entry.name
        main, _, stream = parts[-1].partition(":")
        if entry.type not in REGULAR_TYPES or not main or not stream or stream.endswith(":"):
            raise bad_archive(
                f"{name}: an alternate data stream must be a regular entry 'file:name'")
        d = self._resolve_dir(parts[:-1], name)
        stored_main = self._lookup(d, main)
        if stored_main is None:
            raise bad_archive(f"{name}: alternate data stream of a missing file")
        sname = f"{stored_main}:{stream}"
        dfd = self._open_dir(d)
        try:
            old = self._lookup(d, sname)
            if old is not None:
                self._remove(d, dfd, old, with_streams=False)
            fd = os.open(sname, NEW_FILE, 0o644, dir_fd=dfd)
            self._index(d).names[fold(sname)] = sname
            try:
                reader.copy_data(entry, fd)
                key = (d, fold(stored_main))
                index = self._stream_index.get(key, 0)
                self._stream_index[key] = index + 1
                xattrs = pax_to_xattrs(entry.pax, name)
                xattrs[X_STREAM_INDEX] = b"%d" % index
                set_win_xattrs(fd, xattrs, replace=False, layer_fd=self.root)
                atime = entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns
                os.utime(fd, ns=(atime, entry.mtime_ns))
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    def finish(self) -> None:
        """Write tombstones and symlink metadata, then the directories' times (deepest first)."""
        self._drop_cached()
        if self.tombstones:
            write_small_file(self.root, TOMBSTONES, format_tombstones(self.tombstones))
        if self.linkmeta:
            obj = {p: {k: base64.b64encode(v).decode() for k, v in m.items()}
                   for p, m in sorted(self.linkmeta.items())}
            write_small_file(self.root, LINKMETA, json.dumps(obj, sort_keys=True).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(LINKMETA, dir_fd=self.root)
        if self.crosslinks:
            write_small_file(self.root, CROSSLINKS,
                         json.dumps(self.crosslinks, sort_keys=True).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(CROSSLINKS, dir_fd=self.root)
        for rel, atime, mtime in reversed(self._dir_times):
            try:
                fd = open_beneath(self.root, rel, DIR_FLAGS)
            except OSError:
                continue  # removed by a later whiteout
            try:
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)


def _copy_dir_meta(src: int, dst: int) -> None:
    set_win_xattrs(dst, read_win_xattrs(src), replace=True)


def _resolve_in(root: int, parts: list[str], name: str) -> str:
    cur = ""
    for part in parts:
        real = _lookup_in(root, cur, part)
        if real is None:
            raise bad_archive(f"{name}: parent directory {'/'.join(parts)!r} is missing")
        cur = f"{cur}/{real}" if cur else real
    return cur


def _lookup_in(root: int, d: str, name: str) -> str | None:
    try:
        fd = open_beneath(root, d, DIR_FLAGS)
    except OSError:
        return None
    try:
        key = fold(name)
        for n in os.listdir(fd):
            if fold(n) == key:
                return n
    finally:
        os.close(fd)
    return None


def import_layer(stream_reader: TarReader, root_fd: int, parent_fds: list[int],
                 progress: Callable[[int], None] | None = None) -> int:
    """Apply a Windows layer tar beneath ``root_fd``; returns the bytes of file data (hcsshim)."""
    try:
        return Importer(root_fd, parent_fds).apply(stream_reader, progress)
    except GraphDriverError:
        raise
    except OSError as exc:
        raise from_oserror(exc, "importing the Windows layer") from exc
