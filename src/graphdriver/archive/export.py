"""Write layer tars: a whole tree (``write_tree``) or a change list (``write_changes``).

What the entries look like follows moby's pkg/archive (tarAppender.addTarFile):
- names relative to the root, no "./" prefix, directories with a trailing "/";
- numeric uid/gid mapped back through the id map, uname/gname empty;
- mode = permission bits plus setuid/setgid/sticky;
- mtime truncated to whole seconds, no atime/ctime (moby's FileInfoHeader does this so layer
  digests are reproducible; ``changes_dirs`` tolerates it with sameFsTime).  So PAX ``mtime`` is
  only written for times ustar cannot hold (negative or >= 8**11 s);
- a non-directory whose inode has more than one link is written once with its data; later names
  of the same inode are hard-link entries pointing at the first name (order = archive order);
- regular files, directories, symlinks, char/block devices and fifos are written; sockets are
  skipped (Go's tar cannot represent them; moby logs and skips them);
- xattrs as PAX ``SCHILY.xattr.*``, except overlay's own bookkeeping (``trusted.overlay.*``, or
  ``user.overlay.*`` in the userxattr format), ``security.selinux`` (a host label, not layer
  content) and ``system.*`` (ACLs); a version-3 ``security.capability`` is rewritten to version 2
  as moby does.

Entries are written in a deterministic order: within each directory sorted by byte name, each
directory before its contents.  The writer keeps memory constant: headers are packed and small
files read straight into one reusable 1 MiB buffer, large files go from the file to the output
with ``os.sendfile`` (read/write through a reusable buffer where sendfile cannot be used);
"large" is > 256 KiB into a file, > 16 KiB into a pipe (where sendfile only moves page
references).  When the optional native helper ``graphdriver._fastexport`` is built (and
``GRAPHDRIVER_NO_NATIVE`` is not set), ``write_tree`` with an identity id map hands it each
directory's runs of plain entries (one ustar block, no xattr to write, not a hard link, not an
overlay whiteout or opaque directory); it writes the same bytes the Python code below does, into
the same buffer, without holding the GIL.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

from ..errors import GraphDriverError, InvalidArgument, from_oserror
from ..fsutil import raise_open_files_limit
from ..idmap import IDENTITY, IDMap
from .buffers import aligned_buffer
from .changes import Change, ChangeKind
from .native import native_module
from .pipes import grow_pipe
from .tarwriter import (
    BLKTYPE,
    BLOCK,
    CHRTYPE,
    DIRTYPE,
    END_OF_ARCHIVE,
    FIFOTYPE,
    LNKTYPE,
    REGTYPE,
    SYMTYPE,
    TarHeader,
    encode,
    pack_ustar_into,
    padding,
)
from .whiteout import NAIVE, WHITEOUT_OPAQUE_B, WHITEOUT_PREFIX_B, WhiteoutFormat

Progress = Callable[[int], None]
"""Called with the total number of bytes written to the output so far."""

_BUF_SIZE = 1 << 20
_SMALL_FILE = 256 << 10
"""Files up to this size are read into the buffer; bigger ones go out with sendfile."""
_SPARSE_MIN_HOLES = 1 << 20
"""A regular file with at least this many bytes of holes is written as a PAX sparse entry
(``_fastexport.c`` leaves files allocated this much below their size to Python)."""
_SMALL_FILE_PIPE = 16 << 10
"""The same into a pipe: there sendfile moves page references, no copy, worth its syscalls."""
_ZEROS = memoryview(bytes(_SMALL_FILE + BLOCK))
_COPY_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

_CAP_XATTR = "security.capability"
_PROC_FD = os.path.isdir("/proc/self/fd")
#: never exported, besides the format's own overlay xattrs (``WhiteoutFormat.xattr_prefix``)
_SKIPPED_XATTR_PREFIXES = ("security.selinux", "system.")


class _Native(Protocol):
    """graphdriver._fastexport (see its source for the contract)."""

    def list_dir(self, dir_fd: int, /) -> list[bytes]: ...

    def emit(
        self, buf: bytearray | mmap.mmap, pos: int, out_fd: int, dir_fd: int, names: list[bytes],
        start: int, prefix: bytes, skipped_xattr_prefix: str, opaque_xattr: str | None,
        small_file: int, /,
    ) -> tuple[int, int, int, bool]: ...


_native: _Native | None = native_module("_fastexport")  # type: ignore[assignment]


class TarOut:
    """The output side: one reusable batching buffer, sendfile for big data, progress reporting.

    Headers are packed and small files read straight into the buffer (no intermediate bytes
    objects); it is written out whenever the next piece would not fit.
    """

    def __init__(self, fd: int, progress: Progress | None) -> None:
        self.fd = fd
        self.buf = aligned_buffer(_BUF_SIZE)  # see buffers.py: aligned copies run ~2x faster
        self.view = memoryview(self.buf)
        self.pos = 0
        self.progress = progress
        self.written = 0
        self.sendfile_ok = True
        self.chunk: bytearray | None = None
        self.seen: dict[tuple[int, int], bytes] = {}
        try:
            to_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            to_pipe = False
        self.small_file = _SMALL_FILE_PIPE if to_pipe else _SMALL_FILE

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n

    def flush(self) -> None:
        if self.pos:
            self._write_all(self.view[: self.pos])
            self.pos = 0
            if self.progress is not None:
                self.progress(self.written)

    def add(self, data: bytes) -> None:
        n = len(data)
        if self.pos + n > _BUF_SIZE:
            self.flush()
            if n > _BUF_SIZE:
                self._write_all(data)
                if self.progress is not None:
                    self.progress(self.written)
                return
        self.view[self.pos : self.pos + n] = data
        self.pos += n

    def ustar(
        self, name: bytes, typeflag: bytes, mode: int, uid: int, gid: int, size: int,
        mtime: int, linkname: bytes = b"", devmajor: int = 0, devminor: int = 0,
    ) -> bool:
        """Pack a plain ustar header in place; False (nothing written) if it needs PAX."""
        if self.pos + BLOCK > _BUF_SIZE:
            self.flush()
        if pack_ustar_into(self.buf, self.pos, name, typeflag, mode, uid, gid, size, mtime,
                           linkname, devmajor, devminor):
            self.pos += BLOCK
            return True
        return False

    def file_data(self, in_fd: int, size: int) -> None:
        """Exactly *size* bytes of the file, then padding (zeros if the file shrank meanwhile)."""
        padded = size + padding(size)
        if size <= self.small_file:
            if self.pos + padded > _BUF_SIZE:
                self.flush()
            pos = self.pos
            view = self.view
            end = pos + size
            while pos < end:
                n = os.readv(in_fd, [view[pos:end]])
                if not n:
                    break
                pos += n
            stop = self.pos + padded
            if pos < stop:
                view[pos:stop] = _ZEROS[: stop - pos]
            self.pos = stop
            return
        self.flush()
        done = 0
        if self.sendfile_ok:
            done = self._sendfile(in_fd, size)
        if done < size:
            done = self.copy_range(in_fd, done, size)
        self.zeros(padded - done)

    def zeros(self, count: int) -> None:
        """*count* zero bytes (padding, or the part of a file that shrank meanwhile)."""
        while count:
            k = min(count, len(_ZEROS))
            if self.pos + k > _BUF_SIZE:
                self.flush()
            self.view[self.pos : self.pos + k] = _ZEROS[:k]
            self.pos += k
            count -= k

    def _sendfile(self, in_fd: int, size: int) -> int:
        done = 0
        while done < size:
            try:
                n = os.sendfile(self.fd, in_fd, done, size - done)
            except OSError as exc:
                if done == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    self.sendfile_ok = False
                    return 0
                raise
            if n == 0:
                break
            done += n
            self.written += n
        if self.progress is not None:
            self.progress(self.written)
        return done

    def copy_range(self, in_fd: int, done: int, size: int) -> int:
        """Bytes ``done`` to ``size`` of the file, straight out (the buffer is flushed); returns
        the offset reached (less than ``size`` if the file shrank meanwhile)."""
        if self.chunk is None:
            self.chunk = bytearray(_COPY_CHUNK)
        view = memoryview(self.chunk)
        while done < size:
            want = min(size - done, len(view))
            n = os.preadv(in_fd, [view[:want]], done)
            if n == 0:
                break
            self._write_all(view[:n])
            done += n
        return done

    def finish(self) -> None:
        self.add(END_OF_ARCHIVE)
        self.flush()


def _read_xattrs(path: bytes | int, whiteouts: WhiteoutFormat) -> dict[str, bytes]:
    """The exportable xattrs of *path* (not followed) or of an open file descriptor, with the
    format's opaque marker if it has one."""
    follow = isinstance(path, int)  # an fd: the flag must be left at its default
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if (name.startswith(_SKIPPED_XATTR_PREFIXES) or whiteouts.is_private_xattr(name)) \
                and name != whiteouts.opaque_xattr:
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue
            raise
    cap = out.get(_CAP_XATTR)
    if cap is not None and len(cap) > 3 and cap[3] == 3:
        # VFS_CAP_REVISION_3 -> 2: the root uid it names means nothing outside this namespace.
        out[_CAP_XATTR] = cap[:3] + b"\x02" + cap[4:20]
    return out


