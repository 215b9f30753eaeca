"""Windows container layer tars (go-winio backuptar semantics): import for apply, write for diff.

A Windows layer tar (what hcsshim's ``ociwclayer`` exports and imports, and what moby's
windowsfilter driver streams) is a PAX tar whose entries live under three top directories:
``Files/`` (the container's ``C:\\``), ``Hives/`` (registry deltas) and ``UtilityVM/Files/`` (the
utility VM image of base layers).  Windows metadata rides in PAX records:

- ``MSWINDOWS.fileattr``: the Win32 file attributes, decimal (``FILE_ATTRIBUTE_DIRECTORY`` = 16...);
- ``MSWINDOWS.rawsd``: the self-relative security descriptor, base64 (``MSWINDOWS.sd``: the legacy
  SDDL form);
- ``MSWINDOWS.mountpoint``: present on a symlink entry that is a junction (mount point);
- ``MSWINDOWS.xattr.<name>``: an NTFS extended attribute, base64;
- ``LIBARCHIVE.creationtime``: the creation time, ``sec[.nsec]``;
- ``mtime``/``atime``/``ctime``: Go writes them in PAX because Windows times have sub-second parts.

An alternate data stream of ``Files/a.txt`` is its own regular entry ``Files/a.txt:name`` right
after the file (the ``:$DATA`` suffix dropped).  Deleted files are ``.wh.NAME`` entries (whiteouts,
``Files/`` and ``UtilityVM/Files/`` only), second names of a file are hard-link entries.

How this module keeps that on a Linux filesystem (the windowsfilter driver's layer directory):

- every entry's Windows metadata is kept in ``user.mswindows.*`` extended attributes of the file:
  ``fileattr`` (decimal text), ``rawsd`` (the binary SD), ``sd`` (SDDL), ``mountpoint``,
  ``xattr.<name>`` (binary EA value), ``creationtime``, ``mtime``/``atime``/``ctime`` (the PAX
  strings verbatim) and ``pax.<key>`` for any other record, so ``diff`` writes every record back
  unchanged.  Linux refuses ``user.*`` xattrs on symlinks, so a symlink's metadata is kept in the
  sidecar ``linkmeta.json`` at the layer root instead;
- an alternate data stream is a regular file named ``file:stream`` beside its file (Windows names
  cannot contain ``:``, so this never collides); ``user.mswindows.streamindex`` keeps its place
  among its file's streams, so ``diff`` writes them in the order they came;
- deletions are ``tombstones.txt`` in hcsshim's format: a UTF-8 BOM and ``Version 1.0``, then one
  ``\\path`` (relative to ``Files``, backslashes) per line;
- Windows names are case-insensitive: every path of an entry, whiteout or hard-link target is
  matched against the stored names regardless of case (``fold``), the stored spelling is kept.

A hard link to a parent layer's file (hcsshim links across layers) is a hard link to that
file's inode; ``crosslinks.json`` at the layer root remembers the name it was given so ``diff``
writes it back as a link.  A diff layer that touches ``UtilityVM`` starts from a clone of its
parent's utility VM (hard links; directories, symlinks and the BCD files copied), as hcsshim's
``initUtilityVM`` does.  The BCD files of an imported layer are also copied to ``bcd.bak``,
``bcd.log.bak``, ``bcd.log1.bak`` and ``bcd.log2.bak`` at the layer root.

``diff`` output order is hcsshim's exporter's: the top directories, and inside every directory the
names sorted bytewise, each directory followed by its alternate streams, then the whiteouts of its
tombstones, then its contents.  Mode bits are go-winio's: ``0o40000`` for directories,
``0o100000`` for files with data, ``0o120000`` for reparse points, ``0o644`` for hard links.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import GraphDriverError, InvalidArchive, UnsafeArchive, from_oserror
from .export import TarOut
from .pathres import open_beneath
from .tarstream import DIRECTORY, HARDLINK, REGULAR_TYPES, SYMLINK, TarEntry, TarReader
from .whiteout import WHITEOUT_META_PREFIX, WHITEOUT_PREFIX

HDR_FILE_ATTRIBUTES = "MSWINDOWS.fileattr"
HDR_SECURITY_DESCRIPTOR = "MSWINDOWS.sd"
HDR_RAW_SECURITY_DESCRIPTOR = "MSWINDOWS.rawsd"
HDR_MOUNT_POINT = "MSWINDOWS.mountpoint"
HDR_EA_PREFIX = "MSWINDOWS.xattr."
HDR_CREATION_TIME = "LIBARCHIVE.creationtime"

FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_REPARSE_POINT = 0x400

TOP_DIRS = ("Files", "Hives", "UtilityVM")
TOMBSTONES = "tombstones.txt"
LINKMETA = "linkmeta.json"
CROSSLINKS = "crosslinks.json"
TOMBSTONE_HEADER = b"\xef\xbb\xbfVersion 1.0"

# Files the Windows import process mutates; backed up at import, served from the backup by diff
# getters so tar-split can re-assemble the original tar (hcsshim ociwclayer mutatedFiles).
MUTATED_FILES = {
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD": "bcd.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG": "bcd.log.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG1": "bcd.log1.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG2": "bcd.log2.bak",
}

XATTR_PREFIX = "user.mswindows."
_X_FILEATTR = XATTR_PREFIX + "fileattr"
_X_RAWSD = XATTR_PREFIX + "rawsd"
_X_SD = XATTR_PREFIX + "sd"
_X_MOUNTPOINT = XATTR_PREFIX + "mountpoint"
_X_EA = XATTR_PREFIX + "xattr."
_X_CTIME_CREATION = XATTR_PREFIX + "creationtime"
_X_PAX = XATTR_PREFIX + "pax."
_X_STREAM_INDEX = XATTR_PREFIX + "streamindex"  # an alternate stream's place after its file
_TIME_KEYS = ("mtime", "atime", "ctime")
# Records that describe the tar entry itself, not the file: never stored.
_STRUCTURAL = frozenset(("path", "linkpath", "size"))
_XATTR_NAME_MAX = 255

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_RW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_MODE_DIR = 0o40000
_MODE_REG = 0o100000
_MODE_LNK = 0o120000


def fold(name: str) -> str:
    """The case-insensitive key of a Windows name (simple, one-to-one upper-casing as NTFS)."""
    if name.isascii():
        return name.upper()
    return "".join(u if len(u := c.upper()) == 1 else c for c in name)


# ----- metadata: PAX records <-> user.mswindows.* xattrs -------------------------------------


def _bad(msg: str) -> InvalidArchive:
    return InvalidArchive(f"invalid Windows layer: {msg}")


def _b64decode(value: str, key: str, name: str) -> bytes:
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise _bad(f"{name}: {key} is not base64") from exc


def _check_pax_time(value: str, key: str, name: str) -> None:
    whole, _, frac = value.partition(".")
    digits = whole[1:] if whole.startswith("-") else whole
    if not digits.isascii() or not digits.isdigit() or (frac and not (
            frac.isascii() and frac.isdigit())):
        raise _bad(f"{name}: {key} {value!r} is not a time")


def pax_to_xattrs(pax: dict[str, str], name: str) -> dict[str, bytes]:
    """The ``user.mswindows.*`` xattrs that keep an entry's PAX records (validated as go-winio)."""
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key in _STRUCTURAL:
            continue
        raw = value.encode("utf-8", "surrogateescape")
        if key == HDR_FILE_ATTRIBUTES:
            if not value.isascii() or not value.isdigit() or int(value) > 0xFFFFFFFF:
                raise _bad(f"{name}: {key} {value!r} is not a 32-bit decimal number")
            out[_X_FILEATTR] = raw
        elif key == HDR_RAW_SECURITY_DESCRIPTOR:
            out[_X_RAWSD] = _b64decode(value, key, name)
        elif key == HDR_SECURITY_DESCRIPTOR:
            out[_X_SD] = raw
        elif key == HDR_MOUNT_POINT:
            out[_X_MOUNTPOINT] = raw
        elif key.startswith(HDR_EA_PREFIX) and len(key) > len(HDR_EA_PREFIX):
            xname = _X_EA + key[len(HDR_EA_PREFIX):]
            if len(xname.encode("utf-8", "surrogateescape")) > _XATTR_NAME_MAX:
                raise _bad(f"{name}: extended attribute name too long")
            out[xname] = _b64decode(value, key, name)
        elif key == HDR_CREATION_TIME:
            _check_pax_time(value, key, name)
            out[_X_CTIME_CREATION] = raw
        elif key in _TIME_KEYS:
            out[XATTR_PREFIX + key] = raw
        else:
            xname = _X_PAX + key
            if len(xname.encode("utf-8", "surrogateescape")) > _XATTR_NAME_MAX:
                raise _bad(f"{name}: PAX record name {key[:40]!r}... too long")
            out[xname] = raw
    return out


