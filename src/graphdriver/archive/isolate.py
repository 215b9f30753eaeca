"""The Linux layer apply as a confined job (DESIGN.md rule 2), and :func:`apply_confined`.

:func:`apply_confined` runs :func:`apply_job` through the runner of confined jobs
(:mod:`.confine`: an exec'd child, chrooted into the target as root, signals forwarded, errors
and progress carried back).  Before the child confines itself the job opens the input, picks its
decoder from the stream's first bytes and warms up what the apply needs (isal, zstandard, lzma,
bz2, the diffID's sha256 worker, openat2, anycrc for tar-split); confined, it runs
:func:`.apply.apply_reader` on the target.  A SIGTERM goes through the apply's signal gate
(never between creating a path and journalling it), so the apply rolls back.

A recorder (tar-split, issue 6) works across the boundary: ``opts.recorder`` gets the calls of
the child's tar reader replayed from the runner's frame pipe (:mod:`.recframes`);
``opts.tarsplit_fd``, when set and no recorder is given, receives that frame stream directly.
With ``opts.packer_fd`` instead (the store's way), the child packs the tar-split lines itself,
beside its reader, gzip'd into that file, and checks the applied files against them: only the
summary comes back (``ApplyResult.recording``), no frame crosses a pipe.

A plain layer file's diffID is hashed in the parent (:mod:`.inputdigest`) from the moment the
apply starts, while the child starts; the child's reader takes that hash over at its first
read, from the parent's state (a hand-off page the two share), unless it is done.  The child
says what it read, which the parent checks against what it hashed, and its diffID if it took
over.  Any other input is hashed in the child, as it reads it.

If the child dies without a result (SIGKILL, OOM), an empty target is emptied by the parent
(GraphDriverError), while a non-empty one cannot be rolled back: ``StoreCorrupt`` is raised, and
the caller must keep the layer incomplete.  SIGINT or SIGTERM to the parent (while it runs
``apply_confined`` in the main thread) stops the child, which rolls the target back; the parent
then raises :class:`~graphdriver.errors.Interrupted`.

Owns the apply job.  Imports :mod:`.confine`, :mod:`.apply`, :mod:`.compression`,
:mod:`.inputdigest`, :mod:`.pathres`, :mod:`.tarstream` and the helpers
:mod:`graphdriver.errors`, :mod:`graphdriver.fsutil` and :mod:`graphdriver.idmap`; never a
driver, the store, the CLI, the plugin or the package root.
"""

from __future__ import annotations

import io
import os

from .. import errors
from ..errors import GraphDriverError
from ..fsutil import empty_beneath
from ..idmap import IDMap
from . import inputdigest
from .confine import ChildContext, run_job
from .jobs import LINUX_APPLY
from .options import ApplyOptions, ApplyResult
from .recframes import BufferedRecorder
from .whiteout import FORMATS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:  # the parent's modules: the child does not import them (start-up time)
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any, BinaryIO

    from .confine import JobBody
    from .tarsplit import TarSplitPacker

APPLY_JOB = LINUX_APPLY
#: bytes of recorder frames the child's packer thread takes at a time: each batch costs that
#: thread a few GIL round trips (which the reader's per-file GIL re-takes wait on), and the
#: BufferedRecorder keeps at most four buffers of 1.5 batches (memory)
CHILD_BATCH = 512 << 10


