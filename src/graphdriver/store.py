"""The machinery every driver shares: ids, records, locks, reference counts, repair, NaiveDiff.

A driver subclasses ``LayerStore`` and says only where bytes live (the ``_``-prefixed hooks);
everything else — validation, the commit points of DESIGN.md rule 1, the locks of rule 3, mount
reference counts, the naive diff/changes/apply built on ``get`` — is here, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from . import TYPE_CHECKING
from .errors import (
    AlreadyExists,
    GraphDriverError,
    InUse,
    InvalidArgument,
    NotFound,
    NotSupported,
    StoreCorrupt,
)
from .fsutil import remove_tree
from .idmap import IDENTITY, IDMap
from .layers import REMOVING_SUFFIX, LayerRecord, MetaDir, validate_id
from .locking import FileLock, LockSet
from .refcount import RefCounts, default_runroot

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, BinaryIO, ClassVar

    from .driver import Change, CreateOpts

log = logging.getLogger("graphdriver")


def normalize_options(
    options: dict[str, str] | None, known: frozenset[str], who: str
) -> dict[str, str]:
    """Storage options with lower-case keys (moby's windowsfilter rule); unknown keys refused."""
    out: dict[str, str] = {}
    for key, value in (options or {}).items():
        k = key.strip().lower()
        if k not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(f"{who}: unknown storage option {key!r} (known: {allowed})")
        out[k] = value
    return out


def parse_size(value: str, who: str) -> int:
    from .units import ram_in_bytes

    try:
        size = ram_in_bytes(value)
    except GraphDriverError as exc:
        raise InvalidArgument(f"{who}: invalid size {value!r}: {exc}") from exc
    if size < 0:
        raise InvalidArgument(f"{who}: invalid size {value!r}: negative")
    return size


class LayerStore:
    """Base class of every driver.  Subclasses set ``name`` and implement the hooks."""

    name: ClassVar[str] = ""
    #: storage options accepted at open (keys, lower case)
    driver_options: ClassVar[frozenset[str]] = frozenset({"size"})
    #: storage options accepted by create/create_rw
    create_options: ClassVar[frozenset[str]] = frozenset({"size"})
    #: whether a size limit on writable layers can be enforced here
    supports_quota: ClassVar[bool] = False
    #: how the apply target stores whiteouts: "naive" (deletes) or "overlay" (0/0 devices)
    whiteout_format: ClassVar[str] = "naive"
    #: whether get() mounts something (so counts are reconciled with the mount table)
    mounts: ClassVar[bool] = False

    def __init__(
        self,
        home: Path,
        options: dict[str, str] | None = None,
        idmap: IDMap = IDENTITY,
        runroot: Path | None = None,
    ) -> None:
        self.home = Path(home)
        self.options = normalize_options(options, self.driver_options, self.name)
        self.idmap = idmap
        self.default_size: int | None = None
        if "size" in self.options:
            self.default_size = parse_size(self.options["size"], self.name)
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.home / "locks").mkdir(exist_ok=True, mode=0o700)
        self.meta = MetaDir(self.home)
        self.runroot = Path(runroot) if runroot else default_runroot()
        self.refs = RefCounts(self.runroot, self.home)
        self._mount_cache: dict[str, Path] = {}
        self._cache_lock = threading.Lock()
        self._init_driver()
        self.repair()

    # ----- hooks a driver implements -------------------------------------------------------

    def _init_driver(self) -> None:
        """Check the driver works here (raise NotSupported with the reason) and set up its home."""

    def _layer_paths(self, layer_id: str) -> list[Path]:
        """The driver's directories (or files) that make up a layer."""
        raise NotImplementedError

    def _disk_ids(self) -> set[str]:
        """Ids for which the driver has something on disk (complete or not)."""
        raise NotImplementedError

    def _removing_leftovers(self) -> list[Path]:
        """Driver paths renamed to ``*-removing`` that a crash left behind."""
        return []

    def _make_layer(self, rec: LayerRecord, parent: LayerRecord | None) -> None:
        """Create the layer's storage (it is committed after this returns)."""
        raise NotImplementedError

    def _destroy(self, path: Path) -> None:
        """Destroy one of a layer's paths (already renamed aside, or an orphan)."""
        remove_tree(path)

    def _mount(self, rec: LayerRecord, mount_label: str) -> Path:
        """Make the layer's assembled tree available; called when its count goes 0 -> 1."""
        raise NotImplementedError

    def _unmount(self, rec: LayerRecord) -> None:
        """Undo ``_mount``; called when the count goes 1 -> 0, and by cleanup."""

    def _mount_path(self, rec: LayerRecord) -> Path:
        """Where the assembled tree is while mounted (for a second get without a mount)."""
        raise NotImplementedError

    def _is_mounted(self, layer_id: str) -> bool:
        """For reconciling counts with the mount table; drivers that never mount say True."""
        return True

    def _apply_target(self, rec: LayerRecord) -> Path:
        """The directory an apply writes into."""
        raise NotImplementedError

    def _on_first_child(self, parent: LayerRecord) -> None:
        """Called (under the parent's lock) when a layer gets its first child."""

    def _status(self) -> list[tuple[str, str]]:
        return []

    def _metadata(self, rec: LayerRecord) -> dict[str, str]:
        return {}

    # ----- paths and locks -----------------------------------------------------------------

    def _lock_path(self, layer_id: str) -> Path:
        return self.home / "locks" / f"{layer_id}.lock"

    def layer_lock(self, layer_id: str) -> FileLock:
        return FileLock(self._lock_path(layer_id))

    def store_lock(self) -> FileLock:
        return FileLock(self.home / ".lock")

    # ----- reading -------------------------------------------------------------------------

    def exists(self, layer_id: str) -> bool:
        try:
            validate_id(layer_id)
        except InvalidArgument:
            return False
        return self.meta.exists(layer_id)

    def record(self, layer_id: str) -> LayerRecord:
        validate_id(layer_id)
        rec = self.meta.read(layer_id)
        if rec is None or self.meta.is_incomplete(layer_id):
            raise NotFound(f"layer {layer_id} does not exist")
        return rec

    def parent(self, layer_id: str) -> str | None:
        return self.record(layer_id).parent

    def layers(self) -> list[str]:
        return [rec.id for rec in self.meta.records()]

    def children(self, layer_id: str) -> list[str]:
        return [rec.id for rec in self.meta.records() if rec.parent == layer_id]

    def chain(self, layer_id: str) -> list[LayerRecord]:
        """The layer and its ancestors, nearest first."""
        out = [self.record(layer_id)]
        seen = {layer_id}
        while out[-1].parent is not None:
            pid = out[-1].parent
            if pid in seen:
                raise GraphDriverError(f"layer {layer_id}: parent cycle at {pid}")
            seen.add(pid)
            out.append(self.record(pid))
        return out

    # ----- create --------------------------------------------------------------------------

    def create(
        self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None
    ) -> None:
        if opts is not None and opts.storage_opt:
            raise InvalidArgument(
                f"{self.name}: storage options are supported only for writable layers (--rw)"
            )
        self._create(layer_id, parent, "ro", None)

    def create_rw(
        self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None
    ) -> None:
        storage = normalize_options(opts.storage_opt if opts else None, self.create_options,
                                    self.name)
        size = parse_size(storage["size"], self.name) if "size" in storage else self.default_size
        if size is not None and size > 0 and "size" in storage and not self.supports_quota:
            raise NotSupported(f"{self.name}: size quotas are not supported on {self.home}")
        self._create(layer_id, parent, "rw", size or None)

    def _create(self, layer_id: str, parent: str | None, kind: str, size: int | None) -> None:
        validate_id(layer_id)
        if parent is not None and parent != "":
            validate_id(parent, "parent id")
        else:
            parent = None
        locks = [self._lock_path(layer_id)] + ([self._lock_path(parent)] if parent else [])
        with LockSet(locks):
            if self.meta.read(layer_id) is not None and not self.meta.is_incomplete(layer_id):
                raise AlreadyExists(f"layer {layer_id} already exists")
            parent_rec = None
            if parent is not None:
                if not self.meta.exists(parent):
                    raise NotFound(f"parent layer {parent} does not exist")
                parent_rec = self.record(parent)
            # Whatever an earlier crash left under this id goes first (we hold its lock).
            self._destroy_layer(layer_id, reason="leftover of an interrupted create")
            rec = LayerRecord(id=layer_id, parent=parent, kind=kind, size_limit=size)
            try:
                self._make_layer(rec, parent_rec)
                if parent_rec is not None and not self.children(parent_rec.id):
                    self._on_first_child(parent_rec)
                with self.store_lock():
                    self.meta.write(rec)  # the commit point
            except BaseException:
                self._destroy_layer(layer_id, reason=None)
                raise

    # ----- remove --------------------------------------------------------------------------

    def remove(self, layer_id: str) -> None:
        validate_id(layer_id)
        with self.layer_lock(layer_id):
            rec = self.meta.read(layer_id)
            if rec is None:
                raise NotFound(f"layer {layer_id} does not exist")
            if self.refs.get(layer_id) > 0:
                raise InUse(f"layer {layer_id} is mounted ({self.refs.get(layer_id)} references)")
            with self.store_lock():
                kids = self.children(layer_id)
                if kids:
                    raise InUse(f"layer {layer_id} has children: {', '.join(kids[:5])}")
                # Rename every directory aside first, then drop the record (DESIGN.md rule 1).
                aside = self._rename_aside(layer_id)
                meta_aside = self.meta.dir(layer_id).with_name(layer_id + REMOVING_SUFFIX)
                remove_tree(meta_aside)
                os.rename(self.meta.dir(layer_id), meta_aside)
            for path in [*aside, meta_aside]:
                self._destroy(path)
            self._forget_mount(layer_id)
            log.debug("removed layer %s", layer_id)

    def _rename_aside(self, layer_id: str) -> list[Path]:
        aside = []
        for path in self._layer_paths(layer_id):
            if not os.path.lexists(path):
                continue
            target = path.with_name(path.name + REMOVING_SUFFIX)
            if os.path.lexists(target):
                self._destroy(target)
            os.rename(path, target)
            aside.append(target)
        return aside

    def _destroy_layer(self, layer_id: str, reason: str | None) -> None:
        """Remove everything of a layer (caller holds its lock); log when it is a repair."""
        found = [p for p in self._layer_paths(layer_id) if os.path.lexists(p)]
        meta_dir = self.meta.dir(layer_id)
        if os.path.lexists(meta_dir):
            found.append(meta_dir)
        if not found:
            return
        if reason:
            log.warning("repair: removing layer %s (%s)", layer_id, reason)
        for path in self._rename_aside(layer_id):
            self._destroy(path)
        if os.path.lexists(meta_dir):
            aside = meta_dir.with_name(layer_id + REMOVING_SUFFIX)
            remove_tree(aside)
            os.rename(meta_dir, aside)
            self._destroy(aside)
        self.refs.set(layer_id, 0)

    # ----- repair (DESIGN.md rule 1 and 3) -------------------------------------------------

    def repair(self) -> None:
        """Remove what a crash left; touch only what can be locked without waiting."""
        with self.store_lock():
            for path in self.meta.removing_leftovers() + self._removing_leftovers():
                log.warning("repair: destroying %s (interrupted removal)", path)
                self._destroy(path)
            meta_ids = set(self.meta.ids())
            for layer_id in sorted(meta_ids | self._disk_ids()):
                try:
                    rec = self.meta.read(layer_id)
                except GraphDriverError:
                    rec = None
                if rec is not None and not self.meta.is_incomplete(layer_id):
                    continue
                lock = self.layer_lock(layer_id)
                if not lock.acquire(blocking=False):
                    continue  # a live writer is creating or applying it
                try:
                    # Re-check under the lock: the writer may have committed meanwhile.
                    rec = self.meta.read(layer_id)
                    if rec is not None and not self.meta.is_incomplete(layer_id):
                        continue
                    why = "interrupted apply" if rec is not None else "no layer record"
                    self._destroy_layer(layer_id, reason=why)
                finally:
                    lock.release()
        self._reconcile_counts()

    def _reconcile_counts(self) -> None:
        for layer_id, count in self.refs.all().items():
            if not self.meta.exists(layer_id):
                self.refs.set(layer_id, 0)
                continue
            if self.mounts and not self._is_mounted(layer_id):
                lock = self.layer_lock(layer_id)
                if not lock.acquire(blocking=False):
                    continue
                try:
                    if not self._is_mounted(layer_id):
                        log.warning("repair: layer %s counted %d mounts but is not mounted",
                                    layer_id, count)
                        self.refs.set(layer_id, 0)
                finally:
                    lock.release()

    # ----- mounts --------------------------------------------------------------------------

    def get(self, layer_id: str, mount_label: str = "") -> Path:
        validate_id(layer_id)
        with self.layer_lock(layer_id):
            rec = self.record(layer_id)
            count = self.refs.get(layer_id)
            if count > 0 and (not self.mounts or self._is_mounted(layer_id)):
                path = self._mount_path(rec)
            else:
                path = self._mount(rec, mount_label)
                log.debug("mounted layer %s at %s", layer_id, path)
                count = 0
            self.refs.set(layer_id, count + 1)
            with self._cache_lock:
                self._mount_cache[layer_id] = path
            return path

    def put(self, layer_id: str) -> None:
        validate_id(layer_id)
        with self.layer_lock(layer_id):
            count = self.refs.get(layer_id)
            if count == 0:
                return  # put without get is harmless
            rec = self.meta.read(layer_id)
            if count == 1 and rec is not None:
                self._unmount(rec)
                log.debug("unmounted layer %s", layer_id)
            self.refs.set(layer_id, count - 1)
            if count == 1:
                self._forget_mount(layer_id)

    def _forget_mount(self, layer_id: str) -> None:
        with self._cache_lock:
            self._mount_cache.pop(layer_id, None)

    def mount_count(self, layer_id: str) -> int:
        return self.refs.get(layer_id)

    def cleanup(self) -> None:
        """Unmount every mount of this store and zero the counts."""
        for layer_id in list(self.refs.all()):
            with self.layer_lock(layer_id):
                rec = self.meta.read(layer_id)
                if rec is not None:
                    try:
                        self._unmount(rec)
                    except OSError as exc:
                        log.warning("cleanup: unmounting %s: %s", layer_id, exc)
                self.refs.set(layer_id, 0)
                self._forget_mount(layer_id)
        self._cleanup_driver()

    def _cleanup_driver(self) -> None:
        """Anything else the driver keeps mounted (e.g. quota images)."""

    @contextlib.contextmanager
    def mounted(self, layer_id: str, mount_label: str = "") -> Iterator[Path]:
        path = self.get(layer_id, mount_label)
        try:
            yield path
        finally:
            self.put(layer_id)

    # ----- diffs: NaiveDiff (moby's fsdiff.go) ---------------------------------------------

    def _resolve_parent(self, layer_id: str, parent: str | None) -> str | None:
        rec = self.record(layer_id)
        if parent is None:
            return rec.parent
        if parent == "":
            return None
        validate_id(parent, "parent id")
        self.record(parent)
        return parent

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        from .archive.changes import changes_dirs

        parent = self._resolve_parent(layer_id, parent)
        with self.mounted(layer_id) as root:
            if parent is None:
                return changes_dirs(root, None, self.idmap)
            with self.mounted(parent) as proot:
                return changes_dirs(root, proot, self.idmap)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        from .archive.changes import changes_size

        changes = self.changes(layer_id, parent)
        with self.mounted(layer_id) as root:
            return changes_size(root, changes)

    def diff(self, layer_id: str, parent: str | None = None) -> BinaryIO:
        """A tar of the layer's changes, streamed from a writer thread (not buffered)."""
        from .archive.export import stream_tar

        parent = self._resolve_parent(layer_id, parent)

        def write(out_fd: int) -> None:
            self.write_diff(out_fd, layer_id, parent)

        return stream_tar(write)

    def write_diff(self, out_fd: int, layer_id: str, parent: str | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
        """Write the diff tar straight to a file descriptor (the command's fast path)."""
        from .archive.changes import changes_dirs
        from .archive.export import write_changes, write_tree

        with self.mounted(layer_id) as root:
            if parent is None:
                write_tree(out_fd, root, idmap=self.idmap, progress=progress)
                return
            with self.mounted(parent) as proot:
                changes = changes_dirs(root, proot, self.idmap)
            write_changes(out_fd, root, changes, idmap=self.idmap, progress=progress)

    def apply_diff(
        self,
        layer_id: str,
        parent: str | None,
        stream: BinaryIO | int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        return int(self.apply_diff_result(layer_id, parent, stream, progress).size)

    def apply_diff_result(
        self,
        layer_id: str,
        parent: str | None,
        stream: BinaryIO | int,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """Apply a layer tar (plain or compressed) in a confined child; returns ApplyResult."""
        from .archive.apply import ApplyOptions
        from .archive.isolate import apply_confined

        validate_id(layer_id)
        with self.layer_lock(layer_id):
            rec = self.applicable_record(layer_id, parent)
            opts = ApplyOptions(whiteout_format=self.whiteout_format,  # type: ignore[arg-type]
                                idmap=self.idmap, progress=progress)
            opts = self._apply_options(rec, opts)
            # SIGINT/SIGTERM are held from here to the commit, except while apply_confined runs:
            # it installs its own handlers, which stop the child and roll the layer back.  An
            # interrupt between the apply's end and the commit would otherwise leave a fully
            # applied layer incomplete, and repair would remove it.
            with _signals_deferred():
                self.meta.mark_incomplete(layer_id, "apply")
                raw_fd: int | None = None
                try:
                    raw_fd = self._tarsplit_begin(layer_id, opts)
                    with as_fd(stream) as fd:
                        result = apply_confined(fd, self._apply_target(rec), opts)
                except StoreCorrupt:
                    # The child died without a rollback: the layer stays incomplete, so it no
                    # longer exists, and the next open of the store removes it (rule 1).
                    self._tarsplit_discard(layer_id, raw_fd)
                    raise
                except (GraphDriverError, KeyboardInterrupt):
                    # Nothing was applied yet, or the engine rolled the layer back to what it
                    # was (apply_confined stops its child with SIGTERM and waits for the
                    # rollback): the layer is complete again.
                    self.meta.clear_incomplete(layer_id)
                    self._tarsplit_discard(layer_id, raw_fd)
                    raise
                except BaseException:
                    self._tarsplit_discard(layer_id, raw_fd)
                    raise
                # The apply is done: the commit below runs to its end (signals are still held).
                try:
                    if raw_fd is not None:
                        self._tarsplit_end(rec, raw_fd, opts.recorder)
                finally:
                    self._tarsplit_discard(layer_id, raw_fd)
                self._after_apply(rec, result)
                rec.extra["diff_id"] = result.diff_id
                rec.extra["applied_size"] = result.size
                self.meta.write(rec)
                self.meta.clear_incomplete(layer_id)
            return result

    def applicable_record(self, layer_id: str, parent: str | None) -> LayerRecord:
        """The record of a layer an apply may write into (caller holds its lock): the parent
        named matches, and the layer has no children and no mounts."""
        rec = self.record(layer_id)
        if parent not in (None, "") and parent != rec.parent:
            raise InvalidArgument(
                f"layer {layer_id} has parent {rec.parent or '(none)'}, not {parent}"
            )
        kids = self.children(layer_id)
        if kids:
            raise InUse(f"cannot apply to layer {layer_id}: it has children ({kids[0]})")
        if self.refs.get(layer_id) > 0:
            raise InUse(f"cannot apply to layer {layer_id}: it is mounted")
        return rec

    def _tarsplit_discard(self, layer_id: str, raw_fd: int | None) -> None:
        if raw_fd is not None:
            os.close(raw_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.meta.dir(layer_id) / "tar-split.raw")

    def _apply_options(self, rec: LayerRecord, opts: Any) -> Any:
        return opts

    #: record tar-split metadata on apply (issue 6: exact diffs for Docker)
    record_tarsplit: ClassVar[bool] = True

    def _tarsplit_begin(self, layer_id: str, opts: Any) -> int | None:
        """Hand the apply a file for the raw stream description (archive/tarsplit.py)."""
        if not self.record_tarsplit or opts.recorder is not None:
            return None
        from .archive.tarsplit import RAW_NAME, new_layer_packer

        fd = os.open(self.meta.dir(layer_id) / RAW_NAME,
                     os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        opts.recorder = new_layer_packer(fd)  # final lines, gzip'd, CRCs from the child's reader
        return fd

    def _tarsplit_end(self, rec: LayerRecord, raw_fd: int, packer: Any) -> None:
        """Keep ``meta/<id>/tar-split.json.gz`` (the packer's file, once the applied files are
        checked against it), or say why not."""
        from .archive.tarsplit import finish_layer_recording

        packer.close()
        finish_layer_recording(self.meta.dir(rec.id), raw_fd, self._apply_target(rec), rec.id,
                               packer.problem, packer)

    def _after_apply(self, rec: LayerRecord, result: Any) -> None:
        """Driver bookkeeping after a successful apply (the layer is still incomplete here)."""

    # ----- facts ---------------------------------------------------------------------------

    def status(self) -> list[tuple[str, str]]:
        return [*self._status(), ("Layers", str(len(self.layers())))]

    def metadata(self, layer_id: str) -> dict[str, str]:
        return self._metadata(self.record(layer_id))

    def diff_getter(self, layer_id: str) -> MountedFiles:
        return MountedFiles(self, layer_id)

    def close(self) -> None:
        """Release what this object holds in memory (mounts stay: they are counted on disk)."""


class MountedFiles:
    """A DiffGetter over the mounted tree: opens files by their path inside the layer."""

    def __init__(self, store: LayerStore, layer_id: str) -> None:
        self._store = store
        self._id = layer_id
        self._root = store.get(layer_id)
        self._root_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._closed = False

    def open(self, path: str) -> BinaryIO:
        from .archive.pathres import open_beneath

        fd = open_beneath(self._root_fd, path.lstrip("/"), os.O_RDONLY)
        return os.fdopen(fd, "rb")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._root_fd)
            self._store.put(self._id)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (main thread only; elsewhere a no-op).

    The block is a commit that must not be cut in half; a signal that arrives meanwhile is
    logged and dropped: the operation it would have interrupted has completed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import signal

    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            log.warning("signal %d arrived while the layer was being committed; it was committed",
                        got[0])


@contextlib.contextmanager
def as_fd(stream: BinaryIO | int) -> Iterator[int]:
    """A file descriptor for the stream: its own, or a pipe fed by a thread when it has none."""
    if isinstance(stream, int):
        yield stream
        return
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd >= 0:
        # Hand over the position a reader may have reached (a buffered stream may have read ahead).
        with contextlib.suppress(OSError, ValueError):
            if stream.seekable():
                os.lseek(fd, stream.tell(), os.SEEK_SET)
        yield fd
        return
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            while True:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(wfd, view):]
        except BrokenPipeError:
            pass
        except BaseException as exc:  # reported after the apply
            failure.append(exc)
        finally:
            os.close(wfd)

    thread = threading.Thread(target=pump, name="graphdriver-pump", daemon=True)
    thread.start()
    try:
        yield rfd
    finally:
        os.close(rfd)
        thread.join()
    if failure:
        raise GraphDriverError(f"reading the layer stream: {failure[0]}") from failure[0]
