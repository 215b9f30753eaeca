"""Fast tar-split recording (issue 7): CRCs from the reader, final lines written once."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from graphdriver import exactdiff as ed
from graphdriver.archive import tarsplit as ts
from graphdriver.archive.crc64 import crc64
from graphdriver.archive.recframes import PipeRecorder, replay_recorder_stream
from graphdriver.archive.tarstream import TarReader
from graphdriver.errors import InvalidArchive

needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar missing")


def _tar(tmp_path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """(name, data or None for a dir, symlink/hardlink target 'sym:x' / 'hard:x')."""
    out = tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data, link in members:
            ti = tarfile.TarInfo(name)
            if link is not None:
                kind, _, target = link.partition(":")
                ti.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                ti.linkname = target
                t.addfile(ti)
            elif data is None:
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return out


def _apply(d: object, layer: str, tar: Path, parent: str | None = None) -> None:
    d.create(layer, parent)  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        d.apply_diff(layer, parent, f)  # type: ignore[attr-defined]


def test_stored_crcs_come_from_the_stream_and_reassemble(store: object, tmp_path: Path) -> None:
    big = os.urandom(3 << 20)  # bigger than the reader's buffer: CRC over several chunks
    tar = _tar(tmp_path, [("d", None, None), ("d/big", big, None), ("d/small", b"abc", None),
                          ("e", b"", None), ("l", None, "sym:d/small"),
                          ("h", None, "hard:d/small")])
    _apply(store, "a", tar)
    meta = store.meta.dir("a")  # type: ignore[attr-defined]
    with gzip.open(meta / ts.METADATA_NAME) as g:
        entries = [ts.decode_entry(x) for x in g.read().splitlines()]
    crcs = {e.name: e.payload for e in entries if e.type == ts.FILE_TYPE and e.size}
    assert crcs == {b"d/big": ts.crc_bytes(crc64(big)),
                    b"d/small": ts.crc_bytes(crc64(b"abc"))}
    out = io.BytesIO()
    ed.write_exact_diff(store, "a", out)
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(tar.read_bytes()).digest()
    assert not (meta / ed.RAW_NAME).exists()


def test_big_entries_record_and_reassemble(store: object, tmp_path: Path) -> None:
    """Entries around and above the reader's buffer (one byte under it, at it, one over, odd
    sizes, all zeros, the archive's last entry): the confined apply's CRCs (the digest thread's
    and the reader's, joined when the digest thread is behind), its diffID, the files and the
    exact re-export."""
    from graphdriver.archive.tarstream import BUFFER_SIZE

    rng = random.Random(18)
    blobs = {"b/under": rng.randbytes(BUFFER_SIZE - 1), "b/at": rng.randbytes(BUFFER_SIZE),
             "b/over": rng.randbytes(BUFFER_SIZE + 1), "b/small": b"xyz",
             "b/odd": rng.randbytes(2 * BUFFER_SIZE + 511), "b/zeros": bytes(3 << 20),
             "b/odd2": rng.randbytes(5 * BUFFER_SIZE + 12_345),
             "last": rng.randbytes(BUFFER_SIZE + 7)}
    tar = _tar(tmp_path, [("b", None, None), *((n, d, None) for n, d in blobs.items())])
    store.create("a", None)  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        applied = store.apply_diff_result("a", None, f)  # type: ignore[attr-defined]
    assert applied.diff_id == "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
    with store.mounted("a") as m:  # type: ignore[attr-defined]
        for name, data in blobs.items():
            assert Path(m, name).read_bytes() == data, name
    meta = store.meta.dir("a")  # type: ignore[attr-defined]
    with gzip.open(meta / ts.METADATA_NAME) as g:
        entries = [ts.decode_entry(x) for x in g.read().splitlines()]
    crcs = {e.name: e.payload for e in entries if e.type == ts.FILE_TYPE and e.size}
    assert crcs == {n.encode(): ts.crc_bytes(crc64(d)) for n, d in blobs.items()}
    out = io.BytesIO()
    ed.write_exact_diff(store, "a", out)
    assert out.getvalue() == tar.read_bytes()


def test_archive_cut_inside_a_big_entry_is_refused(store: object, tmp_path: Path) -> None:
    """An input that ends inside a big entry's data (past the reader's buffer): refused as
    truncated, the layer left empty."""
    big = os.urandom(5 << 20)
    tar = _tar(tmp_path, [("a", b"abc", None), ("big", big, None)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: 1536 + (3 << 20) + 1000])
    store.create("a", None)  # type: ignore[attr-defined]
    with open(cut, "rb") as f, pytest.raises(InvalidArchive, match="truncated"):
        store.apply_diff("a", None, f)  # type: ignore[attr-defined]
    with store.mounted("a") as m:  # type: ignore[attr-defined]
        assert os.listdir(m) == []


def test_file_deleted_later_in_the_archive_is_not_reproducible(store: object,
                                                               tmp_path: Path) -> None:
    _apply(store, "base", _tar(tmp_path, [("keep", b"k", None)]))
    # "x" is written, then an opaque/whiteout-free trick: a later entry replaces x by a dir
    tar = _tar(tmp_path, [("x", b"data", None), ("x/", None, None), ("x/y", b"z", None)])
    d = store
    d.create("top", "base")  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        d.apply_diff("top", "base", f)  # type: ignore[attr-defined]
    ok, why = ed.exact_available(d, "top")
    assert not ok and ("twice" in why or "regular file" in why), why


def test_file_whited_out_in_its_own_layer_stays_reproducible(store: object,
                                                             tmp_path: Path) -> None:
    """OCI layer.md: a whiteout hides only lower layers, so the layer's own ``f`` stays and the
    layer reproduces exactly (issue 15 rule 1)."""
    tar = _tar(tmp_path, [("f", b"data", None), (".wh.f", b"", None)])
    d = store
    d.create("w")  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        d.apply_diff("w", None, f)  # type: ignore[attr-defined]
    ok, why = ed.exact_available(d, "w")
    assert ok, why


def test_file_replaced_later_is_not_reproducible(store: object, tmp_path: Path) -> None:
    tar = _tar(tmp_path, [("f", b"data", None), ("f", None, None)])
    d = store
    d.create("w")  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        d.apply_diff("w", None, f)  # type: ignore[attr-defined]
    ok, why = ed.exact_available(d, "w")
    assert not ok and ("twice" in why or "not a regular file" in why), why


def test_file_written_through_a_symlinked_dir_is_not_reproducible(tmp_path: Path) -> None:
    target = tmp_path / "layer"
    target.mkdir()
    (target / "real").mkdir()
    (target / "real" / "f").write_bytes(b"1234")
    (target / "ln").symlink_to("real")
    for files, word in (([(b"real/f", 4), (b"ln/f", 4)], "not in the layer"),
                        ([(b"real/f", 5)], "has 4 bytes"),
                        ([(b"ln", 4)], "not a regular file")):
        root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            why = ts._verify_files(root_fd, files)
        finally:
            os.close(root_fd)
        assert why is not None and word in why, why
    os.link(target / "real" / "f", target / "g")
    root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        why = ts._verify_files(root_fd, [(b"real/f", 4), (b"./g", 4)])
        assert why is not None and "same file" in why
        assert ts._verify_files(root_fd, [(b"real/f", 4), (b"/real//f", 4)]) is not None
        assert ts._verify_files(root_fd, [(b"./real/f", 4)]) is None
    finally:
        os.close(root_fd)


def test_second_apply_and_sparse_verdicts_kept(store: object, tmp_path: Path) -> None:
    tar = _tar(tmp_path, [("f", b"one", None)])
    _apply(store, "s", tar)
    assert ed.exact_available(store, "s")[0]


def test_frames_replayed_across_buffer_boundaries(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    calls: list[tuple[object, ...]] = []

    class Rec:
        def segment(self, raw: bytes) -> None:
            calls.append(("S", raw))

        def file(self, name: bytes, size: int, crc: int | None) -> None:
            calls.append(("F", name, size, crc))

        def file_done(self, crc: int) -> None:
            calls.append(("C", crc))

    want: list[tuple[object, ...]] = []
    pr = PipeRecorder(os.open(frames, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    for i in range(3000):
        seg = os.urandom(i * 37 % 5000 + 1)
        pr.segment(seg)
        want.append(("S", seg))
        name = b"n" * (i % 300 + 1)
        pr.file(name, i, None if i % 2 else i * 7)
        want.append(("F", name, i, None if i % 2 else i * 7))
        pr.file_done(2**64 - 1 - i)
        want.append(("C", 2**64 - 1 - i))
    huge = os.urandom(3 << 20)  # one frame larger than the replay buffer
    pr.segment(huge)
    want.append(("S", huge))
    pr.close()
    replay_recorder_stream(os.open(frames, os.O_RDONLY), Rec())
    assert calls == want
    # a recorder without file_done still works (C frames are dropped)
    class Old:
        def __init__(self) -> None:
            self.n = 0

        def segment(self, raw: bytes) -> None:
            self.n += 1

        def file(self, name: bytes, size: int, crc: int | None) -> None:
            self.n += 1

    old = Old()
    replay_recorder_stream(os.open(frames, os.O_RDONLY), old)
    assert old.n == 6001
    # truncated
    data = frames.read_bytes()
    frames.write_bytes(data[:-5])
    with pytest.raises(InvalidArchive, match="truncated"):
        replay_recorder_stream(os.open(frames, os.O_RDONLY), Rec())


def test_reader_crc_on_every_consumption_path() -> None:
    blobs = [os.urandom(n) for n in (1, 511, 512, 70_000, 2_500_000)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for i, b in enumerate(blobs):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = len(b)
            t.addfile(ti, io.BytesIO(b))
    want = [ts.crc_bytes(crc64(b)) for b in blobs]
    for how in ("skip", "chunks", "buffered", "copy"):
        out = io.BytesIO()
        packer = ts.TarSplitPacker(out)
        reader = TarReader(io.BytesIO(buf.getvalue()), packer)
        for e in reader:
            if how == "chunks":
                for _ in reader.chunks(1000):
                    pass
            elif how == "buffered":
                reader.take_buffered()
            elif how == "copy":
                r, w = os.pipe()
                try:
                    fd = os.open("/dev/null", os.O_WRONLY)
                    reader.copy_data(e, fd)
                    os.close(fd)
                finally:
                    os.close(r)
                    os.close(w)
        packer.close()
        assert packer.missing == 0
        got = [x.payload for x in ts.read_entries(io.BytesIO(out.getvalue()))
               if x.type == ts.FILE_TYPE and x.size]
        assert got == want, how


def test_compressed_packer_matches_plain_lines() -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as t:
        for i in range(200):
            ti = tarfile.TarInfo(f"dir/caf\u00e9-<{i}>&\"q\"")
            ti.size = i
            t.addfile(ti, io.BytesIO(bytes(i)))
    plain, packed = io.BytesIO(), io.BytesIO()
    for out, comp in ((plain, False), (packed, True)):
        p = ts.TarSplitPacker(out, compress=comp)
        for _ in TarReader(io.BytesIO(data.getvalue()), p):
            pass
        p.close()
    assert gzip.decompress(packed.getvalue()) == plain.getvalue()
    lines = plain.getvalue().splitlines(keepends=True)
    assert [ts.encode_entry(ts.decode_entry(x)) for x in lines] == lines


@needs_gnu_tar
def test_go_tar_split_reads_the_stored_file(store: object, tmp_path: Path) -> None:
    if shutil.which("tar-split") is None:
        pytest.skip("Debian's tar-split command is not installed")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(os.urandom(100_000))
    (src / "n\u00e4me").write_bytes(b"x")
    tar = tmp_path / "g.tar"
    subprocess.run(["tar", "--format=posix", "-cf", str(tar), "-C", str(src), "."], check=True)
    _apply(store, "g", tar)
    with store.mounted("g") as root:  # type: ignore[attr-defined]
        r = subprocess.run(["tar-split", "asm", "--input",
                            str(store.meta.dir("g") / ts.METADATA_NAME),  # type: ignore[attr-defined]
                            "--path", str(root), "--output", "-"], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tar.read_bytes()


def test_packer_without_crcs_falls_back_to_reading_files(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    meta.mkdir()
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "f").write_bytes(b"hello")
    raw_fd = os.open(meta / ed.RAW_NAME, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        packer = ed.new_layer_packer(raw_fd)
        packer.segment(b"H" * 512)
        packer.file(b"f", 5, None)  # never told the CRC (an old-style recorder stream)
        packer.segment(b"\0" * 507)
        packer.close()
        assert packer.missing == 1
        rec = ed.finish_layer_recording(meta, raw_fd, layer, "x", packer)
    finally:
        os.close(raw_fd)
    assert rec.reproducible, rec.reason
    with ts.open_metadata(meta / ts.METADATA_NAME) as m:
        files = [e for e in ts.read_entries(m) if e.type == ts.FILE_TYPE]
    assert files[0].payload == ts.crc_bytes(crc64(b"hello"))
    # the same again: a second apply to the layer is refused
    raw_fd = os.open(meta / ed.RAW_NAME, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        packer = ed.new_layer_packer(raw_fd)
        packer.file(b"f", 5, 1)
        packer.close()
        rec = ed.finish_layer_recording(meta, raw_fd, layer, "x", packer)
    finally:
        os.close(raw_fd)
    assert not rec.reproducible and "more than one archive" in str(rec.reason)


def test_file_records_spill_and_are_checked_across_chunks(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The records of the files to check go to an unnamed file every _SPILL bytes (memory flat
    in entries); the check reads them back chunk by chunk and still finds two entries that are
    one inode (a hard link) in different chunks."""
    monkeypatch.setattr(ts, "_SPILL", 64)
    layer = tmp_path / "layer"
    layer.mkdir()
    names = [f"d/file{i:03d}".encode() for i in range(40)]
    (layer / "d").mkdir()
    for n in names:
        (layer / n.decode()).write_bytes(b"abc")
    dir_fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        packer = ts.TarSplitPacker(io.BytesIO(), spill_dir_fd=dir_fd)  # type: ignore[arg-type]
        for n in names:
            packer.file(n, 3, 7)
        assert len(packer._records._sizes) > 2
        assert [name for name, _ in packer.files] == names
        assert os.listdir(layer) == ["d"]  # the spill file has no name
        assert ts.verify_packed(dir_fd, packer) is None
        # the last name becomes a hard link to the first: one inode, chunks apart
        os.unlink(layer / names[-1].decode())
        os.link(layer / names[0].decode(), layer / names[-1].decode())
        why = ts.verify_packed(dir_fd, packer)
        assert why is not None and "same file" in why, why
        packer.release()
        assert packer._records._fd == -1
    finally:
        os.close(dir_fd)


