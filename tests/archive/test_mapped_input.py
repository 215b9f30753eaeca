"""A layer read through a map of its file (the confined child's uncompressed regular files).

The tar reader then takes the file's own pages instead of reading into its buffer
(tarstream's ``_fill_mapped``).  What it reads must be what a read gives, byte for byte, entry
for entry and call for call of the recorder, wherever in the file the stream starts; its RSS
must stay flat in the file's size; a file cut shorter while it is mapped must end the apply
with one clear error and nothing applied.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tarbuild import build, member, pax_member

from graphdriver.archive import tarstream
from graphdriver.archive.compression import open_decompressed
from graphdriver.archive.tarstream import TarReader
from graphdriver.errors import GraphDriverError
from graphdriver.exactdiff import write_exact_diff

MiB = 1 << 20


class CallLog:
    """A Recorder that keeps every call (the tar-split view of what the reader read)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def segment(self, raw: bytes) -> None:
        if raw:
            # consecutive segments are one stretch of raw bytes, however the reader cut them
            if self.calls and self.calls[-1][0] == "S":
                self.calls[-1] = ("S", self.calls[-1][1] + bytes(raw))
            else:
                self.calls.append(("S", bytes(raw)))

    def file(self, name: bytes, size: int, payload_crc64: int | None) -> None:
        self.calls.append(("F", bytes(name), size))

    def file_done(self, crc64: int) -> None:
        self.calls.append(("C", crc64))


def layer_tar(seed: int = 1, big: int = 9 * MiB) -> bytes:
    """Small files, a PAX-named one, links, directories, and one file bigger than the reader's
    buffer (read in pieces), with trailing garbage after the end blocks."""
    rng = random.Random(seed)
    parts = [member("d/", type=b"5", mode=0o755)]
    for i in range(300):
        parts.append(member(f"d/f{i:03d}", rng.randbytes(rng.randrange(0, 40_000))))
    parts.append(pax_member([("path", "d/" + "long-name-" * 20)]))
    parts.append(member("d/placeholder", b"pax-named"))
    parts.append(member("d/hard", type=b"1", linkname="d/f001"))
    parts.append(member("d/sym", type=b"2", linkname="f002"))
    parts.append(member("big", rng.randbytes(big)))
    parts.append(member("d/after-big", b"tail"))
    return build(*parts) + b"trailing bytes after the end blocks"


def read_all(fd: int, mappable: bool) -> tuple[list[Any], list[Any], str, bool]:
    """Every entry (name, type, size, sha256 of its data), the recorder's calls, the diffID,
    and whether the reader mapped the file."""
    log = CallLog()
    stream = open_decompressed(fd, mappable=mappable)
    reader = TarReader(stream, log)
    mapped = reader.mapped
    entries = []
    for e in reader:
        h = hashlib.sha256()
        for chunk in reader.chunks():
            h.update(chunk)
        entries.append((e.name, e.type, e.size, h.hexdigest()))
    return entries, log.calls, reader.diff_id, mapped


@pytest.fixture
def tar_file(work: Path) -> Iterator[tuple[Path, bytes]]:
    data = layer_tar()
    path = work / "layer.tar"
    path.write_bytes(data)
    yield path, data


