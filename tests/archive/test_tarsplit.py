"""tar-split metadata: our writer and reader against Debian's Go ``tar-split`` command, both ways.

Archives are made by GNU tar (gnu, posix/PAX, ustar, long names, non-UTF-8 names, hard links,
sparse files), applied for real, recorded, re-assembled, and compared by sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from graphdriver.archive import tarsplit as ts
from graphdriver.archive.crc64 import crc64
from graphdriver.archive.tarstream import TarReader
from graphdriver.errors import InvalidArchive, NotFound, StoreCorrupt

TAR_SPLIT = shutil.which("tar-split")
needs_tar_split = pytest.mark.skipif(TAR_SPLIT is None,
                                     reason="Debian's tar-split command is not installed")
needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar missing")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tree(root: Path) -> Path:
    src = root / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "a").write_bytes(b"hello\n")
    (src / "d" / "big").write_bytes(os.urandom(300_000))
    (src / "d" / "e" / "empty").write_bytes(b"")
    (src / "l").symlink_to("a")
    os.link(src / "a", src / "hl")
    (src / "na\xefve-caf\u00e9").write_bytes(b"utf8 name")
    os.mkfifo(src / "fifo")
    long_dir = src / ("x" * 120) / ("y" * 90)
    long_dir.mkdir(parents=True)
    (long_dir / ("z" * 110)).write_bytes(b"deep" * 1000)
    raw = os.fsencode(src) + b"/bad-\xff\xfe-name"
    with open(raw, "wb") as f:
        f.write(b"latin1 name")
    return src


@pytest.fixture(params=["gnu", "posix", "ustar-short"])
def tar_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    src = make_tree(tmp_path)
    out = tmp_path / "layer.tar"
    if request.param == "ustar-short":
        shutil.rmtree(src / ("x" * 120))
        fmt = "ustar"
    else:
        fmt = request.param
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), "."], check=True)
    with open(out, "ab") as f:  # trailing bytes after the end-of-archive blocks count too
        f.write(b"\0" * 10240 + b"trailing garbage")
    return out, src


@dataclass
class Disassembly:
    diff_id: str
    size: int  # bytes of the tar stream
    problem: str | None  # why it is not exactly reproducible, or None


def disasm_ours(tar: Path, meta: Path) -> Disassembly:
    """``tar-split disasm`` done by our reader and packer: tar-split lines for *tar* in *meta*."""
    with open(tar, "rb") as f, gzip.open(meta, "wb") as g:
        packer = ts.TarSplitPacker(g)  # type: ignore[arg-type]
        reader = TarReader(f, packer)  # checksums the data for packer.file_done
        for entry in reader:
            if entry.sparse is not None:
                packer.sparse(entry.raw_name)
        packer.close()
        return Disassembly(reader.diff_id, reader.bytes_read, packer.problem)


def opener(root: Path) -> ts.Opener:
    def open_file(path: str) -> BinaryIO:
        return open(os.path.join(os.fsencode(root), os.fsencode(path)), "rb")
    return open_file


def asm_ours(meta: Path, src: Path, out: Path) -> int:
    with ts.open_metadata(meta) as m, open(out, "wb") as o:
        return ts.assemble(m, opener(src), o)


@needs_tar_split
@needs_gnu_tar
def test_ours_reassembled_by_go_tar_split(tar_file: tuple[Path, Path], tmp_path: Path) -> None:
    tar, src = tar_file
    meta = tmp_path / "ours.json.gz"
    result = disasm_ours(tar, meta)
    assert result.problem is None
    assert result.diff_id == "sha256:" + sha(tar)
    assert result.size == tar.stat().st_size
    out = tmp_path / "go.tar"
    subprocess.run([TAR_SPLIT, "asm", "--input", str(meta), "--path", str(src), "--output",
                    str(out)], check=True, capture_output=True)
    assert sha(out) == sha(tar)


@needs_tar_split
@needs_gnu_tar
def test_go_metadata_reassembled_by_us(tar_file: tuple[Path, Path], tmp_path: Path) -> None:
    tar, src = tar_file
    meta = tmp_path / "go.json.gz"
    with open(tar, "rb") as f:
        subprocess.run([TAR_SPLIT, "disasm", "--no-stdout", "--output", str(meta), "-"],
                       stdin=f, check=True, capture_output=True)
    out = tmp_path / "ours.tar"
    assert asm_ours(meta, src, out) == tar.stat().st_size
    assert sha(out) == sha(tar)


def test_entry_encoding_matches_go_fields() -> None:
    seg = ts.encode_entry(ts.Entry(ts.SEGMENT_TYPE, payload=b"\0\1", position=0))
    assert seg == b'{"type":2,"payload":"AAE=","position":0}\n'
    f = ts.encode_entry(ts.Entry(ts.FILE_TYPE, b"a<b>&c", 5, ts.crc_bytes(1), 3))
    assert f == (b'{"type":1,"name":"a\\u003cb\\u003e\\u0026c","size":5,'
                 b'"payload":"AAAAAAAAAAE=","position":3}\n')
    empty = ts.encode_entry(ts.Entry(ts.FILE_TYPE, b"dir/", 0, None, 4))
    assert empty == b'{"type":1,"name":"dir/","payload":null,"position":4}\n'
    raw = ts.encode_entry(ts.Entry(ts.FILE_TYPE, b"\xff", 0, None, 5))
    assert b'"name_raw":"/w=="' in raw
    for line in (seg, f, empty, raw):
        assert ts.encode_entry(ts.decode_entry(line)) == line


def test_crc64_is_go_iso() -> None:
    # Go: crc64.Checksum([]byte("123456789"), crc64.MakeTable(crc64.ISO))
    assert crc64(b"123456789") == 0xB90956C775A41001
    data = os.urandom(100_000)
    assert crc64(data[50_000:], crc64(data[:50_000])) == crc64(memoryview(data))


def test_duplicate_paths_refused_like_go() -> None:
    lines = b"".join(ts.encode_entry(ts.Entry(ts.FILE_TYPE, n, 0, None, i))
                     for i, n in enumerate([b"./a", b"a/"]))
    with pytest.raises(InvalidArchive, match="duplicate path"):
        list(ts.read_entries(io.BytesIO(lines)))


@needs_gnu_tar
def test_changed_file_fails_clearly(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(src), "."], check=True)
    meta = tmp_path / "m.json.gz"
    disasm_ours(tar, meta)
    (src / "a").write_bytes(b"HELLO\n")  # same size, other bytes
    with pytest.raises(StoreCorrupt, match=r"changed since it was applied \(crc64"):
        asm_ours(meta, src, tmp_path / "out.tar")
    (src / "a").write_bytes(b"hello, longer\n")
    with pytest.raises(StoreCorrupt, match="changed size"):
        asm_ours(meta, src, tmp_path / "out.tar")
    (src / "hl").unlink()
    with pytest.raises(NotFound, match="is gone"):
        asm_ours(meta, src, tmp_path / "out.tar")


@needs_gnu_tar
def test_sparse_marked_not_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(src), "."],
                   check=True)
    result = disasm_ours(tar, tmp_path / "m.json.gz")
    assert result.problem is not None and "sparse" in result.problem


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_recorded_during_a_real_apply(fmt: str, tmp_path: Path) -> None:
    """The apply's Recorder hook (no CRCs) + CRCs from the applied files = the same tar."""
    from graphdriver.archive.apply import ApplyOptions, apply_tar

    src = make_tree(tmp_path)
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(tar), "-C", str(src), "."], check=True)
    target = tmp_path / "layer"
    target.mkdir()
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    raw = io.BytesIO()
    packer = ts.TarSplitPacker(raw)
    with open(tar, "rb") as f:
        result = apply_tar(f, target, ApplyOptions(recorder=packer))
    packer.close()
    assert result.diff_id == "sha256:" + sha(tar)
    raw.seek(0)
    rec = ts.finalize_recording(raw, target, meta_dir / ts.METADATA_NAME)
    assert rec.reproducible, rec.reason
    out = tmp_path / "again.tar"
    with ts.open_metadata(meta_dir / ts.METADATA_NAME) as m, open(out, "wb") as o:
        ts.assemble(m, opener(target), o)
    assert sha(out) == sha(tar)
    if TAR_SPLIT:
        go_out = tmp_path / "go.tar"
        subprocess.run([TAR_SPLIT, "asm", "--input", str(meta_dir / ts.METADATA_NAME), "--path",
                        str(target), "--output", str(go_out)], check=True, capture_output=True)
        assert sha(go_out) == sha(tar)