def _add_entry(
    out: TarOut,
    dir_fd: int | None,
    leaf: bytes,
    full: bytes,
    name: bytes,
    st: os.stat_result,
    idmap: IDMap,
    whiteouts: WhiteoutFormat,
) -> bool:
    """Write one entry; returns True if it is a directory whose contents should follow."""
    mode = st.st_mode
    fmt = stat.S_IFMT(mode)
    is_dir = fmt == stat.S_IFDIR
    wh_named = name.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX_B)
    if is_dir:
        name += b"/"
    perm = mode & 0o7777
    mtime = st.st_mtime_ns // 1_000_000_000
    size = 0
    linkname = b""
    devmajor = devminor = 0
    whiteout = whiteouts.is_whiteout(st)
    if whiteout or wh_named or idmap.is_identity:
        uid, gid = st.st_uid, st.st_gid
    else:
        uid, gid = idmap.to_container(st.st_uid, st.st_gid)

    if is_dir:
        typeflag = DIRTYPE
    elif fmt == stat.S_IFREG:
        typeflag = REGTYPE
        size = st.st_size
    elif fmt == stat.S_IFLNK:
        typeflag = SYMTYPE
        linkname = os.readlink(leaf, dir_fd=dir_fd)
    elif fmt == stat.S_IFCHR or fmt == stat.S_IFBLK:
        typeflag = CHRTYPE if fmt == stat.S_IFCHR else BLKTYPE
        devmajor, devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif fmt == stat.S_IFIFO:
        typeflag = FIFOTYPE
    else:  # sockets (and anything unknown) are skipped
        return False

    if not is_dir and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = out.seen.get(key)
        if first is not None:
            typeflag, linkname, size = LNKTYPE, first, 0
        else:
            out.seen[key] = name

    if whiteout:
        head, _, tail = name.rpartition(b"/")
        name = (head + b"/" if head else b"") + WHITEOUT_PREFIX_B + tail
        perm, typeflag, size, linkname = 0o600, REGTYPE, 0, b""
        devmajor = devminor = 0

    # A file with data is opened first: its xattrs are read through the descriptor.
    in_fd = os.open(leaf, _FILE_FLAGS, dir_fd=dir_fd) if size else -1
    try:
        xattrs = _read_xattrs(in_fd if in_fd >= 0 else full, whiteouts)
        opaque = is_dir and whiteouts.is_opaque_value(xattrs)
        if whiteouts.opaque_xattr is not None:
            xattrs.pop(whiteouts.opaque_xattr, None)
        chunks = _data_map(in_fd, size, st) if in_fd >= 0 else None
        if chunks is not None:
            _add_sparse(out, in_fd, TarHeader(
                name=name, mode=perm, uid=uid, gid=gid, size=size, mtime=mtime, xattrs=xattrs,
            ), chunks)
        elif xattrs or not out.ustar(name, typeflag, perm, uid, gid, size, mtime, linkname,
                                     devmajor, devminor):
            out.add(encode(TarHeader(
                name=name, typeflag=typeflag, mode=perm, uid=uid, gid=gid, size=size,
                mtime=mtime, linkname=linkname, devmajor=devmajor, devminor=devminor,
                xattrs=xattrs,
            )))
        if in_fd >= 0 and chunks is None:
            out.file_data(in_fd, size)
    finally:
        if in_fd >= 0:
            os.close(in_fd)
    if opaque:
        out.add(encode(TarHeader(
            name=name + WHITEOUT_OPAQUE_B, typeflag=REGTYPE, mode=perm & 0o777,
            uid=uid, gid=gid, mtime=mtime,
        )))
    return is_dir


