"""tar-split through the store and the command: a real (confined) apply records the layer's
metadata, ``graphdriver diff --exact`` gives back the applied bytes, and layers that cannot be
reproduced say so and still have their normal diff.  Run over every driver that works here.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graphdriver import exactdiff as ed
from graphdriver.archive import tarsplit as ts
from graphdriver.archive.crc64 import crc64
from graphdriver.errors import ExactDiffUnavailable, StoreCorrupt

SRC = str(Path(__file__).resolve().parents[2] / "src")
needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar missing")


def gnu_tar(tmp_path: Path, name: str, files: dict[str, bytes], *extra: str) -> Path:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = tmp_path / f"{name}.tar"
    subprocess.run(["tar", *extra, "-cf", str(out), "-C", str(src), "."], check=True)
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gd(tmp_path: Path, driver: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root"), "--runroot",
         str(tmp_path / "run"), "--driver", driver, *args],
        env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, timeout=120)


@needs_gnu_tar
def test_apply_records_and_diff_exact_reproduces(store: object, tmp_path: Path) -> None:
    d: object = store
    base = gnu_tar(tmp_path, "base", {"a/b": os.urandom(123_457), "c": b"x" * 1000,
                                      "d/" + "n" * 150: b"long name"}, "--format=gnu")
    top = gnu_tar(tmp_path, "top", {"a/b": b"replaced", "e": b""}, "--format=posix")
    d.create("base")  # type: ignore[attr-defined]
    with open(base, "rb") as f:
        d.apply_diff("base", None, f)  # type: ignore[attr-defined]
    d.create("top", "base")  # type: ignore[attr-defined]
    with open(top, "rb") as f:
        d.apply_diff("top", "base", f)  # type: ignore[attr-defined]
    name = d.name  # type: ignore[attr-defined]
    for layer, tar in (("base", base), ("top", top)):
        assert (d.meta.dir(layer) / ts.METADATA_NAME).exists()  # type: ignore[attr-defined]
        assert not (d.meta.dir(layer) / ed.RAW_NAME).exists()  # type: ignore[attr-defined]
        r = gd(tmp_path, name, "diff", "--exact", layer)
        assert r.returncode == 0, r.stderr
        assert sha(r.stdout) == sha(tar.read_bytes())
        out = tmp_path / f"{layer}-exact.tar"
        r = gd(tmp_path, name, "diff", "--exact", layer, "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == tar.read_bytes()
    if shutil.which("tar-split"):
        # Debian's Go tar-split re-assembles our stored metadata from the layer's files.
        with d.mounted("top") as root:  # type: ignore[attr-defined]
            r = subprocess.run(["tar-split", "asm", "--input",
                                str(d.meta.dir("top") / ts.METADATA_NAME),  # type: ignore[attr-defined]
                                "--path", str(root), "--output", "-"], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout == top.read_bytes()


@needs_gnu_tar
def test_changed_layer_fails_in_one_line(store: object, tmp_path: Path) -> None:
    d: object = store
    tar = gnu_tar(tmp_path, "t", {"f": b"original"})
    d.create("lay")  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        d.apply_diff("lay", None, f)  # type: ignore[attr-defined]
    # the layer's own copy of the file (vfs: its tree; overlay: its diff/ directory)
    target = d._apply_target(d.record("lay")) / "f"  # type: ignore[attr-defined]
    target.write_bytes(b"ORIGINAL")
    with pytest.raises(StoreCorrupt, match="changed since it was applied"):
        ed.write_exact_diff(d, "lay", open(os.devnull, "wb"))  # noqa: SIM115
    r = gd(tmp_path, d.name, "diff", "--exact", "lay", "-o", str(tmp_path / "x.tar"))  # type: ignore[attr-defined]
    assert r.returncode != 0
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "changed since it was applied" in err
    assert not (tmp_path / "x.tar").exists()


@needs_gnu_tar
def test_sparse_layer_not_reproducible_but_diffable(store: object, tmp_path: Path) -> None:
    d: object = store
    src = tmp_path / "sparse-src"
    src.mkdir()
    with open(src / "hole", "wb") as f:
        f.seek(4 << 20)
        f.write(b"tail")
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(src), "."],
                   check=True)
    d.create("s")  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        d.apply_diff("s", None, f)  # type: ignore[attr-defined]
    ok, why = ed.exact_available(d, "s")
    assert not ok and "hole" in why
    with pytest.raises(ExactDiffUnavailable, match="cannot be reproduced byte for byte"):
        ed.write_exact_diff(d, "s", open(os.devnull, "wb"))  # noqa: SIM115
    r = gd(tmp_path, d.name, "diff", "s")  # type: ignore[attr-defined]
    assert r.returncode == 0 and len(r.stdout) > 0


def test_layer_without_apply_has_no_exact_diff(store: object) -> None:
    d: object = store
    d.create("empty")  # type: ignore[attr-defined]
    ok, why = ed.exact_available(d, "empty")
    assert not ok and "not made by applying an archive" in why


def test_stored_metadata_is_gzip_json_lines(store: object, tmp_path: Path) -> None:
    d: object = store
    tar = tmp_path / "t.tar"
    import tarfile

    (tmp_path / "f").write_bytes(b"data")
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        t.add(tmp_path / "f", "f")
    d.create("lay")  # type: ignore[attr-defined]
    with open(tar, "rb") as f:
        d.apply_diff("lay", None, f)  # type: ignore[attr-defined]
    with gzip.open(d.meta.dir("lay") / ts.METADATA_NAME) as g:  # type: ignore[attr-defined]
        lines = g.read().splitlines()
    entries = [ts.decode_entry(line) for line in lines]
    assert [e.position for e in entries] == list(range(len(entries)))
    files = [e for e in entries if e.type == ts.FILE_TYPE]
    assert len(files) == 1 and files[0].name == b"f" and files[0].size == 4
    assert files[0].payload == ts.crc_bytes(crc64(b"data"))
