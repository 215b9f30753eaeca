"""apply_tar against GNU tar: the same archive, extracted by both, must give the same tree."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest
from tarbuild import (
    gnu_extract,
    gnu_tar,
    make_rich_tree,
    needs_gnu_tar,
    needs_root,
)
from tests.treeutil import diff_snapshots, snapshot

from graphdriver.archive.apply import ApplyOptions, apply_tar

#: every fact an apply is responsible for (the root and directory mtimes too)
ALL_FACTS = {"dir_mtimes": True, "with_root": True}

pytestmark = [needs_gnu_tar, needs_root]

FORMATS = {
    # format: (tar options, tree options)
    "gnu": (["--format=gnu", "--sparse"], {"xattrs": False}),
    "pax": (["--format=pax", "--sparse", "--xattrs", "--xattrs-include=*"], {}),
    "pax-sparse-0.0": (["--format=pax", "--sparse", "--sparse-version=0.0"], {"xattrs": False}),
    "pax-sparse-0.1": (["--format=pax", "--sparse", "--sparse-version=0.1"], {"xattrs": False}),
    "pax-sparse-1.0": (["--format=pax", "--sparse", "--sparse-version=1.0"], {"xattrs": False}),
    "ustar": (["--format=ustar"], {"xattrs": False, "long_names": False}),
    "v7": (["--format=v7"], {"xattrs": False, "long_names": False, "devices": False}),
}


def _compare(work: Path, tar: Path, compress: str | None = None) -> None:
    ex = work / "gnu"
    mine = work / "mine"
    ex.mkdir()
    mine.mkdir()
    gnu_extract(tar, ex)
    fd = os.open(tar, os.O_RDONLY)
    try:
        result = apply_tar(fd, mine, ApplyOptions())
    finally:
        os.close(fd)
    problems = diff_snapshots(snapshot(ex, **ALL_FACTS), snapshot(mine, **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])
    if compress is None:
        assert result.diff_id == "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
        with tarfile.open(tar) as tf:
            regular = sum(m.size for m in tf.getmembers() if m.isreg() and not m.islnk())
        assert result.size == regular


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_same_tree_as_gnu_tar(work: Path, fmt: str) -> None:
    opts, tree = FORMATS[fmt]
    src = work / "src"
    make_rich_tree(src, **tree)
    tar = work / "layer.tar"
    gnu_tar("--numeric-owner", *opts, "-cf", tar, "-C", src, ".")
    _compare(work, tar)


def test_sparse_file_is_written_sparse(work: Path) -> None:
    src = work / "src"
    src.mkdir()
    with open(src / "s", "wb") as f:
        f.seek(64 << 20)
        f.write(b"x")
    tar = work / "s.tar"
    gnu_tar("--format=pax", "--sparse", "-cf", tar, "-C", src, ".")
    mine = work / "mine"
    mine.mkdir()
    with open(tar, "rb") as f:
        apply_tar(f.fileno(), mine, ApplyOptions())
    st = os.stat(mine / "s")
    assert st.st_size == (64 << 20) + 1
    assert st.st_blocks * 512 < (1 << 20)


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz", "bzip2"])
def test_compressed_input(work: Path, kind: str) -> None:
    src = work / "src"
    make_rich_tree(src, xattrs=False)
    tar = work / "layer.tar"
    gnu_tar("--numeric-owner", "--format=pax", "-cf", tar, "-C", src, ".")
    flag = {"gzip": "-z", "zstd": "--zstd", "xz": "-J", "bzip2": "-j"}[kind]
    ctar = work / "layer.tar.c"
    gnu_tar("--numeric-owner", "--format=pax", flag, "-cf", ctar, "-C", src, ".")
    mine = work / "mine"
    mine.mkdir()
    with open(ctar, "rb") as f:
        res = apply_tar(f.fileno(), mine, ApplyOptions())
    ex = work / "gnu"
    ex.mkdir()
    gnu_extract(ctar, ex)
    problems = diff_snapshots(snapshot(ex, **ALL_FACTS), snapshot(mine, **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])
    assert res.diff_id.startswith("sha256:")


def test_diff_id_of_compressed_is_uncompressed_digest(work: Path) -> None:
    import gzip

    src = work / "src"
    src.mkdir()
    (src / "a").write_text("a" * 10000)
    tar = work / "layer.tar"
    gnu_tar("--format=pax", "-cf", tar, "-C", src, ".")
    raw = tar.read_bytes()
    gz = work / "layer.tgz"
    gz.write_bytes(gzip.compress(raw))
    mine = work / "mine"
    mine.mkdir()
    with open(gz, "rb") as f:
        res = apply_tar(f.fileno(), mine, ApplyOptions())
    assert res.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert res.size == 10000


def test_binary_stream_source(work: Path) -> None:
    src = work / "src"
    make_rich_tree(src, xattrs=False)
    tar = work / "layer.tar"
    gnu_tar("--numeric-owner", "--format=pax", "-cf", tar, "-C", src, ".")
    mine = work / "mine"
    mine.mkdir()
    ex = work / "gnu"
    ex.mkdir()
    gnu_extract(tar, ex)
    with open(tar, "rb") as f:
        apply_tar(f, mine, ApplyOptions())
    assert not diff_snapshots(snapshot(ex, **ALL_FACTS), snapshot(mine, **ALL_FACTS))


def test_directory_fd_target(work: Path) -> None:
    src = work / "src"
    src.mkdir()
    (src / "f").write_text("x")
    tar = work / "layer.tar"
    gnu_tar("-cf", tar, "-C", src, ".")
    mine = work / "mine"
    mine.mkdir()
    dfd = os.open(mine, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(tar, "rb") as f:
            apply_tar(f.fileno(), dfd, ApplyOptions())
    finally:
        os.close(dfd)
    assert (mine / "f").read_text() == "x"


def test_idmap_shifts_owners(work: Path) -> None:
    from graphdriver.idmap import IDMap

    src = work / "src"
    src.mkdir()
    (src / "f").write_text("x")
    os.chown(src / "f", 5, 7)
    tar = work / "layer.tar"
    gnu_tar("--numeric-owner", "-cf", tar, "-C", src, ".")
    mine = work / "mine"
    mine.mkdir()
    with open(tar, "rb") as f:
        apply_tar(f.fileno(), mine, ApplyOptions(idmap=IDMap.parse("0:100000:65536")))
    st = os.stat(mine / "f")
    assert (st.st_uid, st.st_gid) == (100005, 100007)