def _data_map(fd: int, size: int, st: os.stat_result) -> list[tuple[int, int]] | None:
    """The data extents (offset, length) of a regular file with at least ``_SPARSE_MIN_HOLES``
    bytes of holes, ending with ``(size, 0)`` when the file ends in a hole (as GNU tar writes
    it); None for any other file (written whole, as moby does, so diffIDs stay Docker's)."""
    if st.st_blocks * 512 + _SPARSE_MIN_HOLES > size:  # the native writer's test too
        return None
    chunks: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from off on
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here
                return None
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        chunks.append((data, hole - data))
        off = hole
    if size - sum(length for _, length in chunks) < _SPARSE_MIN_HOLES:
        return None
    if not chunks or sum(chunks[-1]) < size:
        chunks.append((size, 0))
    return chunks


def _add_sparse(out: TarOut, fd: int, h: TarHeader, chunks: list[tuple[int, int]]) -> None:
    """A PAX sparse 1.0 entry (GNU tar's ``--sparse-version=1.0``, read by GNU tar, Go's
    archive/tar and tarstream): the real name and size in ``GNU.sparse.*`` records, the header
    named ``DIR/GNUSparseFile.0/BASE``, its data the decimal map padded to a block, then the
    data extents one after another.  Extents that shrank meanwhile are filled with zeros."""
    head, _, base = h.name.rpartition(b"/")
    sparse_map = b"%d\n" % len(chunks) + b"".join(b"%d\n%d\n" % c for c in chunks)
    sparse_map += bytes(padding(len(sparse_map)))
    data_size = sum(length for _, length in chunks)
    h.records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                 (b"GNU.sparse.name", h.name), (b"GNU.sparse.realsize", b"%d" % h.size)]
    h.name = (head + b"/" if head else b"") + b"GNUSparseFile.0/" + base
    h.size = len(sparse_map) + data_size
    out.add(encode(h))
    out.add(sparse_map)
    out.flush()
    for off, length in chunks:
        done = out.copy_range(fd, off, off + length)
        out.zeros(off + length - done)
    out.zeros(padding(data_size))


