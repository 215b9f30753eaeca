"""write_tree's native path (graphdriver._fastexport) writes the same bytes as the Python path."""

from __future__ import annotations

import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.archive import export
from graphdriver.archive.export import stream_tar, write_tree
from graphdriver.archive.whiteout import NAIVE, OVERLAY, OVERLAY_USERXATTR, WhiteoutFormat
from graphdriver.errors import NoSpace
from graphdriver.idmap import IDMap

IS_ROOT = os.geteuid() == 0
native = pytest.importorskip("graphdriver._fastexport", reason="native helper not built")


@pytest.fixture
def shm() -> Iterator[Path]:
    """tmpfs when there is one: user and trusted xattrs work there."""
    base = Path("/dev/shm")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        pytest.skip("needs a writable /dev/shm (tmpfs, for xattrs)")
    d = Path(tempfile.mkdtemp(prefix="gd-export-native-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _varied_tree(root: Path) -> None:
    """Every kind of entry, and every reason an entry leaves the plain ustar path."""
    root.mkdir()
    (root / "empty").touch()
    (root / "small").write_bytes(b"hello\n")
    (root / "block512").write_bytes(b"b" * 512)
    (root / "k256").write_bytes(os.urandom(256 << 10))  # the largest file read into the buffer
    (root / "k256plus1").write_bytes(os.urandom((256 << 10) + 1))  # the smallest sent
    (root / "big").write_bytes(os.urandom(3 << 20) + b"tail")
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(8 << 20)
        f.write(b"end")
    with open(root / "sparse-small", "wb") as f:
        f.seek(100 << 10)
        f.write(b"x")
    many = root / "many"
    many.mkdir()
    for i in range(300):  # several buffer flushes within one native run
        (many / f"f{i:03d}").write_bytes(os.urandom(i * 37 % 9000))
    # hard links: two inside a native run, one across directories
    (root / "hl-a").write_bytes(b"linked data")
    os.link(root / "hl-a", root / "hl-b")
    os.link(root / "hl-a", many / "hl-c")
    (root / "hl-big").write_bytes(os.urandom(400 << 10))
    os.link(root / "hl-big", root / "hl-big2")
    # names: exactly 100 bytes, 101, a long path split over prefix/name, > 255 bytes in all
    (root / ("n" * 100)).write_bytes(b"100")
    (root / ("m" * 101)).write_bytes(b"101")
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "short").write_bytes(b"split over prefix")
    (deep / ("f" * 90)).write_bytes(b"needs PAX path")
    (root / ("p" * 99)).mkdir()  # "p" * 99 + "/" fits ustar's 100 bytes
    (root / ("p" * 99) / "in").write_bytes(b"needs PAX path")
    (root / ("q" * 100)).mkdir()  # with its slash, one byte too long
    longer = root / ("g" * 200) / ("h" * 200)
    longer.mkdir(parents=True)
    (longer / "x").write_bytes(b"> 255 bytes")
    # non-ASCII and non-UTF-8 names, of a file and of a directory holding plain files
    (root / "ünï.txt").write_bytes(b"utf-8 name")
    (root / os.fsdecode(b"raw-\xff\xfe")).write_bytes(b"not utf-8")
    odd = root / os.fsdecode(b"dir-\xe9")
    odd.mkdir()
    (odd / "inside").write_bytes(b"plain name, non-ASCII prefix")
    (odd / "sub").mkdir()
    # symlinks: short, exactly 100, long, non-ASCII target
    links = root / "links"
    links.mkdir()
    (links / "rel").symlink_to("../small")
    (links / "abs").symlink_to("/etc/passwd")
    (links / "t100").symlink_to("t" * 100)
    (links / "t101").symlink_to("t" * 101)
    (links / "long").symlink_to("x/" * 150 + "end")
    (links / "uni").symlink_to("ζ")
    # special files
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
    finally:
        s.close()
    # modes and times
    for name, mode in (("suid", 0o4755), ("sgid", 0o2711), ("none", 0o000), ("sticky", 0o1777)):
        (root / name).write_bytes(name.encode())
        (root / name).chmod(mode)
    for name, ns in (("t-subsec", 1_600_000_000_123_456_789), ("t-zero", 0),
                     ("t-neg", -5 * 10**9 + 1), ("t-huge", 8**11 * 10**9 + 5)):
        (root / name).write_bytes(name.encode())
        os.utime(root / name, ns=(0, ns))
    # xattrs
    os.setxattr(root / "small", "user.comment", b"bin\x00ary\xff")
    os.setxattr(many, "user.dir", b"on a dir")
    os.setxattr(root / "empty", "user.e", b"")
    # the userxattr format's overlay xattrs (overlay's own there, content elsewhere)
    opq_u = root / "opaque-u"
    opq_u.mkdir()
    (opq_u / "kept").write_bytes(b"k")
    os.setxattr(opq_u, "user.overlay.opaque", b"y")
    os.setxattr(root / "small", "user.overlay.origin", b"userxattr's own")
    if IS_ROOT:
        os.setxattr(root / "block512", "trusted.overlay.origin", b"skipped")
        os.setxattr(root / "big", "trusted.overlay.redirect", b"skipped too")
        cap3 = bytes([0, 0, 0, 3]) + bytes(range(16)) + (1000).to_bytes(4, "little")
        os.setxattr(root / "suid", "security.capability", cap3)
        os.setxattr(links / "rel", "trusted.sym", b"on a symlink", follow_symlinks=False)
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.mknod(root / "hugedev", 0o600 | stat.S_IFCHR, os.makedev(4095, 1_048_575))
        # overlay whiteouts and opaque directories
        os.mknod(root / "gone", stat.S_IFCHR, 0)
        os.mknod(many / "gone-too", stat.S_IFCHR, 0)
        opq = root / "opaque"
        opq.mkdir()
        (opq / "kept").write_bytes(b"k")
        os.setxattr(opq, "trusted.overlay.opaque", b"y")
        not_opq = root / "opaque-n"
        not_opq.mkdir()
        os.setxattr(not_opq, "trusted.overlay.opaque", b"n")
        origin = root / "origin-dir"
        origin.mkdir()
        (origin / "f").write_bytes(b"f")
        os.setxattr(origin, "trusted.overlay.origin", b"skipped")
        (root / "not-opaque-file").write_bytes(b"n")
        os.setxattr(root / "not-opaque-file", "trusted.overlay.opaque", b"y")
        # ids that need PAX
        (root / "bigid").write_bytes(b"uid")
        os.chown(root / "bigid", 8**7, 3_000_000)
        (root / "midid").write_bytes(b"uid")
        os.chown(root / "midid", 8**7 - 1, 1000)


class _Counting:
    """The native module, counting the entries its emit handled (written or skipped)."""

    def __init__(self) -> None:
        self.handled = 0

    def list_dir(self, dir_fd: int, /) -> list[bytes]:
        result: list[bytes] = native.list_dir(dir_fd)
        return result

    def emit(self, *args: object) -> tuple[int, int, int, bool]:
        result: tuple[int, int, int, bool] = native.emit(*args)
        self.handled += result[1] - args[5]  # type: ignore[operator]
        return result


def _export(root: Path, out: Path, *, use_native: bool, counter: _Counting | None = None,
            **kwargs: object) -> bytes:
    if export._native is None:
        pytest.skip("GRAPHDRIVER_NO_NATIVE is set")
    saved = export._native
    export._native = counter if use_native else None
    if use_native and counter is None:
        export._native = saved
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_tree(fd, root, **kwargs)  # type: ignore[arg-type]
        finally:
            os.close(fd)
    finally:
        export._native = saved
    return out.read_bytes()


@pytest.mark.parametrize("fmt", [NAIVE, OVERLAY, OVERLAY_USERXATTR], ids=lambda w: w.name)
def test_native_and_python_paths_write_the_same_bytes(shm: Path, fmt: WhiteoutFormat) -> None:
    root = shm / "tree"
    _varied_tree(root)
    counter = _Counting()
    a = _export(root, shm / "native.tar", use_native=True, counter=counter, whiteout_format=fmt)
    assert counter.handled > 300  # the plain entries did go the native way
    b = _export(root, shm / "python.tar", use_native=False, whiteout_format=fmt)
    assert len(a) == len(b)
    assert a == b
    with tarfile.open(shm / "native.tar") as tf:
        names = tf.getnames()
    assert "many/f299" in names and "sock" not in names
    assert ("gone" in names) == (fmt is NAIVE or not IS_ROOT)
    assert ("opaque-u/.wh..wh..opq" in names) == (fmt is OVERLAY_USERXATTR)
    if IS_ROOT and fmt is not NAIVE:
        assert ".wh.gone" in names
        assert ("opaque/.wh..wh..opq" in names) == (fmt is OVERLAY)
    with tarfile.open(shm / "native.tar") as tf:
        pax = {m.name: m.pax_headers for m in tf.getmembers()}
    assert ("SCHILY.xattr.user.overlay.origin" in pax["small"]) == (fmt is not OVERLAY_USERXATTR)
    if IS_ROOT:  # trusted.overlay.* is content only in the userxattr format
        assert ("SCHILY.xattr.trusted.overlay.origin" in pax["block512"]) == \
            (fmt is OVERLAY_USERXATTR)


def test_native_output_matches_gnu_tar_listing(shm: Path) -> None:
    """The native output holds what GNU tar's own archive of the tree holds."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar not installed")
    root = shm / "tree"
    _varied_tree(root)
    (root / "sock").unlink()
    _export(root, shm / "ours.tar", use_native=True)
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cpf",
                    str(shm / "gnu.tar"), "-C", str(root), "."], check=True)

    def manifest(path: Path) -> dict[str, tuple[object, ...]]:
        rows: dict[str, tuple[object, ...]] = {}
        with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
            for m in tf:
                name = m.name.removeprefix("./").rstrip("/")
                if name in ("", "."):
                    continue
                if m.islnk():  # which name of an inode comes first depends on the walk order
                    rows[name] = rows[m.linkname.removeprefix("./")]
                    continue
                xattrs = {k: v for k, v in m.pax_headers.items()
                          if k.startswith("SCHILY.xattr.")
                          and not k.startswith(("SCHILY.xattr.trusted.overlay.",
                                                "SCHILY.xattr.security.capability"))}
                data = tf.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
                rows[name] = (m.type, m.mode, m.uid, m.gid, math.floor(m.mtime), m.size, data,
                              m.linkname if m.issym() else "", m.devmajor, m.devminor,
                              sorted(xattrs.items()))
        return rows

    ours, gnu = manifest(shm / "ours.tar"), manifest(shm / "gnu.tar")
    assert sorted(ours) == sorted(gnu)
    assert ours == gnu


def test_idmap_falls_back_to_python(shm: Path) -> None:
    """With a real id map the native path stays out (it writes raw ids)."""
    if not IS_ROOT:
        pytest.skip("needs root (chown)")
    root = shm / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    os.chown(root / "f", 100_005, 100_005)
    idmap = IDMap.parse("0:100000:65536", "0:100000:65536")
    a = _export(root, shm / "a.tar", use_native=True, idmap=idmap)
    b = _export(root, shm / "b.tar", use_native=False, idmap=idmap)
    assert a == b
    with tarfile.open(shm / "a.tar") as tf:
        assert tf.getmember("f").uid == 5


def test_list_dir_sorted_bytes(shm: Path) -> None:
    names = [b"b", b"a", b"\xff", b"A", b"a.b", b"a-b", b"\xc3\xa9"]
    for n in names:
        (shm / os.fsdecode(n)).touch()
    fd = os.open(shm, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert native.list_dir(fd) == sorted(names)
        assert native.list_dir(fd) == sorted(names)  # the shared offset was left at the start
    finally:
        os.close(fd)


def test_stream_tar_large_readinto(shm: Path) -> None:
    """The documented fast consumer: readinto a 1 MiB buffer until 0, same bytes as a file."""
    root = shm / "tree"
    _varied_tree(root)
    want = _export(root, shm / "file.tar", use_native=True)
    buf = bytearray(1 << 20)
    got = bytearray()
    seen: list[int] = []
    with stream_tar(lambda fd: write_tree(fd, root, progress=seen.append)) as r:
        readinto = r.readinto  # type: ignore[attr-defined]
        while n := readinto(buf):
            got += buf[:n]
        assert readinto(buf) == 0
    assert bytes(got) == want
    assert seen == sorted(seen) and seen[-1] == len(want)
    # small reads keep the buffered semantics
    with stream_tar(lambda fd: write_tree(fd, root)) as r:
        assert r.read(7) == want[:7]
        assert r.read(1000) == want[7:1007]


def test_no_native_env_is_respected() -> None:
    code = "from graphdriver.archive import export; print(export._native is None)"
    env = {**os.environ, "GRAPHDRIVER_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == "True"


@pytest.mark.parametrize("use_native", [True, False])
def test_output_error_names_no_entry(shm: Path, use_native: bool) -> None:
    """A full output is the output's failure, not one of the entries'."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    root = shm / "tree"
    root.mkdir()
    (root / "data").write_bytes(os.urandom(2 << 20))
    (root / "small").write_bytes(b"x" * 5000)
    with pytest.raises(NoSpace) as info:
        _export(root, Path("/dev/full"), use_native=use_native)
    assert "data" not in str(info.value) and "small" not in str(info.value)
