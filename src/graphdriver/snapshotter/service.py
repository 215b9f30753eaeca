"""containerd's snapshots service (``containerd.services.snapshots.v1.Snapshots``) over a driver.

Every snapshot is a graphdriver layer of the driver (an id chosen here, never the key: keys are
containerd's arbitrary strings), made by "snapshotter" and held by ``snapshot:<layer id>`` so
that ``graphdriver rm`` refuses it.  An active snapshot and a view are writable layers on top of
their parent's layer (containerd mounts a view read-only; a view gets no size limit), an active
one gets the store's default ``size`` where the driver has quotas, and Commit freezes the layer
in place (``driver.freeze``) and renames the key.  Mounts are described, never performed: the
driver's ``mount_spec`` gives containerd's overlayfs conventions.  Each call that changes
anything has one commit point, the metadata transaction; a layer is created before its row and
removed after it, and ``repair`` (start-up and Cleanup) removes a layer made here with no row
and drops a row whose layer is gone.  Failures are containerd's gRPC codes: NotFound,
AlreadyExists, FailedPrecondition, InvalidArgument (Unimplemented for NotSupported).

It owns the mapping between snapshots and layers; it never imports the command, the server or
``drivers/`` (it reaches a driver through its methods only).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ..driver import CreateOpts
from ..errors import (
    AlreadyExists,
    GraphDriverError,
    InUse,
    InvalidArgument,
    NotFound,
    NotSupported,
)
from .api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .filters import compile_filters, snapshot_fields
from .metadata import ACTIVE, COMMITTED, KIND_NAMES, VIEW, Metadata, Snapshot

log = logging.getLogger("graphdriver")

MADE_BY = "snapshotter"
LAYER_PREFIX = "sn-"
MAX_LABEL = 4096  # containerd's labels.Validate: key + value
LIST_BATCH = 100  # infos per List message, as containerd's own service sends them
#: drivers whose layers are assembled from their ancestors' (not copies): a view with a parent
#: is then a read-only mount of the parent's layer, as in containerd's overlayfs snapshotter
STACKED_DRIVERS = frozenset({"overlay"})

_CODES: list[tuple[type[GraphDriverError], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (NotSupported, grpc.StatusCode.UNIMPLEMENTED),
]

Mounts = list[mount_pb2.Mount]
R = TypeVar("R")


class FailedPrecondition(InUse):
    """The snapshot is not in a state the call needs (containerd's ErrFailedPrecondition)."""


def holder_of(layer_id: str) -> str:
    return f"snapshot:{layer_id}"


class Snapshots:
    """The snapshots of one driver store; thread-safe (one lock orders every change)."""

    def __init__(self, driver: Any, metadata: Metadata) -> None:
        self.driver = driver
        self.meta = metadata
        self._lock = threading.Lock()
        #: whether a layer made here may have no row: until the first repair (a crash before
        #: this process), and after a removal here failed; else each call's layer and row go
        #: together under the lock, and Cleanup needs no scan of the store's layers
        self._orphans_possible = True
        self._view_of_parent = driver.name in STACKED_DRIVERS

    # ----- creating ------------------------------------------------------------------------

    def create(self, kind: int, key: str, parent: str, labels: dict[str, str]) -> Mounts:
        """Prepare (ACTIVE) or View (VIEW): a new layer on the parent's, then its row."""
        _check_key(key)
        _check_labels(labels)
        with self._lock:
            if self.meta.get(key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            parent_layer = None
            if parent:
                prow = self._get(parent, "parent snapshot")
                if prow.kind != COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
                parent_layer = prow.layer
            layer = LAYER_PREFIX + secrets.token_hex(16)
            # A view is never written: no quota image for it (size 0 = no limit).  The holder
            # is in the layer's first record: no second write.
            opts = CreateOpts(made_by=MADE_BY, holder=holder_of(layer),
                              storage_opt={"size": "0"} if kind == VIEW else {})
            self.driver.create_rw(layer, parent_layer, opts)
            try:
                now = time.time_ns()
                snap = Snapshot(key, layer, kind, parent, dict(labels), now, now)
                mounts = self._mounts(snap)
                with self.meta.transaction():
                    self.meta.insert(snap)  # the commit point
            except BaseException:
                self._drop_layer(layer)
                raise
            return mounts

    def mounts(self, key: str) -> Mounts:
        snap = self._get(key)
        if snap.kind == COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed: it has no mounts")
        return self._mounts(snap)

    def _mounts(self, snap: Snapshot) -> Mounts:
        source_layer, readonly = snap.layer, snap.kind == VIEW
        if readonly and snap.parent and self._view_of_parent:
            source_layer = self._get(snap.parent, "parent snapshot").layer
        mtype, source, options = self.driver.mount_spec(source_layer, readonly=readonly)
        return [mount_pb2.Mount(type=mtype, source=source, options=options)]

    # ----- committing, removing ------------------------------------------------------------

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        _check_key(name)
        _check_labels(labels)
        with self._lock:
            snap = self._get(key)
            if snap.kind != ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active: it cannot be committed")
            if self.meta.get(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            self.driver.freeze(snap.layer)  # in place; a no-op when a crash already froze it
            with self.meta.transaction():
                self.meta.commit(key, name, dict(labels), time.time_ns())  # the commit point

    def remove(self, key: str) -> None:
        with self._lock:
            snap = self._get(key)
            children = self.meta.children(key)
            if children:
                raise FailedPrecondition(
                    f"cannot remove snapshot {key!r}: it has children ({children[0]!r})")
            with self.meta.transaction():
                self.meta.delete(key)  # the commit point: the layer goes next, or at repair
            self._drop_layer(snap.layer)

    def _drop_layer(self, layer: str) -> None:
        try:
            self.driver.remove(layer, releasing=holder_of(layer))  # the hold goes with it
        except NotFound:
            pass
        except GraphDriverError as exc:
            self._orphans_possible = True
            log.warning("snapshotter: layer %s stays until the next cleanup: %s", layer, exc)
        except BaseException:
            self._orphans_possible = True
            raise

    # ----- reading, updating ---------------------------------------------------------------

    def stat(self, key: str) -> snapshots_pb2.Info:
        return info_of(self._get(key))

    def update(self, info: snapshots_pb2.Info, paths: list[str]) -> snapshots_pb2.Info:
        """containerd's UpdateInfo: only labels change ("labels", "labels.<key>", or no path)."""
        with self._lock:
            snap = self._get(info.name)
            labels = dict(snap.labels)
            for path in paths or ["labels"]:
                if path == "labels":
                    labels = dict(info.labels)
                elif path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    labels[label] = info.labels.get(label, "")
                else:
                    raise InvalidArgument(
                        f"cannot update {path!r} field on snapshot {info.name!r}")
            labels = {k: v for k, v in labels.items() if v != ""}
            _check_labels(labels)
            now = time.time_ns()
            with self.meta.transaction():
                self.meta.set_labels(snap.key, labels, now)  # the commit point
            snap.labels, snap.updated = labels, now
            return info_of(snap)

    def walk(self, filters: list[str]) -> Iterator[snapshots_pb2.Info]:
        match = compile_filters(filters)
        for snap in self.meta.all():
            fields = snapshot_fields(KIND_NAMES[snap.kind], snap.key, snap.parent, snap.labels)
            if match(fields):
                yield info_of(snap)

    def usage(self, key: str) -> tuple[int, int]:
        """Bytes (allocated blocks, as containerd's fs.DiskUsage) and inodes of the snapshot's
        own layer — for a copying driver (vfs) its whole copy."""
        snap = self._get(key)
        facts = self.driver.metadata(snap.layer)
        own = facts.get("UpperDir") or facts.get("Dir")
        if not own:
            raise NotSupported(f"{self.driver.name}: no directory of layer {snap.layer}")
        return disk_usage(os.path.realpath(own))

    def _get(self, key: str, what: str = "snapshot") -> Snapshot:
        snap = self.meta.get(key)
        if snap is None:
            raise NotFound(f"{what} {key!r} does not exist")
        return snap

    # ----- repair --------------------------------------------------------------------------

    def repair(self) -> None:
        """Drop rows whose layer is gone; remove layers made here that no row names (what a
        crash between a layer and its row leaves, or a removal that failed).  Start-up and
        Cleanup run it; the scan of the store's layers only when orphans are possible."""
        with self._lock:
            rows = self.meta.all()
            gone = [s for s in rows if not self.driver.exists(s.layer)]
            if gone:
                with self.meta.transaction():
                    for snap in gone:
                        log.warning("repair: snapshot %r had no layer (%s); its record is dropped",
                                    snap.key, snap.layer)
                        self.meta.delete_layer(snap.layer)
            if not self._orphans_possible:
                return
            self._orphans_possible = False  # a removal failing below sets it again
            named = {s.layer for s in rows}
            orphans = {layer for layer in self.driver.layers()
                       if layer not in named and self.driver.record(layer).made_by == MADE_BY}
            while orphans:  # children before parents
                leaves = {o for o in orphans if not set(self.driver.children(o)) & orphans}
                for layer in sorted(leaves):
                    log.warning("repair: removing layer %s (made by the snapshotter, no snapshot)",
                                layer)
                    self._drop_layer(layer)
                orphans -= leaves


def info_of(snap: Snapshot) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=snap.key, parent=snap.parent, kind=snap.kind,  # type: ignore[arg-type]
        created_at=_timestamp(snap.created), updated_at=_timestamp(snap.updated),
        labels=snap.labels,
    )


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _check_key(key: str) -> None:
    if not key:
        raise InvalidArgument("snapshot key must not be empty")


def _check_labels(labels: dict[str, str] | Any) -> None:
    for k, v in labels.items():
        if len(k) + len(v) > MAX_LABEL:
            raise InvalidArgument(f"label key and value length ({len(k) + len(v)} bytes) "
                                  f"greater than maximum size ({MAX_LABEL} bytes), key: {k[:40]}")


def disk_usage(root: str) -> tuple[int, int]:
    """(bytes allocated, inodes) under *root*, each inode counted once; no symlink followed."""
    size = inodes = 0
    seen: set[int] = set()
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        inodes += 1
        size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                stack += [os.path.join(path, n) for n in os.listdir(path)]
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
    return size, inodes


def _status(exc: GraphDriverError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _call(context: grpc.ServicerContext, fn: Callable[[], R]) -> R:
    """Run one RPC; a graphdriver error becomes its gRPC status (one line)."""
    try:
        return fn()
    except GraphDriverError as exc:
        context.abort(_status(exc), str(exc))
    except OSError as exc:
        from ..errors import from_oserror

        err = from_oserror(exc, "snapshotter")
        context.abort(_status(err), str(err))
    except sqlite3.Error as exc:  # e.g. the database locked by someone else past the timeout
        context.abort(grpc.StatusCode.UNAVAILABLE, f"snapshotter records: {exc}")


class Servicer(snapshots_pb2_grpc.SnapshotsServicer):
    """The gRPC face of ``Snapshots``: requests in, responses or status codes out."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.s = snapshots

    def Prepare(self, request: snapshots_pb2.PrepareSnapshotRequest,
                context: grpc.ServicerContext) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = _call(context, lambda: self.s.create(ACTIVE, request.key, request.parent,
                                                      dict(request.labels)))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts)

    def View(self, request: snapshots_pb2.ViewSnapshotRequest,
             context: grpc.ServicerContext) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = _call(context, lambda: self.s.create(VIEW, request.key, request.parent,
                                                      dict(request.labels)))
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts)

    def Mounts(self, request: snapshots_pb2.MountsRequest,
               context: grpc.ServicerContext) -> snapshots_pb2.MountsResponse:
        return snapshots_pb2.MountsResponse(
            mounts=_call(context, lambda: self.s.mounts(request.key)))

    def Commit(self, request: snapshots_pb2.CommitSnapshotRequest,
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        _call(context, lambda: self.s.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: snapshots_pb2.RemoveSnapshotRequest,
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        _call(context, lambda: self.s.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: snapshots_pb2.StatSnapshotRequest,
             context: grpc.ServicerContext) -> snapshots_pb2.StatSnapshotResponse:
        return snapshots_pb2.StatSnapshotResponse(
            info=_call(context, lambda: self.s.stat(request.key)))

    def Update(self, request: snapshots_pb2.UpdateSnapshotRequest,
               context: grpc.ServicerContext) -> snapshots_pb2.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths)
        return snapshots_pb2.UpdateSnapshotResponse(
            info=_call(context, lambda: self.s.update(request.info, paths)))

    def List(self, request: snapshots_pb2.ListSnapshotsRequest,
             context: grpc.ServicerContext) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        infos = _call(context, lambda: list(self.s.walk(list(request.filters))))
        for start in range(0, len(infos), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(info=infos[start:start + LIST_BATCH])

    def Usage(self, request: snapshots_pb2.UsageRequest,
              context: grpc.ServicerContext) -> snapshots_pb2.UsageResponse:
        size, inodes = _call(context, lambda: self.s.usage(request.key))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: snapshots_pb2.CleanupRequest,
                context: grpc.ServicerContext) -> empty_pb2.Empty:
        _call(context, self.s.repair)
        return empty_pb2.Empty()