class _Dir:
    """One directory of the walk: its descriptor, sorted names, the next one's index."""

    __slots__ = ("fd", "index", "names", "prefix")

    def __init__(self, fd: int, names: list[bytes], prefix: bytes) -> None:
        self.fd = fd
        self.names = names
        self.index = 0
        self.prefix = prefix


def _root_facts(root: bytes | int, whiteouts: WhiteoutFormat) -> tuple[int, int, int, dict[
        str, bytes]]:
    """What a layer root's own ``./`` entry carries besides times: mode, owner, xattrs."""
    st = os.fstat(root) if isinstance(root, int) else os.lstat(root)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, _read_xattrs(root, whiteouts)


def _maps_back(idmap: IDMap, uid: int, gid: int) -> bool:
    """Whether a host owner has a container owner in *idmap*."""
    try:
        idmap.to_container(uid, gid)
    except InvalidArgument:
        return False
    return True


def _add_root(out: TarOut, root_fd: int, root_b: bytes, idmap: IDMap,
              whiteouts: WhiteoutFormat) -> None:
    st = os.fstat(root_fd)
    _add_entry(out, None, root_b, root_b, b".", st, idmap, whiteouts)


def _list_dir(fd: int) -> list[bytes]:
    if _native is not None:
        return _native.list_dir(fd)
    names = [os.fsencode(n) for n in os.listdir(fd)]
    names.sort()
    return names


