"""Mounting without a ``mount`` subprocess.

Overlay mounts go through the new mount API (``fsopen`` / ``fsconfig`` / ``fsmount`` /
``move_mount``, Linux 5.2+): every lower directory is passed on its own with ``lowerdir+``
(Linux 6.8+), so the length of a chain never meets the one-page limit of mount(2)'s option
string.  Where the kernel lacks that, the classic ``mount(2)`` is used with the lower layers
named relatively (``l/A:l/B``) from a child process that changes into the driver home first —
this (threaded) process never calls ``chdir``.

Everything here raises ``OSError`` with the errno the kernel gave; callers turn it into the
graphdriver error that fits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

# Syscall numbers of the new mount API: one table for every architecture (424 and up).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1

FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

MOVE_MOUNT_F_EMPTY_PATH = 0x4

MS_RDONLY = 0x1
MNT_DETACH = 0x2

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def _read_fs_log(fs_fd: int) -> str:
    """The messages the filesystem left in the fs context (read(2) on the fsopen fd)."""
    lines = []
    for _ in range(16):
        try:
            data = os.read(fs_fd, 4096)
        except OSError:
            break
        if not data:
            break
        lines.append(data.decode(errors="replace").strip())
    return "; ".join(lines)


_OPTION_FIELDS = ("lowers", "upper", "work", "relative_lowers", "relative_to", "readonly",
                  "extra", "label")
_DEFAULT: Any = object()  # "not given": the list fields then take their default_factory


class OverlayOptions:
    """What an overlay mount is made of.  Lower paths are absolute, nearest first.

    It behaves as a (non-frozen) dataclass of these fields, written out so that the overlay
    driver's commands do not import dataclasses (and inspect): start-up time.
    """

    __match_args__ = ("lowers", "upper", "work", "relative_lowers", "relative_to", "readonly",
                      "extra", "label")
    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    lowers: list[str]
    upper: str | None
    work: str | None
    #: relative lower names (``l/A``) and the directory they are relative to, for mount(2)
    relative_lowers: list[str]
    relative_to: str | None
    readonly: bool
    extra: list[str]  # e.g. "index=off", "userxattr"
    label: str

    def __init__(
        self,
        lowers: list[str],
        upper: str | None = None,
        work: str | None = None,
        relative_lowers: list[str] = _DEFAULT,
        relative_to: str | None = None,
        readonly: bool = False,
        extra: list[str] = _DEFAULT,
        label: str = "",
    ) -> None:
        self.lowers = lowers
        self.upper = upper
        self.work = work
        self.relative_lowers = [] if relative_lowers is _DEFAULT else relative_lowers
        self.relative_to = relative_to
        self.readonly = readonly
        self.extra = [] if extra is _DEFAULT else extra
        self.label = label

    def _values(self) -> tuple[object, ...]:
        return (self.lowers, self.upper, self.work, self.relative_lowers, self.relative_to,
                self.readonly, self.extra, self.label)

    def __repr__(self) -> str:
        values = zip(_OPTION_FIELDS, self._values(), strict=True)
        return f"OverlayOptions({', '.join(f'{n}={v!r}' for n, v in values)})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]


class _Probe:
    new_api: bool | None = None
    lowerdir_plus: bool | None = None


def have_new_mount_api() -> bool:
    """Whether ``fsopen`` exists (ENOSYS otherwise) — probed once per process."""
    if _Probe.new_api is None:
        fd = _syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
        if fd >= 0:
            os.close(fd)
            _Probe.new_api = True
        else:
            _Probe.new_api = ctypes.get_errno() not in (errno.ENOSYS,)
    return bool(_Probe.new_api)


def _fsconfig(fs_fd: int, cmd: int, key: str | None, value: str | None) -> None:
    k = key.encode() if key is not None else None
    v = os.fsencode(value) if value is not None else None
    if _syscall(SYS_FSCONFIG, fs_fd, cmd, k, v, 0) < 0:
        err = ctypes.get_errno()
        detail = _read_fs_log(fs_fd)
        what = f"fsconfig {key or 'create'}" + (f" ({detail})" if detail else "")
        raise OSError(err, f"{what}: {os.strerror(err)}", value)


def mount_overlay(target: Path, opts: OverlayOptions) -> None:
    """Mount an overlay at *target*: new mount API with ``lowerdir+``, else mount(2) in a child."""
    if have_new_mount_api() and _Probe.lowerdir_plus is not False:
        try:
            _mount_overlay_new_api(target, opts)
            _Probe.lowerdir_plus = True
            return
        except OSError as exc:
            # EINVAL on "lowerdir+" means a kernel older than 6.8: fall back, remember it.
            if exc.errno != errno.EINVAL or "lowerdir+" not in str(exc) or _Probe.lowerdir_plus:
                raise
            _Probe.lowerdir_plus = False
    _mount_overlay_legacy(target, opts)


def _mount_overlay_new_api(target: Path, opts: OverlayOptions) -> None:
    fs_fd = _check(_syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC), "fsopen overlay")
    try:
        for lower in opts.lowers:
            _fsconfig(fs_fd, FSCONFIG_SET_STRING, "lowerdir+", lower)
        if opts.upper is not None and opts.work is not None:
            _fsconfig(fs_fd, FSCONFIG_SET_STRING, "upperdir", opts.upper)
            _fsconfig(fs_fd, FSCONFIG_SET_STRING, "workdir", opts.work)
        for opt in opts.extra:
            key, eq, value = opt.partition("=")
            if eq:
                _fsconfig(fs_fd, FSCONFIG_SET_STRING, key, value)
            else:
                _fsconfig(fs_fd, FSCONFIG_SET_FLAG, key, None)
        if opts.label:
            _fsconfig(fs_fd, FSCONFIG_SET_STRING, "context", opts.label)
        _fsconfig(fs_fd, FSCONFIG_CMD_CREATE, None, None)
        attrs = MOUNT_ATTR_RDONLY if opts.readonly else 0
        mnt_fd = _syscall(SYS_FSMOUNT, fs_fd, FSMOUNT_CLOEXEC, attrs)
        if mnt_fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fsmount overlay: {os.strerror(err)}", str(target))
        try:
            _check(
                _syscall(SYS_MOVE_MOUNT, mnt_fd, b"", -100, os.fsencode(target),
                         MOVE_MOUNT_F_EMPTY_PATH),
                "move_mount", str(target),
            )
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def legacy_option_string(opts: OverlayOptions) -> str:
    """The mount(2) data string, naming the lowers relatively (``lowerdir=l/A:l/B,...``)."""
    lowers = opts.relative_lowers or opts.lowers
    parts = ["lowerdir=" + ":".join(lowers)]
    if opts.upper is not None and opts.work is not None:
        parts += [f"upperdir={opts.upper}", f"workdir={opts.work}"]
    parts += opts.extra
    if opts.label:
        parts.append(f"context={opts.label}")
    return ",".join(parts)


_CHILD = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
target, data, flags = sys.argv[1], sys.argv[2], int(sys.argv[3])
if libc.mount(b"overlay", os.fsencode(target), b"overlay", flags, os.fsencode(data)) != 0:
    err = ctypes.get_errno()
    sys.stderr.write(f"{err}\\n")
    sys.exit(3)
"""


