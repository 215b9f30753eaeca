"""Filesystem helpers every driver shares: atomic writes, tree copies, tree removal, filesystem
facts.  Mounts and their table are mount.py's."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graphdriver")

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
    """Remove a tree (or a file) that may contain read-only dirs; missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    import shutil

    def retry(func: object, p: str, exc_info: tuple[type[BaseException], BaseException, object],
              ) -> None:
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            # A directory without write permission (possible when not root): open it up and retry.
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            return
        raise exc

    shutil.rmtree(path, onerror=retry)  # onexc is 3.12+; onerror works on 3.11 and later


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


def _copy_xattrs(src: str, dst: str, *, follow: bool) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        try:
            value = os.getxattr(src, name, follow_symlinks=follow)
            os.setxattr(dst, name, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
                continue
            if exc.errno == errno.EPERM and os.geteuid() != 0:
                continue  # trusted.* / security.* need root; an unprivileged copy loses them
            raise


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the contents of ``src`` into the existing directory ``dst``, exactly.

    Keeps types, modes (incl. setuid/sticky), owners, nanosecond times, xattrs, devices, fifos,
    sockets' absence (as tar would) and hard links (files sharing an inode in ``src`` share one
    in ``dst``).  Data moves by reflink where possible, else copy_file_range, never through
    Python buffers.  Directory times are set after their contents.
    """
    links: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result]] = []
    root_st = os.lstat(src)
    _copy_meta(str(src), str(dst), root_st, is_link=False)
    dirs.append((str(dst), root_st))
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        rel = os.path.relpath(dirpath, src)
        target_dir = str(dst) if rel == "." else os.path.join(dst, rel)
        for name in dirnames + filenames:
            s = os.path.join(dirpath, name)
            d = os.path.join(target_dir, name)
            st = os.lstat(s)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(d, 0o700)
                _copy_meta(s, d, st, is_link=False, times=False)
                dirs.append((d, st))
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(mode):
                key = (st.st_dev, st.st_ino)
                first = links.get(key)
                if first is not None:
                    os.link(first, d, follow_symlinks=False)
                    continue
                links[key] = d
            if stat.S_ISREG(mode):
                sfd = os.open(s, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    dfd = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o600)
                    try:
                        copy_file_data(sfd, dfd, st.st_size)
                    finally:
                        os.close(dfd)
                finally:
                    os.close(sfd)
                _copy_meta(s, d, st, is_link=False)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(s), d)
                _copy_meta(s, d, st, is_link=True)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                os.mknod(d, mode, st.st_rdev)
                _copy_meta(s, d, st, is_link=False)
            elif stat.S_ISSOCK(mode):
                continue  # sockets are not layer content (tar skips them too)
        # names were handled above; os.walk descends into dirnames itself
    for d, st in reversed(dirs):
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_meta(s: str, d: str, st: os.stat_result, *, is_link: bool, times: bool = True) -> None:
    try:
        os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        if os.geteuid() == 0:
            raise
    _copy_xattrs(s, d, follow=False)
    if not is_link:
        os.chmod(d, stat.S_IMODE(st.st_mode))
    if times:
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


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
    magic = fs_magic(path)
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
