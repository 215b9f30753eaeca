"""Apply a layer tar onto a directory (moby's ``UnpackLayer`` semantics), in process.

Every path is resolved beneath the target directory through directory file descriptors, never
following a symlink: a path beneath a symlink, the archive's own or one a lower layer left (a vfs
layer's copy of its parent's ``/bin -> usr/bin``, an overlay layer's lower chain), is refused
(``UnsafeArchive``), as a layer must mean the same on every driver.  A failed apply, whatever
the cause (including KeyboardInterrupt), leaves the target as it was: an empty target is emptied
again; otherwise every replaced or removed path was renamed aside into a hidden scratch
directory inside the target and is put back, created paths are removed, and metadata of merged
directories and times of touched directories are restored.

The OCI changeset rules (image-spec layer.md; tests/archive/test_layer_rules.py and
tests/conformance/test_layer_semantics.py), where moby differs:

- A whiteout hides only what the layers below have: this layer's own ``x`` stays, whatever the
  order of ``x`` and ``.wh.x``; when that own ``x`` is a directory it becomes opaque (the lower
  ``x`` is still hidden).  A directory created over a whiteout this layer wrote (deleted and
  re-created in one layer) is opaque.
- With the lower layers known (``ApplyOptions.lower_fds``, an overlay layer's parent chain): a
  whiteout with nothing below to hide is not written; a directory the layer does not list but
  needs is made as overlayfs' copy-up makes it (the lower directory's owner, mode, times,
  xattrs); an opaque marker at the root, which overlayfs ignores there, whites out each lower
  entry instead.
- With the lower layers known, a path beneath a lower non-directory is refused as it is in one
  tree; a whiteout or opaque marker beneath one (or beneath this layer's own file, or under a
  directory this layer made opaque) hides nothing and leaves no trace; a directory made opaque
  drops this layer's whiteouts beneath it (overlayfs would list them); a directory made over
  this layer's own non-directory is opaque; a hard link to a lower file copies the file up
  first (one inode in the merged view, as in one tree).
- A directory the layer does not list, the root included, keeps its times (vfs: its copy in the
  target); the times recorded for a directory never land on what replaces it.
- An entry over an existing directory replaces its attributes, xattrs included.
- The root's own entry (``./``) sets the target's mode, owner, times and xattrs.

Choices where moby and GNU tar differ (documented here, tested in tests/archive):

- A path whose parent is a regular file (or another non-directory) is an ``InvalidArchive``
  error, as GNU tar fails ("Not a directory"); a missing parent is created (0755, root).
- xattrs: as root, failing to set any xattr is a ``NotSupported`` error; when not root,
  EPERM/ENOTSUP on an xattr, a chown or a device node is skipped and logged (moby's rootless rule).
- Hard links only link; the link's own header metadata is not applied (GNU tar does the same).
- Unknown entry types are refused (``InvalidArchive``); volume labels are skipped.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import (
    GraphDriverError,
    InvalidArchive,
    InvalidArgument,
    NotSupported,
    UnsafeArchive,
    from_oserror,
)
from ..fsutil import copy_file_data, empty_beneath, fs_name_of, remove_beneath, reserve_fd_table
from ..idmap import real_root
from ..logs import get_logger
from . import tarstream as ts
from .compression import decompress_stream, open_decompressed
from .jsontext import dumps as json_text
from .lowerview import LowerView
from .native import native_module
from .options import ApplyOptions as ApplyOptions  # re-exported: where the classes were
from .options import ApplyResult as ApplyResult
from .pathres import open_beneath
from .tarstream import TarEntry, TarReader
from .whiteout import (
    WHITEOUT_LINK_DIR,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    WhiteoutFormat,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, BinaryIO


_fastapply = native_module("_fastapply")
#: ``create_file``: one regular file of a run, created and written in C (as root only)
_native_create: Callable[..., tuple[int, str] | None] | None = (
    _fastapply.create_file if _fastapply else None)
#: ``set_dir_times``: the times of many directories at the end of an apply, in one call
_native_dir_times: Callable[[int, list[tuple[str, int, int]]], list[int]] | None = (
    _fastapply.set_dir_times if _fastapply else None)
#: ``fs_type``: fstatfs's f_type of an fd (see _writer_creates; fsutil.fs_magic takes a path,
#: through ctypes, which the confined child does not import)
_native_fs_type: Callable[[int], int] | None = getattr(_fastapply, "fs_type", None)
#: the filesystems where a new inode costs next to nothing
_CHEAP_INODES = ("tmpfs", "ramfs")

log = get_logger(__name__)

#: the real root (not a user namespace's): read at import, before the confined child chroots
#: away from /proc
_REAL_ROOT = real_root()

SCRATCH_PREFIX = ".graphdriver-apply-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE_LIMIT = 256
_PROGRESS_STEP = 4 << 20
_PLNK_PREFIX = WHITEOUT_LINK_DIR + "/"


def _writer_creates(root_fd: int) -> bool:
    """Whether the native runs' file writer creates files too (beside the runs, which make the
    rest): where making an inode costs time of its own -- ext4 without a journal searches past
    every inode freed in the last minute for each new one, which two threads do side by side --
    but not on tmpfs, where it is cheap and the second thread's time is better spent writing.
    ``GRAPHDRIVER_WRITER_CREATES`` = 1 or 0 says so instead (tests, A/B runs)."""
    forced = os.environ.get("GRAPHDRIVER_WRITER_CREATES")
    if forced in ("0", "1"):
        return forced == "1"
    if _native_fs_type is None:
        return False
    try:
        return fs_name_of(_native_fs_type(root_fd)) not in _CHEAP_INODES
    except OSError:
        return False

# Set by the confined child (isolate.py): it may chdir (single-threaded, chrooted), which is how
# xattrs are set on symlinks and device nodes when /proc is not there.
allow_chdir = False


class _SignalGate:
    """Where SIGINT/SIGTERM may land in an apply (the confined child's handlers go through it).

    An interrupt raised between creating a path and writing it into the undo journal would leave
    that path behind after the rollback; so the gate is closed while an entry is being created
    (and during the rollback itself), and an interrupt that comes then waits for it to open.  It
    is open while the reader waits for input and while a file's data is copied.
    """

    __slots__ = ("closed", "pending")

    def __init__(self) -> None:
        self.closed = False
        self.pending: BaseException | None = None

    def interrupt(self, exc: BaseException) -> None:
        """Raise *exc* now, or when the gate next opens."""
        if self.closed:
            if self.pending is None:
                self.pending = exc
            return
        raise exc

    def open(self) -> None:
        self.closed = False
        if self.pending is not None:
            exc, self.pending = self.pending, None
            raise exc


SIGNAL_GATE = _SignalGate()


# A plain class with slots, not a dataclass: the confined apply child does not import
# dataclasses (and inspect) at every apply (ApplyOptions and ApplyResult, in .options, too).
class _DirMeta:
    """A directory's own metadata, as read before the apply changed it."""

    __slots__ = ("atime_ns", "gid", "mode", "mtime_ns", "uid", "xattrs")

    def __init__(self, mode: int, uid: int, gid: int, atime_ns: int, mtime_ns: int,
                 xattrs: dict[str, bytes] | None = None) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.xattrs = {} if xattrs is None else xattrs


def _join(parent: str, base: str) -> str:
    return f"{parent}/{base}" if parent else base


def _read_meta(fd: int) -> _DirMeta:
    st = os.fstat(fd)
    xattrs: dict[str, bytes] = {}
    try:
        for k in os.listxattr(fd):
            try:
                xattrs[k] = os.getxattr(fd, k)
            except OSError:
                pass
    except OSError:
        pass
    return _DirMeta(
        stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, xattrs
    )


def _write_meta(fd: int, m: _DirMeta) -> None:
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode)
    try:
        current = set(os.listxattr(fd))
    except OSError:
        current = set()
    for k in current - set(m.xattrs):
        try:
            os.removexattr(fd, k)
        except OSError:
            pass
    for k, v in m.xattrs.items():
        try:
            os.setxattr(fd, k, v)
        except OSError:
            pass
    os.utime(fd, ns=(m.atime_ns, m.mtime_ns))