def xattrs_to_pax(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """The PAX records (key -> raw value) an entry gets back from its stored xattrs."""
    out: dict[str, bytes] = {}
    for xname, value in xattrs.items():
        if not xname.startswith(XATTR_PREFIX):
            continue
        if xname == _X_FILEATTR:
            out[HDR_FILE_ATTRIBUTES] = value
        elif xname == _X_RAWSD:
            out[HDR_RAW_SECURITY_DESCRIPTOR] = base64.b64encode(value)
        elif xname == _X_SD:
            out[HDR_SECURITY_DESCRIPTOR] = value
        elif xname == _X_MOUNTPOINT:
            out[HDR_MOUNT_POINT] = value
        elif xname.startswith(_X_EA):
            out[HDR_EA_PREFIX + xname[len(_X_EA):]] = base64.b64encode(value)
        elif xname == _X_CTIME_CREATION:
            out[HDR_CREATION_TIME] = value
        elif xname.startswith(_X_PAX):
            out[xname[len(_X_PAX):]] = value
        elif xname[len(XATTR_PREFIX):] in _TIME_KEYS:
            out[xname[len(XATTR_PREFIX):]] = value
    return out


def read_win_xattrs(path: int | str) -> dict[str, bytes]:
    """The ``user.mswindows.*`` xattrs of an open fd (or a path; symlinks not followed)."""
    follow = isinstance(path, int)  # an fd: the flag is not allowed (and means nothing)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for n in names:
        if n.startswith(XATTR_PREFIX):
            with contextlib.suppress(OSError):
                out[n] = os.getxattr(path, n, follow_symlinks=follow)
    return out


def _set_xattrs(fd: int, xattrs: dict[str, bytes], replace: bool) -> None:
    if replace:
        for n in os.listxattr(fd):
            if n.startswith(XATTR_PREFIX) and n not in xattrs:
                os.removexattr(fd, n)
    for n, v in xattrs.items():
        os.setxattr(fd, n, v)


def file_attributes(xattrs: dict[str, bytes]) -> int:
    raw = xattrs.get(_X_FILEATTR)
    return int(raw) if raw and raw.isdigit() else 0


def _time_ns(value: bytes | None) -> int | None:
    if value is None:
        return None
    text = value.decode("ascii", "replace")
    whole, _, frac = text.partition(".")
    try:
        sec = int(whole) if whole not in ("", "-") else 0
        ns = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        return None
    neg = whole.startswith("-")
    return sec * 1_000_000_000 - ns if neg else sec * 1_000_000_000 + ns


# ----- tombstones.txt and linkmeta.json -------------------------------------------------------


def parse_tombstones(data: bytes) -> list[str]:
    """Deleted paths (relative to ``Files``, "/"-separated) from hcsshim's tombstones.txt."""
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    if not lines or lines[0].lstrip("\ufeff").strip() != "Version 1.0":
        raise GraphDriverError("invalid tombstones.txt: no 'Version 1.0' header")
    out = []
    for line in lines[1:]:
        p = line.strip("\r").replace("\\", "/").strip("/")
        if p:
            out.append(p)
    return out


def format_tombstones(paths: list[str]) -> bytes:
    body = "".join("\\" + p.replace("/", "\\") + "\n" for p in paths)
    return TOMBSTONE_HEADER + b"\n" + body.encode("utf-8", "surrogateescape")


def read_tombstones(layer_fd: int) -> list[str]:
    try:
        fd = os.open(TOMBSTONES, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer_fd)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as f:
        return parse_tombstones(f.read())


def read_linkmeta(layer_fd: int) -> dict[str, dict[str, bytes]]:
    try:
        fd = os.open(LINKMETA, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer_fd)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        obj = json.loads(f.read())
    return {path: {k: base64.b64decode(v) for k, v in meta.items()} for path, meta in obj.items()}


def read_crosslinks(layer_fd: int) -> dict[str, str]:
    """Names of this layer that are hard links to a parent layer's file -> that file's path."""
    try:
        fd = os.open(CROSSLINKS, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer_fd)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        return {str(k): str(v) for k, v in json.loads(f.read()).items()}


def _write_small(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, _NEW_FILE, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


# ----- import: apply a Windows layer tar into a layer directory -------------------------------


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
                sfd = open_beneath(parent, "UtilityVM/Files", _DIR_FLAGS)
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
                dst = open_beneath(self.root, f"{top}/Files", _DIR_FLAGS)
                try:
                    _copy_dir_meta(sfd, dst)
                    self._clone_uvm(sfd, dst, f"{top}/Files", read_linkmeta(parent))
                finally:
                    os.close(dst)
            finally:
                os.close(sfd)
            return

    def _clone_uvm(self, sfd: int, dfd: int, rel: str,
                   linkmeta: dict[str, dict[str, bytes]]) -> None:
        for n in _sorted_names(sfd):
            st = os.stat(n, dir_fd=sfd, follow_symlinks=False)
            path = f"{rel}/{n}"
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(n, 0o755, dir_fd=dfd)
                s2 = os.open(n, _DIR_FLAGS, dir_fd=sfd)
                d2 = os.open(n, _DIR_FLAGS, dir_fd=dfd)
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
                    out = os.open(n, _NEW_FILE, 0o644, dir_fd=dfd)
                    try:
                        _copy_range(src, out, st.st_size)
                        _set_xattrs(out, read_win_xattrs(src), replace=False)
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
            fd = open_beneath(self.root if root is None else root, d, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise UnsafeArchive(f"path {d!r} goes through a symbolic link") from exc
            if exc.errno == errno.ENOTDIR:
                with contextlib.suppress(OSError):
                    st = os.stat(d, dir_fd=self.root if root is None else root,
                                 follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise UnsafeArchive(f"path {d!r} goes through a symbolic link") from exc
                raise _bad(f"path {d!r} goes through a file") from exc
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
                    raise _bad(f"{name}: parent directory {'/'.join(parts)!r} is missing")
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
            raise _bad(f"{shown!r}: backslash in an entry name")
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts):
            if ".." in parts:
                raise UnsafeArchive(f"entry {shown!r} leaves the layer")
            raise _bad(f"entry {shown!r}: a Windows layer holds only entries under Files/, "
                       "Hives/ and UtilityVM/ (no root entry, no ./ prefix)")
        if parts[0] not in TOP_DIRS:
            raise _bad(f"entry {shown!r} is outside Files/, Hives/ and UtilityVM/")
        return parts

    def _entry(self, reader: TarReader, entry: TarEntry) -> None:
        parts = self._split(entry)
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._last_main = None
            self._whiteout(entry.name, parts)
        elif entry.type == HARDLINK:
            self._last_main = None
            self._hardlink(entry, parts)
        elif ":" in base:
            self._stream(reader, entry, parts)
        elif entry.type == DIRECTORY or entry.type in REGULAR_TYPES or entry.type == SYMLINK:
            self._add(reader, entry, parts)
        else:
            raise _bad(f"{entry.name}: entry type {entry.type!r} has no Windows meaning")

    def _whiteout(self, name: str, parts: list[str]) -> None:
        base = parts[-1]
        if base.startswith(WHITEOUT_META_PREFIX):
            raise _bad(f"{name}: opaque and AUFS whiteouts are not part of Windows layers")
        target = base[len(WHITEOUT_PREFIX):]
        in_files = parts[0] == "Files" and len(parts) >= 2
        in_uvm = parts[0] == "UtilityVM" and len(parts) >= 3 and parts[1] == "Files"
        if not (in_files or in_uvm) or not target:
            raise _bad(f"invalid tombstone {name}")
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
            raise _bad(f"invalid hard link in layer: {name} -> {target}")
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
            raise _bad(f"failed to find link target for {name!r} -> {target!r}")
        r, tdir, tname = src
        d = self._resolve_dir(parts[:-1], name, create_top=True)
        sfd = self._open_dir(tdir, r)
        dfd = self._open_dir(d)
        try:
            st = os.stat(tname, dir_fd=sfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise _bad(f"hard link {name} -> {target}: the target is a directory")
            stored = self._lookup(d, parts[-1])
            if stored is not None:
                self._remove(d, dfd, stored)
            new = stored or parts[-1]
            os.link(tname, new, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            self._index(d).names[fold(new)] = new
            if r != self.root:
                # a link into a parent layer: diff writes it back as a link, as it came
                self.crosslinks[f"{d}/{new}"] = f"{tdir}/{tname}"
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
                raise _bad(f"{name} must be a directory")
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
                fd = os.open(stored, _DIR_FLAGS, dir_fd=dfd)
                try:
                    _set_xattrs(fd, xattrs, replace=True)
                finally:
                    os.close(fd)
                self._dir_times.append((rel, atime, entry.mtime_ns))
            elif entry.type == SYMLINK:
                os.symlink(entry.linkname, stored, dir_fd=dfd)
                self._index(d).names[fold(stored)] = stored
                self.linkmeta[rel] = xattrs
                os.utime(stored, ns=(atime, entry.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            else:
                flags = _NEW_FILE if name not in MUTATED_FILES else _NEW_FILE_RW
                fd = os.open(stored, flags, 0o644, dir_fd=dfd)
                self._index(d).names[fold(stored)] = stored
                try:
                    reader.copy_data(entry, fd)
                    _set_xattrs(fd, xattrs, replace=False)
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
        out = os.open(bak, _NEW_FILE, 0o644, dir_fd=self.root)
        try:
            _copy_range(fd, out, size)
        finally:
            os.close(out)

    def _stream(self, reader: TarReader, entry: TarEntry, parts: list[str]) -> None:
        name = entry.name
        main, _, stream = parts[-1].partition(":")
        if entry.type not in REGULAR_TYPES or not main or not stream or stream.endswith(":"):
            raise _bad(f"{name}: an alternate data stream must be a regular entry 'file:name'")
        d = self._resolve_dir(parts[:-1], name)
        stored_main = self._lookup(d, main)
        if stored_main is None:
            raise _bad(f"{name}: alternate data stream of a missing file")
        sname = f"{stored_main}:{stream}"
        dfd = self._open_dir(d)
        try:
            old = self._lookup(d, sname)
            if old is not None:
                self._remove(d, dfd, old, with_streams=False)
            fd = os.open(sname, _NEW_FILE, 0o644, dir_fd=dfd)
            self._index(d).names[fold(sname)] = sname
            try:
                reader.copy_data(entry, fd)
                key = (d, fold(stored_main))
                index = self._stream_index.get(key, 0)
                self._stream_index[key] = index + 1
                xattrs = pax_to_xattrs(entry.pax, name)
                xattrs[_X_STREAM_INDEX] = b"%d" % index
                _set_xattrs(fd, xattrs, replace=False)
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
            _write_small(self.root, TOMBSTONES, format_tombstones(self.tombstones))
        if self.linkmeta:
            obj = {p: {k: base64.b64encode(v).decode() for k, v in m.items()}
                   for p, m in sorted(self.linkmeta.items())}
            _write_small(self.root, LINKMETA, json.dumps(obj, sort_keys=True).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(LINKMETA, dir_fd=self.root)
        if self.crosslinks:
            _write_small(self.root, CROSSLINKS,
                         json.dumps(self.crosslinks, sort_keys=True).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(CROSSLINKS, dir_fd=self.root)
        for rel, atime, mtime in reversed(self._dir_times):
            try:
                fd = open_beneath(self.root, rel, _DIR_FLAGS)
            except OSError:
                continue  # removed by a later whiteout
            try:
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)


def copy_data(src: int, dst: int, size: int) -> None:
    """``size`` bytes from the start of ``src`` to ``dst``: copy_file_range (reflinks where the
    filesystem can), else sendfile (another filesystem: copy_file_range refuses with EXDEV)."""
    off = 0
    use_range = True
    while off < size:
        if use_range:
            try:
                n = os.copy_file_range(src, dst, size - off, off, off)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_range = False
                continue
        else:
            os.lseek(dst, off, os.SEEK_SET)
            n = os.sendfile(dst, src, off, size - off)
        if n == 0:
            break
        off += n


_copy_range = copy_data


def _copy_dir_meta(src: int, dst: int) -> None:
    _set_xattrs(dst, read_win_xattrs(src), replace=True)


def _resolve_in(root: int, parts: list[str], name: str) -> str:
    cur = ""
    for part in parts:
        real = _lookup_in(root, cur, part)
        if real is None:
            raise _bad(f"{name}: parent directory {'/'.join(parts)!r} is missing")
        cur = f"{cur}/{real}" if cur else real
    return cur


def _lookup_in(root: int, d: str, name: str) -> str | None:
    try:
        fd = open_beneath(root, d, _DIR_FLAGS)
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


# ----- walking a stored layer (diff, changes, size) -------------------------------------------


@dataclass
class LayerItem:
    """One thing a layer holds, in exporter order."""

    path: str  # "Files/a/b" as stored
    kind: str  # "entry" or "whiteout"
    st: os.stat_result | None = None
    streams: list[str] = field(default_factory=list)  # stored names of alternate streams
    link_to: str | None = None  # an earlier name of the same file (hard link)


def _stream_index(dfd: int, name: str) -> int:
    """Where the import put an alternate stream among its file's (the tar's order)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except OSError:
        return 1 << 30
    try:
        return int(os.getxattr(fd, _X_STREAM_INDEX))
    except (OSError, ValueError):
        return 1 << 30
    finally:
        os.close(fd)


def _sorted_names(fd: int) -> list[str]:
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
        names = _sorted_names(dfd)
        streams: dict[str, list[str]] = {}
        for n in names:
            if ":" in n:
                streams.setdefault(fold(n.split(":", 1)[0]), []).append(n)
        for group in streams.values():
            if len(group) > 1:
                group.sort(key=lambda n: (_stream_index(dfd, n), os.fsencode(n)))
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
                sub = os.open(n, _DIR_FLAGS, dir_fd=dfd)
                try:
                    yield from walk(rel, sub)
                finally:
                    os.close(sub)

    for top in TOP_DIRS:
        try:
            fd = os.open(top, _DIR_FLAGS, dir_fd=layer_fd)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            st = os.fstat(fd)
            if os.listdir(fd) or _X_FILEATTR in read_win_xattrs(fd):
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


# ----- export: write a Windows layer tar ---------------------------------------------------


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _block(name: bytes, typeflag: bytes, mode: int, size: int, mtime: int,
           linkname: bytes) -> bytes:
    b = bytearray(512)
    b[0:len(name)] = name
    b[100:108] = _octal(mode, 8)
    b[108:116] = _octal(0, 8)
    b[116:124] = _octal(0, 8)
    b[124:136] = _octal(size, 12)
    b[136:148] = _octal(mtime if 0 <= mtime < 8**11 else 0, 12)
    b[148:156] = b"        "
    b[156:157] = typeflag
    b[157:157 + len(linkname)] = linkname
    b[257:265] = b"ustar\x0000"
    b[329:337] = _octal(0, 8)
    b[337:345] = _octal(0, 8)
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def _fits(name: bytes) -> bool:
    return len(name) <= 100 and name.isascii()


def encode_header(name: bytes, typeflag: bytes, mode: int, size: int, mtime: int,
                  records: dict[str, bytes], linkname: bytes = b"") -> bytes:
    """A Go-style PAX header: an ``x`` header with the sorted records (if any), then ustar."""
    recs = dict(records)
    short = name
    if not _fits(name):
        recs["path"] = name
        short = bytes(c if 32 <= c < 127 else 0x5F for c in name)[-100:]
    link = linkname
    if not _fits(linkname):
        recs["linkpath"] = linkname
        link = bytes(c if 32 <= c < 127 else 0x5F for c in linkname)[-100:]
    if size >= 8**11:
        recs["size"] = b"%d" % size
    main = _block(short, typeflag, mode, size if size < 8**11 else 0, mtime, link)
    if not recs:
        return main
    body = b"".join(_pax_record(k.encode("utf-8", "surrogateescape"), recs[k])
                    for k in sorted(recs))
    d, _, base = name.rstrip(b"/").rpartition(b"/")
    pax_name = (d + b"/" if d else b"") + b"PaxHeaders.0/" + base
    if not _fits(pax_name):
        pax_name = b"PaxHeaders.0/" + bytes(c if 32 <= c < 127 else 0x5F for c in base)[-80:]
    return _block(pax_name, b"x", 0o644, len(body), mtime, b"") + body + bytes(
        -len(body) % 512) + main


def _mtime_s(records: dict[str, bytes], st: os.stat_result) -> int:
    ns = _time_ns(records.get("mtime"))
    if ns is None:
        return int(st.st_mtime)
    return ns // 1_000_000_000


def write_layer_tar(out_fd: int, layer_fd: int,
                    progress: Callable[[int], None] | None = None) -> None:
    """Stream the Windows layer tar of the layer directory ``layer_fd`` to ``out_fd``."""
    out = TarOut(out_fd, progress)
    linkmeta = read_linkmeta(layer_fd)
    for item in walk_layer(layer_fd):
        name = os.fsencode(item.path)
        if item.kind == "whiteout":
            d, _, base = item.path.rpartition("/")
            out.add(encode_header(os.fsencode(f"{d}/{WHITEOUT_PREFIX}{base}"), b"0", 0, 0, 0, {}))
            continue
        st = item.st
        assert st is not None
        if stat.S_ISLNK(st.st_mode):
            xattrs = linkmeta.get(item.path, {})
        else:
            fd = open_beneath(layer_fd, item.path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                xattrs = read_win_xattrs(fd)
            except BaseException:
                os.close(fd)
                raise
        records = xattrs_to_pax(xattrs)
        mtime = _mtime_s(records, st)
        if stat.S_ISLNK(st.st_mode):
            dirbit = _MODE_DIR if file_attributes(xattrs) & FILE_ATTRIBUTE_DIRECTORY else 0
            out.add(encode_header(name, b"2", _MODE_LNK | dirbit, 0, mtime, records,
                                  os.fsencode(os.readlink(item.path, dir_fd=layer_fd))))
            continue
        try:
            if item.link_to is not None:
                keep = {k: v for k, v in records.items()
                        if k in (HDR_FILE_ATTRIBUTES, HDR_CREATION_TIME, *_TIME_KEYS)}
                out.add(encode_header(name, b"1", 0o644, 0, mtime, keep,
                                      os.fsencode(item.link_to)))
            elif stat.S_ISDIR(st.st_mode):
                out.add(encode_header(name, b"5", _MODE_DIR, 0, mtime, records))
            else:
                size = st.st_size
                mode = _MODE_REG if size else 0
                out.add(encode_header(name, b"0", mode, size, mtime, records))
                out.file_data(fd, size)
                _write_streams(out, layer_fd, item, mode)
            if stat.S_ISDIR(st.st_mode) and item.streams:
                _write_streams(out, layer_fd, item, _MODE_DIR)
        finally:
            os.close(fd)
    out.finish()


def _write_streams(out: TarOut, layer_fd: int, item: LayerItem, mode: int) -> None:
    d = item.path.rpartition("/")[0]
    for sname in item.streams:
        rel = f"{d}/{sname}"
        fd = open_beneath(layer_fd, rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            records = xattrs_to_pax(read_win_xattrs(fd))
            out.add(encode_header(os.fsencode(rel), b"0", mode, st.st_size,
                                  _mtime_s(records, st), records))
            out.file_data(fd, st.st_size)
        finally:
            os.close(fd)
