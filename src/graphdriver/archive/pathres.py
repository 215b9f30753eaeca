"""Resolving paths beneath a directory file descriptor without ever leaving it.

- :func:`open_beneath` opens a path that must contain no symlink at all, beneath a root fd:
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` where the kernel has
  it (Linux >= 5.6, syscall 437), else a component-by-component walk with ``O_NOFOLLOW``.
- :func:`resolve_in_root` computes where a path really leads when symlinks are followed *as if
  the root were "/"* (``RESOLVE_IN_ROOT`` semantics: absolute targets are relative to the root,
  ".." stops at the root).  It returns the symlink-free relative path, which the caller then opens
  with :func:`open_beneath` (so a race that swaps a component for a symlink fails, never escapes).

openat2 is ``_fastapply.openat2`` where the native helpers are built, else a ctypes call (ctypes
is imported only then: it is a few ms of the confined child's start-up).  Imports only
:mod:`.native` of graphdriver (a leaf otherwise).
"""

from __future__ import annotations

import errno
import os

from .native import native_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable
else:
    from _collections import deque  # the same, without the collections package (start-up time)

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_SYS_OPENAT2 = 437
_PATH_MAX = 4096  # bytes of a path a system call takes, its NUL included
_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_MAX_LINKS = 40

_fastapply = native_module("_fastapply")


def _ctypes_openat2() -> Callable[[int, str, int, int, int], int] | None:
    """The openat2 system call through ctypes (None: no libc), where the native helper is not
    built: ctypes is imported only then (its import is start-up time of the confined child)."""
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):  # pragma: no cover - no libc: use the fallback
        return None
    syscall.restype = ctypes.c_long

    def call(dir_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
        how = OpenHow(flags | os.O_CLOEXEC, mode, resolve)
        fd = syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd),
                     ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                     ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return int(fd)

    return call


_openat2: Callable[[int, str, int, int, int], int] | None = (
    _fastapply.openat2 if _fastapply is not None else _ctypes_openat2())

_have_openat2: bool | None = None if _openat2 is not None else False


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """The openat2 system call (O_CLOEXEC added); OSError(ENOSYS) when the kernel lacks it."""
    if _openat2 is None:
        raise OSError(errno.ENOSYS, "openat2 unavailable")
    return _openat2(dir_fd, path, flags, mode, resolve)


def have_openat2() -> bool:
    global _have_openat2
    if _have_openat2 is None:
        # (the probe's fd of "/" is closed: the confined child makes it before its chroot)
        root = os.open("/", os.O_PATH | os.O_CLOEXEC)
        try:
            os.close(openat2(root, ".", os.O_PATH))
            _have_openat2 = True
        except OSError as exc:
            _have_openat2 = exc.errno not in (errno.ENOSYS, errno.EPERM)
        finally:
            os.close(root)
    return _have_openat2


def open_beneath(root_fd: int, path: str, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """Open *path* (relative, symlink-free) beneath *root_fd*; any symlink on the way fails.
    Paths of PATH_MAX bytes or more (a layer may hold them) are opened piece by piece."""
    if not path or path == ".":
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=root_fd)
    if have_openat2():
        if len(os.fsencode(path)) < _PATH_MAX:
            return openat2(root_fd, path, flags, 0, _BENEATH)
        return _open_in_pieces(root_fd, path, flags)
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise OSError(errno.EXDEV, "path leaves its root", path)

    def open_part(cur: int, part: str, last: bool) -> int:
        f = (flags if last else os.O_RDONLY | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(part, f, dir_fd=cur)

    return _open_chain(root_fd, parts, open_part)


def _open_chain(root_fd: int, pieces: list[str], open_one: Callable[[int, str, bool], int]) -> int:
    """Open each piece beneath the directory the previous one opened (``open_one(dir_fd, piece,
    is_last)``), closing what is passed; the last piece's fd."""
    cur = root_fd
    try:
        for i, piece in enumerate(pieces):
            nxt = open_one(cur, piece, i == len(pieces) - 1)
            if cur != root_fd:
                os.close(cur)
            cur = nxt
    except BaseException:
        if cur != root_fd:
            os.close(cur)
        raise
    return cur


def _open_in_pieces(root_fd: int, path: str, flags: int) -> int:
    """open_beneath for a path too long for one system call: pieces shorter than PATH_MAX, each
    opened with openat2 beneath the directory the previous one opened (so none leaves it)."""
    pieces: list[str] = []
    for part in path.split("/"):
        if pieces and len(os.fsencode(pieces[-1])) + 1 + len(os.fsencode(part)) < _PATH_MAX:
            pieces[-1] += "/" + part
        else:
            pieces.append(part)
    return _open_chain(root_fd, pieces, lambda cur, piece, last: openat2(
        cur, piece, flags if last else os.O_PATH | os.O_DIRECTORY, 0, _BENEATH))


def resolve_in_root(root_fd: int, path: str) -> str:
    """Where *path* leads beneath *root_fd*, following symlinks as if the root were "/".

    A missing component raises FileNotFoundError; ELOOP after 40 links.
    """
    parts = deque(p for p in path.split("/") if p and p != ".")
    real: list[str] = []
    links = 0
    while parts:
        comp = parts.popleft()
        if comp == "..":
            if real:
                real.pop()
            continue
        cand = "/".join([*real, comp])
        try:
            target = os.readlink(cand, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a symlink
                real.append(comp)
                continue
            raise
        links += 1
        if links > _MAX_LINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
        if target.startswith("/"):
            real = []
        parts.extendleft(reversed([p for p in target.split("/") if p and p != "."]))
    return "/".join(real)
