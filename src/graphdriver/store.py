"""The machinery every driver shares: ids, records, locks, reference counts, repair, NaiveDiff.

A driver subclasses ``LayerStore`` and says only where bytes live (the ``_``-prefixed hooks);
everything else — validation, the commit points of DESIGN.md rule 1, the locks of rule 3, mount
reference counts, the naive diff/changes/apply built on ``get`` — is here, once.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from . import TYPE_CHECKING
from .archive.whiteout import NAIVE, WhiteoutFormat
from .errors import (
    AlreadyExists,
    GraphDriverError,
    InUse,
    InvalidArchive,
    InvalidArgument,
    NotAStore,
    NotFound,
    NotSupported,
    StoreCorrupt,
    from_oserror,
)
from .fsutil import atomic_write, remove_tree
from .idmap import IDENTITY, IDMap, real_root
from .layers import (
    APPLY_COMMIT,
    APPLY_INTENT,
    COMMIT_INTENT,
    CREATE_INTENT,
    MADE_BY,
    REMOVING_SUFFIX,
    STAGING_PREFIX,
    LayerRecord,
    MetaDir,
    is_valid_id,
    validate_id,
)
from .locking import FileLock, LockSet
from .logs import get_logger
from .refcount import RefCounts, default_runroot

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, BinaryIO, ClassVar, TypeVar

    from .archive.confine import Prespawned
    from .archive.options import ApplyOptions, ApplyResult
    from .archive.recorded import RecordedLayer
    from .archive.tarsplit import Resolver
    from .driver import Change, CreateOpts

    _T = TypeVar("_T")

log = get_logger("graphdriver")

#: written first in every home a store makes; its absence means "made by someone else"
STORE_MARKER = ".graphdriver-store"
STORE_FORMAT = 1
#: where repair moves what it cannot explain
LOST_FOUND = ".lost+found"


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
    #: how the apply target keeps whiteouts (archive/whiteout.py): NAIVE deletes
    whiteout_format: WhiteoutFormat = NAIVE
    #: whether get() mounts something (so counts are reconciled with the mount table)
    mounts: ClassVar[bool] = False

    def __init__(
        self,
        home: Path,
        options: dict[str, str] | None = None,
        idmap: IDMap = IDENTITY,
        runroot: Path | None = None,
    ) -> None:
        # Absolute and resolved once, here: mount points are matched against mountinfo, counts
        # are keyed by it, and a relative home would change meaning with the working directory.
        self.home = Path(os.path.realpath(home))
        self.options = normalize_options(options, self.driver_options, self.name)
        self.idmap = idmap
        self.default_size: int | None = None
        if "size" in self.options:
            self.default_size = parse_size(self.options["size"], self.name)
        made = self._open_home()
        try:
            (self.home / "locks").mkdir(exist_ok=True, mode=0o700)
            self.meta = MetaDir(self.home)
            self.runroot = Path(runroot) if runroot else default_runroot()
            self.refs = RefCounts(self.runroot, self.home)
            self._mount_cache: dict[str, Path] = {}
            self._cache_lock = threading.Lock()
            self._init_driver()
        except BaseException:
            if made:  # a probe that fails leaves nothing behind (auto-selection tries the next)
                remove_tree(self.home)
            raise
        self.repair()

    # ----- the home: made, adopted or refused (DESIGN.md "On-disk layout") -------------------

    #: entries of a home that are graphdriver's own besides layer directories and meta/locks
    home_names: ClassVar[frozenset[str]] = frozenset()

    def _open_home(self) -> bool:
        """Make the home (marker first), accept it (marker), adopt it (every entry ours), or
        refuse it (NotAStore).  True when this open made it."""
        marker = self.home / STORE_MARKER
        try:
            names = os.listdir(self.home)
        except FileNotFoundError:
            names = None
        except NotADirectoryError as exc:
            raise NotAStore(f"not a graphdriver store: {self.home} is not a directory") from exc
        if names is not None and STORE_MARKER in names:
            if not os.path.isdir(self.home / "meta"):
                raise StoreCorrupt(f"{self.home}: its meta/ directory is missing; refusing to "
                                   "open (nothing was removed)")
            return False
        if names is not None and any(n != "lost+found" or not _empty(self.home / n)
                                     for n in names):
            self._adopt(names)
            return False
        # The marker goes last: a process that opens the home meanwhile and finds the marker
        # finds meta/ and locks/ beside it (one that finds them without it adopts the home).
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("meta", "locks"):
            (self.home / name).mkdir(exist_ok=True, mode=0o700)
        self._write_marker(marker)
        return names is None

    def _adopt(self, names: list[str]) -> None:
        """A home made by an earlier version (or a Docker plugin home): adopted only when every
        entry is graphdriver's own layout."""
        meta = self.home / "meta"
        try:
            ids = set(os.listdir(meta))
        except OSError as exc:
            raise NotAStore(f"not a graphdriver store: {self.home} has no readable meta/ "
                            f"({exc.strerror}); refusing to touch it") from exc
        own = {"meta", "locks", ".lock", "lost+found"} | self.home_names
        strangers = [n for n in names if n not in own and n not in ids
                     and not n.endswith(REMOVING_SUFFIX) and not n.startswith(".probe-")
                     and not n.startswith(f".{STORE_MARKER}.tmp-")  # another opener's marker
                     and not self._looks_like_layer(self.home / n)]
        if strangers:
            raise NotAStore(f"not a graphdriver store: {self.home} holds "
                            f"{', '.join(sorted(strangers)[:3])}; use an empty directory")
        log.info("adopting %s as a graphdriver store (made by an earlier version)", self.home)
        self._write_marker(self.home / STORE_MARKER)

    def _looks_like_layer(self, path: Path) -> bool:
        """Whether a home entry without a record is a layer directory of this driver's layout
        (a crash's leftover, which repair handles)."""
        return False

    def _write_marker(self, marker: Path) -> None:
        import json

        namespace = "trusted" if real_root() else "user"
        atomic_write(marker, json.dumps({"format": STORE_FORMAT, "driver": self.name,
                                         "xattr_namespace": namespace}).encode() + b"\n")

    def _xattr_namespace(self) -> str:
        """The xattr namespace the marker records ("trusted" as root, "user" rootless); a
        marker without one (an older store) was made by root."""
        import json

        try:
            data = json.loads((self.home / STORE_MARKER).read_bytes())
        except (OSError, ValueError) as exc:
            raise StoreCorrupt(f"{self.home}: unreadable store marker {STORE_MARKER}") from exc
        namespace = data.get("xattr_namespace", "trusted") if isinstance(data, dict) else None
        if namespace not in ("trusted", "user"):
            raise StoreCorrupt(f"{self.home}: the store marker has an unknown xattr namespace "
                               f"{namespace!r}")
        return str(namespace)

    # ----- hooks a driver implements -------------------------------------------------------

    def _init_driver(self) -> None:
        """Check the driver works here (raise NotSupported with the reason) and set up its home."""

    def _layer_paths(self, layer_id: str) -> list[Path]:
        """The driver's directories (or files) that make up a layer."""
        raise NotImplementedError

    def _removal_in_progress(self, leftover: Path) -> bool:
        """Whether a ``*-removing`` path belongs to a removal that is still running: ``remove``
        renames a layer's paths aside under the store lock, then destroys them holding only the
        layer's lock; a repair in another process must leave them to it."""
        layer_id = self._removing_owner(leftover)
        if layer_id is None:
            return False
        lock = self.layer_lock(layer_id)
        if not lock.acquire(blocking=False):
            return True
        lock.release()
        return False

    def _removing_owner(self, leftover: Path) -> str | None:
        """The layer a ``*-removing`` path was renamed aside from (None when it can't tell)."""
        if not leftover.name.endswith(REMOVING_SUFFIX):
            return None
        layer_id = leftover.name[: -len(REMOVING_SUFFIX)]
        return layer_id if is_valid_id(layer_id) else None

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

    def _destroy_paths(self, paths: list[Path]) -> None:
        """Destroy a layer's paths, in order (a driver that mounts reads its mounts once)."""
        for path in paths:
            self._destroy(path)

    def _detach(self, path: Path) -> None:
        """Undo the driver's mounts beneath one of a layer's paths (default: it mounts none)."""

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

    def _apply_stream(self, rec: LayerRecord, fd: int, opts: ApplyOptions) -> ApplyResult:
        """Apply the layer stream on *fd* into the layer (the one hook of the apply path).

        It either succeeds, or fails with the layer as it was (GraphDriverError, Interrupted),
        or raises StoreCorrupt when it could not roll back.  The base class owns the rest:
        the lock, the incomplete marker, signals, tar-split recording (``opts.recorder``) and
        the commit.  Default: the tar engine in the confined child.
        """
        from .archive.isolate import apply_confined

        return apply_confined(fd, self._apply_target(rec), opts)

    def _on_first_child(self, parent: LayerRecord) -> None:
        """Called (under the parent's lock) when a layer gets its first child."""

    def _rename_layer(self, old_id: str, new_id: str) -> None:
        """Rename a (staged, never mounted) layer's paths from *old_id* to *new_id*."""
        for path in self._layer_paths(old_id):
            if path.name == old_id and os.path.lexists(path):
                os.rename(path, path.with_name(new_id))

    def _freeze(self, rec: LayerRecord) -> None:
        """Driver work for making writable layer *rec* read-only in place (default: none)."""

    def _quota_available(self) -> bool:
        """Whether a size limit given at create_rw is enforced here."""
        return self.supports_quota

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
        return is_valid_id(layer_id) and self.meta.exists(layer_id)

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

    def broken_layers(self) -> dict[str, str]:
        """Layers whose record is unreadable (id -> why): listed apart, removable with rm."""
        return self.meta.broken()

    def children(self, layer_id: str) -> list[str]:
        """The complete layers whose parent is *layer_id*: the children index's entries, each
        checked against its own record (an entry may outlive its child by a crash)."""
        return [kid for kid in self.meta.indexed_children(layer_id)
                if self._is_child(kid, layer_id)]

    def _has_other_child(self, layer_id: str, but: str) -> bool:
        """Whether the layer has a complete child other than *but* (the first one found ends the
        look: a parent of many layers is not read whole for each new child)."""
        return any(kid != but and self._is_child(kid, layer_id)
                   for kid in self.meta.indexed_children(layer_id))

    def _is_child(self, layer_id: str, parent: str) -> bool:
        try:
            rec = self.meta.read(layer_id)
        except StoreCorrupt:
            return False  # broken: not listed, as records() leaves it out
        return rec is not None and rec.parent == parent and not self.meta.is_incomplete(layer_id)

    def chain(self, layer_id: str) -> list[LayerRecord]:
        """The layer (a staged one too) and its ancestors, nearest first."""
        staged = self.meta.read(layer_id) if layer_id.startswith(STAGING_PREFIX) else None
        out = [staged or self.record(layer_id)]
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
        self._create(layer_id, parent, "ro", None, opts)

    def create_rw(
        self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None
    ) -> None:
        storage = normalize_options(opts.storage_opt if opts else None, self.create_options,
                                    self.name)
        size = parse_size(storage["size"], self.name) if "size" in storage else self.default_size
        if size is not None and size > 0 and "size" in storage and not self.supports_quota:
            raise NotSupported(f"{self.name}: size quotas are not supported on {self.home}")
        self._create(layer_id, parent, "rw", size or None, opts)

    def _create(self, layer_id: str, parent: str | None, kind: str, size: int | None,
                opts: CreateOpts | None) -> None:
        validate_id(layer_id)
        made_by = _made_by(opts)
        holders = [_validate_holder(opts.holder)] if opts is not None and opts.holder else []
        parent = self._parent_arg(parent)
        locks = [self._lock_path(layer_id)] + ([self._lock_path(parent)] if parent else [])
        with LockSet(locks):
            if self.meta.read(layer_id) is not None and not self.meta.is_incomplete(layer_id):
                raise AlreadyExists(f"layer {layer_id} already exists")
            rec = LayerRecord(id=layer_id, parent=parent, kind=kind, size_limit=size,
                              made_by=made_by, holders=holders)
            self._create_locked(rec, staged=False)

    @staticmethod
    def _parent_arg(parent: str | None) -> str | None:
        if parent is not None and parent != "":
            return validate_id(parent, "parent id")
        return None

    def _create_locked(self, rec: LayerRecord, staged: bool) -> None:
        """Make the layer of *rec* (the caller holds its lock and its parent's).

        A staged layer (commit_new_layer) gets its record first, as the intent record that
        lets repair remove it and that keeps its parent from being removed meanwhile.
        """
        parent_rec = None
        if rec.parent is not None:
            try:
                parent_rec = self.record(rec.parent)
            except NotFound as exc:
                raise NotFound(f"parent layer {rec.parent} does not exist") from exc
        # Whatever an earlier crash left under this id goes first (we hold its lock).
        self._destroy_layer(rec.id, reason="leftover of an interrupted create")
        try:
            # The intent record first: repair removes what it shows the store was making.
            self.meta.dir(rec.id).mkdir(exist_ok=True)
            if not staged:
                self.meta.mark_incomplete(rec.id, CREATE_INTENT)
            with self.store_lock():
                if rec.parent is not None and not staged:
                    self.meta.add_child(rec.parent, rec.id)  # before the record names it
                self.meta.write(rec)
            intended = rec.to_json()
            self._make_layer(rec, parent_rec)
            if parent_rec is not None and not self._has_other_child(parent_rec.id, rec.id):
                self._on_first_child(parent_rec)
            if not staged:
                with self.store_lock():
                    if rec.to_json() != intended:
                        self.meta.write(rec)  # as the driver completed it (a nominal size)
                    self.meta.clear_incomplete(rec.id)  # the commit point
        except BaseException:
            self._destroy_layer(rec.id, reason=None)
            if not staged:
                self._unindex_failed(rec.parent, rec.id)
            raise

    def _unindex_failed(self, parent: str | None, layer_id: str) -> None:
        """Drop the index entry of a layer whose create failed (the store is left as it was);
        best effort: an entry left behind (a full disk) is checked away by readers and repair."""
        if parent is None:
            return
        with contextlib.suppress(OSError, GraphDriverError), self.store_lock():
            self.meta.drop_child(parent, layer_id)

    # ----- remove --------------------------------------------------------------------------

    def remove(self, layer_id: str, *, releasing: str | None = None) -> None:
        """Remove the layer; refused while it is mounted, has children or is held — by anyone
        but *releasing*, whose hold goes with the layer (no separate ``release`` write)."""
        validate_id(layer_id)
        with self.layer_lock(layer_id):
            try:
                rec = self.meta.read(layer_id)
            except StoreCorrupt as exc:
                # A broken record (quarantined): the layer can still be removed.
                log.warning("removing broken layer %s: %s", layer_id, exc)
                rec = LayerRecord(id=layer_id, parent=None, kind="ro")
            if rec is None:
                raise NotFound(f"layer {layer_id} does not exist")
            if self.refs.get(layer_id) > 0:
                raise InUse(f"layer {layer_id} is mounted ({self.refs.get(layer_id)} references)")
            holders = [h for h in rec.holders if h != releasing]
            if holders:
                raise InUse(f"layer {layer_id} is held by {', '.join(holders[:5])}")
            with self.store_lock():
                kids = self.children(layer_id) + self.meta.staged_children(layer_id)
                if kids:
                    raise InUse(f"layer {layer_id} has children: {', '.join(kids[:5])}")
                # Rename every directory aside first, then drop the record (DESIGN.md rule 1).
                aside = self._rename_aside(layer_id)
                meta_aside = self.meta.dir(layer_id).with_name(layer_id + REMOVING_SUFFIX)
                if os.path.lexists(meta_aside):  # a crash's leftover
                    remove_tree(meta_aside)
                os.rename(self.meta.dir(layer_id), meta_aside)
                if rec.parent is not None:
                    self.meta.drop_child(rec.parent, layer_id)  # once the child is gone
            self._destroy_paths([*aside, meta_aside])
            self._forget_mount(layer_id)
            log.debug("removed layer %s", layer_id)

    # ----- holders, staged commits, freezing (the image store's and snapshotter's API) --------

    def hold(self, layer_id: str, holder: str) -> None:
        """Add *holder* to the layer's holders (idempotent); ``remove`` refuses while any."""
        validate_id(layer_id)
        _validate_holder(holder)
        with self.layer_lock(layer_id):
            self._hold_locked(self.record(layer_id), holder)

    def _hold_locked(self, rec: LayerRecord, holder: str) -> None:
        if holder not in rec.holders:
            rec.holders = sorted({*rec.holders, holder})
            self.meta.write(rec)

    def release(self, layer_id: str, holder: str) -> None:
        """Drop *holder* from the layer's holders; a missing layer or holder is a no-op."""
        validate_id(layer_id)
        _validate_holder(holder)
        with self.layer_lock(layer_id):
            rec = self.meta.read(layer_id)
            if rec is None or self.meta.is_incomplete(layer_id) or holder not in rec.holders:
                return
            rec.holders = [h for h in rec.holders if h != holder]
            self.meta.write(rec)

    def freeze(self, layer_id: str) -> None:
        """Make a writable layer read-only in place (no file is copied); refused while mounted."""
        validate_id(layer_id)
        with self.layer_lock(layer_id):
            rec = self.record(layer_id)
            if self.refs.get(layer_id) > 0:
                raise InUse(f"cannot freeze layer {layer_id}: it is mounted")
            if not rec.writable:
                return
            self._freeze(rec)
            rec.kind = "ro"
            self.meta.write(rec)

    def capabilities(self) -> dict[str, bool]:
        """What this store can do here: exact diffs (tar-split), enforced size quotas."""
        return {"reproduces_exact_diffs": self.record_tarsplit, "quota": self._quota_available()}

    def commit_new_layer(
        self,
        parent: str | None,
        stream: BinaryIO | int,
        *,
        layer_id_for: Callable[[str], str],
        made_by: str,
        expected_diff_id: str | None = None,
        holder: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[str, ApplyResult]:
        """Apply *stream* into a hidden staging layer on *parent*, then commit it under
        ``layer_id_for(diff_id)``: the id is known only once the diff is hashed.

        An existing complete layer of that id with the same parent, maker and diffID is reused
        (the staging is discarded, *holder* added); any other existing layer is AlreadyExists.
        A crash leaves the layer absent or complete; repair removes staging leftovers.
        """
        _check_made_by(made_by)
        if holder is not None:
            _validate_holder(holder)
        parent = self._parent_arg(parent)
        import secrets

        staging_id = STAGING_PREFIX + secrets.token_hex(16)
        rec = LayerRecord(id=staging_id, parent=parent, kind="ro", made_by=made_by)
        parent_locks = [self._lock_path(parent)] if parent else []
        staging_lock = FileLock(self._lock_path(staging_id))
        with self._apply_child() as child, staging_lock:
            try:
                with LockSet(parent_locks):
                    self._create_locked(rec, staged=True)
                result = self._apply_locked(rec, stream, progress, child)
                if expected_diff_id is not None and result.diff_id != expected_diff_id:
                    raise InvalidArchive(f"the layer's diffID is {result.diff_id}, "
                                         f"not the expected {expected_diff_id}")
                layer_id = validate_id(layer_id_for(result.diff_id))
                with LockSet([self._lock_path(layer_id), *parent_locks]):
                    if self.meta.exists(layer_id):
                        self._reuse(self.record(layer_id), rec, holder)
                        self._destroy_layer(staging_id, reason=None)
                    else:
                        self._promote(rec, layer_id, holder)
            except BaseException:
                self._destroy_layer(staging_id, reason=None)
                raise
            finally:
                # Nobody waits on a staging lock (repair only tries it): its file can go.
                staging_lock.path.unlink(missing_ok=True)
        return layer_id, result

    def _reuse(self, existing: LayerRecord, staged: LayerRecord, holder: str | None) -> None:
        if (existing.parent, existing.made_by, existing.diff_id) != \
                (staged.parent, staged.made_by, staged.diff_id):
            raise AlreadyExists(f"layer {existing.id} already exists with other content "
                                f"(parent {existing.parent or '(none)'}, made by "
                                f"{existing.made_by}, diffID {existing.diff_id})")
        if holder is not None:
            self._hold_locked(existing, holder)

    def _promote(self, staged: LayerRecord, layer_id: str, holder: str | None) -> None:
        """Rename the staging layer to *layer_id* and commit it (caller holds both locks).

        The staging marker names the target first, so repair can remove a half-renamed layer;
        the final record is written inside the staging directory, which is then renamed; the
        marker's removal is the commit point.
        """
        from .layers import asdict

        self._destroy_layer(layer_id, reason="leftover of an interrupted create")
        fields = asdict(staged)
        fields.update(id=layer_id, holders=[holder] if holder else [])
        final = LayerRecord(**fields)
        self.meta.mark_incomplete(staged.id, f"{COMMIT_INTENT} {layer_id}")
        # Under the store lock from the index entry to the rename: repair (which rebuilds the
        # index from the records it lists) sees neither or both.
        try:
            with self.store_lock():
                if final.parent is not None:
                    self.meta.add_child(final.parent, layer_id)  # before the rename names it
                self.meta.write(final, in_dir=staged.id)
                self._rename_layer(staged.id, layer_id)
                os.rename(self.meta.dir(staged.id), self.meta.dir(layer_id))
            self.meta.clear_incomplete(layer_id)  # the commit point
        except BaseException:
            self._unindex_failed(final.parent, layer_id)
            raise
        staged.id = layer_id

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
            driver_leftovers = self._removing_leftovers()
            # remove() renames a layer's paths aside only once it has decided (not mounted, not
            # held, no children), the record last: a path renamed aside whose record is still
            # there is a removal a crash cut short, which repair finishes (never half a layer).
            unfinished = sorted({owner for path in driver_leftovers
                                 if (owner := self._removing_owner(path)) is not None
                                 and os.path.lexists(self.meta.dir(owner))})
            for path in self.meta.removing_leftovers() + driver_leftovers:
                if self._removal_in_progress(path):
                    continue  # a live remove destroys it: not a crash's leftover
                log.warning("repair: destroying %s (interrupted removal)", path)
                self._destroy(path)
            for layer_id in unfinished:
                self._finish_removal(layer_id)
            for staged_id in self.meta.staged_ids():
                self._repair_staged(staged_id)
            meta_ids = set(self.meta.ids())
            # every record read once (a store of hundreds of layers pays this at every open)
            read: dict[str, LayerRecord | None] = {}
            broken: dict[str, str] = {}
            for layer_id in sorted(meta_ids):
                try:
                    read[layer_id] = self.meta.read(layer_id)
                except StoreCorrupt as exc:
                    broken[layer_id] = str(exc)
            for layer_id, why in broken.items():
                log.warning("layer %s is broken and quarantined (rm removes it): %s", layer_id, why)
            kept: list[LayerRecord] = []  # the records still there after repair
            for layer_id in sorted(meta_ids | self._disk_ids()):
                if layer_id in broken:
                    continue
                rec = read.get(layer_id)  # none for a layer directory without a meta one
                if rec is not None and not self.meta.is_incomplete(layer_id):
                    kept.append(rec)
                    continue
                lock = self.layer_lock(layer_id)
                if not lock.acquire(blocking=False):
                    if rec is not None:
                        kept.append(rec)
                    continue  # a live writer is creating or applying it
                try:
                    # Re-check under the lock: the writer may have committed meanwhile.
                    try:
                        rec = self.meta.read(layer_id)
                    except GraphDriverError:
                        continue
                    if rec is not None and not self.meta.is_incomplete(layer_id):
                        kept.append(rec)
                        continue
                    if rec is not None and self._repair_apply(rec):
                        kept.append(rec)
                        continue
                    if self.meta.is_incomplete(layer_id):
                        self._destroy_layer(layer_id, reason="interrupted create or commit")
                    else:
                        self._quarantine(layer_id)
                finally:
                    lock.release()
            self._rebuild_children_index(meta_ids, kept)
        self._reconcile_counts()

    def _finish_removal(self, layer_id: str) -> None:
        """Finish the removal of a layer a crash left with some paths renamed aside."""
        lock = self.layer_lock(layer_id)
        if not lock.acquire(blocking=False):
            return  # somebody works on it now: the next open looks again
        try:
            self._destroy_layer(layer_id, reason="interrupted removal")
        finally:
            lock.release()

    def _rebuild_children_index(self, meta_ids: set[str], kept: list[LayerRecord]) -> None:
        """Make every parent's children index name exactly the records that name it (what a
        crash, an older graphdriver or a lost file left is corrected; the store lock is held).
        *kept* includes the layers live writers are still making: their entries stay."""
        kids: dict[str, list[str]] = {}
        for rec in kept:
            if rec.parent is not None:
                kids.setdefault(rec.parent, []).append(rec.id)
        for layer_id in sorted(meta_ids):
            indexed = self.meta.child_ids(layer_id)  # [] when its meta dir is gone meanwhile
            want = sorted(kids.get(layer_id, ()))
            if indexed is None or sorted(indexed) != want:
                self.meta.set_child_ids(layer_id, want)

    def _quarantine(self, layer_id: str) -> None:
        """What repair cannot explain (no intent record shows the store made it) is moved to
        ``.lost+found/``, never deleted."""
        import time

        lost = self.home / LOST_FOUND
        lost.mkdir(exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        paths = [p for p in self._layer_paths(layer_id) if os.path.lexists(p)]
        meta_dir = self.meta.dir(layer_id)
        if os.path.lexists(meta_dir):
            paths.append(meta_dir)
        for path in paths:
            where = lost / f"{path.parent.name}-{path.name}-{stamp}"
            log.warning("repair: %s has no layer record; moved to %s", path, where)
            try:
                self._detach(path)  # our mounts beneath are not data: they go, the files stay
                os.rename(path, where)
            except OSError as exc:
                log.error("repair: moving %s to %s failed (skipped): %s", path, where, exc)

    def _repair_apply(self, rec: LayerRecord) -> bool:
        """An interrupted apply to a committed layer: finished when it had passed its commit
        point, else rolled back from its journal; never deleted.  False: not an apply."""
        reason = self.meta.incomplete_reason(rec.id)
        if reason == APPLY_COMMIT:
            log.warning("repair: finishing the committed apply to layer %s", rec.id)
            self._finish_apply(rec)
            return True
        if reason != APPLY_INTENT or not self.apply_journal:
            return False
        log.warning("repair: rolling back the interrupted apply to layer %s", rec.id)
        self._roll_back_apply(rec)
        return True

    def _repair_staged(self, staged_id: str) -> None:
        """Remove a staging layer a crash left, and its half-renamed target (its marker says)."""
        lock = self.layer_lock(staged_id)
        if not lock.acquire(blocking=False):
            return  # its commit_new_layer is still running
        try:
            words = self.meta.incomplete_reason(staged_id).split()
            if len(words) == 2 and words[0] == COMMIT_INTENT and is_valid_id(words[1]) \
                    and not os.path.lexists(self.meta.dir(words[1])):
                target = self.layer_lock(words[1])
                if target.acquire(blocking=False):
                    try:
                        self._destroy_layer(words[1], reason=f"interrupted commit of {staged_id}")
                    finally:
                        target.release()
            self._destroy_layer(staged_id, reason="staging leftover of an interrupted commit")
        finally:
            lock.release()

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

    def resolve_parent(self, layer_id: str, parent: str | None) -> str | None:
        """The parent a diff is taken against: None = the layer's own, "" = none, else checked."""
        rec = self.record(layer_id)
        if parent is None:
            return rec.parent
        if parent == "":
            return None
        validate_id(parent, "parent id")
        self.record(parent)
        return parent

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        parent = self.resolve_parent(layer_id, parent)
        recorded = self._from_record(layer_id, parent, lambda layer: layer.changes())
        changes = recorded if recorded is not None else self._walk_changes(layer_id, parent)
        return self._with_link_groups(layer_id, changes)

    def _with_link_groups(self, layer_id: str, changes: list[Change]) -> list[Change]:
        """A changed file's other hard-link names in the layer are listed too (C), so that its
        diff carries the whole group: a layer that links ``c`` to the parent's ``b`` keeps ``b``
        and ``c`` one file when its diff is applied again (overlay's copy-up lists ``b``; a vfs
        layer's ``b`` is a copy that only the new link changed).  The tree is walked only when a
        changed file has names the list lacks."""
        from .archive.changes import Change, ChangeKind, sort_changes

        listed = {c.path for c in changes if c.kind is not ChangeKind.DELETE}
        # the layer's own directory (overlay's diff, where every name of such an inode is), not
        # a mount: ``changes`` answered from the record mounts nothing
        root_s = str(self._apply_target(self.record(layer_id)))
        wanted: dict[tuple[int, int], int] = {}
        for path in listed:
            try:
                st = os.lstat(root_s + path)
            except FileNotFoundError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                wanted[key] = wanted.get(key, st.st_nlink) - 1
        wanted = {k: n for k, n in wanted.items() if n > 0}
        if not wanted:
            return changes
        added: list[Change] = []
        for path, st in _walk_paths(root_s):
            if (st.st_dev, st.st_ino) in wanted and path not in listed:
                added.append(Change(path, ChangeKind.MODIFY))
                up = path.rpartition("/")[0]
                while up and up not in listed:  # moby: a change's parents are listed
                    listed.add(up)
                    added.append(Change(up, ChangeKind.MODIFY))
                    up = up.rpartition("/")[0]
        return sort_changes(changes + added) if added else changes

    def _walk_changes(self, layer_id: str, parent: str | None) -> list[Change]:
        """The changes found by walking the layer's tree against *parent*'s (resolved)."""
        from .archive.changes import changes_dirs

        with self.mounted(layer_id) as root:
            if parent is None:
                return changes_dirs(root, None, self.idmap)
            with self.mounted(parent) as proot:
                return changes_dirs(root, proot, self.idmap,
                                    self._unchanged_copies(layer_id, parent))

    def _unchanged_copies(self, layer_id: str, parent: str) -> frozenset[tuple[int, int]] | None:
        """When the layer's tree began as a copy of *parent*'s: its regular files as copied,
        (inode, ctime ns) pairs (archive.changes.changes_dirs); else None."""
        return None

    def _parent_roots(self, rec: LayerRecord) -> list[Path] | None:
        """The read-only roots of the layer's parent view, nearest first, kept in the store's
        whiteout format (empty for a base layer); None when the driver does not compare a
        layer's recorded headers with them (archive/recorded.py)."""
        return None

    def _copied_from_parent(self, layer_id: str) -> bool:
        """Whether the layer's tree began as a copy of its parent's (mtimes then compare to the
        nanosecond, as ``_unchanged_copies`` makes the walk compare them)."""
        return False

    def _from_record(self, layer_id: str, parent: str | None,
                     use: Callable[[RecordedLayer], _T]) -> _T | None:
        """``use`` of the layer's recorded headers replayed against its own *parent* (issue 15
        rule 8: exact, O(entries)); None where the walk must answer: no usable record, a
        writable layer, another parent, not real root (the apply's rootless rules), or a
        record the replay does not model."""
        rec = self.record(layer_id)
        if rec.writable or parent != rec.parent or not real_root():
            return None
        roots = self._parent_roots(rec)
        if roots is None:
            return None
        from .archive.lowerview import LowerView
        from .archive.recorded import RecordedLayer, Unmodelled
        from .exactdiff import layer_headers

        with layer_headers(self.meta.dir(layer_id)) as headers:
            if headers is None:
                return None
            fds: list[int] = []
            try:
                for root in roots:
                    fds.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                view = LowerView(fds, self.whiteout_format) if fds else None
                try:
                    return use(RecordedLayer(headers, self.idmap, view,
                                             self._apply_target(rec),
                                             self._copied_from_parent(layer_id)))
                except Unmodelled as why:
                    log.debug("layer %s: changes from a walk (%s)", layer_id, why)
                    return None
            except OSError as exc:
                raise from_oserror(exc, f"changes of layer {layer_id}") from exc
            finally:
                for fd in fds:
                    os.close(fd)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        parent = self.resolve_parent(layer_id, parent)
        size = self._from_record(layer_id, parent, self._recorded_size)
        return size if size is not None else self._walk_size(layer_id, parent)

    def _recorded_size(self, layer: RecordedLayer) -> int:
        return layer.changes_size(layer.changes())

    def _walk_size(self, layer_id: str, parent: str | None) -> int:
        """moby's ChangesSize of the walked changes against *parent* (resolved)."""
        from .archive.changes import changes_size

        changes = self._walk_changes(layer_id, parent)
        with self.mounted(layer_id) as root:
            return changes_size(root, changes)

    def diff(self, layer_id: str, parent: str | None = None) -> BinaryIO:
        """A tar of the layer's changes, streamed from a writer thread (not buffered)."""
        from .archive.export import stream_tar

        parent = self.resolve_parent(layer_id, parent)

        def write(out_fd: int) -> None:
            self.write_diff(out_fd, layer_id, parent)

        return stream_tar(write)

    def write_diff(self, out_fd: int, layer_id: str, parent: str | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
        """Write the diff tar straight to a file descriptor (the command's fast path)."""
        from .archive.export import write_changes, write_tree

        with self.mounted(layer_id) as root:
            if parent is None:
                write_tree(out_fd, root, idmap=self.idmap, progress=progress)
                return
            with self.mounted(parent) as proot:
                changes = self._from_record(layer_id, parent, lambda layer: layer.changes())
                if changes is None:
                    changes = self._walk_changes(layer_id, parent)
                changes = self._with_link_groups(layer_id, changes)
                write_changes(out_fd, root, changes, idmap=self.idmap, progress=progress,
                              parent_root=proot)

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
    ) -> ApplyResult:
        """Apply a layer tar (plain or compressed) in a confined child; returns ApplyResult."""
        validate_id(layer_id)
        with self._apply_child() as child, self.layer_lock(layer_id):
            rec = self.applicable_record(layer_id, parent)
            return self._apply_locked(rec, stream, progress, child)

    #: whether the apply hook runs the Linux apply's confined job (``apply_confined`` with the
    #: store's options): its child is then started first thing in an apply
    apply_child_ahead: ClassVar[bool] = True

    @contextlib.contextmanager
    def _apply_child(self) -> Iterator[Prespawned | None]:
        """The apply hook's confined child, started before the lock, the record, the marker and
        the parent's imports, so that its start-up (Python, the tar engine's imports) overlaps
        them; the hook gets it as ``ApplyOptions.child``.  None: the hook runs no such child.
        One the hook never took (the apply was refused) is stopped and reaped on the way out."""
        if not self.apply_child_ahead:
            yield None
            return
        from .archive.confine import start_child
        from .archive.jobs import LINUX_APPLY

        child = start_child(LINUX_APPLY)
        try:
            yield child
        finally:
            child.discard()

    def _apply_locked(self, rec: LayerRecord, stream: BinaryIO | int,
                      progress: Callable[[int], None] | None,
                      child: Prespawned | None = None) -> ApplyResult:
        """The apply and its commit (the caller holds the layer's lock); *child*: the hook's
        confined child started ahead (:meth:`_apply_child`, which discards it if the
        hook did not take it).  A child that answered success exits while the commit is
        written, and is reaped here, before the lock goes."""
        from .archive.options import ApplyOptions

        layer_id = rec.id
        opts = ApplyOptions(whiteout_format=self.whiteout_format,
                            idmap=self.idmap, progress=progress, child=child,
                            on_started=self._prepare_commit)
        opts = self._apply_options(rec, opts)
        opts.journal = self.apply_journal
        # SIGINT/SIGTERM are held from here to the commit, except while apply_confined runs:
        # it installs its own handlers, which stop the child and roll the layer back.
        with _signals_deferred():
            try:
                self.meta.mark_incomplete(layer_id, APPLY_INTENT)
            except OSError as exc:
                self.meta.clear_incomplete(layer_id)
                raise from_oserror(exc, f"apply to layer {layer_id}") from exc
            raw_fd: int | None = None
            applied = False
            try:
                raw_fd = self._tarsplit_begin(layer_id, opts)
                with as_fd(stream) as fd:
                    result = self._apply_stream(rec, fd, opts)
                applied = True
                # as_fd has checked the transport (a pump that failed after a clean entry
                # boundary raised there): everything below may still roll the apply back.
                if raw_fd is not None:
                    self._tarsplit_end(rec, raw_fd, result)
                self._decide_apply(rec, result)
            except BaseException as exc:
                if child is not None:
                    child.discard()  # gone before the rollback
                self._tarsplit_discard(layer_id, raw_fd)
                self._roll_back_apply(rec, applied)
                if isinstance(exc, OSError):
                    raise from_oserror(exc, f"apply to layer {layer_id}") from exc
                raise
            self._tarsplit_discard(layer_id, raw_fd)
            self._finish_apply(rec)
            if child is not None:
                child.discard()
        return result

    #: whether the apply hook keeps an undo journal (ApplyOptions.journal) for the store to
    #: commit or roll back; a driver whose hook swaps the layer in whole says False
    apply_journal: ClassVar[bool] = True

    def _prepare_commit(self) -> None:
        """While the child applies (``ApplyOptions.on_started``): import what the commit after
        it needs -- the journal's commit and rollback (they live with the tar engine), the
        tar-split finishing (exactdiff) -- so that the commit does not."""
        if self.apply_journal:
            from .archive import apply  # noqa: F401
        if self.record_tarsplit:
            from . import exactdiff  # noqa: F401

    def _decide_apply(self, rec: LayerRecord, result: ApplyResult) -> None:
        """The commit decision: the new record beside the old, then the marker says "commit"."""
        rec.diff_id = result.diff_id
        rec.extra.pop("diff_id", None)  # where records before the field kept it
        rec.extra["applied_size"] = result.size
        self.meta.write_next(rec)
        self.meta.mark_incomplete(rec.id, APPLY_COMMIT)  # the commit point

    def _finish_apply(self, rec: LayerRecord) -> None:
        """After the commit point (also repair's way on): the new record in place, the journal
        dropped, the marker gone."""
        self.meta.promote_next(rec.id)
        if self.apply_journal:
            from .archive.apply import commit_journal

            with self._target_fd(rec) as root_fd:
                commit_journal(root_fd)
        self.meta.clear_incomplete(rec.id)

    def _roll_back_apply(self, rec: LayerRecord, applied: bool = True) -> None:
        """Before the commit point: the layer as it was before the apply, the marker gone.

        When the rollback itself fails the marker stays, and the next open's repair tries again.
        Without a journal, a hook that failed left the layer as it was; one that succeeded
        cannot be undone here (*applied*): the marker stays.
        """
        layer_id = rec.id
        try:
            self.meta.drop_next(layer_id)
            self._undo_tarsplit(layer_id)
            if self.apply_journal:
                from .archive.apply import rollback_journal

                with self._target_fd(rec) as root_fd:
                    rollback_journal(root_fd)
            elif applied:
                return  # not undoable here: the marker stays (repair)
            self.meta.clear_incomplete(layer_id)
        except (OSError, GraphDriverError) as exc:
            log.error("rolling back the apply to layer %s failed (repair will retry): %s",
                      layer_id, exc)

    @contextlib.contextmanager
    def _target_fd(self, rec: LayerRecord) -> Iterator[int]:
        fd = os.open(self._apply_target(rec), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def _undo_tarsplit(self, layer_id: str) -> None:
        """Remove the tar-split files the rolled-back apply wrote (newer than its marker)."""
        from .archive.tarsplit import METADATA_NAME, UNREPRODUCIBLE_NAME

        d = self.meta.dir(layer_id)
        try:
            since = os.stat(d / MetaDir.INCOMPLETE).st_mtime_ns
        except FileNotFoundError:
            return
        for name in (METADATA_NAME, UNREPRODUCIBLE_NAME):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(d / name).st_mtime_ns >= since:
                    os.unlink(d / name)

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
                os.unlink(self.meta.dir(layer_id) / MetaDir.TARSPLIT_RAW)

    def _apply_options(self, rec: LayerRecord, opts: Any) -> Any:
        return opts

    #: record tar-split metadata on apply (issue 6: exact diffs for Docker)
    record_tarsplit: ClassVar[bool] = True

    def _tarsplit_begin(self, layer_id: str, opts: Any) -> int | None:
        """Hand the apply a file for the raw stream description (archive/tarsplit.py)."""
        if not self.record_tarsplit or opts.recorder is not None:
            return None
        fd = os.open(self.meta.dir(layer_id) / MetaDir.TARSPLIT_RAW,
                     os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        opts.packer_fd = fd  # the confined child packs the final lines, gzip'd, into it
        return fd

    def _tarsplit_end(self, rec: LayerRecord, raw_fd: int, result: ApplyResult) -> None:
        """Keep ``meta/<id>/tar-split.json.gz`` (the child packer's file, once the applied files
        are checked against it), or say why not."""
        from .exactdiff import finish_layer_recording

        finish_layer_recording(self.meta.dir(rec.id), raw_fd, self._apply_target(rec), rec.id,
                               result.recording, self._tarsplit_resolver())

    def _tarsplit_resolver(self) -> Resolver | None:
        """How the check after an apply finds a recorded name the driver stores under another
        spelling (archive/tarsplit.py's ``Resolver``); None: names are kept as written."""
        return None

    # ----- facts ---------------------------------------------------------------------------

    def status(self) -> list[tuple[str, str]]:
        return [*self._status(), ("Layers", str(len(self.layers())))]

    def metadata(self, layer_id: str) -> dict[str, str]:
        return self._metadata(self.record(layer_id))

    def diff_getter(self, layer_id: str) -> MountedFiles:
        return MountedFiles(self, layer_id)

    def close(self) -> None:
        """Release what this object holds in memory (mounts stay: they are counted on disk)."""

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _made_by(opts: CreateOpts | None) -> str:
    return _check_made_by(opts.made_by if opts is not None else "user")


def _check_made_by(made_by: str) -> str:
    if made_by not in MADE_BY:
        raise InvalidArgument(f"invalid made_by {made_by!r}: one of {', '.join(sorted(MADE_BY))}")
    return made_by


_MAX_HOLDER = 512


def _empty(path: Path) -> bool:
    try:
        return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    except OSError:
        return False


def _validate_holder(holder: object) -> str:
    """A holder is one printable line such as ``image:sha256:<hex>`` or ``snapshot:<name>``."""
    if not isinstance(holder, str) or not holder or len(holder) > _MAX_HOLDER \
            or not holder.isprintable():
        raise InvalidArgument(f"invalid holder {str(holder)[:40]!r}: one printable line of at "
                              f"most {_MAX_HOLDER} characters")
    return holder


#: how many :func:`signals_redelivered` blocks the main thread has open
_redelivering = 0


@contextlib.contextmanager
def signals_redelivered() -> Iterator[None]:
    """Within the block, a SIGINT/SIGTERM held over a layer's commit (:func:`_signals_deferred`)
    is delivered again once the commit is done, to the handler in place before, instead of
    dropped.  For an operation that goes on after a commit (a pull's or load's next layer, an
    image's record): a signal that came during one layer's commit must still stop it.  Main
    thread only, as the hold is (elsewhere a no-op: another thread's block does not change
    what the main thread's own applies do)."""
    global _redelivering
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _redelivering += 1
    try:
        yield
    finally:
        _redelivering -= 1


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (main thread only; elsewhere a no-op).

    The block is a commit that must not be cut in half.  A signal that arrives meanwhile is
    logged and dropped, since the operation it would have interrupted has completed; inside
    :func:`signals_redelivered` it is raised again instead, once the commit is done.  When the
    block fails, its error stops the operation and the signal is dropped.
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
    except BaseException:
        got.clear()  # the block failed: its error stops the operation and says why
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got and _redelivering:
            log.debug("signal %d arrived while the layer was being committed; delivered now",
                      got[0])
            signal.raise_signal(got[0])  # its handler runs (and may raise) here
        elif got:
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


def _walk_paths(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every path beneath *root* ("/a/b", absolute inside it) with its lstat; iterative."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(root + rel if rel else root) as it:
                entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        except OSError:
            continue  # gone meanwhile, or a path too long to name: nothing to add there
        for name, st in entries:
            path = f"{rel}/{name}"
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