@needs_gnu_tar
def test_rewritten_in_same_archive_is_not_reproducible(tmp_path: Path) -> None:
    from graphdriver.archive.apply import ApplyOptions, apply_tar

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"first")
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(src), "f"], check=True)
    (src / "f").write_bytes(b"second!")
    subprocess.run(["tar", "-rf", str(tar), "-C", str(src), "f"], check=True)
    target = tmp_path / "layer"
    target.mkdir()
    raw = io.BytesIO()
    packer = ts.TarSplitPacker(raw)
    with open(tar, "rb") as f:
        apply_tar(f, target, ApplyOptions(recorder=packer))
    packer.close()
    assert packer.problem is not None and "twice" in packer.problem
    raw.seek(0)
    rec = ts.finalize_recording(raw, target, tmp_path / ts.METADATA_NAME, packer.problem)
    assert not rec.reproducible
    assert not (tmp_path / ts.METADATA_NAME).exists()
    assert "twice" in (tmp_path / ts.UNREPRODUCIBLE_NAME).read_text()


def test_a_resolver_finds_names_the_tree_spells_otherwise(tmp_path: Path) -> None:
    """A store that matches names as another filesystem does hands the check a Resolver: a
    recorded name found through it is checked (CRC filled in) and kept as it was recorded."""
    tree = tmp_path / "tree"
    (tree / "Dir").mkdir(parents=True)
    (tree / "Dir" / "a.txt").write_bytes(b"payload")
    raw = io.BytesIO()
    packer = ts.TarSplitPacker(raw)
    packer.file(b"dir/A.TXT", 7, None)  # no CRC: finalize computes it from the file it finds
    packer.close()

    def resolve(root_fd: int, path: str) -> str | None:
        return {"dir/A.TXT": "Dir/a.txt"}.get(path)

    out = tmp_path / ts.METADATA_NAME
    raw.seek(0)
    assert not ts.finalize_recording(raw, tree, out).reproducible  # exact names only
    raw.seek(0)
    assert ts.finalize_recording(raw, tree, out, resolve=resolve).reproducible
    with ts.open_metadata(out) as meta:
        (entry,) = ts.read_entries(meta)
    assert entry.name == b"dir/A.TXT" and entry.payload == ts.crc_bytes(crc64(b"payload"))
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        packer.close()
        assert ts.verify_packed(fd, packer) is not None
        assert ts.verify_packed(fd, packer, resolve) is None
    finally:
        os.close(fd)
