"""Filesystem helpers every driver shares: atomic writes, tree copies, tree removal, the lstat
walk of a tree (``walk_lstat``), filesystem facts.  Mounts and their table are mount.py's."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat

from . import TYPE_CHECKING
from .idmap import real_root
from .logs import get_logger

if TYPE_CHECKING:
    from array import array
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

log = get_logger("graphdriver")

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_COPY_CHUNK = 1 << 30


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(data):x}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def remove_tree(path: Path) -> None:
    """Remove a tree (or a file) that may contain read-only dirs; missing is fine.

    Iterative and fd-based (:func:`remove_beneath`): any depth the kernel allows."""
    parent = os.open(os.path.dirname(os.path.abspath(path)) or "/",
                     os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_beneath(parent, os.path.basename(os.path.abspath(path)))
    finally:
        os.close(parent)


_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_beneath(parent_fd: int, name: str) -> None:
    """Remove *name* (a tree, a file, or nothing) beneath the directory *parent_fd*.

    One directory fd is open at a time, whatever the depth: the walk goes down by name and
    back up by ``..``, checking that ``..`` is the directory it came from (device and inode).
    A directory that refuses an unlink (no write permission, when not root) is opened up.
    """
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink_at(parent_fd, name)
        return
    try:
        fd = os.open(name, _DIR_OPEN, dir_fd=parent_fd)
    except FileNotFoundError:
        return  # gone since the lstat: missing is fine
    path: list[tuple[str, int, int]] = []  # names walked down, with their parent's identity
    try:
        while True:
            child = _first_subdir_emptying(fd)
            if child is not None:
                went = _down(fd, child)
                if went is not None:
                    fd, (dev, ino) = went
                    path.append((child, dev, ino))
                continue
            if not path:
                break
            child, dev, ino = path.pop()
            up = os.open("..", _DIR_OPEN, dir_fd=fd)
            os.close(fd)
            fd = up
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise OSError(errno.EXDEV, "a directory moved while its tree was removed", child)
            _rmdir_at(fd, child)
    finally:
        os.close(fd)
    _rmdir_at(parent_fd, name)


def empty_beneath(dir_fd: int) -> None:
    """Remove everything inside the directory *dir_fd* (trees at any depth, no symlink followed);
    the directory itself stays."""
    for name in _names(dir_fd):
        remove_beneath(dir_fd, name)


def raise_open_files_limit() -> None:
    """Lift this process's soft limit of open files to its hard limit, as Go's runtime does at
    start: a tree walk holds a directory fd per level (two when it compares trees), and the
    usual soft limit of 1024 is less than a 2000-level layer needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # a hard limit above the kernel's nr_open
            log.debug("open files limit stays %d: %s", soft, exc)


#: the descriptor table an apply wants ready (:func:`reserve_fd_table`): the file writer's 128
#: open files and the directory cache's 256 fds, with the lower layers' and room to spare
FD_TABLE_SLOTS = 1024


def reserve_fd_table(slots: int = FD_TABLE_SLOTS) -> None:
    """Grow this process's table of file descriptors to *slots* (at most its open files limit)
    now, while the process has one thread.

    Linux grows the table on demand, and in a process of several threads each growth waits for
    an RCU grace period (``expand_fdtable`` calls ``synchronize_rcu`` when the table is
    shared): 10-20 ms on a small VM, during which an apply's other threads soon wait too, for
    the one that opened its 65th, 129th or 257th file.  The table never shrinks, and growing it
    with one thread costs an allocation.  A process with threads already is left as it is (a
    growth now would wait as well), and so is one without /proc to tell."""
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        top = slots if soft == resource.RLIM_INFINITY else min(slots, soft)
        fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        # the lowest free descriptor at or above top - 1: none in use is touched
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top - 1))
    except OSError:  # the limit moved meanwhile: the kernel grows the table when needed
        pass
    finally:
        os.close(fd)


