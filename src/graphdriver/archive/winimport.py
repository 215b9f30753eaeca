"""The Windows layer import as a confined job, and :func:`import_windows_confined`.

moby re-execs ``docker-windows-write-layer`` to import a Windows layer; graphdriver runs
:func:`import_job` through the same runner of confined jobs as the Linux apply (:mod:`.confine`:
an exec'd child, chrooted into the target as root or refusing to run, signals forwarded,
progress and errors carried back, the tar-split frames replayed into the caller's recorder).
Before the child confines itself the job opens the input and warms up its decoder
(:func:`.isolate.open_warm_input`); confined, it imports the tar beneath the target with
:func:`.windows.importer.import_layer`.

The parent chain reaches the job as *linkable* directory fds (plain fds of the layers' own
mount): hcsshim's import hard-links a parent layer's file into the new layer (AddLink) and
clones the parent's utility VM by hard links, and link(2) cannot cross the read-only clone of a
mount the runner gives by default.

A SIGTERM (forwarded from the parent) raises :class:`~graphdriver.errors.Interrupted` at once:
the target is a staging directory the caller removes on any failure, so that is the rollback.

Owns the import job.  Imports :mod:`.confine`, :mod:`.isolate` (the warmed-up input),
:mod:`.apply` (the options and result types), :mod:`.tarstream` and
:mod:`.windows.importer`; never a driver, the store, the CLI, the plugin or the package root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import GraphDriverError
from .confine import ChildContext, run_job
from .options import ApplyOptions, ApplyResult

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from .confine import JobBody

IMPORT_JOB = "graphdriver.archive.winimport:import_job"


def import_windows_confined(source_fd: int, target: Path, opts: ApplyOptions, *,
                            parents: Sequence[Path] = ()) -> ApplyResult:
    """Import the (possibly compressed) Windows layer tar read from *source_fd* beneath
    *target* (an empty staging directory, or a clone of what the layer held) in a confined
    child.  *parents* are the parent layers' directories, nearest first.  ``opts.recorder``,
    ``opts.tarsplit_fd``, ``opts.packer_fd`` and ``opts.progress`` work as for
    :func:`.isolate.apply_confined`; the whiteout format and id mapping do not apply to
    Windows layers.  Returns hcsshim's size (bytes of file data) and the diffID.  On any
    error the target is left as the child left it: the caller discards it."""

    from .isolate import child_packer_fd

    def on_death(why: str) -> GraphDriverError:
        return GraphDriverError(
            f"the Windows import child exited with {why} without a result; nothing was imported")

    ok = run_job(IMPORT_JOB, target, {}, on_death=on_death, input_fd=source_fd,
                 lowers=parents, lowers_linkable=True, recorder=opts.recorder,
                 frames_fd=opts.tarsplit_fd, packer_fd=child_packer_fd(opts),
                 progress=opts.progress)
    return ApplyResult(int(ok["size"]), str(ok["diff_id"]), ok.get("recording"))


def import_job(ctx: ChildContext) -> JobBody:
    """The confined job: import the input Windows layer tar beneath the target."""
    from .isolate import CHILD_BATCH, open_child_packer, open_warm_input, packer_summary
    from .recframes import BufferedRecorder
    from .tarstream import TarReader
    from .windows.importer import import_layer

    stream = open_warm_input(ctx)
    packer = open_child_packer(ctx)

    def body() -> dict[str, Any]:
        recorder = ctx.recorder if packer is None else BufferedRecorder(
            packer, batch=CHILD_BATCH, threaded=True)
        reader = TarReader(stream, recorder=recorder)
        size = import_layer(reader, ctx.target_fd, ctx.lower_fds, ctx.progress)
        reader.drain()
        if isinstance(recorder, BufferedRecorder):
            recorder.close()
        return {"size": size, "diff_id": reader.diff_id, **packer_summary(packer, ctx)}

    return body
