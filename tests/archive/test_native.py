"""The optional native header parser (graphdriver._fastapply) against the pure-Python one.

Both must give the same entries, the same diff_id, the same recorder stream and, on broken input,
the same error: the native parser only ever declines (returns None) and lets Python decide.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from graphdriver.archive import tarstream as ts
from graphdriver.errors import InvalidArchive

native = pytest.importorskip("graphdriver._fastapply", reason="native extension not compiled")

FIELDS = (
    "name", "raw_name", "type", "mode", "uid", "gid", "size", "data_size", "mtime_ns",
    "atime_ns", "ctime_ns", "linkname", "raw_linkname", "uname", "gname", "devmajor",
    "devminor", "xattrs", "pax", "sparse",
)


class _Rec:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def segment(self, raw: bytes) -> None:
        self.calls.append(("S", bytes(raw)))

    def file(self, name: bytes, size: int, payload_crc64: int | None) -> None:
        self.calls.append(("F", name, size, payload_crc64))


def _read(data: bytes, use_native: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(ts, "_native_header", native.header if use_native else None)
    rec = _Rec()
    out: list[Any] = []
    try:
        r = ts.TarReader(io.BytesIO(data), rec)
        for e in r:
            content = r.read_data(e, 1 << 30) if e.data_size and e.sparse is None else b""
            out.append((*(getattr(e, k) for k in FIELDS), content))
        return out, r.diff_id, rec.calls
    except InvalidArchive as exc:
        return "error", str(exc)


def _both(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    a = _read(data, False, monkeypatch)
    b = _read(data, True, monkeypatch)
    assert a == b
    return a


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    (root / "d" / "sub").mkdir(parents=True)
    for i in range(20):
        (root / "d" / f"f{i}").write_bytes(os.urandom(i * 100))
    long_dir = root / ("x" * 90) / ("y" * 90)
    long_dir.mkdir(parents=True)
    (long_dir / ("z" * 120)).write_text("long")
    (root / "d" / "link").symlink_to("f1")
    os.link(root / "d" / "f2", root / "d" / "hard")
    (root / "d" / "sub" / "exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "d" / "sub" / "exec", 0o4755)
    os.mkfifo(root / "d" / "fifo")
    with contextlib.suppress(OSError):
        os.setxattr(root / "d" / "f3", "user.test", b"value\nwith newline")
    (root / ".hidden").write_text("h")
    return root


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "ustar", "pax", "v7", "posix-xattrs"])
def test_gnu_tar_formats_parse_the_same(fmt: str, tree: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.tar"
    args = ["tar", "-C", str(tree), "-cf", str(out)]
    if fmt == "posix-xattrs":
        args[1:1] = ["--format=posix", "--xattrs", "--xattrs-include=*"]
    else:
        args[1:1] = [f"--format={fmt}"]
    proc = subprocess.run([*args, "."], capture_output=True)
    if proc.returncode:  # ustar/v7 cannot hold some members (long names, fifos): tar skips them
        assert fmt in ("ustar", "v7"), proc.stderr
    entries = _both(out.read_bytes(), monkeypatch)
    assert entries != "error" and len(entries[0]) > 20


def test_sparse_global_pax_and_long_names_fall_back(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sparse = tmp_path / "src" / "sparse"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    for fmt in ("gnu", "posix"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "-S", "-C", str(tmp_path / "src"), "-cf",
                        str(out), "."], check=True)
        _both(out.read_bytes(), monkeypatch)
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as t:
        info = tarfile.TarInfo("a" * 300)
        info.size = 3
        info.mtime = 1.5
        t.addfile(info, io.BytesIO(b"abc"))
    _both(buf.getvalue(), monkeypatch)


def test_mutated_headers_give_the_same_result(tree: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.tar"
    subprocess.run(["tar", "--format=posix", "-C", str(tree), "-cf", str(out), "."], check=True)
    base = out.read_bytes()[: 64 * 1024]
    rng = random.Random(7)
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 8192)
            data[pos] = rng.choice([0, 0x20, 0x30, 0x37, 0x38, 0x2E, 0x2F, 0x0A, 0xFF,
                                    rng.randrange(256)])
        _both(bytes(data), monkeypatch)


def test_native_declines_short_buffers() -> None:
    assert native.header(bytearray(1024), 0, 100) is None
    assert native.header(bytearray(1024), 0, 1024) is None  # zero blocks: Python's end marker


@pytest.mark.skipif(os.geteuid() != 0, reason="the native create is used as root only")
@pytest.mark.parametrize("pre_existing", [False, True])
def test_native_and_python_applies_make_the_same_tree(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pre_existing: bool
) -> None:
    from tests.treeutil import snapshot

    from graphdriver.archive import apply as apply_mod
    from graphdriver.archive.apply import ApplyOptions, apply_tar

    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "-C", str(tree),
                    "-cf", str(tar), "."], check=True)
    results = []
    for use_native in (False, True):
        monkeypatch.setattr(ts, "_native_header", native.header if use_native else None)
        monkeypatch.setattr(apply_mod, "_native_create",
                            native.create_file if use_native else None)
        out = tmp_path / f"out-{use_native}"
        (out / "d").mkdir(parents=True)
        if pre_existing:  # replaced files go through the FileExistsError path and the journal
            (out / "d" / "f1").write_text("old")
            (out / "d" / "sub").mkdir()
        with open(tar, "rb") as f:
            res = apply_tar(f.fileno(), out, ApplyOptions())
        results.append((snapshot(out), res.size, res.diff_id))
    assert results[0] == results[1]


def test_native_create_refuses_an_existing_name(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            native.create_file(fd, "x", 0o644, b"new", False, 0, 0, -1, 0, 0)
        link = tmp_path / "l"
        link.symlink_to("x")
        with pytest.raises(FileExistsError):  # O_EXCL: a symlink is never followed
            native.create_file(fd, "l", 0o644, b"new", False, 0, 0, -1, 0, 0)
        assert native.create_file(fd, "y", 0o600, b"abc", False, 0, 0, 0o640, 5 * 10**9,
                                  7 * 10**9 + 5) is None
    finally:
        os.close(fd)
    st = (tmp_path / "y").stat()
    assert (tmp_path / "x").read_text() == "keep" and (tmp_path / "y").read_bytes() == b"abc"
    assert st.st_mode & 0o7777 == 0o640 and st.st_mtime_ns == 7 * 10**9 + 5
    assert st.st_atime_ns == 5 * 10**9


def test_openat2_natively_as_through_ctypes(tmp_path: Path) -> None:
    """archive/pathres.py's openat2: _fastapply's (no ctypes in the confined child) answers as
    the ctypes call does -- a path beneath opened, a symlink or ".." on the way refused with the
    same errno, a missing name FileNotFoundError naming it, O_CLOEXEC always added."""
    from graphdriver.archive import pathres

    slow = pathres._ctypes_openat2()
    assert slow is not None
    if not pathres.have_openat2():
        pytest.skip("the kernel has no openat2")
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "link").symlink_to("d")
    beneath = pathres.RESOLVE_BENEATH | pathres.RESOLVE_NO_SYMLINKS
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for call in (native.openat2, slow):
            fd = call(root, "d/e", os.O_RDONLY | os.O_DIRECTORY, 0, beneath)
            try:
                assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "d" / "e"))
                assert not os.get_inheritable(fd)
            finally:
                os.close(fd)
            errnos = []
            for path in ("link/e", "../" + tmp_path.name, "nope"):
                with pytest.raises(OSError) as caught:
                    call(root, path, os.O_RDONLY, 0, beneath)
                errnos.append(caught.value.errno)
                assert caught.value.filename == path
            assert errnos == [errno.ELOOP, errno.EXDEV, errno.ENOENT]
    finally:
        os.close(root)
