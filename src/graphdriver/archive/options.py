"""The options and the result of a layer apply (:class:`ApplyOptions`, :class:`ApplyResult`).

Their own module so that a caller that only builds the options and reads the result (the store's
apply path, the drivers' hooks, :mod:`.isolate`'s parent side) does not import the tar engine
(:mod:`.apply` -> :mod:`.tarstream` -> the CRC-64, the digest, OpenSSL) in the process that
never runs it: the confined child does (issue 18).  :mod:`.apply` re-exports both.

Owns the two classes.  Imports only the leaves :mod:`.whiteout` and :mod:`graphdriver.idmap`
(their defaults); never :mod:`.apply`, :mod:`.tarstream`, :mod:`.confine` (a type only), a
driver, the store, the CLI or the package root.
"""

from __future__ import annotations

from ..idmap import IDENTITY, IDMap
from .whiteout import NAIVE, WhiteoutFormat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from .confine import Prespawned
    from .tarstream import Recorder


# The two classes behave as the dataclasses they were (init, repr, eq), written out so that the
# confined apply child does not import dataclasses (and inspect) at every apply.
class ApplyOptions:
    """How an apply runs (keyword arguments; every field has a default)."""

    __slots__ = ("child", "idmap", "journal", "lower_fds", "on_started", "packer_fd", "progress",
                 "recorder", "tarsplit_fd", "whiteout_format")

    def __init__(
        self,
        whiteout_format: WhiteoutFormat = NAIVE,
        idmap: IDMap = IDENTITY,
        recorder: Recorder | None = None,
        progress: Callable[[int], None] | None = None,
        tarsplit_fd: int | None = None,
        journal: bool = False,
        lower_fds: Sequence[int] | None = None,
        packer_fd: int | None = None,
        child: Prespawned | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self.whiteout_format = whiteout_format
        self.idmap = idmap
        self.recorder = recorder
        self.progress = progress  # bytes read so far, now and then
        # For apply_confined: the child writes tar-split's raw stream description here.
        self.tarsplit_fd = tarsplit_fd
        # Keep the undo journal on disk (in the scratch directory, JOURNAL_NAME) as it grows,
        # and leave it there on success: the caller commits (commit_journal) or rolls back
        # (rollback_journal) later, e.g. after its own steps failed or after a crash.
        self.journal = journal
        # A format that keeps whiteouts: read-only fds of the layers below (nearest first), or
        # None when they are unknown (then every whiteout is kept, and every implicit parent
        # is a plain 0755 directory).
        self.lower_fds = lower_fds
        # For apply_confined, when no recorder is given: the child packs tar-split's final
        # lines (gzip'd) into this file itself, beside its reader, and checks the applied files
        # against them; ApplyResult.recording says what it found.
        self.packer_fd = packer_fd
        # For apply_confined: the child started ahead of the job to run it (the store starts it
        # first thing in an apply, confine.start_child); None: the runner spawns one.
        self.child = child
        # For apply_confined: called once the child has the job, while it applies (the store
        # imports what its commit needs then, off the critical path).
        self.on_started = on_started

    _FIELDS = ("whiteout_format", "idmap", "recorder", "progress", "tarsplit_fd", "journal",
               "lower_fds", "packer_fd", "child", "on_started")

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"ApplyOptions({inner})"


class ApplyResult:
    """What an apply did: ``size`` (bytes of regular-file data applied, moby's ApplyDiff return
    value) and ``diff_id`` ("sha256:<hex>" of the uncompressed stream); ``recording``: the
    summary of the tar-split packer the confined child ran (``ApplyOptions.packer_fd``; see
    ``TarSplitPacker.summary``), else None; ``vouched``: the apply proves by construction that
    every regular file it wrote is where its entry named it, as written (it only created, on an
    empty target: see ``apply._Applier.vouched``), so the check of the recorded files after it
    is redundant.  Equality is (size, diff_id)."""

    __slots__ = ("diff_id", "recording", "size", "vouched")

    def __init__(self, size: int, diff_id: str,
                 recording: dict[str, Any] | None = None, vouched: bool = False) -> None:
        self.size = size
        self.diff_id = diff_id
        self.recording = recording
        self.vouched = vouched

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.size, self.diff_id) == (other.size, other.diff_id)  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ApplyResult(size={self.size!r}, diff_id={self.diff_id!r})"
