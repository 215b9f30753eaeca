"""Exact diffs: the store's side of tar-split (the files under ``meta/<id>/``).

An apply records the tar's raw description into ``meta/<id>/tar-split.raw`` (the packer of
:func:`new_layer_packer`); :func:`finish_layer_recording` turns it into ``tar-split.json.gz`` or
marks the layer ``tar-split.unreproducible`` with the reason; :func:`write_exact_diff`
re-assembles the applied tar byte for byte from the layer's files.  The format, the packer and
the re-assembly of a description are archive/tarsplit.py's.

Owns: the per-layer tar-split files.  Never imports: drivers/, cli, plugin (it is handed a
driver); archive/ never imports this module.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import zlib
from pathlib import Path

from . import TYPE_CHECKING
from .archive.tarsplit import (
    METADATA_LEVEL,
    METADATA_NAME,
    UNREPRODUCIBLE_NAME,
    PackedElsewhere,
    Recording,
    TarSplitPacker,
    assemble,
    finalize_recording,
    mark_unreproducible,
    open_metadata,
    recorded_headers,
    verify_packed,
)
from .errors import ExactDiffUnavailable, StoreCorrupt
from .layers import MetaDir
from .logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, BinaryIO

    from .archive.tarsplit import Opener, Resolver
    from .archive.tarstream import TarEntry
    from .store import LayerStore

log = get_logger("graphdriver")

#: where an apply records the raw description (in ``meta/<id>/``) until it is finished
RAW_NAME = MetaDir.TARSPLIT_RAW


def new_layer_packer(raw_fd: int) -> TarSplitPacker:
    """The packer an apply records into: final lines, gzip'd, on ``meta/<id>/tar-split.raw``
    (*raw_fd*, not closed by the packer), for :func:`finish_layer_recording`."""
    out = io.FileIO(raw_fd, "wb", closefd=False)
    return TarSplitPacker(out, compress=True, level=METADATA_LEVEL)  # type: ignore[arg-type]


def finish_layer_recording(meta_dir: Path, raw_fd: int, target: str | os.PathLike[str],
                           layer_id: str,
                           packer: TarSplitPacker | dict[str, Any] | None,
                           resolve: Resolver | None = None) -> Recording:
    """After a successful apply: turn ``meta_dir/tar-split.raw`` (on *raw_fd*) into the layer's
    ``tar-split.json.gz``, or mark the layer not exactly reproducible (and log why).
    *resolve* finds a recorded name the layer spells otherwise (archive/tarsplit.py's
    ``Resolver``: windowsfilter matches names as NTFS does).

    *packer* is the (closed) packer, or the summary of the one the confined child ran
    (:meth:`TarSplitPacker.summary`, ``ApplyResult.recording``), or None when the apply packed
    nothing.  When it got every CRC, the raw file is already the final metadata: the applied
    files are only checked (one stat each; by the child, for its packer, unless the apply
    vouched for them) and the file is renamed into place.  Otherwise the lines are re-read and
    missing CRCs computed from the files.
    """
    packed: TarSplitPacker | PackedElsewhere | None = (
        PackedElsewhere(packer) if isinstance(packer, dict) else packer)
    problem = None if packed is None else packed.problem
    if packed is None:
        problem = "the apply recorded no description of the archive"
    elif problem is not None:
        pass
    elif (meta_dir / METADATA_NAME).exists() or (meta_dir / UNREPRODUCIBLE_NAME).exists():
        problem = "more than one archive was applied to this layer"
    elif os.fstat(raw_fd).st_size == 0 or packed.lines == 0:
        problem = "the apply recorded no description of the archive"
    out_path = meta_dir / METADATA_NAME
    if problem is None and packed is not None and packed.compressed and not packed.missing:
        if isinstance(packed, PackedElsewhere):
            why = packed.verify(-1)
            log.debug("layer %s: the recorded files were %s", layer_id,
                      "checked after the apply" if packed.checked else "vouched for by the apply")
        else:
            root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                why = verify_packed(root_fd, packed, resolve)
            finally:
                os.close(root_fd)
        if why is None:
            # no marker to remove: there was none (problem would say so), the lock is held
            os.fsync(raw_fd)
            os.replace(meta_dir / RAW_NAME, out_path)
            rec = Recording(True)
        elif resolve is not None and isinstance(packed, PackedElsewhere):
            # the child checked the names as written: look again as this store spells them
            rec = _finalize(raw_fd, target, out_path, None, resolve)
        else:
            rec = mark_unreproducible(out_path, why)
    else:
        rec = _finalize(raw_fd, target, out_path, problem, resolve)
    if not rec.reproducible:
        log.warning("layer %s is not exactly reproducible (its diff will be a new tar): %s",
                    layer_id, rec.reason)
    return rec


def _finalize(raw_fd: int, target: str | os.PathLike[str], out_path: Path, problem: str | None,
              resolve: Resolver | None) -> Recording:
    """The raw lines re-read from the start: missing CRCs computed, every file checked."""
    os.lseek(raw_fd, 0, os.SEEK_SET)
    with io.FileIO(raw_fd, "rb", closefd=False) as raw:
        return finalize_recording(raw, target, out_path, problem, resolve)


def layer_status(meta_dir: Path) -> tuple[bool, str]:
    """(True, "") if the layer has exact metadata, else (False, why not)."""
    if (meta_dir / METADATA_NAME).exists():
        return True, ""
    marker = meta_dir / UNREPRODUCIBLE_NAME
    with contextlib.suppress(FileNotFoundError):
        return False, marker.read_text().strip() or "not exactly reproducible"
    return False, "the layer was not made by applying an archive"


def assemble_layer(meta_dir: Path, open_file: Opener, out: int | BinaryIO,
                   layer_id: str = "layer") -> int:
    """Re-assemble a layer's applied tar from ``meta_dir/tar-split.json.gz``."""
    ok, why = layer_status(meta_dir)
    if not ok:
        raise ExactDiffUnavailable(f"layer {layer_id}: the archive it was made from cannot be "
                                   f"reproduced byte for byte ({why})")
    with open_metadata(meta_dir / METADATA_NAME) as meta:
        try:
            return assemble(meta, open_file, out, f"layer {layer_id}")
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise StoreCorrupt(f"layer {layer_id}: reading its tar-split metadata: {exc}") from exc


