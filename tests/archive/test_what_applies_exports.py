"""What applies, exports (issue 12): sparse files go out as PAX sparse 1.0 entries, which GNU tar,
Go's archive/tar and our reader read back with the same content and the same holes; a sparse
entry claiming more than the target filesystem holds is refused at apply; a path of 4096 bytes
or more that applies also exports."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tarbuild import build, member, pax_member

from graphdriver.archive import export
from graphdriver.archive.apply import ApplyOptions, apply_tar
from graphdriver.archive.export import write_tree
from graphdriver.errors import InvalidArchive

GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture
def shm() -> Iterator[Path]:
    """tmpfs: holes are kept, SEEK_DATA/SEEK_HOLE work, and GiB of holes cost nothing."""
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("needs a writable /dev/shm (tmpfs)")
    d = Path(os.path.realpath("/dev/shm")) / f"gd-sparse-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        for off, data in pieces:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _tree(root: Path, big: int = 10 * GIB) -> None:
    (root / "d").mkdir(parents=True)
    _sparse(root / "d" / "big", big, [(0, b"head" * 1000), (big // 2, b"middle" * 3000)])
    _sparse(root / "d" / "ends-with-data", 3 * MIB, [(3 * MIB - 4, b"tail")])
    _sparse(root / "small-hole", 2 * MIB, [(0, b"a" * (3 * MIB // 2))])  # 0.5 MiB of holes
    (root / "plain").write_bytes(b"x" * 100)


def _export(root: Path, out: Path) -> bytes:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_tree(fd, root)
    finally:
        os.close(fd)
    return out.read_bytes()


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        sa, sb = os.lstat(a / name), os.lstat(b / name)
        assert sa.st_size == sb.st_size, name
        if name in SPARSE:  # du agrees (a file with few holes is written whole, and filled)
            assert sa.st_blocks == sb.st_blocks, f"{name}: holes differ"
        assert subprocess.run(["cmp", a / name, b / name], check=False).returncode == 0, name


NAMES = ["d/big", "d/ends-with-data", "small-hole", "plain"]
SPARSE = NAMES[:2]


def test_sparse_files_export_sparsely_and_gnu_tar_reads_them(shm: Path) -> None:
    src, gnu = shm / "src", shm / "gnu"
    _tree(src)
    gnu.mkdir()
    data = _export(src, shm / "out.tar")
    assert len(data) < 4 * MIB  # 10 GiB of holes cost nothing (was: 10 GiB of zeros)
    listing = subprocess.run(["tar", "-tvf", shm / "out.tar"], check=True, capture_output=True,
                             text=True).stdout
    assert "10737418240" in listing and "GNUSparseFile" not in listing
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # Python's reader: PAX 1.0 names
        names = {m.name: m for m in tf.getmembers()}
    assert names["d/big"].pax_headers["GNU.sparse.realsize"] == str(10 * GIB)
    assert "GNU.sparse.major" not in names["small-hole"].pax_headers  # plain: few holes
    subprocess.run(["tar", "-xf", shm / "out.tar", "-C", gnu], check=True)
    _same_files(src, gnu, NAMES)
    du = subprocess.run(["du", "-s", "--block-size=1", src / "d", gnu / "d"], check=True,
                        capture_output=True, text=True).stdout.split()
    assert du[0] == du[2]


def test_sparse_export_applies_back_with_the_same_holes(shm: Path) -> None:
    src, back = shm / "src", shm / "back"
    _tree(src)
    back.mkdir()
    _export(src, shm / "out.tar")
    with open(shm / "out.tar", "rb") as f:
        apply_tar(f, back, ApplyOptions())
    _same_files(src, back, NAMES)


def test_native_and_python_writers_agree_on_sparse_files(shm: Path) -> None:
    if export._native is None:
        pytest.skip("native helper not built or disabled")
    src = shm / "src"
    _tree(src, big=64 * MIB)
    native = _export(src, shm / "native.tar")
    saved, export._native = export._native, None
    try:
        python = _export(src, shm / "python.tar")
    finally:
        export._native = saved
    assert native == python


_GO_READER = """package main

import (
	"archive/tar"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
)