def _first_subdir_emptying(fd: int) -> str | None:
    """Unlink every non-directory in *fd*; return one subdirectory's name (None: it is empty)."""
    with os.scandir(fd) as it:
        entries = list(it)
    for e in entries:
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if is_dir:
            return e.name
        _unlink_at(fd, e.name)
    return None


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        os.chmod(dir_fd, 0o700)  # not root: a read-only directory; open it up and retry
        os.unlink(name, dir_fd=dir_fd)


def _rmdir_at(dir_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        os.chmod(dir_fd, 0o700)
        os.rmdir(name, dir_fd=dir_fd)


# --- tree copies -------------------------------------------------------------------------------


def copy_file_data(src_fd: int, dst_fd: int, size: int) -> None:
    """The first ``size`` bytes of ``src_fd`` to the start of ``dst_fd`` (whatever their offsets):
    a reflink where the filesystem offers it, else copy_file_range, else sendfile (another
    filesystem: copy_file_range refuses with EXDEV).  The one file-copy loop of graphdriver."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                             errno.ENOSYS, errno.EBADF, errno.EPERM):
            raise
    off = 0
    use_range = True
    while off < size:
        chunk = min(_COPY_CHUNK, size - off)
        if use_range:
            try:
                n = os.copy_file_range(src_fd, dst_fd, chunk, off, off)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                use_range = False
                continue
        else:
            os.lseek(dst_fd, off, os.SEEK_SET)
            n = os.sendfile(dst_fd, src_fd, off, chunk)
        if n == 0:
            break
        off += n


def _copy_xattrs(src: str | int, dst: str | int, *, follow: bool, skip: str = "") -> None:
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        if skip and name.startswith(skip):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=follow)
            os.setxattr(dst, name, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
                continue
            if exc.errno == errno.EPERM and not real_root():
                continue  # trusted.* / security.* need root; an unprivileged copy loses them
            raise


def copy_tree(src: Path, dst: Path, copied: array[int] | None = None) -> None:
    """Copy the contents of ``src`` into the existing directory ``dst``, exactly.

    *copied*, when given, gets each copied regular file's inode number and ctime (ns), two
    items a file: what the copy looked like, to tell later which files were changed since.

    Keeps types, modes (incl. setuid/sticky), owners, nanosecond times, xattrs, devices, fifos,
    sockets' absence (as tar would) and hard links (files sharing an inode in ``src`` share one
    in ``dst``).  Data moves by reflink where possible, else copy_file_range, never through
    Python buffers.  Directory times are set after their contents.  Iterative and fd-based, two
    directory fds open whatever the depth (down by name, up by a checked ``..``).
    """
    droot = os.open(dst, _DIR_OPEN)
    sfd = os.open(src, _DIR_OPEN)
    dfd = os.dup(droot)
    # first copy of each multiply-linked inode: its directory (names below dst) and name
    links: dict[tuple[int, int], tuple[tuple[str, ...], str]] = {}
    here: list[str] = []
    try:
        root_st = os.fstat(sfd)
        _copy_meta_fd(sfd, dfd, root_st)
        frames: list[tuple[list[str], os.stat_result]] = [(_names(sfd), root_st)]
        parents: list[tuple[tuple[int, int], tuple[int, int]]] = []
        while frames:
            pending, dir_st = frames[-1]
            down = None
            while pending:
                name = pending.pop()
                st = os.lstat(name, dir_fd=sfd)
                if stat.S_ISDIR(st.st_mode):
                    down = (name, st)
                    break
                _copy_entry(sfd, dfd, name, st, links, here, droot, copied)
            if down is not None:
                name, st = down
                os.mkdir(name, 0o700, dir_fd=dfd)
                ids = (_ident(sfd), _ident(dfd))
                nsfd = os.open(name, _DIR_OPEN, dir_fd=sfd)
                try:
                    ndfd = os.open(name, _DIR_OPEN, dir_fd=dfd)
                except BaseException:
                    os.close(nsfd)
                    raise
                os.close(sfd)
                os.close(dfd)
                sfd, dfd = nsfd, ndfd
                _copy_meta_fd(sfd, dfd, st)
                frames.append((_names(sfd), st))
                parents.append(ids)
                here.append(name)
                continue
            os.utime(dfd, ns=(dir_st.st_atime_ns, dir_st.st_mtime_ns))
            frames.pop()
            if not frames:
                break
            s_id, d_id = parents.pop()
            here.pop()
            sfd = _up(sfd, s_id)
            dfd = _up(dfd, d_id)
    finally:
        for fd in {sfd, dfd, droot}:
            os.close(fd)


def walk_lstat(root: str | os.PathLike[str]) -> Iterator[os.stat_result]:
    """lstat of every entry beneath *root* (not *root* itself), a directory before what it
    holds; nothing followed, an entry gone meanwhile skipped.  Iterative and fd-based: one
    directory fd open whatever the depth (down by name, up by a checked ``..``)."""
    fd = os.open(root, _DIR_OPEN)
    frames = [_names(fd)]
    parents: list[tuple[int, int]] = []
    try:
        while frames:
            pending = frames[-1]
            down = None
            while pending:
                name = pending.pop()
                try:
                    st = os.lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                yield st
                if stat.S_ISDIR(st.st_mode):
                    down = name
                    break
            if down is not None:
                went = _down(fd, down)
                if went is not None:
                    fd, ident = went
                    frames.append(_names(fd))
                    parents.append(ident)
                continue
            frames.pop()
            if parents:
                below, fd = fd, -1
                fd = _up(below, parents.pop())
    finally:
        if fd >= 0:
            os.close(fd)


def _names(fd: int) -> list[str]:
    names = os.listdir(fd)
    names.sort(reverse=True)  # popped from the end: copied in name order
    return names


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _down(fd: int, name: str) -> tuple[int, tuple[int, int]] | None:
    """Into the directory *name* of directory *fd* (closed then): its fd and *fd*'s identity,
    for the checked way back up (:func:`_up`); None, *fd* still open, when it is gone."""
    ident = _ident(fd)
    try:
        sub = os.open(name, _DIR_OPEN, dir_fd=fd)
    except FileNotFoundError:
        return None
    os.close(fd)
    return sub, ident


def _up(fd: int, expect: tuple[int, int]) -> int:
    """The parent of directory *fd* (closed), checked to be the one the walk came down from."""
    up = os.open("..", _DIR_OPEN, dir_fd=fd)
    os.close(fd)
    if _ident(up) != expect:
        os.close(up)
        raise OSError(errno.EXDEV, "a directory moved while its tree was copied")
    return up


def _open_below(root: int, names: tuple[str, ...]) -> int:
    fd = os.dup(root)
    for name in names:
        sub = os.open(name, _DIR_OPEN, dir_fd=fd)
        os.close(fd)
        fd = sub
    return fd


def _copy_entry(sfd: int, dfd: int, name: str, st: os.stat_result,
                links: dict[tuple[int, int], tuple[tuple[str, ...], str]], here: list[str],
                droot: int, copied: array[int] | None = None) -> None:
    mode = st.st_mode
    if st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = links.get(key)
        if first is not None:
            first_dir = _open_below(droot, first[0])
            try:
                os.link(first[1], name, src_dir_fd=first_dir, dst_dir_fd=dfd,
                        follow_symlinks=False)
            finally:
                os.close(first_dir)
            if copied is not None and stat.S_ISREG(mode):  # a link changes the inode's ctime
                done = os.lstat(name, dir_fd=dfd)
                copied.extend((done.st_ino, done.st_ctime_ns))
            return
        links[key] = (tuple(here), name)
    if stat.S_ISREG(mode):
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
        try:
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                copy_file_data(src, out, st.st_size)
                _copy_meta_fd(src, out, st)
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                if copied is not None:
                    done = os.fstat(out)
                    copied.extend((done.st_ino, done.st_ctime_ns))
            finally:
                os.close(out)
        finally:
            os.close(src)
        return
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        os.mknod(name, mode, st.st_rdev, dir_fd=dfd)
    else:
        return  # sockets are not layer content (tar skips them too)
    _copy_meta(f"/proc/self/fd/{sfd}/{name}", f"/proc/self/fd/{dfd}/{name}", st,
               is_link=stat.S_ISLNK(mode))


def _copy_meta(s: str, d: str, st: os.stat_result, *, is_link: bool) -> None:
    try:
        os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        if real_root():
            raise
    _copy_xattrs(s, d, follow=False)
    if not is_link:
        os.chmod(d, stat.S_IMODE(st.st_mode))
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_dir_attributes(src: Path, dst: Path, *, skip_xattrs: str = "") -> None:
    """The directory *src*'s owner, mode, xattrs (but those whose names start with
    *skip_xattrs*) and times onto the directory *dst*, as overlayfs' copy-up gives them."""
    sfd = os.open(src, _DIR_OPEN)
    try:
        dfd = os.open(dst, _DIR_OPEN)
        try:
            st = os.fstat(sfd)
            _copy_meta_fd(sfd, dfd, st, skip_xattrs=skip_xattrs)
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_meta_fd(sfd: int, dfd: int, st: os.stat_result, *, skip_xattrs: str = "") -> None:
    """Owner, xattrs and mode of an open directory or file (times: the caller's)."""
    try:
        os.fchown(dfd, st.st_uid, st.st_gid)
    except PermissionError:
        if real_root():
            raise
    _copy_xattrs(sfd, dfd, follow=True, skip=skip_xattrs)
    os.fchmod(dfd, stat.S_IMODE(st.st_mode))