def _mount_overlay_legacy(target: Path, opts: OverlayOptions) -> None:
    """mount(2) from a child whose working directory is the driver home (relative lowers)."""
    data = legacy_option_string(opts)
    page = os.sysconf("SC_PAGESIZE")
    if len(data) >= page:
        raise OSError(errno.E2BIG, f"overlay mount options longer than one page ({len(data)})")
    flags = MS_RDONLY if opts.readonly else 0
    cwd = opts.relative_to if opts.relative_lowers else None
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _CHILD, os.fspath(Path(target).absolute()), data,
         str(flags)],
        cwd=cwd, capture_output=True, check=False,
    )
    if proc.returncode != 0:
        text = proc.stderr.decode(errors="replace").strip()
        err = int(text) if text.isdigit() else errno.EIO
        raise OSError(err, f"mount overlay: {os.strerror(err)}", str(target))


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2) with absolute paths (no working directory involved)."""
    ret = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(),
                      ctypes.c_ulong(flags), os.fsencode(data) if data else None)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype}: {os.strerror(err)}", str(target))


def unmount(target: Path, *, detach: bool = True) -> None:
    """umount2(2); a target that is not mounted is not an error."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return  # not a mount point (any more)
        raise OSError(err, f"umount: {os.strerror(err)}", str(target))


def _unescape(field_: str) -> str:
    if "\\" not in field_:
        return field_
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit():
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def _escape(path: str) -> bytes:
    """*path* as mountinfo spells it: space, tab, newline and backslash in octal."""
    raw = os.fsencode(path)
    for ch in b"\\ \t\n":  # the backslash first: the others bring backslashes in
        raw = raw.replace(bytes((ch,)), b"\\%03o" % ch)
    return raw


def _mountinfo() -> bytes:
    """This process's ``/proc/self/mountinfo``, read whole (one pass of the kernel's seq file)."""
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _mount_points(data: bytes) -> list[str]:
    out = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        fields = line.split(" ", 5)
        if len(fields) >= 5:
            out.append(_unescape(fields[4]))
    return out


def mount_points() -> list[str]:
    """Every mount point this process sees, in mount order."""
    return _mount_points(_mountinfo())


def is_mounted(path: Path | str) -> bool:
    p = os.fspath(path)
    data = _mountinfo()
    # A mount point is the fifth field, between spaces: a path found nowhere so is no mount
    # point, and the table needs no parse (the common answer, on every removal).
    if b" " + _escape(p) + b" " not in data:
        return False
    return p in _mount_points(data)


def unmount_all_under(*paths: Path | str, include_self: bool = True) -> None:
    """Detach every mount beneath each of *paths* (and at it, with *include_self*), deepest
    first; one read of the mount table for them all."""
    if not paths:
        return
    data = _mountinfo()
    wanted: list[str] = []
    for path in paths:
        p = os.fspath(path).rstrip("/")
        escaped = b" " + _escape(p)
        if escaped + b"/" in data or (include_self and escaped + b" " in data):
            wanted.append(p)  # else nothing is mounted at or beneath it: no parse
    if not wanted:
        return
    found = {mp for mp in _mount_points(data) for p in wanted
             if (include_self and mp == p) or mp.startswith(p + "/")}
    for mp in sorted(found, key=len, reverse=True):
        unmount(Path(mp), detach=True)


SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def read_only_view(dir_fd: int) -> int:
    """A new fd of the directory *dir_fd* on a detached read-only clone of its mount (new mount
    API: ``open_tree(OPEN_TREE_CLONE)`` + ``mount_setattr(MOUNT_ATTR_RDONLY)``): nothing can be
    written through it or beneath it (EROFS), while the original mount stays writable.  The
    clone goes away with its last fd.  Needs CAP_SYS_ADMIN and Linux 5.12; OSError otherwise."""
    tree = _check(_syscall(SYS_OPEN_TREE, dir_fd, b"", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
                           | AT_EMPTY_PATH), "open_tree")
    try:
        attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        _check(_syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                        ctypes.sizeof(attr)), "mount_setattr")
        # open_tree gives an O_PATH fd: a real one can be listed and read (and keeps the
        # detached clone alive after the O_PATH one is closed)
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=tree)
    finally:
        os.close(tree)
