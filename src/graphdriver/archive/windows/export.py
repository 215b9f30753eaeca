"""Windows layer tars: export, i.e. write a stored layer as a Windows layer tar, every header
through :mod:`..tarwriter` (``encode_sorted``).  Never imports the importer."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from ..export import TarOut
from ..pathres import open_beneath
from ..tarwriter import encode_sorted
from ..whiteout import WHITEOUT_PREFIX
from .layout import LayerItem, walk_layer
from .metadata import file_attributes, read_linkmeta, read_win_xattrs, time_ns, xattrs_to_pax
from .names import (
    FILE_ATTRIBUTE_DIRECTORY,
    HDR_CREATION_TIME,
    HDR_FILE_ATTRIBUTES,
    MODE_DIR,
    MODE_LNK,
    MODE_REG,
    TIME_KEYS,
    X_EMPTY_MODE,
)


def _mtime_s(records: dict[str, bytes], st: os.stat_result) -> int:
    ns = time_ns(records.get("mtime"))
    if ns is None:
        return int(st.st_mtime)
    return ns // 1_000_000_000


def write_layer_tar(out_fd: int, layer_fd: int,
                    progress: Callable[[int], None] | None = None) -> None:
    """Stream the Windows layer tar of the layer directory ``layer_fd`` to ``out_fd``."""
    out = TarOut(out_fd, progress)
    linkmeta = read_linkmeta(layer_fd)
    for item in walk_layer(layer_fd):
        name = os.fsencode(item.path)
        if item.kind == "whiteout":
            d, _, base = item.path.rpartition("/")
            out.add(encode_sorted(os.fsencode(f"{d}/{WHITEOUT_PREFIX}{base}"), b"0", 0, 0, 0, {},
                                  ustar_ok=True))
            continue
        st = item.st
        assert st is not None
        if stat.S_ISLNK(st.st_mode):
            xattrs = linkmeta.get(item.path, {})
        else:
            fd = open_beneath(layer_fd, item.path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                xattrs = read_win_xattrs(fd, layer_fd)
            except BaseException:
                os.close(fd)
                raise
        records = xattrs_to_pax(xattrs)
        mtime = _mtime_s(records, st)
        if stat.S_ISLNK(st.st_mode):
            dirbit = MODE_DIR if file_attributes(xattrs) & FILE_ATTRIBUTE_DIRECTORY else 0
            out.add(encode_sorted(name, b"2", MODE_LNK | dirbit, 0, mtime, records,
                                  os.fsencode(os.readlink(item.path, dir_fd=layer_fd))))
            continue
        try:
            if item.link_to is not None:
                keep = {k: v for k, v in records.items()
                        if k in (HDR_FILE_ATTRIBUTES, HDR_CREATION_TIME, *TIME_KEYS)}
                out.add(encode_sorted(name, b"1", 0o644, 0, mtime, keep,
                                      os.fsencode(item.link_to)))
            elif stat.S_ISDIR(st.st_mode):
                out.add(encode_sorted(name, b"5", MODE_DIR, 0, mtime, records))
            else:
                size = st.st_size
                mode = MODE_REG if size or X_EMPTY_MODE in xattrs else 0
                out.add(encode_sorted(name, b"0", mode, size, mtime, records))
                out.file_data(fd, size)
                _write_streams(out, layer_fd, item, mode)
            if stat.S_ISDIR(st.st_mode) and item.streams:
                _write_streams(out, layer_fd, item, MODE_DIR)
        finally:
            os.close(fd)
    out.finish()


def _write_streams(out: TarOut, layer_fd: int, item: LayerItem, mode: int) -> None:
    d = item.path.rpartition("/")[0]
    for sname in item.streams:
        rel = f"{d}/{sname}"
        fd = open_beneath(layer_fd, rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            records = xattrs_to_pax(read_win_xattrs(fd, layer_fd))
            out.add(encode_sorted(os.fsencode(rel), b"0", mode, st.st_size,
                                  _mtime_s(records, st), records))
            out.file_data(fd, st.st_size)
        finally:
            os.close(fd)