@pytest.mark.parametrize("start", [0, 1, 4096, 70_000])
def test_a_mapped_file_reads_as_the_same_stream(work: Path, start: int) -> None:
    """Wherever the stream starts in its file (an offset mmap cannot start at, too), the map
    gives the entries, recorder calls and diffID the reads give, and leaves the file's offset
    where the reads leave it: at its end."""
    data = layer_tar()
    path = work / "layer.tar"
    path.write_bytes(b"\xaa" * start + data)
    results = []
    for mappable in (False, True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.lseek(fd, start, os.SEEK_SET)
            results.append(read_all(fd, mappable))
            assert os.lseek(fd, 0, os.SEEK_CUR) == start + len(data)
        finally:
            os.close(fd)
    (e_read, c_read, id_read, m_read), (e_map, c_map, id_map, m_map) = results
    assert (m_read, m_map) == (False, True)
    assert e_map == e_read
    assert c_map == c_read
    assert id_map == id_read == "sha256:" + hashlib.sha256(data).hexdigest()
    assert len(e_read) == 306


def test_what_is_not_mapped(work: Path) -> None:
    """A pipe, a compressed file, a file whose head is all there is, and a caller that did not
    ask: read as before."""
    import gzip

    data = layer_tar(big=0)
    cases: list[tuple[str, int]] = []
    gz = work / "layer.tar.gz"
    gz.write_bytes(gzip.compress(data, 1))
    cases.append(("gzip", os.open(gz, os.O_RDONLY)))
    tiny = work / "tiny"
    tiny.write_bytes(b"abc")
    cases.append(("tiny", os.open(tiny, os.O_RDONLY)))
    r, w = os.pipe()
    os.write(w, data[:4096])
    os.close(w)
    cases.append(("pipe", r))
    try:
        for name, fd in cases:
            stream = open_decompressed(fd, mappable=True)
            assert getattr(stream, "mapping", None) is None or stream.mapping() is None, name
        plain = work / "layer.tar"
        plain.write_bytes(data)
        fd = os.open(plain, os.O_RDONLY)
        try:
            assert not hasattr(open_decompressed(fd), "mapping")
        finally:
            os.close(fd)
    finally:
        for _, fd in cases:
            os.close(fd)


def _mapped_rss_kb(path: Path) -> int:
    """The resident size of this process's maps of *path* (kB, /proc/self/smaps)."""
    total = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.parametrize("sizes", [[2 * MiB] * 32, [40 * MiB, 1000, 24 * MiB]],
                         ids=["2MiB-entries", "big-entries"])
def test_a_mapped_files_pages_leave_the_process(work: Path, sizes: list[int]) -> None:
    """Reading a 64 MiB file through the map keeps only a few MiB of it resident at any time:
    the pages behind the reader and the digest are dropped as it goes (entries of a few MiB),
    or never mapped in (big entries' data is read into the reader's own buffer)."""
    rng = random.Random(7)
    parts = [member(f"f{i:02d}", rng.randbytes(size)) for i, size in enumerate(sizes)]
    path = work / "big.tar"
    path.write_bytes(build(*parts))
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = TarReader(open_decompressed(fd, mappable=True), None)
        assert reader.mapped
        peak = 0
        for _ in reader:
            for _chunk in reader.chunks():
                pass
            peak = max(peak, _mapped_rss_kb(path))
        assert reader.diff_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        os.close(fd)
    bound = (tarstream.MAP_KEEP * 2 + tarstream.MAP_LAG + 2 * tarstream.MAP_STEP) // 1024
    assert 0 < peak <= bound, (peak, bound)


def test_pages_the_digest_is_done_with_leave_without_the_lag(work: Path) -> None:
    """The digest may lag MAP_LAG (16 MiB) behind the reads, but pages it is already done
    with are not kept for it: with the digest caught up after every entry, what stays
    resident is what the reader keeps (MAP_KEEP behind it, dropped MAP_KEEP at a time), not
    the lag too."""
    rng = random.Random(8)
    path = work / "small.tar"
    path.write_bytes(build(*(member(f"f{i:02d}", rng.randbytes(2 * MiB)) for i in range(32))))
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = TarReader(open_decompressed(fd, mappable=True), None)
        assert reader.mapped and reader._digest is not None
        peak = 0
        for _ in reader:
            for _chunk in reader.chunks():
                pass
            reader._digest.wait()  # as a digest faster than the reads is
            peak = max(peak, _mapped_rss_kb(path))
        assert reader.diff_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        os.close(fd)
    bound = (tarstream.MAP_KEEP * 2 + 2 * tarstream.MAP_STEP) // 1024
    assert bound * 1024 // 2 < tarstream.MAP_LAG  # the lag would show
    assert 0 < peak <= bound, (peak, bound)


def test_the_store_applies_a_mapped_file_exactly(store: Any, tar_file: tuple[Path, bytes]) -> None:
    """A store's apply of a layer file (mapped in its confined child): the layer holds the
    files, the diffID is the file's, the recorded tar-split gives the file back byte for byte,
    and the file's offset is at its end, as a read would leave it."""
    path, data = tar_file
    store.create("layer")
    with open(path, "rb") as f:
        result = store.apply_diff_result("layer", None, f)
        assert f.tell() == len(data)
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    with store.mounted("layer") as root:
        assert Path(root, "d", "placeholder").exists() is False
        assert Path(root, "d", "long-name-" * 20).read_bytes() == b"pax-named"
        assert Path(root, "big").stat().st_size == 9 * MiB
        assert os.path.samefile(Path(root, "d", "hard"), Path(root, "d", "f001"))
    out = path.with_name("exact.tar")
    with open(out, "wb") as f:
        write_exact_diff(store, "layer", f.fileno())
    assert out.read_bytes() == data


def test_a_file_cut_shorter_during_the_apply(store: Any, work: Path) -> None:
    """The layer file is truncated while the confined child maps it: the child dies of
    SIGBUS (its reader touched a page that is gone), or its file writer's write from the map
    fails with EFAULT (the kernel did), whichever comes first; the apply fails with one line that
    says the file was cut shorter, and the layer holds nothing."""
    rng = random.Random(3)
    data = build(*[member(f"f{i:02d}", rng.randbytes(2 * MiB)) for i in range(40)])
    path = work / "shrinking.tar"
    path.write_bytes(data)
    store.create("layer")
    cut: list[int] = []

    def progress(n: int) -> None:
        if not cut and n > 0:
            os.truncate(path, 4 * MiB)
            cut.append(n)

    with open(path, "rb") as f, pytest.raises(GraphDriverError) as info:
        store.apply_diff("layer", None, f, progress=progress)
    assert cut, "the apply reported no progress before it ended"
    message = str(info.value)
    assert "cut shorter" in message and "\n" not in message
    with store.mounted("layer") as root:
        assert os.listdir(root) == []
    assert store.exists("layer") and not store.meta.is_incomplete("layer")