def test_duplicate_found_across_spilled_hashes(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The duplicate rule's hashes spill too; the path that appears twice is still found (and
    named, from the lines read back) when the recording ends."""
    monkeypatch.setattr(ts, "_SPILL", 64)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # the second time in another sorted run (merged at the end), in the same run (found
        # when that run is sorted), in the part still in memory
        for compress, count, again in ((False, 40, 3), (True, 40, 3), (True, 5, 2),
                                       (False, 3, 0)):
            packer = ts.TarSplitPacker(io.BytesIO(), compress=compress,  # type: ignore[arg-type]
                                       spill_dir_fd=dir_fd)
            for i in range(count):
                packer.file(b"d/f%d" % i, 3, 7)
            packer.file(b"./d//f%d" % again, 0, None)
            for i in range(20):
                packer.file(b"e/%d" % i, 1, 1)
            packer.close()
            assert packer.problem == f"path './d//f{again}' appears twice in the archive", count
            packer.release()
    finally:
        os.close(dir_fd)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("batch", [1, 100, 4096, 1 << 20])
def test_buffered_recorder_packs_the_same_lines(batch: int) -> None:
    """The confined child's way (frames kept in memory, replayed into the packer by a thread a
    batch at a time, a batch ending anywhere between frames) writes the packer's own lines."""
    from graphdriver.archive.recframes import BufferedRecorder

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(30):
            info = tarfile.TarInfo(("d/" + "long" * 40 if i % 7 == 0 else "d/f") + str(i))
            data = bytes([i]) * (i * 300)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    outputs = []
    for buffered in (False, True):
        out = io.BytesIO()
        packer = ts.TarSplitPacker(out)  # type: ignore[arg-type]
        rec = BufferedRecorder(packer, batch=batch, threaded=True) if buffered else packer
        reader = TarReader(io.BytesIO(buf.getvalue()), rec)  # type: ignore[arg-type]
        for _ in reader:
            pass
        if isinstance(rec, BufferedRecorder):
            rec.close()
        packer.close()
        assert packer.problem is None and packer.missing == 0
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