_libc_handle: Any = None


def _libc() -> Any:
    """libc through ctypes, loaded on first use (ctypes costs start-up time every command)."""
    global _libc_handle
    if _libc_handle is None:
        import ctypes

        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


# --- filesystem facts --------------------------------------------------------------------------

_FS_MAGIC = {
    0xEF53: "extfs", 0x9123683E: "btrfs", 0x58465342: "xfs", 0x01021994: "tmpfs",
    0x794C7630: "overlayfs", 0x65735546: "fuse", 0x6969: "nfs", 0x2FC12FC1: "zfs",
    0x5346414F: "afs", 0x73717368: "squashfs", 0xF2F52010: "f2fs", 0x52654973: "reiserfs",
    0x858458F6: "ramfs", 0x4D44: "msdos", 0xFF534D42: "cifs", 0x0BD00BD0: "lustre",
}


def fs_magic(path: Path) -> int:
    """statfs(2)'s f_type (os.statvfs does not report it)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc().statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int.from_bytes(buf.raw[:4], "little")


def fs_name(path: Path) -> str:
    """The backing filesystem's name, as moby's status reports it ("extfs", "btrfs", ...)."""
    return fs_name_of(fs_magic(path))


def fs_name_of(magic: int) -> str:
    """The name of the filesystem whose statfs f_type is *magic* (see fs_name)."""
    return _FS_MAGIC.get(magic, f"<unknown 0x{magic:x}>")


def supports_d_type(path: Path) -> bool:
    """Whether readdir on this filesystem reports entry types (overlayfs needs it).

    Reads the raw ``getdents64`` records of a probe directory, as moby's fsutils does, since
    ``os.scandir`` hides whether the type came from the directory entry or from a stat.
    """
    probe = path / f".d_type-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        (probe / "f").touch()
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            import ctypes

            buf = ctypes.create_string_buffer(4096)
            n = _libc().syscall(_SYS_GETDENTS64, fd, buf, len(buf))
            if n < 0:
                return False
            raw, off = buf.raw[:n], 0
            while off < n:
                reclen = int.from_bytes(raw[off + 16:off + 18], "little")
                d_type = raw[off + 18]
                name = raw[off + 19:off + reclen].split(b"\0", 1)[0]
                if name == b"f":
                    return d_type == 8  # DT_REG; DT_UNKNOWN (0) means no d_type
                off += reclen
            return False
        finally:
            os.close(fd)
    finally:
        remove_tree(probe)


_SYS_GETDENTS64 = 217 if os.uname().machine == "x86_64" else 61


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def log_repair(what: str) -> None:
    log.warning("repair: %s", what)
