"""write_tree / write_changes / stream_tar against GNU tar, tarfile and the project's apply."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from tests.treeutil import snapshot

from graphdriver.archive.changes import ChangeKind, changes_dirs
from graphdriver.archive.export import stream_tar, write_changes, write_tree
from graphdriver.archive.whiteout import OVERLAY, OVERLAY_USERXATTR, WhiteoutFormat
from graphdriver.errors import InvalidArgument, NotFound
from graphdriver.idmap import IDMap

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mknod, trusted.* xattrs)")
def _rich_tree(root: Path) -> None:
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "empty").touch()
    (root / "usr" / "bin").mkdir(parents=True)
    big = os.urandom(3 << 20)
    (root / "usr" / "bin" / "big").write_bytes(big)
    (root / "usr" / "bin" / "mid").write_bytes(big[: 300 << 10])
    os.link(root / "usr" / "bin" / "mid", root / "usr" / "mid-link")
    os.link(root / "etc" / "passwd", root / "usr" / "bin" / "passwd-link")
    os.link(root / "etc" / "passwd", root / "passwd-link2")
    suid = root / "usr" / "bin" / "suid"
    suid.write_text("#!/bin/sh\n")
    suid.chmod(0o4755)
    sgid = root / "usr" / "bin" / "sgid"
    sgid.write_text("x")
    sgid.chmod(0o2711)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "secret").write_text("s")
    (root / "secret").chmod(0o000)
    deep = root / "deep"
    for i in range(6):
        deep = deep / (f"level{i}-" + "d" * 50)
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_text("deep file")
    uni = root / "ünïcödé dir"
    uni.mkdir()
    (uni / "日本語.txt").write_text("nihongo")
    (root / "links").mkdir()
    (root / "links" / "rel").symlink_to("../etc/passwd")
    (root / "links" / "abs").symlink_to("/etc/passwd")
    (root / "links" / "dangling").symlink_to("nowhere")
    (root / "links" / "long").symlink_to("x/" * 90 + "end")
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
    finally:
        s.close()
    os.setxattr(root / "etc" / "passwd", "user.comment", b"bin\x00ary\xff")
    os.setxattr(root / "etc", "user.dir", b"on a dir")
    (root / "times").mkdir()
    for name, ns in (("subsec", 1_600_000_000_123_456_789), ("zero", 0), ("neg", -5 * 10**9 + 1)):
        (root / "times" / name).write_text(name)
        os.utime(root / "times" / name, ns=(0, ns))
    if IS_ROOT:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "loop", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
        (root / "owned").write_text("o")
        os.chown(root / "owned", 1000, 1001)
        (root / "bigid").write_text("b")
        os.chown(root / "bigid", 3_000_000, 4_000_000)
        os.chown(root / "links" / "rel", 5, 6, follow_symlinks=False)
        os.setxattr(root / "etc" / "passwd", "trusted.note", b"t")
        cap = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)
        os.setxattr(root / "usr" / "bin" / "big", "security.capability", cap)
    os.utime(root / "times", ns=(0, 1_500_000_000_999_999_999))


def _write_file(path: Path, fn: object, *args: object, **kw: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fn(fd, *args, **kw)  # type: ignore[operator]
    finally:
        os.close(fd)


def _gnu_extract(tar: Path, dst: Path) -> None:
    dst.mkdir()
    r = subprocess.run(
        ["tar", "-xpf", str(tar), "-C", str(dst), "--numeric-owner", "--same-owner",
         "--xattrs", "--xattrs-include=*"],
        capture_output=True, text=True, check=False,
    )
    # GNU tar warns about (correctly restored) pre-1970 times; nothing else is acceptable.
    noise = [ln for ln in r.stderr.splitlines() if "implausibly old time stamp" not in ln]
    assert r.returncode == 0 and noise == [], r.stderr


def _gnu_names(tar: Path) -> list[str]:
    r = subprocess.run(
        ["tar", "--numeric-owner", "-tvf", str(tar)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r2 = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, check=True)
    return [os.fsdecode(n) for n in r2.stdout.split(b"\n") if n]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    _rich_tree(root)
    return root


def test_gnu_tar_extracts_the_same_tree(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.tar"
    _write_file(out, write_tree, tree)
    _gnu_extract(out, tmp_path / "x")
    want = snapshot(tree, dir_mtimes=True, mtime_seconds=True)
    del want["sock"]  # sockets are not archived (as GNU tar, moby)
    got = snapshot(tmp_path / "x", dir_mtimes=True, mtime_seconds=True)
    cap = want.get("usr/bin/big")
    assert got == want, [k for k in want if want[k] != got.get(k)] or cap


def test_names_order_and_format(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.tar"
    _write_file(out, write_tree, tree)
    names = _gnu_names(out)
    assert "sock" not in names and "sock/" not in names
    assert all(not n.startswith(("./", "/")) for n in names)
    assert "etc/" in names and "etc/passwd" in names
    # sorted within each directory, each directory right before its contents
    def key(n: str) -> list[bytes]:
        return [os.fsencode(c) for c in n.rstrip("/").split("/")]
    assert names == sorted(names, key=key)
    with tarfile.open(out) as tf:
        members = tf.getmembers()
    by = {m.name: m for m in members}
    assert by["etc"].isdir()
    first = min(("etc/passwd", "passwd-link2", "usr/bin/passwd-link"), key=key)
    assert first == "etc/passwd" and by["etc/passwd"].isreg()
    assert by["passwd-link2"].islnk() and by["passwd-link2"].linkname == "etc/passwd"
    assert by["usr/bin/passwd-link"].islnk()
    assert by["usr/mid-link"].linkname == "usr/bin/mid"
    assert by["times/subsec"].mtime == 1_600_000_000  # truncated like moby
    assert "mtime" not in by["times/subsec"].pax_headers
    assert by["times/neg"].mtime == -5
    assert by["etc/passwd"].uname == "" and by["etc/passwd"].gname == ""
    assert by["etc/passwd"].pax_headers["SCHILY.xattr.user.comment"]
    assert by["fifo"].isfifo()


def test_deterministic(tree: Path, tmp_path: Path) -> None:
    _write_file(tmp_path / "a.tar", write_tree, tree)
    _write_file(tmp_path / "b.tar", write_tree, tree)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_pipe_output_and_progress(tree: Path, tmp_path: Path) -> None:
    _write_file(tmp_path / "a.tar", write_tree, tree)
    seen: list[int] = []
    with stream_tar(lambda fd: write_tree(fd, tree, progress=seen.append)) as r:
        data = r.read()
    assert data == (tmp_path / "a.tar").read_bytes()
    assert seen == sorted(seen) and seen[-1] == len(data)


def test_stream_tar_reraises_writer_error() -> None:
    def fail(fd: int) -> None:
        os.write(fd, b"partial")
        raise NotFound("layer vanished")

    r = stream_tar(fail)
    with pytest.raises(NotFound, match="layer vanished"):
        r.read()
    r.close()


def test_stream_tar_early_close_is_quiet(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "f").write_bytes(bytes(20 << 20))
    r = stream_tar(lambda fd: write_tree(fd, big))
    assert len(r.read(100)) == 100
    r.close()


def test_missing_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        write_tree(os.open(os.devnull, os.O_WRONLY), tmp_path / "nope")


@needs_root
def test_idmap_maps_owners_back(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_text("x")
    os.chown(root, 100000, 100000)
    os.chown(root / "f", 101000, 100005)
    idmap = IDMap.parse("0:100000:65536")
    out = tmp_path / "t.tar"
    _write_file(out, write_tree, root, idmap=idmap)
    with tarfile.open(out) as tf:
        (m,) = tf.getmembers()
    assert (m.uid, m.gid) == (1000, 5)
    os.chown(root / "f", 5, 5)
    with pytest.raises(InvalidArgument):
        write_tree(os.open(os.devnull, os.O_WRONLY), root, idmap=idmap)


@needs_root
@pytest.mark.parametrize("wf", [OVERLAY, OVERLAY_USERXATTR], ids=lambda w: w.name)
def test_overlay_whiteout_form_round_trip(tmp_path: Path, wf: WhiteoutFormat) -> None:
    from graphdriver.archive.apply import ApplyOptions, apply_tar

    ns = wf.xattr_prefix  # trusted.overlay. or user.overlay.
    other = "user.overlay." if ns.startswith("trusted.") else "trusted.overlay."

    root = tmp_path / "upper"
    root.mkdir()
    (root / "kept").write_text("k")
    os.mknod(root / "gone", 0o600 | stat.S_IFCHR, 0)
    (root / "opq").mkdir(0o750)
    os.setxattr(root / "opq", ns + "opaque", b"y")
    os.setxattr(root / "opq", ns + "origin", b"junk")
    os.setxattr(root / "kept", other + "origin", b"another namespace: content")
    (root / "opq" / "inner").write_text("i")
    os.mknod(root / "opq" / "gone2", 0o600 | stat.S_IFCHR, 0)
    out = tmp_path / "t.tar"
    _write_file(out, write_tree, root, whiteout_format=wf)
    names = _gnu_names(out)
    assert names == [".wh.gone", "kept", "opq/", "opq/.wh..wh..opq", "opq/.wh.gone2", "opq/inner"]
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf.getmembers()}
    wh = members[".wh.gone"]
    assert wh.isreg() and wh.size == 0 and wh.mode == 0o600
    assert members["opq/.wh..wh..opq"].isreg() and members["opq/.wh..wh..opq"].mode == 0o750
    assert all(not k.startswith("SCHILY.xattr." + ns) for m in members.values()
               for k in m.pax_headers)
    assert members["kept"].pax_headers.get("SCHILY.xattr." + other + "origin") == "another " \
        "namespace: content"
    # naive form keeps the devices as devices and still drops trusted.overlay.*
    os.removexattr(root / "kept", other + "origin")
    _write_file(tmp_path / "n.tar", write_tree, root)
    with tarfile.open(tmp_path / "n.tar") as tf:
        naive = {m.name: m for m in tf.getmembers()}
    assert naive["gone"].ischr() and "opq/.wh..wh..opq" not in naive
    assert not any("trusted.overlay" in k for k in naive["opq"].pax_headers)
    # apply the overlay form back: the same upper directory
    back = tmp_path / "back"
    back.mkdir()
    with open(out, "rb") as f:
        apply_tar(f, back, ApplyOptions(whiteout_format=wf))
    assert os.getxattr(back / "opq", ns + "opaque") == b"y"
    for name in ("gone", "opq/gone2"):
        st = os.lstat(back / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (back / "opq" / "inner").read_text() == "i"
    assert (back / "kept").read_text() == "k"


def _mutate(old: Path, new: Path) -> None:
    subprocess.run(["cp", "-a", str(old), str(new)], check=True)
    (new / "etc" / "passwd").write_text("changed\n")
    (new / "etc" / "added").write_text("new file")
    os.link(new / "etc" / "added", new / "etc" / "added-link")
    shutil.rmtree(new / "deep")
    (new / "usr" / "bin" / "mid").unlink()
    (new / "tmp").chmod(0o1770)
    (new / "newdir" / "sub").mkdir(parents=True)
    (new / "newdir" / "sub" / "f").write_text("f")
    (new / "links" / "rel").unlink()
    (new / "links" / "rel").symlink_to("elsewhere")


def test_write_changes_matches_moby(tree: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    _mutate(tree, new)
    changes = changes_dirs(new, tree)
    out = tmp_path / "c.tar"
    _write_file(out, write_changes, new, list(reversed(changes)))
    names = _gnu_names(out)
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert ".wh.deep" in names and "usr/bin/.wh.mid" in names
    assert members[".wh.deep"].mode == 0 and members[".wh.deep"].size == 0
    assert "etc/" in names  # modified parent: the directory entry alone
    assert "etc/empty" not in names
    assert "tmp/" in names
    assert "newdir/" in names and "newdir/sub/" in names and "newdir/sub/f" in names
    assert members["etc/added-link"].islnk()
    assert members["etc/added-link"].linkname == "etc/added"
    want = []
    for c in sorted(changes, key=lambda c: os.fsencode(c.path)):
        rel = c.path.lstrip("/")
        if c.kind == ChangeKind.DELETE:
            head, _, tail = rel.rpartition("/")
            want.append((head + "/" if head else "") + ".wh." + tail)
        else:
            want.append(rel + "/" if (new / rel).is_dir() and not (new / rel).is_symlink()
                        else rel)
    assert names == want


def test_write_changes_applied_gives_new_tree(tree: Path, tmp_path: Path) -> None:
    from graphdriver.archive.apply import ApplyOptions, apply_tar

    new = tmp_path / "new"
    _mutate(tree, new)
    out = tmp_path / "c.tar"
    _write_file(out, write_changes, new, changes_dirs(new, tree))
    applied = tmp_path / "applied"
    subprocess.run(["cp", "-a", str(tree), str(applied)], check=True)
    with open(out, "rb") as f:
        apply_tar(f, applied, ApplyOptions())
    assert changes_dirs(applied, new) == []
    assert (snapshot(applied, dir_mtimes=True, mtime_seconds=True)
            == snapshot(new, dir_mtimes=True, mtime_seconds=True))


def test_write_changes_skips_vanished_paths(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    from graphdriver.archive.changes import Change

    buf = io.BytesIO()
    with stream_tar(lambda fd: write_changes(fd, root, [Change("/gone", ChangeKind.ADD)])) as r:
        buf.write(r.read())
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert tf.getmembers() == []


# ------------------------------------------------------------------------------------------
# Benchmark: write_tree vs GNU tar -cpf on a 50k-small-file tree (GRAPHDRIVER_BENCH=1)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GRAPHDRIVER_BENCH"), reason="set GRAPHDRIVER_BENCH=1")
def test_bench_write_tree_vs_gnu_tar() -> None:
    base = Path("/dev/shm") / f"gd-export-bench-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    try:
        src = base / "src"
        for d in range(500):
            sub = src / f"d{d:03}"
            sub.mkdir(parents=True)
            for f in range(100):
                (sub / f"file{f:03}.txt").write_bytes(b"x" * ((d * 100 + f) % 4096))
        out = base / "out.tar"

        def ours() -> None:
            _write_file(out, write_tree, src)

        def gnu() -> None:
            subprocess.run(
                ["tar", "-cpf", str(out), "--numeric-owner", "--xattrs", "-C", str(src), "."],
                check=True,
            )

        results = {}
        for label, fn in (("write_tree", ours), ("gnu tar", gnu)):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            results[label] = statistics.median(times)
        ratio = results["write_tree"] / results["gnu tar"]
        print(f"\n50k files: write_tree {results['write_tree']:.3f}s, "
              f"GNU tar {results['gnu tar']:.3f}s, ratio {ratio:.2f}")
        assert ratio < 20
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_tree_deeper_than_path_max(tmp_path: Path) -> None:
    depth = 2500  # "d/" * 2500 is longer than PATH_MAX: only dir fds can reach the bottom
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.symlink("target", "link", dir_fd=fd)
        f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"bottom")
        os.close(f)
    finally:
        os.close(fd)
    with stream_tar(lambda out: write_tree(out, root)) as r:
        data = r.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    assert len(members) == depth + 2
    assert members[-1].name == "d/" * depth + "link" and members[-1].linkname == "target"
    assert members[-2].name == "d/" * depth + "f" and members[-2].size == 6
    subprocess.run(["rm", "-rf", str(root)], check=True)