def _empty_dir(target: Path) -> None:
    """Remove everything beneath *target* (never following symlinks, at any depth)."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        empty_beneath(fd)
    finally:
        os.close(fd)


def apply_confined(source_fd: int, target: Path, opts: ApplyOptions, *,
                   lowers: Sequence[Path] | None = None) -> ApplyResult:
    """Apply the (possibly compressed) tar read from *source_fd* onto *target* in a confined
    child.  *lowers* (the parent chain's directories, nearest first: an overlay layer's) reach
    the child as read-only directory fds, and the apply reads them (``ApplyOptions.lower_fds``);
    None: unknown."""
    with os.scandir(target) as it:
        was_empty = next(it, None) is None

    def on_death(why: str) -> GraphDriverError:
        if was_empty:
            _empty_dir(target)  # the child could not roll back; an empty target is easy
            return GraphDriverError(
                f"the apply child exited with {why} without a result; the target was emptied")
        # no rollback was possible: a distinct class, so the caller keeps the layer incomplete
        return errors.StoreCorrupt(
            f"the apply child exited with {why} without a result; the target may be partly "
            "applied")

    # a plain layer file is hashed here, from now on, while the child starts (inputdigest)
    digest = inputdigest.start(source_fd)
    params = {"whiteout_format": opts.whiteout_format.name, "idmap": opts.idmap.to_json(),
              "journal": opts.journal, "lowers": lowers is not None}
    try:
        ok = run_job(APPLY_JOB, target, params, on_death=on_death, input_fd=source_fd,
                     lowers=lowers or (), recorder=opts.recorder, frames_fd=opts.tarsplit_fd,
                     packer_fd=child_packer_fd(opts),
                     digest_fd=None if digest is None else digest.page_fd,
                     progress=opts.progress, child=opts.child, on_started=opts.on_started)
        diff_id = str(ok["diff_id"]) if digest is None else \
            digest.diff_id(ok["diff_id"], *ok["read"])
    finally:
        if digest is not None:
            digest.close()
    return ApplyResult(int(ok["size"]), diff_id, ok.get("recording"))


def child_packer_fd(opts: ApplyOptions) -> int | None:
    """The file the child packs tar-split lines into: only when no recorder is given."""
    return opts.packer_fd if opts.recorder is None and opts.tarsplit_fd is None else None


# ---- the child -----------------------------------------------------------------------------------
def preload() -> None:
    """What every apply job needs whatever its stream, imported and exercised by a child that
    waits for its job (:mod:`.confine` calls it: it overlaps the parent's preparation): the tar
    engine, the diffID's worker, openat2's probe, and the tar-split packer with its compressor
    (the store's applies record)."""
    from . import apply, tarsplit  # noqa: F401

    _warm_engine()
    tarsplit.load_compressor()


def _warm_engine() -> None:
    """openat2's probe and the diffID's worker exercised: what they load is then loaded (cheap
    when done already)."""
    from . import digest, pathres

    pathres.have_openat2()
    digest.warm_up()


def _warm_up(kind: str) -> None:
    """Import and exercise what the apply needs (the stream's decoder only) before the chroot
    takes the library files away."""
    from . import compression

    _warm_engine()
    blob = b""
    if kind == "gzip":
        from isal import igzip

        blob = igzip.compress(b"x")
    elif kind == "zstd":
        import zstandard

        blob = zstandard.ZstdCompressor().compress(b"x")
    elif kind == "xz":
        import lzma

        blob = lzma.compress(b"x")
    elif kind == "bzip2":
        import bz2

        blob = bz2.compress(b"x")
    if blob:
        with compression.decompress_stream(io.BytesIO(blob)) as s:
            s.read()


def open_warm_input(ctx: ChildContext) -> BinaryIO:
    """The job's input stream, decompressed, its decoder (and anycrc, when recording) imported
    and exercised before the chroot takes the library files away."""
    from .compression import open_decompressed, warm_kind

    if ctx.input_fd is None:
        raise errors.InvalidArgument("a layer job needs an input stream")
    stream = open_decompressed(ctx.input_fd, mappable=True)
    _warm_up(warm_kind(stream))  # nothing more for a decoder loaded with the stream
    if ctx.recorder is not None or ctx.packer_fd is not None:
        from . import crc64  # noqa: F401  (loads anycrc's extension before the chroot)
    return stream


def open_child_packer(ctx: ChildContext) -> TarSplitPacker | None:
    """The tar-split packer of a layer job that was handed ``ctx.packer_fd`` (None: not
    recording in the child): final lines, gzip'd, written as the reader goes.  Made before the
    chroot (it imports the compressor)."""
    if ctx.packer_fd is None:
        return None
    from .tarsplit import METADATA_LEVEL, TarSplitPacker

    out = io.FileIO(ctx.packer_fd, "wb", closefd=True)
    # the records of the files to check spill to an unnamed file beside the layer's own
    return TarSplitPacker(out, compress=True, level=METADATA_LEVEL,  # type: ignore[arg-type]
                          spill_dir_fd=ctx.target_fd)


def packer_summary(packer: TarSplitPacker | None, ctx: ChildContext,
                   vouched: bool = False) -> dict[str, Any]:
    """The result's ``recording`` entry for :func:`open_child_packer`'s packer (closed here,
    once the job's work is done: the applied files are checked against what it recorded,
    unless the apply *vouched* for them: ``ApplyResult.vouched``)."""
    if packer is None:
        return {}
    packer.close()
    try:
        return {"recording": packer.summary(ctx.target_fd, vouched)}
    finally:
        packer.release()


def apply_job(ctx: ChildContext) -> JobBody:
    """The confined job: apply the input tar onto the target (see the module docstring)."""
    from . import apply as apply_mod
    from .compression import stream_kind
    from .tarstream import TarReader

    stream = open_warm_input(ctx)
    packer = open_child_packer(ctx)
    # the page of the parent's hash of the input, mapped before the chroot
    handoff = None if ctx.digest_fd is None else inputdigest.open_page(ctx.digest_fd)
    ctx.on_interrupt = apply_mod.SIGNAL_GATE.interrupt
    params = ctx.params
    recorder = ctx.recorder if packer is None else BufferedRecorder(
        packer, batch=CHILD_BATCH, threaded=True)

    def body() -> dict[str, Any]:
        if ctx.chrooted:
            apply_mod.allow_chdir = True  # single-threaded and chrooted: chdir is safe
        opts = ApplyOptions(whiteout_format=FORMATS[params["whiteout_format"]],
                            idmap=IDMap.from_json(params["idmap"]),
                            recorder=recorder, progress=ctx.progress,
                            journal=bool(params.get("journal")),
                            lower_fds=ctx.lower_fds if params.get("lowers") else None)
        reader = TarReader(stream, recorder, handoff=handoff)
        result = apply_mod.apply_reader(reader, ctx.target_fd, opts)
        if isinstance(recorder, BufferedRecorder):
            recorder.close()
        # what was read, for the parent that hashed it (inputdigest); no diffID if it did it all
        read = (stream_kind(stream), reader.bytes_read)
        return {"size": result.size, "diff_id": result.diff_id or None, "read": read,
                **packer_summary(packer, ctx, result.vouched)}

    return body