def write_tree(
    out_fd: int,
    root: str | Path,
    *,
    whiteout_format: WhiteoutFormat = NAIVE,
    idmap: IDMap = IDENTITY,
    progress: Progress | None = None,
) -> None:
    """Write a tar of everything under *root* to *out_fd*; root itself (``./``) only when its
    mode, owner or xattrs are not a fresh layer's (0755, the id map's root, none) and its owner
    maps into the container (a directory that is no layer's root is left out).

    A format that keeps whiteouts (:data:`~.whiteout.OVERLAY`, ``OVERLAY_USERXATTR``) converts
    them (0/0 character devices) into ``.wh.NAME`` entries and opaque directories (its
    ``opaque_xattr`` = ``y``) into a ``DIR/.wh..wh..opq`` entry right after the directory's own
    entry; its overlay xattrs are never exported.

    With the native helper (``graphdriver._fastexport``, unless ``GRAPHDRIVER_NO_NATIVE`` is
    set) and an identity id map, runs of plain entries (files with one link, directories,
    symlinks, devices, fifos; one ustar block, no xattr to write) are written in C; the rest
    here.  The bytes are
    the same either way.
    """
    if not isinstance(whiteout_format, WhiteoutFormat):
        raise InvalidArgument(f"unknown whiteout format {whiteout_format!r}")
    raise_open_files_limit()  # a directory fd per level
    root_b = os.fsencode(root)
    out = TarOut(out_fd, progress)
    native = _native if idmap.is_identity and _PROC_FD else None
    try:
        root_fd = os.open(root_b, _DIR_FLAGS)
    except OSError as exc:
        raise from_oserror(exc, "export tree") from exc
    stack: list[_Dir] = []
    try:
        facts = _root_facts(root_fd, whiteout_format)
        if facts != (0o755, *idmap.root_pair(), {}) and _maps_back(idmap, facts[1], facts[2]):
            _add_root(out, root_fd, root_b, idmap, whiteout_format)
        stack.append(_Dir(root_fd, _list_dir(root_fd), b""))
        while stack:
            d = stack[-1]
            fd, names, prefix = d.fd, d.names, d.prefix
            if native is not None and d.index < len(names) and prefix.isascii():
                out.pos, d.index, wrote, descend = native.emit(
                    out.buf, out.pos, out_fd, fd, names, d.index, prefix,
                    whiteout_format.xattr_prefix, whiteout_format.opaque_xattr, out.small_file)
                if wrote:
                    out.written += wrote
                    if progress is not None:
                        progress(out.written)
                if descend:  # a directory's header is written: its contents follow
                    leaf = names[d.index - 1]
                    child = os.open(leaf, _DIR_FLAGS, dir_fd=fd)
                    stack.append(_Dir(child, _list_dir(child), prefix + leaf + b"/"))
                    continue
            if d.index >= len(names):
                stack.pop()
                if fd != root_fd:
                    os.close(fd)
                continue
            leaf = names[d.index]
            d.index += 1
            name = prefix + leaf
            try:
                st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            full = b"/proc/self/fd/%d/%s" % (fd, leaf) if _PROC_FD else root_b + b"/" + name
            if _add_entry(out, fd, leaf, full, name, st, idmap, whiteout_format):
                child = os.open(leaf, _DIR_FLAGS, dir_fd=fd)
                stack.append(_Dir(child, _list_dir(child), name + b"/"))
        out.finish()
    except GraphDriverError:
        raise
    except OSError as exc:
        raise from_oserror(exc, "export tree") from exc
    finally:
        for d in stack:
            if d.fd != root_fd:
                os.close(d.fd)
        os.close(root_fd)


def _path_key(change: Change) -> bytes:
    return os.fsencode(change.path)


