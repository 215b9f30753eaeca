"""Property test: any go-winio-format layer imported by archive.windows writes the same entries.

Runs the importer and the writer in-process (the driver runs the same code in its child), on
random trees: unicode names, every metadata record, alternate streams, hard links, symlinks.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.drivers.wintar_build import (
    FILE_ATTRIBUTE_ARCHIVE,
    FILE_ATTRIBUTE_HIDDEN,
    FILE_ATTRIBUTE_READONLY,
    SD_DEFAULT,
    WinTarBuilder,
    entries,
)

from graphdriver.archive.tarstream import TarReader
from graphdriver.archive.windows.export import write_layer_tar
from graphdriver.archive.windows.importer import import_layer
from graphdriver.archive.windows.names import fold

_names = st.text(alphabet="abcXYZé ü_-.1", min_size=1, max_size=8).filter(
    lambda n: n not in (".", "..") and not n.startswith(".wh."))
_files = st.tuples(
    st.just("file"),
    st.binary(max_size=300),
    st.sampled_from([FILE_ATTRIBUTE_ARCHIVE, FILE_ATTRIBUTE_ARCHIVE | FILE_ATTRIBUTE_HIDDEN,
                     FILE_ATTRIBUTE_READONLY]),
    st.one_of(st.none(), st.just(SD_DEFAULT), st.binary(min_size=1, max_size=64)),
    st.dictionaries(st.sampled_from(["$KERNEL.X", "user.ea"]), st.binary(max_size=16),
                    max_size=2),
    st.dictionaries(st.sampled_from(["Zone.Identifier", "s1", "meta"]), st.binary(max_size=50),
                    max_size=2),
)
_symlinks = st.tuples(st.just("symlink"), st.sampled_from(["C:\\x", "..\\y", "rel"]),
                      st.booleans())
_tree = st.recursive(
    st.one_of(_files, _symlinks),
    lambda kids: st.dictionaries(_names, kids, max_size=4).map(lambda d: ("dir", d)),
    max_leaves=16,
)


def _unique(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """Children sorted bytewise (hcsshim's export order), one per case-insensitive name."""
    seen: set[str] = set()
    out = []
    for name in sorted(d, key=os.fsencode):
        if fold(name) not in seen:
            seen.add(fold(name))
            out.append((name, d[name]))
    return out


def _emit(b: WinTarBuilder, path: str, node: Any, files: list[str], links: list[bool]) -> None:
    kind = node[0]
    if kind == "dir":
        b.dir(path)
        for name, child in _unique(node[1]):
            _emit(b, f"{path}/{name}", child, files, links)
    elif kind == "symlink":
        b.symlink(path, node[1], junction=node[2])
    else:
        if files and links and links.pop():
            b.link(path, files[len(path) % len(files)])
            return
        _, data, attrs, sd, eas, streams = node
        b.file(path, data, attrs=attrs, sd=sd, eas=eas, streams=streams)
        files.append(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_tree.filter(lambda t: t[0] == "dir"), links=st.lists(st.booleans(), max_size=8))
def test_import_then_write_gives_the_same_entries(tree: Any, links: list[bool]) -> None:
    b = WinTarBuilder()
    _emit(b, "Files", tree, [], list(links))
    data = b.bytes()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            import_layer(TarReader(io.BytesIO(data)), fd, [])
            with tempfile.TemporaryFile() as f:
                write_layer_tar(f.fileno(), fd)
                f.seek(0)
                out = f.read()
        finally:
            os.close(fd)
    assert entries(out) == entries(data)