func main() {
	r := tar.NewReader(os.Stdin)
	for {
		h, err := r.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			panic(err)
		}
		s := sha256.New()
		n, err := io.Copy(s, r)
		if err != nil {
			panic(err)
		}
		fmt.Printf("%s %d %d %x\\n", h.Name, h.Size, n, s.Sum(nil))
	}
}
"""


def test_go_archive_tar_reads_the_sparse_entries(shm: Path) -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (Debian golang-go)")
    src = shm / "src"
    _tree(src, big=64 * MIB)
    _export(src, shm / "out.tar")
    (shm / "reader.go").write_text(_GO_READER)
    env = {**os.environ, "GOCACHE": str(shm / "gocache"), "GOPATH": str(shm / "gopath"),
           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    with open(shm / "out.tar", "rb") as f:
        got = subprocess.run([go, "run", shm / "reader.go"], stdin=f, env=env, check=True,
                             capture_output=True, text=True, timeout=300).stdout.split("\n")
    want = []
    for name in ["d/", *NAMES[:2]]:
        p = src / name
        if p.is_dir():
            want.append(f"{name} 0 0 {hashlib.sha256(b'').hexdigest()}")
            continue
        size = p.stat().st_size
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        want.append(f"{name} {size} {size} {digest}")
    for line in want:
        assert line in got, (line, got)


def _sparse10(name: str, realsize: int, chunks: list[tuple[int, bytes]]) -> bytes:
    """A PAX sparse 1.0 entry as GNU tar writes it, with any claimed real size."""
    smap = f"{len(chunks)}\n" + "".join(f"{off}\n{len(data)}\n" for off, data in chunks)
    body = smap.encode() + bytes(-len(smap) % 512) + b"".join(d for _, d in chunks)
    return pax_member([("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"),
                       ("GNU.sparse.name", name), ("GNU.sparse.realsize", str(realsize))]) + \
        member(f"GNUSparseFile.0/{name}", body)


def test_sparse_entry_larger_than_the_filesystem_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    tar = build(member("first", b"1"), _sparse10("huge", 1 << 62, [(0, b"x" * 5000)]))
    assert len(tar) < 12 * 1024
    with pytest.raises(InvalidArchive, match=r"'huge': a sparse file of 4611686018427387904 "
                       r"bytes, larger than the filesystem"):
        apply_tar(io.BytesIO(tar), target, ApplyOptions())
    assert os.listdir(target) == []  # all or nothing
    # an honest sparse file well within the filesystem applies
    apply_tar(io.BytesIO(build(_sparse10("ok", 8 * MIB, [(4 * MIB, b"y" * 10)]))), target,
              ApplyOptions())
    st = os.stat(target / "ok")
    assert st.st_size == 8 * MIB and st.st_blocks * 512 < MIB


def _long_path_tar() -> tuple[bytes, str]:
    """A layer whose deepest file has a path of more than 4096 bytes (PATH_MAX)."""
    parts = [f"d{i:03d}" + "x" * 196 for i in range(21)]
    buf = io.BytesIO()
    path = ""
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for part in parts:
            path = f"{path}/{part}" if path else part
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        info = tarfile.TarInfo(f"{path}/file")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    return buf.getvalue(), f"{path}/file"


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_a_path_over_path_max_that_applies_also_exports(tmp_path: Path, driver: str) -> None:
    import sys

    if driver == "overlay" and os.geteuid() != 0:
        pytest.skip("overlay needs root")
    layer, deepest = _long_path_tar()
    assert len(deepest.encode()) > 4096
    (tmp_path / "layer.tar").write_bytes(layer)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}

    def gd(*args: str | Path, stdin: Path | None = None) -> None:
        with open(stdin or os.devnull, "rb") as f:
            proc = subprocess.run([sys.executable, "-m", "graphdriver", "--root",
                                   tmp_path / "root", "--runroot", tmp_path / "run", "--driver",
                                   driver, *map(str, args)], stdin=f, env=env,
                                  capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode and "NotSupported" in proc.stderr:
            pytest.skip(proc.stderr.strip())
        assert proc.returncode == 0, proc.stderr
        assert "not exactly reproducible" not in proc.stderr

    try:
        gd("create", "base")
        gd("apply", "base", stdin=tmp_path / "layer.tar")
        gd("diff", "base", "-o", tmp_path / "plain.tar")
        gd("diff", "--exact", "base", "-o", tmp_path / "exact.tar")
    finally:
        gd("cleanup")
    assert (tmp_path / "exact.tar").read_bytes() == layer
    with tarfile.open(tmp_path / "plain.tar") as tf:
        member = tf.getmember(deepest)
        f = tf.extractfile(member)
        assert f is not None and f.read() == b"hello"