def write_changes(
    out_fd: int,
    root: str | Path,
    changes: list[Change],
    *,
    idmap: IDMap = IDENTITY,
    progress: Progress | None = None,
    parent_root: str | Path | None = None,
) -> None:
    """moby's ExportChanges: a tar of *changes* read from *root*, sorted by path; first the
    root's own ``./`` entry when its mode, owner or xattrs differ from *parent_root*'s.

    ADD/MODIFY write the path itself (a directory without its contents); DELETE writes an
    empty ``dir/.wh.NAME`` entry (mode 0, owner 0:0).  moby stamps whiteouts with the current
    time; here they take the mtime of the directory that holds them, so the same layer always
    exports the same bytes (reproducible digests).  Parent directories are not
    added.  A path that vanished since the changes were computed is skipped, as moby does.
    """
    raise_open_files_limit()  # a directory fd per level
    root_b = os.fsencode(root)
    out = TarOut(out_fd, progress)
    dir_mtimes: dict[bytes, int] = {}

    def whiteout_mtime(head: bytes) -> int:
        if head not in dir_mtimes:
            try:
                dir_mtimes[head] = os.lstat(root_b + b"/" + head).st_mtime_ns // 1_000_000_000
            except OSError:
                dir_mtimes[head] = 0
        return dir_mtimes[head]

    try:
        if parent_root is not None and _root_facts(root_b, NAIVE) != _root_facts(
                os.fsencode(parent_root), NAIVE):
            fd = os.open(root_b, _DIR_FLAGS)
            try:
                _add_root(out, fd, root_b, idmap, NAIVE)
            finally:
                os.close(fd)
        for change in sorted(changes, key=_path_key):
            rel = os.fsencode(change.path).strip(b"/")
            if not rel:
                continue
            if change.kind == ChangeKind.DELETE:
                head, _, tail = rel.rpartition(b"/")
                name = (head + b"/" if head else b"") + WHITEOUT_PREFIX_B + tail
                out.add(encode(TarHeader(name=name, typeflag=REGTYPE, mode=0,
                                         mtime=whiteout_mtime(head))))
                continue
            full = root_b + b"/" + rel
            try:
                st = os.lstat(full)
                _add_entry(out, None, full, full, rel, st, idmap, NAIVE)
            except FileNotFoundError:
                continue
        out.finish()
    except GraphDriverError:
        raise
    except OSError as exc:
        raise from_oserror(exc, "export changes") from exc


class _PipeReader(io.RawIOBase):
    """The reading end of a pipe fed by a writer thread; the writer's error surfaces here."""

    def __init__(self, fd: int, thread: threading.Thread, errors: list[BaseException]) -> None:
        super().__init__()
        self._fd = fd
        self._thread = thread
        self._errors = errors
        self._eof = False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = os.readv(self._fd, [buffer])
        if n == 0:
            self._eof = True
            self._thread.join()
            if self._errors:
                raise self._errors.pop()
        return n

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.close(self._fd)
        self._thread.join()
        # Closed before the end: the writer's failure (EPIPE, most likely) is nobody's concern.
        if self._errors and self._eof:
            raise self._errors.pop()


_READER_BUF = 1 << 16


class _TarReader(io.BufferedReader):
    """stream_tar's reader: a large ``readinto`` returns what the pipe holds (see there)."""

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        if len(memoryview(buffer)) >= _READER_BUF:
            return super().readinto1(buffer)
        return super().readinto(buffer)


def stream_tar(write: Callable[[int], None]) -> BinaryIO:
    """Run ``write(fd)`` in a thread writing into a pipe; return the pipe's reading end.

    An exception raised by *write* is raised again by the reader's next read at end of stream,
    or by close.  Closing the reader early stops the writer (it gets EPIPE), silently.

    The fastest way to consume it is ``readinto`` with a large buffer (1 MiB: the pipe holds
    that much) in a loop until it returns 0: a ``readinto`` of at least 64 KiB goes straight
    from the pipe into the caller's buffer and returns what the pipe holds (a short count, as a
    pipe's read does) instead of waiting for the whole buffer to fill, so the caller's writes
    overlap with the writer thread's work.  ``read(n)`` keeps the usual buffered semantics
    (exactly *n* bytes unless the stream ends).
    """
    r_fd, w_fd = os.pipe2(os.O_CLOEXEC)
    grow_pipe(w_fd, _BUF_SIZE)  # the pipe holds a whole output batch
    errors: list[BaseException] = []

    def run() -> None:
        try:
            write(w_fd)
        except BaseException as exc:  # re-raised on the reader's side
            errors.append(exc)
        finally:
            os.close(w_fd)

    thread = threading.Thread(target=run, name="graphdriver-tar-writer", daemon=True)
    thread.start()
    return _TarReader(_PipeReader(r_fd, thread, errors), _READER_BUF)  # type: ignore[return-value]