class _Applier:
    def __init__(self, root_fd: int, opts: ApplyOptions) -> None:
        self.root_fd = root_fd
        self.opts = opts
        self.fs_size: int | None = None  # bytes of the target filesystem, once a sparse file asks
        self.whiteouts = opts.whiteout_format
        if not isinstance(self.whiteouts, WhiteoutFormat):
            raise InvalidArgument(f"unknown whiteout format {self.whiteouts!r}")
        self.overlay = self.whiteouts.kept  # whiteouts and opaque markers stay on disk
        # what the layers below show (overlay with known lowers only; vfs has them in the target)
        self.lowers = (LowerView(opts.lower_fds, self.whiteouts)
                       if self.overlay and opts.lower_fds is not None else None)
        self.whited: set[str] = set()  # whiteouts this apply wrote (overlay)
        # lower files copied up as hard-link targets (overlay): still the lower layers' paths,
        # which this layer's whiteouts and opaque directories hide
        self.copied_up: set[str] = set()
        self.idmap = opts.idmap
        self.identity = opts.idmap.is_identity
        self.euid = os.geteuid()
        self.egid = os.getegid()
        self.is_root = _REAL_ROOT
        mask = os.umask(0o022)
        os.umask(mask)
        self.umask = mask
        self.root_uid, self.root_gid = opts.idmap.root_pair()
        with os.scandir(root_fd) as it:
            self.empty_start = next(iter(it), None) is None
        # Whether this apply can vouch for the files it wrote: proof by construction that each
        # regular file with data is, at the apply's end, where its entry named it, a regular
        # file of the entry's size and no other entry's file -- what the check after an apply
        # (tarsplit.verify_packed) would otherwise stat each recorded file for.  It holds while
        # every entry is a create that met nothing in the way, on a target that was empty; the
        # first entry that is anything else (see _entry) and every removal (_remove) end it,
        # for good.  The native loop (_fastapply.files) only ever creates (O_EXCL, mkdirat,
        # symlinkat, linkat: what is in the way stops it) and leaves it as it is.
        self.vouched = self.empty_start
        # whether the native runs' file writer creates files (set in run: _writer_creates)
        self.creates_elsewhere = False
        self.root_meta = _read_meta(root_fd)
        # logical dir path -> (fd, real path, setgid)
        self.cache: dict[str, tuple[int, str, bool]] = {
            "": (root_fd, "", bool(self.root_meta.mode & stat.S_ISGID))
        }
        # real paths this apply created, kept when the target was not empty (on an empty one,
        # everything is the apply's own: 100k names would cost ~15 MB)
        self.created: set[str] = set()
        self.merged: set[str] = set()  # pre-existing directories the archive merged into
        # pre-existing directories the layer does not list but put entries beneath: a whiteout
        # of one hides only what was there before (layer.md), not this layer's own entries
        self.holds_own: set[str] = set()
        self.archive_links: set[str] = set()  # symlinks this apply created
        self.journal: list[tuple[object, ...]] = []
        self.journal_fd = -1
        self.touched: set[str] = set()
        self.merged_meta: set[str] = set()
        # directory -> times (and mode) to set at the end; the root, which the layer does not
        # list unless it has a "./" entry, keeps its own (every layer's implicit parent)
        self.dir_times: dict[str, tuple[int, int, int | None]] = {
            "": (self.root_meta.atime_ns, self.root_meta.mtime_ns, None)}
        self.scratch = SCRATCH_PREFIX + f"{os.getpid()}-{os.urandom(6).hex()}"
        self.scratch_fd: int | None = None
        self.aside_count = 0
        self.plnk: dict[str, str] = {}
        self.size = 0
        self.warned: set[str] = set()
        self.graveyard: list[int] = []
        # the native create (open, write, chown, chmod, utime, close in one call) is for root
        # only: a non-root apply skips some failures, which needs each step in Python
        self.native_create = _native_create if self.is_root else None
        if opts.journal:
            self._open_journal()

    # ---- the undo journal on disk --------------------------------------------------------------
    def _open_journal(self) -> None:
        """The scratch directory now, with the journal's first line: the start state."""
        sfd = self._scratch_fd()
        self.journal_fd = os.open(JOURNAL_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                  | os.O_APPEND | os.O_CLOEXEC, 0o600, dir_fd=sfd)
        self._write_journal(["start", self.empty_start, _meta_json(self.root_meta), os.getpid()])

    def _write_journal(self, line: list[object]) -> None:
        data = (json_text(line) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.journal_fd, view):]

    def _log(self, step: tuple[object, ...]) -> None:
        """One undo step: in memory, and on disk when the journal is kept."""
        self.journal.append(step)
        if self.journal_fd >= 0:
            self._write_journal(_step_json(step))

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _soft_fail(self, what: str, exc: OSError) -> None:
        """Not root: EPERM/ENOTSUP on ownership, xattrs or devices is skipped (rootless rule),
        and so is EINVAL on a chown (an owner the user namespace does not map: without
        subordinate ids the file stays the user's)."""
        unmapped = exc.errno == errno.EINVAL and what.startswith("chown ")
        if self.is_root or (not unmapped and exc.errno not in (
            errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES
        )):
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):  # EPERM: PermissionDenied
                raise NotSupported(f"{what}: {exc.strerror}") from exc
            raise from_oserror(exc, what) from exc
        if what not in self.warned:
            self.warned.add(what)
            log.debug("not root: skipped %s (%s)", what, exc.strerror)

    def _touch_dir(self, real: str) -> None:
        """Before changing the contents of a pre-existing directory, remember its times."""
        if self.empty_start or real in self.touched or real in self.created:
            return
        self.touched.add(real)
        st = os.stat(real or ".", dir_fd=self.root_fd, follow_symlinks=False)
        self._log(("times", real, st.st_atime_ns, st.st_mtime_ns))

    def _note_new(self, preal: str, real: str) -> None:
        if self.empty_start or real in self.created:
            return  # everything in the target is this apply's own, or this path is noted
        if preal not in self.created:
            self._touch_dir(preal)
            self._log(("new", real))
            self._hold_parents(preal)
        self.created.add(real)

    def _hold_parents(self, preal: str) -> None:
        """The pre-existing directories above an entry of this layer hold its own entries."""
        up = preal
        while up and up not in self.holds_own and up not in self.created:
            self.holds_own.add(up)
            up = up.rpartition("/")[0]

    def _clear_for_new(self, pfd: int, preal: str, base: str) -> None:
        """Write-ahead for a path about to be created in a target that held something: what is
        there goes aside (journalled), then the new path is journalled *before* it exists, so a
        kill between the create and the journal line cannot leave an unrecorded path behind."""
        if self.empty_start:
            return
        try:
            os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            pass
        else:
            self._make_room(pfd, preal, base, False)
        self._note_new(preal, _join(preal, base))

    def _clear_cache(self) -> None:
        """Forget every cached directory.  The fds are closed later (``_bury``), at a point where
        no caller still holds one of them."""
        root = self.cache[""]
        for key, (fd, _, _) in self.cache.items():
            if key:
                self.graveyard.append(fd)
        self.cache = {"": root}

    def _evict_oldest(self) -> None:
        """Forget the older half of the cached directories (the root stays): the newest are
        the parents of what comes next, so a tree of any depth opens each directory once."""
        keys = list(self.cache)
        for key in keys[:len(keys) // 2]:
            if key:
                self.graveyard.append(self.cache.pop(key)[0])

    def _bury(self) -> None:
        for fd in self.graveyard:
            os.close(fd)
        self.graveyard.clear()

    def _scratch_fd(self) -> int:
        if self.scratch_fd is None:
            self._touch_dir("")
            os.mkdir(self.scratch, 0o700, dir_fd=self.root_fd)
            self.scratch_fd = os.open(self.scratch, _DIR_FLAGS, dir_fd=self.root_fd)
        return self.scratch_fd

    # ---- resolution ----------------------------------------------------------------------------
    def _dir(self, logical: str, create: bool, name: str) -> tuple[int, str, bool] | None:
        """The directory *logical* (a normalized relative path) beneath the root."""
        hit = self.cache.get(logical)
        if hit is not None:
            return hit
        if len(self.cache) > _CACHE_LIMIT:
            self._evict_oldest()
        # nearest cached ancestor (the parent, in a tar listed parents first)
        parts = logical.split("/")
        i = len(parts) - 1
        ancestor = logical
        while i > 0:
            ancestor = ancestor[:ancestor.rfind("/")]
            if ancestor in self.cache:
                break
            i -= 1
        cur_fd, cur_real, cur_sgid = self.cache[ancestor if i else ""]
        cached = True  # whether cur_fd is the cache's (else this walk closes it)
        try:
            for j in range(i, len(parts)):
                comp = parts[j]
                real = _join(cur_real, comp)
                try:
                    fd = os.open(comp, _DIR_FLAGS, dir_fd=cur_fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    self._mkdir_parent(cur_fd, cur_real, comp, name=name)
                    fd = os.open(comp, _DIR_FLAGS, dir_fd=cur_fd)
                except (NotADirectoryError, OSError) as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    st = os.lstat(comp, dir_fd=cur_fd)
                    if not stat.S_ISLNK(st.st_mode):
                        if not create:
                            return None
                        if real not in self.whited:
                            raise InvalidArchive(
                                f"cannot create {name!r}: parent {real!r} is not a directory"
                            ) from exc
                        fd = self._recreate_over_whiteout(cur_fd, cur_real, comp)
                    elif real in self.archive_links:
                        raise UnsafeArchive(
                            f"{name!r} crosses symlink {real!r} created by the archive"
                        ) from exc
                    else:  # a layer means the same on every driver: never through a symlink
                        raise UnsafeArchive(
                            f"{name!r} lies beneath symlink {real!r} of a lower layer"
                        ) from exc
                st = os.fstat(fd)
                if not self.empty_start and real not in self.created:
                    # a directory the layer does not list keeps its times (an entry may set them)
                    self.dir_times.setdefault(real, (st.st_atime_ns, st.st_mtime_ns, None))
                sgid = bool(st.st_mode & stat.S_ISGID)
                # the last directory is cached; those before it while there is room (a 2000-level
                # path opened at once holds one uncached fd at a time, not 2000)
                keep = j == len(parts) - 1 or len(self.cache) < _CACHE_LIMIT
                if keep:
                    self.cache["/".join(parts[: j + 1])] = (fd, real, sgid)
                if not cached:
                    os.close(cur_fd)
                cur_fd, cur_real, cur_sgid, cached = fd, real, sgid, keep
        finally:
            if not cached:
                os.close(cur_fd)
        return cur_fd, cur_real, cur_sgid

    def _recreate_over_whiteout(self, pfd: int, preal: str, base: str) -> int:
        """An entry beneath a path this layer whited out (deleted, then re-created by an entry
        under it): a new directory, opaque, in place of the whiteout; its fd."""
        self._remove(pfd, preal, base)
        self._mkdir_parent(pfd, preal, base, copy_up=False)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        self.whiteouts.mark_opaque(fd)
        return fd

    def _lower_shows(self, real: str) -> os.stat_result | None:
        """What the layers below show at *real* through this layer as the apply has left it so
        far (overlayfs' rules: a non-directory or an opaque directory of this layer at *real* or
        above it hides what lies below); None when nothing.  Overlay with known lowers only."""
        assert self.lowers is not None
        parts = real.split("/")
        for i in range(1, len(parts) + 1):
            up = "/".join(parts[:i])  # its parents were just found to be real directories
            try:
                st = os.lstat(up, dir_fd=self.root_fd)
            except FileNotFoundError:
                break
            if not stat.S_ISDIR(st.st_mode):
                return None
            fd = os.open(up, _DIR_FLAGS, dir_fd=self.root_fd)
            try:
                if self.whiteouts.is_opaque(fd):
                    return None
            finally:
                os.close(fd)
        hit = self.lowers.find(real)
        return None if hit is None else hit[0]

    def _refuse_lower_symlink(self, path: str, name: str) -> None:
        """*name* (a whiteout or an opaque marker) is refused where a layer below shows a
        symlink at *path* or above it and this layer has nothing of its own there (vfs refuses
        it in its copy of the tree); the archive's own symlinks are ``_dir``'s to refuse."""
        parts = path.split("/") if path else []
        for i in range(1, len(parts) + 1):
            up = "/".join(parts[:i])
            try:
                st = os.lstat(up, dir_fd=self.root_fd)
            except FileNotFoundError as exc:
                shown = self._lower_shows(up)
                if shown is not None and stat.S_ISLNK(shown.st_mode):
                    raise UnsafeArchive(
                        f"{name!r} lies beneath symlink {up!r} of a lower layer") from exc
                if shown is None or not stat.S_ISDIR(shown.st_mode):
                    return
                continue
            if not stat.S_ISDIR(st.st_mode):
                return

    def _mkdir_parent(self, pfd: int, preal: str, base: str, copy_up: bool = True,
                      name: str = "") -> None:
        """A directory the layer needs but does not list: overlayfs' copy-up of what the layers
        below show there (a lower non-directory is refused, as it would be in one tree)."""
        real = _join(preal, base)
        lower_fd = None
        if copy_up and self.lowers is not None:
            shown = self._lower_shows(real)
            if shown is not None and stat.S_ISLNK(shown.st_mode):
                raise UnsafeArchive(f"{name!r} lies beneath symlink {real!r} of a lower layer")
            if shown is not None and not stat.S_ISDIR(shown.st_mode):
                raise InvalidArchive(f"cannot create {name!r}: parent {real!r} is not a "
                                     "directory")
            if shown is not None:
                lower_fd = self.lowers.open_dir(real)
        self._touch_dir(preal)  # before the parent's times change: a rollback restores them
        if lower_fd is not None:
            try:
                self._copy_up_dir(pfd, preal, base, lower_fd)
            finally:
                os.close(lower_fd)
            return
        os.mkdir(base, 0o755, dir_fd=pfd)
        self._note_new(preal, real)
        if (self.root_uid, self.root_gid) != (self.euid, self.egid):
            try:
                os.chown(base, self.root_uid, self.root_gid, dir_fd=pfd, follow_symlinks=False)
            except OSError as exc:
                self._soft_fail(f"chown {base}", exc)
        if self.umask & 0o755:
            os.chmod(base, 0o755, dir_fd=pfd)

    def _copy_up_dir(self, pfd: int, preal: str, base: str, lower_fd: int) -> None:
        """A directory the layer does not list, made in the upper as overlayfs' copy-up makes
        it: the lower directory's owner, mode, times and xattrs (not overlayfs' own)."""
        real = _join(preal, base)
        meta = _read_meta(lower_fd)
        os.mkdir(base, 0o700, dir_fd=pfd)
        self._note_new(preal, real)
        dfd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            try:
                os.fchown(dfd, meta.uid, meta.gid)
            except OSError as exc:
                self._soft_fail(f"chown {real!r}", exc)
            os.fchmod(dfd, meta.mode)
            for k, v in meta.xattrs.items():
                if self.whiteouts.is_private_xattr(k):
                    continue
                try:
                    os.setxattr(dfd, k, v)
                except OSError as exc:
                    self._soft_fail(f"set xattr {k} on {real!r}", exc)
        finally:
            os.close(dfd)
        self.dir_times[real] = (meta.atime_ns, meta.mtime_ns, None)

    # ---- removal -------------------------------------------------------------------------------
    def _remove(self, pfd: int, preal: str, base: str, st: os.stat_result | None = None) -> None:
        self.vouched = False  # whatever goes may be (or hold) a file this apply wrote
        real = _join(preal, base)
        if st is None:
            try:
                st = os.lstat(base, dir_fd=pfd)
            except FileNotFoundError:
                return
        is_dir = stat.S_ISDIR(st.st_mode)
        if self.empty_start or real in self.created:
            if is_dir:
                self._clear_cache()
                remove_beneath(pfd, base)
            else:
                os.unlink(base, dir_fd=pfd)
        else:
            self._touch_dir(preal)
            sfd = self._scratch_fd()
            self.aside_count += 1
            aside = str(self.aside_count)
            if is_dir:
                self._clear_cache()
            self._log(("moved", real, aside))  # first: an undo of a move not made is a no-op
            os.rename(base, aside, src_dir_fd=pfd, dst_dir_fd=sfd)
        self.archive_links.discard(real)
        self.created.discard(real)
        self.merged.discard(real)
        self.whited.discard(real)
        self.copied_up.discard(real)
        # the times recorded for a directory stay with it: never set on what replaces it
        self.dir_times.pop(real, None)
        if is_dir:
            below = real + "/"
            for key in [k for k in self.dir_times if k.startswith(below)]:
                del self.dir_times[key]

    def _make_room(self, pfd: int, preal: str, base: str, new_is_dir: bool) -> bool:
        """Something exists at base: True to merge (dir over dir), else it is removed."""
        st = os.lstat(base, dir_fd=pfd)
        if new_is_dir and stat.S_ISDIR(st.st_mode):
            return True
        self._remove(pfd, preal, base, st)
        return False

    # ---- whiteouts -----------------------------------------------------------------------------
    def _own(self, real: str) -> bool:
        """Whether the path (there now) is this layer's own entry: this apply put it there."""
        return self.empty_start or real in self.created

    def _whiteout(self, parent: str, target: str, name: str) -> None:
        """OCI layer.md: a whiteout hides only what the layers below have; this layer's own
        entry stays (in either order), and its own directory there becomes opaque."""
        if target in ("", ".", "..") or target.startswith(WHITEOUT_META_PREFIX[4:]):
            raise UnsafeArchive(f"whiteout {name!r} names no removable entry")
        hit = self._dir(parent, False, name)
        if self.lowers is not None:
            self._refuse_lower_symlink(parent, name)
        if hit is not None:
            pfd, preal, _ = hit
            real = _join(preal, target)
            if real in self.copied_up:  # a lower file, copied up for a link: hidden
                self._remove(pfd, preal, target)
            try:
                st: os.stat_result | None = os.lstat(target, dir_fd=pfd)
            except FileNotFoundError:
                st = None
            if st is not None and (self._own(real) or real in self.merged):
                if stat.S_ISDIR(st.st_mode):
                    self._hide_below(pfd, real, target)
                return
            if st is not None and real in self.holds_own and stat.S_ISDIR(st.st_mode):
                # a directory the layer does not list, with its own entries beneath: the lower
                # part of it goes, what the layer put there stays
                self._hide_below(pfd, real, target)
                return
        if not self.overlay:
            if hit is not None:
                self._remove(hit[0], hit[1], target)
            return
        real = _join(hit[1] if hit is not None else parent, target)
        if self.lowers is not None and self._lower_shows(real) is None:
            if hit is not None:  # nothing below to hide: no whiteout, only what was here goes
                self._remove(hit[0], hit[1], target)
            return
        if hit is None:
            hit = self._dir(parent, True, name)
            assert hit is not None
        pfd, preal, _ = hit
        self._remove(pfd, preal, target)
        self.whiteouts.write_whiteout(pfd, target)
        self._note_new(preal, real)
        self.whited.add(real)
        if (self.root_uid, self.root_gid) != (self.euid, self.egid):
            os.chown(target, self.root_uid, self.root_gid, dir_fd=pfd, follow_symlinks=False)

    def _hide_below(self, pfd: int, real: str, base: str) -> None:
        """This layer's directory *real* hides what the layers below had there (it is opaque)."""
        dfd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            if self.overlay:
                if self.lowers is not None and self._lower_shows(real) is None:
                    return
                self._save_dir_meta(dfd, real)
                self.whiteouts.mark_opaque(dfd)
                self._drop_whiteouts_beneath(real)
            self._prune(dfd, real)
        finally:
            os.close(dfd)

    def _opaque(self, parent: str, name: str) -> None:
        if self.overlay and self.lowers is not None:
            if not parent:
                self._opaque_root()
                return
            self._dir(parent, False, name)  # refuses a path through the archive's own symlink
            self._refuse_lower_symlink(parent, name)
            shown = self._lower_shows(parent)
            if shown is None or not stat.S_ISDIR(shown.st_mode):
                return  # no directory below to hide: no trace (nor beneath a non-directory)
        hit = self._dir(parent, self.overlay, name)
        if hit is None:
            return
        dfd, dreal, _ = hit
        if self.overlay:
            self._save_dir_meta(dfd, dreal)
            self.whiteouts.mark_opaque(dfd)
            self._drop_whiteouts_beneath(dreal)
        self._prune(dfd, dreal)

    def _drop_whiteouts_beneath(self, dreal: str) -> None:
        """The directory *dreal* became opaque: this layer's whiteouts beneath it hide nothing
        now, and overlayfs would list them (a name readdir shows and lstat cannot find); the
        lower files copied up beneath it as link targets are hidden with the rest below."""
        below = dreal + "/" if dreal else ""
        hidden = [w for w in self.whited | self.copied_up if w.startswith(below)]
        for real in sorted(hidden, reverse=True):
            parent, _, base = real.rpartition("/")
            pfd = open_beneath(self.root_fd, parent)
            try:
                self._remove(pfd, parent, base)
            finally:
                os.close(pfd)

    def _opaque_root(self) -> None:
        """An opaque marker at the layer's root: overlayfs ignores the opaque xattr on a layer's
        root, so each lower entry is whited out (this layer's own directories become opaque)."""
        assert self.lowers is not None
        self._prune(self.root_fd, "")
        for base in sorted(self.lowers.names("")):
            if base == self.scratch:
                continue
            if base in self.copied_up:
                self._remove(self.root_fd, "", base)
            try:
                st = os.lstat(base, dir_fd=self.root_fd)
            except FileNotFoundError:
                self.whiteouts.write_whiteout(self.root_fd, base)
                self._note_new("", base)
                self.whited.add(base)
                if (self.root_uid, self.root_gid) != (self.euid, self.egid):
                    os.chown(base, self.root_uid, self.root_gid, dir_fd=self.root_fd,
                             follow_symlinks=False)
                continue
            if stat.S_ISDIR(st.st_mode):
                self._hide_below(self.root_fd, base, base)

    def _prune(self, dfd: int, dreal: str) -> None:
        """Remove what this apply did not put in the directory (moby's unpackedPaths rule)."""
        if self.empty_start:
            return  # all of it is this apply's
        with os.scandir(dfd) as it:
            children = [(d.name, d.is_dir(follow_symlinks=False)) for d in it]
        for base, is_dir in children:
            real = _join(dreal, base)
            if not dreal and base == self.scratch:
                continue
            if real in self.created or real in self.merged or real in self.holds_own:
                if is_dir:
                    sub = os.open(base, _DIR_FLAGS, dir_fd=dfd)
                    try:
                        self._prune(sub, real)
                    finally:
                        os.close(sub)
                continue
            self._remove(dfd, dreal, base)

    # ---- entries -------------------------------------------------------------------------------
    @staticmethod
    def _check_ids(e: TarEntry) -> None:
        """Ids no file can have: the reader hands them on as Go's does; the apply refuses."""
        if not (0 <= e.uid <= ts.MAX_ID and 0 <= e.gid <= ts.MAX_ID):
            raise InvalidArchive(f"{e.name!r}: uid/gid {e.uid}/{e.gid} out of range")

    def _ids(self, e: TarEntry) -> tuple[int, int]:
        if self.idmap.is_identity:
            return e.uid, e.gid
        try:
            return self.idmap.to_host(e.uid, e.gid)
        except InvalidArgument as exc:
            raise InvalidArchive(f"{e.name!r}: {exc}") from exc

    def _check_xattrs(self, e: TarEntry) -> None:
        if self.overlay:
            for k in e.xattrs:
                if self.whiteouts.is_private_xattr(k):
                    raise UnsafeArchive(f"{e.name!r} carries overlay xattr {k!r}")

    def _set_xattrs_fd(self, fd: int, e: TarEntry) -> None:
        for k, v in e.xattrs.items():
            try:
                os.setxattr(fd, k, v)
            except OSError as exc:
                self._soft_fail(f"set xattr {k} on {e.name!r}", exc)

    def _set_xattrs_path(self, pfd: int, base: str, e: TarEntry) -> None:
        if not e.xattrs:
            return
        if os.path.isdir("/proc/self/fd"):
            path = f"/proc/self/fd/{pfd}/{base}"
            for k, v in e.xattrs.items():
                try:
                    os.setxattr(path, k, v, follow_symlinks=False)
                except OSError as exc:
                    self._soft_fail(f"set xattr {k} on {e.name!r}", exc)
            return
        if not allow_chdir:
            raise NotSupported(f"cannot set xattrs on {e.name!r} without /proc")
        os.fchdir(pfd)
        for k, v in e.xattrs.items():
            try:
                os.setxattr(base, k, v, follow_symlinks=False)
            except OSError as exc:
                self._soft_fail(f"set xattr {k} on {e.name!r}", exc)

    def _times(self, e: TarEntry) -> tuple[int, int]:
        at = e.atime_ns
        mt = e.mtime_ns
        return (at if at is not None and at >= mt else mt), mt

    def _chown_path(self, pfd: int, base: str, uid: int, gid: int, sgid: bool, e: TarEntry) -> None:
        if uid == self.euid and gid == self.egid and not sgid:
            return
        try:
            os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
        except OSError as exc:
            self._soft_fail(f"chown {e.name!r}", exc)

    def _check_sparse_size(self, e: TarEntry) -> None:
        """A sparse file may claim any size with a few bytes of data: one larger than the whole
        filesystem it lands on could never be filled in place, and is refused (GNU tar and Go
        stop only when ftruncate fails, which tmpfs or xfs allow up to 8 EiB)."""
        if self.fs_size is None:
            st = os.fstatvfs(self.root_fd)
            self.fs_size = st.f_blocks * st.f_frsize
        if e.size > self.fs_size:
            raise InvalidArchive(f"{e.name!r}: a sparse file of {e.size} bytes, larger than the "
                                 f"filesystem it is applied to ({self.fs_size} bytes)")

    def _regular(self, reader: TarReader, e: TarEntry, pfd: int, preal: str, sgid: bool,
                 base: str) -> bool:
        """A regular file; True when it was created anew with all its data (nothing in the
        way, not sparse: see ``vouched``)."""
        mode = e.mode
        if e.sparse is not None:
            self._check_sparse_size(e)
        create = self.native_create
        if create is not None and e.sparse is None and not e.xattrs:
            data = reader.take_buffered() if e.data_size else b""
            if data is not None:
                return self._regular_native(create, e, data, pfd, preal, sgid, base)
        self._clear_for_new(pfd, preal, base)
        fresh = e.sparse is None
        try:
            fd = os.open(base, _FILE_FLAGS, mode & 0o777, dir_fd=pfd)
        except FileExistsError:
            self._make_room(pfd, preal, base, False)
            fd = os.open(base, _FILE_FLAGS, mode & 0o777, dir_fd=pfd)
            fresh = False
        try:
            real = f"{preal}/{base}" if preal else base
            self._note_new(preal, real)
            if e.data_size:
                # the file is in the journal now: an interrupt may land while its data flows
                gate = SIGNAL_GATE
                gate.open()
                try:
                    reader.copy_data(e, fd)
                finally:
                    gate.closed = True
            elif e.sparse is not None and e.size:
                os.ftruncate(fd, e.size)
            self.size += e.size
            uid, gid = (e.uid, e.gid) if self.identity else self._ids(e)
            if uid != self.euid or gid != self.egid or sgid:
                try:
                    os.fchown(fd, uid, gid)
                except OSError as exc:
                    self._soft_fail(f"chown {e.name!r}", exc)
            if mode & 0o7000 or mode & self.umask:
                os.fchmod(fd, mode)
            if e.xattrs:
                self._set_xattrs_fd(fd, e)
            at = e.atime_ns
            mt = e.mtime_ns
            os.utime(fd, ns=((at if at is not None and at >= mt else mt), mt))
        finally:
            os.close(fd)
        return fresh

    def _regular_native(self, create: Callable[..., tuple[int, str] | None], e: TarEntry,
                        data: memoryview | bytes, pfd: int, preal: str, sgid: bool,
                        base: str) -> bool:
        """_regular's steps in one native call (the data is in the reader's buffer)."""
        mode = e.mode
        uid, gid = (e.uid, e.gid) if self.identity else self._ids(e)
        at = e.atime_ns
        mt = e.mtime_ns
        args = (mode, data, uid != self.euid or gid != self.egid or sgid, uid, gid,
                mode if mode & 0o7000 or mode & self.umask else -1,
                at if at is not None and at >= mt else mt, mt)
        self._clear_for_new(pfd, preal, base)
        fresh = True
        try:
            failed = create(pfd, base, *args)
        except FileExistsError:
            self._make_room(pfd, preal, base, False)
            failed = create(pfd, base, *args)
            fresh = False
        real = f"{preal}/{base}" if preal else base
        self._note_new(preal, real)
        self.size += e.size
        if failed is not None:
            err, step = failed
            exc = OSError(err, os.strerror(err))
            if step == "chown":
                self._soft_fail(f"chown {e.name!r}", exc)
            raise exc
        return fresh

    def _directory(self, e: TarEntry, parent: str, pfd: int, preal: str, sgid: bool,
                   base: str) -> bool:
        """A directory; True when it was created anew, or merged into one that was there
        (which moves no file), and made no file's way opaque."""
        real = _join(preal, base)
        mode = e.mode
        mkmode = mode & 0o777 if self.is_root else (mode & 0o777) | 0o700
        # deleted (or replaced by a non-directory) and re-created in this layer: the new
        # directory hides the old contents
        replaces_whiteout = real in self.whited
        replaces_own = False  # this layer's own non-directory (overlay with known lowers)
        if self.overlay and not replaces_whiteout and self.lowers is not None:
            try:
                replaces_own = not stat.S_ISDIR(os.lstat(base, dir_fd=pfd).st_mode)
            except FileNotFoundError:
                pass
        self._touch_dir(preal)  # before the parent's times change: a rollback restores them
        fresh = not replaces_whiteout
        try:
            os.mkdir(base, mkmode, dir_fd=pfd)
            created = True
        except FileExistsError:
            if self._make_room(pfd, preal, base, True):
                created = False
            else:
                os.mkdir(base, mkmode, dir_fd=pfd)
                created = True
                fresh = False  # over what was removed
        if created:
            self._note_new(preal, real)
        else:
            self.merged.add(real)
            if not self.empty_start:
                self._hold_parents(preal)
        key = _join(parent, base)
        hit = self.cache.get(key)
        if hit is None:
            got = self._dir(key, False, e.name)
            if got is None:
                raise InvalidArchive(f"directory {e.name!r} vanished while applying")
            hit = got
        self._dir_meta(e, hit[0], real, created, sgid)
        if created and (replaces_whiteout or (replaces_own and (
                (shown := self._lower_shows(real)) is not None
                and stat.S_ISDIR(shown.st_mode)))):
            self.whiteouts.mark_opaque(hit[0])
        # new files inherit the group of a setgid directory: remember the bit as it is now
        self.cache[key] = (hit[0], hit[1], bool(e.mode & stat.S_ISGID))
        return fresh

    def _dir_meta(self, e: TarEntry, dfd: int, real: str, created: bool, sgid: bool) -> None:
        if not created:
            self._save_dir_meta(dfd, real)
        uid, gid = self._ids(e)
        if uid != self.euid or gid != self.egid or sgid or not created:
            try:
                os.fchown(dfd, uid, gid)
            except OSError as exc:
                self._soft_fail(f"chown {e.name!r}", exc)
        mode = e.mode
        if self.is_root and (mode & 0o7000 or mode & self.umask or not created or sgid):
            os.fchmod(dfd, mode)
        if not created:
            self._drop_xattrs(dfd, e)
        if e.xattrs:
            self._set_xattrs_fd(dfd, e)
        # re-insert, so that the last-seen (deeper) directories get their times first (reversed)
        self.dir_times.pop(real, None)
        self.dir_times[real] = (*self._times(e), None if self.is_root else mode)

    def _drop_xattrs(self, dfd: int, e: TarEntry) -> None:
        """An entry over an existing directory replaces its attributes: xattrs the entry does
        not carry go (overlayfs' own, such as an opaque marker, stay)."""
        try:
            names = os.listxattr(dfd)
        except OSError:
            return
        for k in names:
            if k in e.xattrs or self.whiteouts.is_private_xattr(k) or k.startswith(
                    "security.selinux"):
                continue
            try:
                os.removexattr(dfd, k)
            except OSError as exc:
                self._soft_fail(f"remove xattr {k} from {e.name!r}", exc)

    def _save_dir_meta(self, dfd: int, real: str) -> None:
        if self.empty_start or real in self.created or real in self.merged_meta:
            return
        self.merged_meta.add(real)
        self._log(("meta", real, _read_meta(dfd)))

    def _symlink(self, e: TarEntry, pfd: int, preal: str, sgid: bool, base: str) -> bool:
        """A symlink; True when it was created with nothing in the way."""
        self._clear_for_new(pfd, preal, base)
        fresh = True
        try:
            os.symlink(e.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._make_room(pfd, preal, base, False)
            os.symlink(e.linkname, base, dir_fd=pfd)
            fresh = False
        real = _join(preal, base)
        self._note_new(preal, real)
        self.archive_links.add(real)
        uid, gid = self._ids(e)
        self._chown_path(pfd, base, uid, gid, sgid, e)
        self._set_xattrs_path(pfd, base, e)
        os.utime(base, ns=self._times(e), dir_fd=pfd, follow_symlinks=False)
        return fresh

    def _node(self, e: TarEntry, pfd: int, preal: str, sgid: bool, base: str) -> bool:
        """A device node or a FIFO; True when it was created with nothing in the way (or,
        not root, skipped: nothing was touched)."""
        if e.type == ts.FIFO:
            kind = stat.S_IFIFO
            dev = 0
        else:
            kind = stat.S_IFCHR if e.type == ts.CHARDEV else stat.S_IFBLK
            dev = os.makedev(e.devmajor, e.devminor)
            if self.overlay and kind == stat.S_IFCHR and dev == 0:
                raise UnsafeArchive(f"{e.name!r} is an overlay whiteout device inside the archive")
        for attempt in (0, 1):
            try:
                if kind == stat.S_IFIFO:
                    os.mkfifo(base, e.mode & 0o777, dir_fd=pfd)
                else:
                    os.mknod(base, kind | (e.mode & 0o777), dev, dir_fd=pfd)
                break
            except FileExistsError:
                if attempt:
                    raise
                self._make_room(pfd, preal, base, False)
            except PermissionError as exc:
                self._soft_fail(f"create device {e.name!r}", exc)
                return not attempt
        self._note_new(preal, _join(preal, base))
        uid, gid = self._ids(e)
        self._chown_path(pfd, base, uid, gid, sgid, e)
        if e.mode & 0o7000 or e.mode & self.umask:
            os.chmod(base, e.mode, dir_fd=pfd)
        self._set_xattrs_path(pfd, base, e)
        os.utime(base, ns=self._times(e), dir_fd=pfd, follow_symlinks=False)
        return not attempt

    def _hardlink(self, e: TarEntry, pfd: int, preal: str, base: str) -> bool:
        """A hard link; True when it is a new name for a file of this layer's own, made with
        nothing in the way (a link changes no existing name, type or size, and its entry has
        no data: it is not among the files the check looks at)."""
        fresh = True
        raw = e.raw_linkname
        target = ts.clean_name(raw)
        if not target or target == ".." or target.startswith("../"):
            raise UnsafeArchive(f"hard link {e.name!r} points outside the layer ({e.linkname!r})")
        if target.startswith(_PLNK_PREFIX):
            aside = self.plnk.get(target[len(_PLNK_PREFIX):])
            if aside is None:
                raise InvalidArchive(f"hard link {e.name!r} to unknown AUFS link {target!r}")
            src_fd = self._scratch_fd()
            src_base = aside
            fresh = False
        else:
            if target == e.name:  # moby's link(2) onto the removed path fails: refuse it too
                raise InvalidArchive(f"hard link {e.name!r} names itself")
            tparent, _, tbase = target.rpartition("/")
            if tparent.split("/", 1)[0] == self.scratch or target == self.scratch:
                raise UnsafeArchive(f"hard link {e.name!r} points into the scratch directory")
            if self.lowers is not None and self._copy_up_link_target(target, e.name):
                fresh = False
            hit = self._dir(tparent, False, e.name)
            if hit is None:
                raise InvalidArchive(f"hard link {e.name!r}: target {target!r} does not exist")
            src_fd, src_base = hit[0], tbase
        self._touch_dir(preal)  # before the parent's times change: a rollback restores them
        for attempt in (0, 1):
            try:
                os.link(src_base, base, src_dir_fd=src_fd, dst_dir_fd=pfd, follow_symlinks=False)
                break
            except FileExistsError:
                if attempt:
                    raise
                self._make_room(pfd, preal, base, False)
                fresh = False
            except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
                raise InvalidArchive(
                    f"hard link {e.name!r} to {target!r}: {exc.strerror}"
                ) from exc
        self._note_new(preal, _join(preal, base))
        return fresh

    def _copy_up_link_target(self, target: str, name: str) -> bool:
        """A hard link to a file of the layers below: as overlayfs copies a file up before it
        links to it, the file is copied into this layer first, so that the link and its target
        are one file in the merged view (as in one tree).  True when it did."""
        assert self.lowers is not None
        shown = self._lower_shows(target)
        if shown is None or not stat.S_ISREG(shown.st_mode):
            return False  # this layer's own, or nothing to link to: the link decides
        found = self.lowers.find(target)
        assert found is not None
        st, layer_fd = found
        tparent, _, tbase = target.rpartition("/")
        hit = self._dir(tparent, True, name)
        assert hit is not None
        pfd, preal, _ = hit
        src = open_beneath(layer_fd, target, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            self._clear_for_new(pfd, preal, tbase)
            dst = os.open(tbase, _FILE_FLAGS, 0o600, dir_fd=pfd)
            try:
                copy_file_data(src, dst, st.st_size)
                try:
                    os.fchown(dst, st.st_uid, st.st_gid)
                except OSError as exc:
                    self._soft_fail(f"chown {target!r}", exc)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                for k in os.listxattr(src):
                    if not self.whiteouts.is_private_xattr(k):
                        try:
                            os.setxattr(dst, k, os.getxattr(src, k))
                        except OSError as exc:
                            self._soft_fail(f"set xattr {k} on {target!r}", exc)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self.copied_up.add(_join(preal, tbase))
        return True

    def _plnk_file(self, reader: TarReader, e: TarEntry) -> None:
        """Regular files under /.wh..wh.plnk are extracted aside to serve as link targets."""
        sfd = self._scratch_fd()
        key = e.name[len(_PLNK_PREFIX):]
        if "/" in key:
            key = key.rsplit("/", 1)[1]
        self.aside_count += 1
        aside = f"plnk-{self.aside_count}"
        fd = os.open(aside, _FILE_FLAGS, e.mode & 0o777, dir_fd=sfd)
        try:
            if e.data_size:
                reader.copy_data(e, fd)
            uid, gid = self._ids(e)
            if uid != self.euid or gid != self.egid:
                try:
                    os.fchown(fd, uid, gid)
                except OSError as exc:
                    self._soft_fail(f"chown {e.name!r}", exc)
            os.fchmod(fd, e.mode)
            if e.xattrs:
                self._set_xattrs_fd(fd, e)
            os.utime(fd, ns=self._times(e))
        finally:
            os.close(fd)
        self.plnk[key] = aside

    # ---- main loop -----------------------------------------------------------------------------
    def run(self, reader: TarReader) -> None:
        progress = self.opts.progress
        next_progress = _PROGRESS_STEP
        regular = ts.REGULAR_TYPES
        gate = SIGNAL_GATE
        # Runs of plain entries go through the native loop (one call for many entries) when
        # this apply is the simple case: root, ids as they are, a target that was empty
        # (nothing to journal: a rollback empties it).
        native = (self.native_create is not None and self.identity and self.empty_start
                  and reader.can_apply_files())
        if native:
            # (where the writer creates files, the entries applied here wait for it: _settle)
            self.creates_elsewhere = _writer_creates(self.root_fd)
            reader.prepare_writes(self.creates_elsewhere)
        entries = iter(reader)
        while True:
            if native:
                next_progress = self._native_files(reader, next_progress)
            e = next(entries, None)
            if e is None:
                break
            gate.closed = True
            try:
                self._entry(reader, e, regular)
            finally:
                gate.closed = False
            next_progress = self._step_done(reader, next_progress)
        error = reader.finish_writes()
        if error is not None:
            self._native_error(error, reader)
        if progress is not None:
            progress(reader.bytes_read)

    def _step_done(self, reader: TarReader, next_progress: int) -> int:
        """After an entry or a native run (the gate open again): an interrupt that waited is
        raised now, and the progress is reported when due; returns the bytes read at which it
        is next due."""
        if SIGNAL_GATE.pending is not None:
            SIGNAL_GATE.open()
        progress = self.opts.progress
        if progress is not None and reader.bytes_read >= next_progress:
            progress(reader.bytes_read)
            return reader.bytes_read + _PROGRESS_STEP
        return next_progress

    def _native_files(self, reader: TarReader, next_progress: int) -> int:
        """Runs of plain entries in native calls (TarReader.apply_files), as long as the next
        entry is of their kind: with the signal gate closed during a call, open while the next
        entry is read; returns the bytes read at which the progress is next due (_step_done)."""
        gate = SIGNAL_GATE
        while True:
            if self.graveyard:
                self._settle(reader, None)  # the writer may still create files in them
                self._bury()
            gate.closed = True
            try:
                _, size, error, need = reader.apply_files(
                    self.cache, self.dir_times, self.archive_links, self.euid, self.egid,
                    self.umask, _CACHE_LIMIT)
                self.size += size
                if error is not None:
                    self._native_error(error, reader)
            finally:
                gate.closed = False
            next_progress = self._step_done(reader, next_progress)
            if len(self.cache) > _CACHE_LIMIT:
                self._evict_oldest()  # as _dir does before it caches one more
                continue
            if not need or not reader.prefetch(need):
                return next_progress

    def _settle(self, reader: TarReader, e: TarEntry | None) -> None:
        """Where the file writer creates files (``creates_elsewhere``): wait until it has made
        every file handed to it, before entry *e* is applied here or cached directories are
        closed (None); *e*'s name and its parents are then noted, so that no later run hands a
        file of those names to the writer (what a whiteout hides: _apply_entry)."""
        if not self.creates_elsewhere:
            return
        error = reader.settle_writes()
        if error is not None:
            self._native_error(error, reader)
        if e is not None:
            reader.note_applied(e.name)

    def _native_error(self, error: tuple[int, str, str], reader: TarReader) -> None:
        """Raise a native run's error, (errno, step, real path), or its file writer's: as
        _regular_native reports it.  A write from a map that fails with EFAULT read a page the
        input file no longer has (it was cut shorter: the reader's own reads there are a
        SIGBUS)."""
        err, step, real = error
        if err == errno.EFAULT and step == "write" and reader.mapped:
            raise GraphDriverError(f"writing {real!r}: its data is gone from the input file "
                                   "(it was cut shorter while it was read?)")
        if step == "create":  # the file writer's: it made nothing
            raise OSError(err, os.strerror(err), real)
        exc = OSError(err, os.strerror(err))
        if step == "chown":
            self._soft_fail(f"chown {real!r}", exc)
        raise exc

    def _entry(self, reader: TarReader, e: TarEntry, regular: frozenset[bytes]) -> None:
        """Apply one entry (with the signal gate closed: see _SignalGate); the apply no longer
        vouches for its files (``vouched``) unless the entry was a plain create: one of the
        kinds :meth:`_apply_entry` says True for, under the name the archive gives it (which
        is where the check looks), with data only when it is a regular file."""
        fresh = self._apply_entry(reader, e, regular)
        if fresh is not True or (e.data_size and e.type not in regular) \
                or not _plain_name(e):
            self.vouched = False

    def _apply_entry(self, reader: TarReader, e: TarEntry, regular: frozenset[bytes]) -> bool:
        """Apply one entry; True only when it was a create that met nothing in the way (see
        the handlers): any other outcome, a path that returns nothing included, is not."""
        self._settle(reader, e)
        if self.graveyard:
            self._bury()
        name = e.name
        if e.raw_name.startswith(b"/"):
            raise UnsafeArchive(f"absolute name {e.raw_name.decode(errors='replace')!r}")
        if name == ".." or name.startswith("../"):
            raise UnsafeArchive(f"{e.raw_name.decode(errors='replace')!r} leaves the layer")
        parent, _, base = name.rpartition("/")
        if not name:
            if e.type != ts.DIRECTORY:
                raise InvalidArchive("the archive's root entry is not a directory")
            self._check_xattrs(e)
            self._check_ids(e)
            self._dir_meta(e, self.root_fd, "", False, False)
            self.cache[""] = (self.root_fd, "", bool(e.mode & stat.S_ISGID))
            return True  # the root's own metadata: no file moves
        if name.startswith(self.scratch) and name.split("/", 1)[0] == self.scratch:
            raise UnsafeArchive(f"{name!r} names the apply's scratch directory")
        if name.startswith(WHITEOUT_META_PREFIX) and name != WHITEOUT_OPAQUE:
            # AUFS metadata at the top; plnk files are kept aside as hard link targets
            if name.startswith(_PLNK_PREFIX) and e.type in regular:
                self._plnk_file(reader, e)
            return False  # recorded, but not put where it is named
        if base.startswith(WHITEOUT_PREFIX):
            if base == WHITEOUT_OPAQUE:
                self._opaque(parent, name)
            else:
                hidden = base[len(WHITEOUT_PREFIX):]
                if self.creates_elsewhere:  # nor of the name it hides (see _settle)
                    reader.note_applied(f"{parent}/{hidden}" if parent else hidden)
                self._whiteout(parent, hidden, name)
            return False
        if e.xattrs:
            self._check_xattrs(e)
        self._check_ids(e)
        hit = self.cache.get(parent)
        if hit is None:
            hit = self._dir(parent, True, name)
            assert hit is not None
        pfd, preal, sgid = hit
        typ = e.type
        if typ in regular:
            return self._regular(reader, e, pfd, preal, sgid, base)
        if typ == ts.DIRECTORY:
            return self._directory(e, parent, pfd, preal, sgid, base)
        if typ == ts.SYMLINK:
            return self._symlink(e, pfd, preal, sgid, base)
        if typ == ts.HARDLINK:
            return self._hardlink(e, pfd, preal, base)
        if typ in (ts.CHARDEV, ts.BLOCKDEV, ts.FIFO):
            return self._node(e, pfd, preal, sgid, base)
        if typ == b"V":
            return False  # skipped: a volume label's data (if any) lands nowhere
        raise InvalidArchive(f"{name!r} has unsupported entry type {typ!r}")

    def finish(self) -> None:
        """Success: directory times (deepest last-seen first), scratch dir gone, fds closed."""
        self._clear_cache()
        self._bury()
        times = self.dir_times
        if _native_dir_times is not None:
            # the directories with times only, in one native call (a mode, the root's entry and
            # what the call could not do go the Python way, after it: times alone do not
            # change another directory's)
            plain = [(real, at, mt) for real, (at, mt, mode) in reversed(times.items())
                     if real and mode is None]
            for i in _native_dir_times(self.root_fd, plain):
                self._set_dir_time(*plain[i], None)
            times = {real: t for real, t in times.items() if not real or t[2] is not None}
        for real, (at, mt, mode) in reversed(times.items()):
            self._set_dir_time(real, at, mt, mode)
        if self.journal_fd >= 0:
            # The caller commits or rolls back; the root's final times are restored then.
            st = os.fstat(self.root_fd)
            self._write_journal(["done", st.st_atime_ns, st.st_mtime_ns])
            os.fsync(self.journal_fd)
            os.close(self.journal_fd)
            self.journal_fd = -1
            if self.scratch_fd is not None:
                os.close(self.scratch_fd)
                self.scratch_fd = None
            return
        if self.scratch_fd is not None:
            os.close(self.scratch_fd)
            self.scratch_fd = None
            remove_beneath(self.root_fd, self.scratch)
            if "" in self.dir_times:
                at, mt, _ = self.dir_times[""]
                os.utime(self.root_fd, ns=(at, mt))

    def _set_dir_time(self, real: str, at: int, mt: int, mode: int | None) -> None:
        parent, _, base = real.rpartition("/")
        if not real:
            if mode is not None:
                os.fchmod(self.root_fd, mode)
            os.utime(self.root_fd, ns=(at, mt))
            return
        try:
            pfd = open_beneath(self.root_fd, parent)
        except OSError:
            return
        try:
            if mode is not None:
                os.chmod(base, mode, dir_fd=pfd, follow_symlinks=True)
            os.utime(base, ns=(at, mt), dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        finally:
            os.close(pfd)

    # ---- rollback ------------------------------------------------------------------------------
    def rollback(self) -> None:
        try:
            self._clear_cache()
            self._bury()
        except OSError:
            pass
        if self.journal_fd >= 0:
            os.close(self.journal_fd)
            self.journal_fd = -1
        if self.scratch_fd is not None and self.empty_start:
            os.close(self.scratch_fd)
            self.scratch_fd = None
        if self.empty_start:
            empty_beneath(self.root_fd)
            _write_meta(self.root_fd, self.root_meta)
            return
        for step in reversed(self.journal):
            _undo_step(self.root_fd, self.scratch_fd, step)
        if self.scratch_fd is not None:
            os.close(self.scratch_fd)
            self.scratch_fd = None
            try:
                remove_beneath(self.root_fd, self.scratch)
            except OSError:
                pass
        _write_meta(self.root_fd, self.root_meta)


def _plain_name(e: TarEntry) -> bool:
    """Whether the archive's own name of *e* (one leading ``./`` and a directory's trailing
    ``/`` aside) is the path the apply used: no ``.``, ``..`` or empty component that
    cleaning took away, so that the check after the apply, which looks a recorded name up as
    the archive spells it, would find the very path the apply created."""
    raw = e.raw_name
    if raw.startswith(b"./"):
        raw = raw[2:]
    if raw.endswith(b"/") and e.type == ts.DIRECTORY:
        raw = raw[:-1]
    return raw.decode("utf-8", "surrogateescape") == e.name


def _undo_step(root_fd: int, scratch_fd: int | None, step: tuple[object, ...]) -> None:
    """Undo one journal step; a step that fails is logged and the rest still undone."""
    try:
        _undo(root_fd, scratch_fd, step)
    except OSError as exc:  # keep undoing the rest; report what could not be restored
        log.error("rollback step %r failed: %s", step[:2], exc)


def _undo(root_fd: int, scratch_fd: int | None, step: tuple[object, ...]) -> None:
    kind, real = step[0], step[1]
    assert isinstance(real, str)
    parent, _, base = real.rpartition("/")
    if kind == "new":
        try:
            pfd = open_beneath(root_fd, parent)
        except FileNotFoundError:
            return
        try:
            remove_beneath(pfd, base)
        finally:
            os.close(pfd)
    elif kind == "moved":
        aside = step[2]
        assert isinstance(aside, str)
        if scratch_fd is None or _missing(scratch_fd, aside):
            return  # logged before the move, which never happened
        pfd = open_beneath(root_fd, parent)
        try:
            remove_beneath(pfd, base)
            os.rename(aside, base, src_dir_fd=scratch_fd, dst_dir_fd=pfd)
        finally:
            os.close(pfd)
    elif kind == "meta":
        meta = step[2]
        assert isinstance(meta, _DirMeta)
        fd = open_beneath(root_fd, real)
        try:
            _write_meta(fd, meta)
        finally:
            os.close(fd)
    elif kind == "times":
        at, mt = step[2], step[3]
        assert isinstance(at, int) and isinstance(mt, int)
        fd = open_beneath(root_fd, real)
        try:
            os.utime(fd, ns=(at, mt))
        finally:
            os.close(fd)


def _missing(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    return False


# ---- the journal kept on disk (ApplyOptions.journal) -------------------------------------------

JOURNAL_NAME = "journal"


def _meta_json(m: _DirMeta) -> list[object]:
    return [m.mode, m.uid, m.gid, m.atime_ns, m.mtime_ns, {k: v.hex() for k, v in m.xattrs.items()}]


def _meta_from(obj: list[Any]) -> _DirMeta:
    mode, uid, gid, at, mt, xattrs = obj
    return _DirMeta(int(mode), int(uid), int(gid), int(at), int(mt),
                    {str(k): bytes.fromhex(v) for k, v in dict(xattrs).items()})


def _step_json(step: tuple[object, ...]) -> list[object]:
    if step[0] == "meta":
        assert isinstance(step[2], _DirMeta)
        return ["meta", step[1], _meta_json(step[2])]
    return list(step)


def _step_from(obj: list[Any]) -> tuple[object, ...]:
    kind = obj[0]
    if kind == "meta":
        return ("meta", str(obj[1]), _meta_from(obj[2]))
    if kind == "times":
        return ("times", str(obj[1]), int(obj[2]), int(obj[3]))
    if kind == "moved":
        return ("moved", str(obj[1]), str(obj[2]))
    if kind == "new":
        return ("new", str(obj[1]))
    raise ValueError(f"unknown journal step {kind!r}")


def kept_journals(root_fd: int) -> list[str]:
    """The scratch directories beneath *root_fd* that hold a kept journal (oldest apply first
    does not matter: an apply runs under the layer's lock, so there is at most one)."""
    with os.scandir(root_fd) as it:
        return sorted(d.name for d in it
                      if d.name.startswith(SCRATCH_PREFIX) and d.is_dir(follow_symlinks=False))


def _read_journal(root_fd: int, scratch: str) -> list[list[Any]]:
    import json

    try:
        fd = os.open(f"{scratch}/{JOURNAL_NAME}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=root_fd)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as f:
        lines = []
        for raw in f:
            try:
                lines.append(json.loads(raw))
            except ValueError:
                break  # a line cut by a crash: the step it describes was not taken yet
        return lines


def _wait_gone(pid: int, seconds: float = 60.0) -> None:
    """Wait while *pid* is a live graphdriver process (an apply child rolling back)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"graphdriver" not in f.read():
                    return
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    return
        except OSError:
            return
        time.sleep(0.05)


def commit_journal(root_fd: int) -> None:
    """The apply is committed: drop the kept journal and the moved-aside paths, and put back
    the root's times as the apply left them."""
    for scratch in kept_journals(root_fd):
        lines = _read_journal(root_fd, scratch)
        remove_beneath(root_fd, scratch)
        done = [ln for ln in lines if ln and ln[0] == "done"]
        if done:
            os.utime(root_fd, ns=(int(done[-1][1]), int(done[-1][2])))


def rollback_journal(root_fd: int) -> bool:
    """Undo an apply from its kept journal (after the child finished or died); False when there
    was no journal (nothing was applied)."""
    found = False
    for scratch in kept_journals(root_fd):
        lines = _read_journal(root_fd, scratch)
        if lines and lines[0][0] == "start" and len(lines[0]) > 3 and lines[-1][0] != "done":
            # The applier may still be rolling back itself (its parent died: SIGTERM); wait
            # for it, then undo whatever it left.
            _wait_gone(int(lines[0][3]))
            if _missing(root_fd, scratch):
                found = True
                continue
            lines = _read_journal(root_fd, scratch)
        if not lines or lines[0][0] != "start":
            remove_beneath(root_fd, scratch)
            continue
        found = True
        empty_start, root_meta = bool(lines[0][1]), _meta_from(lines[0][2])
        if empty_start:
            empty_beneath(root_fd)
        else:
            sfd = os.open(scratch, _DIR_FLAGS, dir_fd=root_fd)
            try:
                for line in reversed(lines[1:]):
                    if line[0] != "done":
                        _undo_step(root_fd, sfd, _step_from(line))
            finally:
                os.close(sfd)
            remove_beneath(root_fd, scratch)
        _write_meta(root_fd, root_meta)
    return found


def _open_target(target: str | os.PathLike[str] | int) -> tuple[int, bool]:
    if isinstance(target, int):
        return target, False
    try:
        return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), True
    except OSError as exc:
        raise from_oserror(exc, "open apply target") from exc


def apply_reader(reader: TarReader, root_fd: int, opts: ApplyOptions) -> ApplyResult:
    """Apply the entries of *reader* beneath *root_fd*; all or nothing."""
    applier = _Applier(root_fd, opts)
    try:
        applier.run(reader)
        applier.finish()
    except BaseException as exc:
        SIGNAL_GATE.closed = True  # a second signal must not cut the rollback short
        try:
            reader.stop_writes()  # no file is written any more while the rollback runs
            applier.rollback()
        except Exception as rb:  # pragma: no cover - reported, the original error wins
            log.error("rollback failed: %r", rb)
        finally:
            SIGNAL_GATE.closed = False
            SIGNAL_GATE.pending = None  # already stopping
        if isinstance(exc, GraphDriverError | KeyboardInterrupt | SystemExit):
            raise
        if isinstance(exc, OSError):
            raise from_oserror(exc, "apply layer") from exc
        if isinstance(exc, ValueError) and "null byte" in str(exc):
            # a path, link target or xattr name from a PAX record holding a NUL
            raise InvalidArchive("invalid tar: a name in the archive holds a NUL byte") from exc
        raise
    return ApplyResult(applier.size, reader.diff_id if reader.hashes else "",
                       vouched=applier.vouched)


def apply_tar(
    source: int | BinaryIO, target: str | os.PathLike[str] | int, opts: ApplyOptions
) -> ApplyResult:
    """Apply a (possibly compressed) layer tar onto a directory path or fd, in process."""
    reserve_fd_table()  # before the reader's threads start, if the caller has none
    root_fd, owned = _open_target(target)
    try:
        stream = open_decompressed(source) if isinstance(source, int) else decompress_stream(source)
        try:
            reader = TarReader(stream, opts.recorder)
            return apply_reader(reader, root_fd, opts)
        finally:
            stream.close()
    finally:
        if owned:
            os.close(root_fd)
