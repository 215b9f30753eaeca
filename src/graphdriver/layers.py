"""Layer ids and layer records: the commit points every driver shares (DESIGN.md rule 1).

A layer exists iff ``meta/<id>/layer.json`` exists and ``meta/<id>/incomplete`` does not.  The
record is written atomically after the driver's directories are in place, so a crash leaves a
layer absent or complete; what a crash leaves behind is found and removed by repair.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from pathlib import Path

from . import TYPE_CHECKING
from .errors import InvalidArgument, StoreCorrupt
from .fsutil import atomic_write, remove_tree

if TYPE_CHECKING:
    from typing import Any

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
MAX_ID_LEN = 96
REMOVING_SUFFIX = "-removing"
# "l" holds overlay's short links; "meta" and "locks" are directories of every home, which
# overlay2's layout puts beside the layer directories.
RESERVED_IDS = frozenset({"l", "meta", "locks"})


def validate_id(layer_id: object, what: str = "layer id") -> str:
    """Refuse ids that are not ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (≤ 96 chars) or are reserved."""
    if not isinstance(layer_id, str) or not layer_id:
        raise InvalidArgument(f"invalid {what}: empty")
    if len(layer_id) > MAX_ID_LEN:
        raise InvalidArgument(f"invalid {what} {layer_id[:20]!r}...: longer than {MAX_ID_LEN}")
    if not _ID_RE.match(layer_id):
        raise InvalidArgument(
            f"invalid {what} {layer_id!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    if layer_id in RESERVED_IDS or layer_id.endswith(REMOVING_SUFFIX):
        raise InvalidArgument(f"invalid {what} {layer_id!r}: reserved")
    return layer_id


def is_valid_id(layer_id: str) -> bool:
    try:
        validate_id(layer_id)
    except InvalidArgument:
        return False
    return True


_RECORD_FIELDS = ("id", "parent", "kind", "size_limit", "created", "extra", "made_by", "holders",
                  "diff_id")
#: who made a layer: a user's create, the image store's pull/commit, or the snapshotter
MADE_BY = frozenset({"user", "image", "snapshotter"})
#: the id prefix of a layer being staged by commit_new_layer (no valid layer id starts so)
STAGING_PREFIX = ".staging-"
#: what a staged layer's incomplete marker says once its target id is known: "commit <id>"
COMMIT_INTENT = "commit"
#: an apply's marker: "apply" until the commit decision, then "apply-commit" (the commit point)
APPLY_INTENT = "apply"
#: a create's marker, written (with the record) before the driver makes anything
CREATE_INTENT = "create"
APPLY_COMMIT = "apply-commit"
_DEFAULT: Any = object()  # "not given": created and extra then take their default_factory


def asdict(rec: LayerRecord) -> dict[str, Any]:
    """``dataclasses.asdict`` of a record: its fields in order, values copied."""
    from copy import deepcopy

    return {name: deepcopy(getattr(rec, name)) for name in _RECORD_FIELDS}


class LayerRecord:
    """What ``meta/<id>/layer.json`` holds.

    It behaves as a (non-frozen) dataclass of these fields, written out so that opening a store
    does not import dataclasses (and inspect): start-up time.
    """

    __match_args__ = ("id", "parent", "kind", "size_limit", "created", "extra", "made_by",
                      "holders", "diff_id")
    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    id: str
    parent: str | None
    kind: str  # "ro" (create) or "rw" (create_rw)
    size_limit: int | None
    created: float
    extra: dict[str, Any]
    made_by: str  # "user" (default), "image" or "snapshotter"
    holders: list[str]  # sorted, unique: "image:sha256:<hex>", "snapshot:<name>", ...
    diff_id: str | None  # "sha256:<hex>" of the uncompressed tar last applied

    def __init__(
        self,
        id: str,
        parent: str | None,
        kind: str,
        size_limit: int | None = None,
        created: float = _DEFAULT,
        extra: dict[str, Any] = _DEFAULT,
        made_by: str = "user",
        holders: list[str] = _DEFAULT,
        diff_id: str | None = None,
    ) -> None:
        self.id = id
        self.parent = parent
        self.kind = kind
        self.size_limit = size_limit
        self.created = time.time() if created is _DEFAULT else created
        self.extra = {} if extra is _DEFAULT else extra
        self.made_by = made_by
        self.holders = [] if holders is _DEFAULT else holders
        self.diff_id = diff_id

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _RECORD_FIELDS)

    def __repr__(self) -> str:
        values = zip(_RECORD_FIELDS, self._values(), strict=True)
        fields = ", ".join(f"{n}={v!r}" for n, v in values)
        return f"LayerRecord({fields})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    @property
    def writable(self) -> bool:
        return self.kind == "rw"

    def to_json(self) -> bytes:
        import json

        # the values as they are (json only reads them): no copy, unlike ``asdict``
        return json.dumps({name: getattr(self, name) for name in _RECORD_FIELDS},
                          sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path | str) -> LayerRecord:
        import json

        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise TypeError("not a JSON object")
            extra = obj.get("extra") or {}
            # Records written before diff_id was a field kept it in extra.
            diff_id = obj.get("diff_id", extra.get("diff_id") if isinstance(extra, dict) else None)
            rec = cls(
                id=_typed(obj.get("id"), str, "id"),
                parent=_typed(obj.get("parent"), (str, type(None)), "parent"),
                kind=_typed(obj.get("kind", "ro"), str, "kind"),
                size_limit=_typed(obj.get("size_limit"), (int, type(None)), "size_limit"),
                created=float(_typed(obj.get("created", 0), (int, float), "created")),
                extra=_typed(extra, dict, "extra"),
                made_by=_typed(obj.get("made_by", "user"), str, "made_by"),
                holders=sorted(set(_typed(obj.get("holders") or [], list, "holders"))),
                diff_id=_typed(diff_id, (str, type(None)), "diff_id"),
            )
            if rec.kind not in ("ro", "rw") or rec.made_by not in MADE_BY:
                raise ValueError(f"kind {rec.kind!r} / made_by {rec.made_by!r}")
            if not all(isinstance(h, str) for h in rec.holders):
                raise TypeError("holders: not all strings")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise StoreCorrupt(f"unreadable layer record {where}: {exc}") from exc
        return rec


def _typed(value: Any, types: type | tuple[type, ...], field: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"{field}: {type(value).__name__} is not the type expected")
    return value


class MetaDir:
    """The ``meta/`` directory of a driver home: records and incomplete markers."""

    RECORD = "layer.json"
    INCOMPLETE = "incomplete"
    #: the raw tar-split stream description an apply writes (exactdiff finishes it): named here
    #: so that the store opens it without importing exactdiff (tar-split, the CRC-64) before
    #: its apply's child has the job
    TARSPLIT_RAW = "tar-split.raw"

    def __init__(self, home: Path) -> None:
        self.root = home / "meta"
        self.root.mkdir(parents=True, exist_ok=True)
        self._prefix = f"{self.root}/"  # the hot reads join strings, not Paths

    def dir(self, layer_id: str) -> Path:
        return self.root / layer_id

    def record_path(self, layer_id: str) -> Path:
        return self.root / layer_id / self.RECORD

    MAX_RECORD = 1 << 20

    def read(self, layer_id: str) -> LayerRecord | None:
        """The record (None: none); StoreCorrupt when it cannot be read or does not belong here
        (another id, itself as parent): that one layer is broken."""
        path = f"{self._prefix}{layer_id}/{self.RECORD}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreCorrupt(f"unreadable layer record {path}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreCorrupt(f"unreadable layer record {path}: not a regular file")
            data = os.read(fd, self.MAX_RECORD + 1)
        except OSError as exc:
            raise StoreCorrupt(f"unreadable layer record {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if len(data) > self.MAX_RECORD:
            raise StoreCorrupt(f"unreadable layer record {path}: larger than 1 MiB")
        rec = LayerRecord.from_json(data, path)
        if rec.id != layer_id and not layer_id.startswith(STAGING_PREFIX):
            raise StoreCorrupt(f"layer record {path} names layer {rec.id!r}")
        if rec.parent is not None and (rec.parent == rec.id or rec.parent == layer_id):
            raise StoreCorrupt(f"layer record {path} names the layer as its own parent")
        return rec

    def broken(self) -> dict[str, str]:
        """Layers whose record is unreadable or does not belong (id -> why): quarantined."""
        out = {}
        for layer_id in self.ids():
            try:
                self.read(layer_id)
            except StoreCorrupt as exc:
                out[layer_id] = str(exc)
        return out

    def write(self, record: LayerRecord, in_dir: str | None = None) -> None:
        """The commit point of a layer: atomic and durable (*in_dir*: a staged layer's dir)."""
        d = self.dir(in_dir or record.id)
        d.mkdir(exist_ok=True)
        atomic_write(d / self.RECORD, record.to_json())

    NEXT = "layer.json.next"

    def write_next(self, record: LayerRecord) -> None:
        """The record an apply will commit, beside the current one until then."""
        atomic_write(self.dir(record.id) / self.NEXT, record.to_json())

    def promote_next(self, layer_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.dir(layer_id) / self.NEXT, self.record_path(layer_id))

    def drop_next(self, layer_id: str) -> None:
        (self.dir(layer_id) / self.NEXT).unlink(missing_ok=True)

    def is_incomplete(self, layer_id: str) -> bool:
        return os.path.lexists(f"{self._prefix}{layer_id}/{self.INCOMPLETE}")

    def mark_incomplete(self, layer_id: str, why: str) -> None:
        atomic_write(self.root / layer_id / self.INCOMPLETE, f"{why} pid={os.getpid()}\n".encode())

    def clear_incomplete(self, layer_id: str) -> None:
        (self.root / layer_id / self.INCOMPLETE).unlink(missing_ok=True)

    def exists(self, layer_id: str) -> bool:
        return os.path.isfile(f"{self._prefix}{layer_id}/{self.RECORD}") \
            and not self.is_incomplete(layer_id)

    # The children index: ``meta/<parent>/children`` names, one per line, every layer whose
    # record names that parent — written before the child's record and rewritten after the
    # child's meta directory is gone, so it is a superset of the complete children (a crash
    # leaves at most an entry too many, which a reader checks against the child's record and
    # repair drops).  No file: no children.  Staging layers are never listed (their parent
    # finds them by ``staged_children``).
    CHILDREN = "children"

    def child_ids(self, parent: str) -> list[str] | None:
        """The ids the parent's children index names; None when it is unreadable (the caller
        then scans the records)."""
        path = f"{self._prefix}{parent}/{self.CHILDREN}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, self.MAX_RECORD + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            ids = data.decode("ascii").split()
        except UnicodeDecodeError:
            return None
        if len(data) > self.MAX_RECORD or not all(map(is_valid_id, ids)):
            return None
        return ids

    def set_child_ids(self, parent: str, ids: list[str]) -> None:
        """Rewrite the parent's children index (the caller holds the store lock); nothing when
        the parent has no meta directory."""
        path = self.root / parent / self.CHILDREN
        if not ids:
            if os.path.isdir(path) and not os.path.islink(path):
                remove_tree(path)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(path)
            return
        if os.path.isdir(self.root / parent):
            if os.path.isdir(path) and not os.path.islink(path):
                remove_tree(path)  # not ours to keep: the index is a file
            atomic_write(path, "".join(f"{i}\n" for i in sorted(set(ids))).encode())

    def indexed_children(self, parent: str) -> list[str]:
        """The parent's children index, or, when that is unreadable, every record naming the
        parent (complete or not): a superset of its complete children either way."""
        ids = self.child_ids(parent)
        if ids is None:
            ids = [rec.id for rec in self.all_records() if rec.parent == parent]
        return ids

    def add_child(self, parent: str, child: str) -> None:
        """Index *child* under *parent* before its record makes it a layer (store lock held)."""
        ids = self.child_ids(parent)  # one read when the index is readable
        if ids is not None and child in ids:
            return
        known = self.indexed_children(parent) if ids is None else ids
        self.set_child_ids(parent, [*known, child])

    def drop_child(self, parent: str, child: str) -> None:
        """Unindex *child* once its meta directory is gone (store lock held)."""
        ids = self.child_ids(parent)
        if ids is not None and child in ids:
            self.set_child_ids(parent, [i for i in ids if i != child])

    def ids(self) -> list[str]:
        """Every id with a meta directory (complete or not), removing leftovers excluded."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(".") and not n.endswith(REMOVING_SUFFIX))

    def incomplete_reason(self, layer_id: str) -> str:
        """The marker's first word and argument ("apply", "commit <id>"), "" if unreadable."""
        try:
            text = (self.root / layer_id / self.INCOMPLETE).read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(w for w in text.split() if not w.startswith("pid="))

    def staged_ids(self) -> list[str]:
        """Layers being staged by commit_new_layer (or left by a crash while staged)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names
                      if n.startswith(STAGING_PREFIX) and not n.endswith(REMOVING_SUFFIX))

    def staged_children(self, layer_id: str) -> list[str]:
        out = []
        for staged in self.staged_ids():
            try:
                rec = self.read(staged)
            except StoreCorrupt:
                continue
            if rec is not None and rec.parent == layer_id:
                out.append(staged)
        return out

    def removing_leftovers(self) -> list[Path]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return [self.root / n for n in names if n.endswith(REMOVING_SUFFIX)]

    def records(self) -> list[LayerRecord]:
        """The complete layers' records; a broken one is left out (see ``broken``)."""
        return [rec for rec in self.all_records() if not self.is_incomplete(rec.id)]

    def all_records(self) -> list[LayerRecord]:
        """The records of every layer, complete or not; a broken one is left out."""
        out = []
        for layer_id in self.ids():
            try:
                rec = self.read(layer_id)
            except StoreCorrupt:
                continue
            if rec is not None:
                out.append(rec)
        return out