@contextlib.contextmanager
def layer_headers(meta_dir: Path) -> Iterator[Iterator[TarEntry] | None]:
    """The headers of the tar applied to a layer, in order, from its ``tar-split.json.gz``
    (no file of the layer is read); None when the layer has no usable description."""
    if not layer_status(meta_dir)[0]:
        yield None
        return
    try:
        with open_metadata(meta_dir / METADATA_NAME) as meta:
            yield recorded_headers(meta)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise StoreCorrupt(f"{meta_dir.name}: reading its tar-split metadata: {exc}") from exc


def exact_available(driver: LayerStore, layer_id: str,
                    parent: str | None = None) -> tuple[bool, str]:
    """Whether ``driver.diff(layer_id, parent)`` can be the applied tar, byte for byte."""
    rec = driver.record(layer_id)
    if parent not in (None, "") and parent != rec.parent:
        return False, f"asked against {parent}, not the layer's parent"
    return layer_status(driver.meta.dir(layer_id))


def write_exact_diff(driver: LayerStore, layer_id: str, out: int | BinaryIO) -> int:
    """Re-assemble the tar that was applied to *layer_id* from its stored files (same sha256).

    Raises ExactDiffUnavailable (a NotFound) when the layer has no usable metadata and
    StoreCorrupt when a file changed.
    """
    ok, why = exact_available(driver, layer_id)
    if not ok:
        log.debug("layer %s: no tar-split metadata (%s) to re-assemble from: %s", layer_id,
                  driver.meta.dir(layer_id) / METADATA_NAME, why)
        raise ExactDiffUnavailable(f"layer {layer_id}: the archive it was made from cannot be "
                                   f"reproduced byte for byte ({why}); a plain diff still works")
    getter = driver.diff_getter(layer_id)
    try:
        return assemble_layer(driver.meta.dir(layer_id), getter.open, out, layer_id)
    finally:
        getter.close()
