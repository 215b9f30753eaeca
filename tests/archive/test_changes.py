"""changes_dirs / changes_size: moby's ChangesDirs rules, one test per rule, real trees.

Scenarios follow moby's pkg/archive changes_test.go (sample dir, mutations, GH13590, sizes
with hard links); the overlay comparison against a real mount lives in test_overlay_changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from graphdriver.archive.changes import (
    Change,
    ChangeKind,
    changes_dirs,
    changes_size,
    stat_different,
    tree_size,
)
from graphdriver.errors import NotFound

A, C, D = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE
IS_ROOT = os.geteuid() == 0


def _write(p: Path, data: str = "x", mode: int = 0o644) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data)
    p.chmod(mode)
    return p


def _copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def _sample(root: Path) -> None:
    """moby's createSampleDir, minus what needs root."""
    root.mkdir()
    _write(root / "file1", "file1\n", 0o600)
    _write(root / "file2", "file2\n", 0o666)
    _write(root / "file3", "file3\n", 0o404)
    _write(root / "file4", "file4\n", 0o600)
    _write(root / "file5", "file5\n", 0o600)
    (root / "dir1").mkdir(0o740)
    _write(root / "dir1" / "file1-1", "file1-1\n", 0o1444)
    _write(root / "dir1" / "file1-2", "file1-2\n", 0o666)
    (root / "dir2").mkdir(0o700)
    _write(root / "dir2" / "file2-1", "file2-1\n", 0o666)
    _write(root / "dir2" / "file2-2", "file2-2\n", 0o666)
    (root / "dir3").mkdir(0o700)
    _write(root / "dir3" / "file3-1", "file3-1\n", 0o666)
    _write(root / "dir3" / "file3-2", "file3-2\n", 0o666)
    (root / "dir4").mkdir(0o700)
    _write(root / "dir4" / "file3-1", "file4-1\n", 0o666)
    _write(root / "dir4" / "file3-2", "file4-2\n", 0o666)
    (root / "symlink1").symlink_to("target1")
    (root / "symlink2").symlink_to("target2")
    (root / "symlink3").symlink_to(root / "file1")
    (root / "symlink4").symlink_to(root / "symlink3")
    (root / "dirSymlink").symlink_to(root / "dir1")
    now = 1_600_000_000
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (now, now), follow_symlinks=False)
    os.utime(root, (now, now))


def test_no_changes(tmp_path: Path) -> None:
    _sample(tmp_path / "a")
    _copy(tmp_path / "a", tmp_path / "b")
    assert changes_dirs(tmp_path / "b", tmp_path / "a") == []


def test_old_none_lists_everything_as_added(tmp_path: Path) -> None:
    _sample(tmp_path / "a")
    got = changes_dirs(tmp_path / "a", None)
    names = sorted(
        "/" + os.path.relpath(os.path.join(d, n), tmp_path / "a")
        for d, ds, fs in os.walk(tmp_path / "a")
        for n in ds + fs
    )
    assert got == [Change(p, A) for p in sorted(names, key=os.fsencode)]


def test_empty_dirs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert changes_dirs(tmp_path / "b", tmp_path / "a") == []
    assert changes_dirs(tmp_path / "b", None) == []


def test_mutated_sample(tmp_path: Path) -> None:
    """moby TestChangesDirsMutated."""
    old, new = tmp_path / "old", tmp_path / "new"
    _sample(old)
    _copy(old, new)
    os.chmod(new / "dir1", 0o740)  # unchanged mode: still nothing
    shutil.rmtree(new / "dir1")
    os.chmod(new / "dir2", 0o755)  # a directory's mode counts
    (new / "dirnew").mkdir(0o766)
    (new / "file1").unlink()
    _write(new / "file2", "file2\n", 0o600)  # only the mode changed
    st = os.stat(old / "file3")
    _write(new / "file3", "file3-modified\n", 0o404)  # size
    os.utime(new / "file3", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(new / "file4", ns=(0, (1_600_000_000 + 1) * 10**9))  # mtime only
    _write(new / "file5", "fileN\n", 0o600)  # same size, same mtime second: not a change
    os.utime(new / "file5", ns=(0, 1_600_000_000 * 10**9))
    _write(new / "filenew", "filenew\n", 0o644)
    (new / "symlink1").unlink()
    (new / "symlinknew").symlink_to("targetnew")
    (new / "symlink2").unlink()
    (new / "symlink2").symlink_to("target2changed")  # size differs
    os.utime(new / "dir3", (5, 5))  # a directory's mtime alone does not count
    (new / "dir4" / "file3-1").unlink()  # dir4 listed as the parent of a change

    assert changes_dirs(new, old) == [
        Change("/dir1", D),
        Change("/dir2", C),
        Change("/dir4", C),
        Change("/dir4/file3-1", D),
        Change("/dirnew", A),
        Change("/file1", D),
        Change("/file2", C),
        Change("/file3", C),
        Change("/file4", C),
        Change("/filenew", A),
        Change("/symlink1", D),
        Change("/symlink2", C),
        Change("/symlinknew", A),
    ]


def test_parent_dir_listed_even_when_unchanged_gh13590(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "dir1" / "dir2" / "file")
    os.utime(old / "dir1" / "dir2" / "file", (7, 7))
    _copy(old, new)
    _write(new / "dir1" / "dir2" / "file", "changed")
    os.utime(new / "dir1" / "dir2", (1, 1))
    os.utime(new / "dir1", (1, 1))
    assert changes_dirs(new, old) == [
        Change("/dir1", C),
        Change("/dir1/dir2", C),
        Change("/dir1/dir2/file", C),
    ]


def test_added_dir_lists_children_added_without_parent_modify(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "d").mkdir(parents=True)
    _copy(old, new)
    _write(new / "d" / "n" / "f")
    assert changes_dirs(new, old) == [
        Change("/d", C),
        Change("/d/n", A),
        Change("/d/n/f", A),
    ]


def test_modified_dir_not_listed_twice(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "d").mkdir(parents=True)
    _copy(old, new)
    _write(new / "d" / "f")
    os.chmod(new / "d", 0o700)
    assert changes_dirs(new, old) == [Change("/d", C), Change("/d/f", A)]


def test_dir_replaced_by_file_does_not_list_old_children(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "x" / "child1")
    _write(old / "x" / "child2")
    new.mkdir()
    _write(new / "x", "now a file")
    assert changes_dirs(new, old) == [Change("/x", C)]


def test_file_replaced_by_dir_lists_new_children_added(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "x", "a file")
    _write(new / "x" / "c1")
    _write(new / "x" / "sub" / "c2")
    assert changes_dirs(new, old) == [
        Change("/x", C),
        Change("/x/c1", A),
        Change("/x/sub", A),
        Change("/x/sub/c2", A),
    ]


def test_deleted_dir_is_one_entry(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "d" / "e" / "f")
    new.mkdir()
    assert changes_dirs(new, old) == [Change("/d", D)]


def test_symlinks_not_followed(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "real" / "f")
    (old / "link").symlink_to("real")
    _copy(old, new)
    _write(new / "real" / "f", "longer content")  # change behind the link
    got = changes_dirs(new, old)
    assert Change("/link", C) not in got
    assert Change("/real/f", C) in got


def test_same_second_with_zero_nanoseconds_is_equal(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "f", "abc")
    _write(new / "f", "abc")
    os.utime(old / "f", ns=(0, 100 * 10**9 + 123_456_789))
    os.utime(new / "f", ns=(0, 100 * 10**9))  # what a tar round trip leaves
    assert changes_dirs(new, old) == []
    os.utime(new / "f", ns=(0, 100 * 10**9 + 1))  # both sub-second and different
    assert changes_dirs(new, old) == [Change("/f", C)]
    os.utime(new / "f", ns=(0, 101 * 10**9))
    assert changes_dirs(new, old) == [Change("/f", C)]


def test_stat_different_ignores_dir_size_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(200):
        (tmp_path / "b" / f"f{i}").touch()
    os.utime(tmp_path / "a", (1, 1))
    assert not stat_different(os.lstat(tmp_path / "a"), os.lstat(tmp_path / "b"))


@pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mknod, security.* xattrs)")
def test_owner_rdev_and_capability(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "owned")
    _write(old / "capped")
    (old / "d").mkdir()
    os.mknod(old / "dev", 0o600 | 0o020000, os.makedev(1, 3))
    _copy(old, new)
    os.chown(new / "owned", 1000, 1000)
    os.chown(new / "d", 0, 5)  # a directory's group counts
    os.unlink(new / "dev")
    os.mknod(new / "dev", 0o600 | 0o020000, os.makedev(1, 5))
    os.utime(new / "dev", ns=(0, os.lstat(old / "dev").st_mtime_ns))
    # a VFS_CAP_REVISION_2 blob: CAP_NET_RAW permitted+effective
    cap = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)
    os.setxattr(new / "capped", "security.capability", cap)
    assert changes_dirs(new, old) == [
        Change("/capped", C),
        Change("/d", C),
        Change("/dev", C),
        Change("/owned", C),
    ]


def test_same_inode_on_same_device_is_skipped(tmp_path: Path) -> None:
    """changes_linux.go: a name with the same inode in both trees is not even collected."""
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "shared", "a")
    new.mkdir()
    os.link(old / "shared", new / "shared")
    os.chmod(new / "shared", 0o600)  # changes both names: one inode
    assert changes_dirs(new, old) == []


def test_sorted_by_bytes(tmp_path: Path) -> None:
    new = tmp_path / "new"
    for n in ("b", "a.b", "a", "A", "ä", "a-"):
        _write(new / n)
    got = [c.path for c in changes_dirs(new, None)]
    assert got == sorted(got, key=os.fsencode)


def test_missing_dir_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        changes_dirs(tmp_path / "nope", None)


def test_changes_size_counts_hardlinks_once(tmp_path: Path) -> None:
    """moby TestChangesSize / TestChangesSizeWithHardlinks."""
    root = tmp_path / "root"
    _write(root / "file1", "x" * 10)
    _write(root / "file2", "y" * 20)
    os.link(root / "file2", root / "link2")
    (root / "dir").mkdir()
    changes = [
        Change("/file1", A),
        Change("/file2", C),
        Change("/link2", A),
        Change("/dir", A),
        Change("/gone", D),
        Change("/vanished", A),
    ]
    assert changes_size(root, changes) == 30
    assert changes_size(root, changes_dirs(root, None)) == 30


# --------------------------------------------------------------------------------------------
# overlay_changes == changes_dirs(merged, lower_merged), on real overlay mounts
# --------------------------------------------------------------------------------------------

import random  # noqa: E402
import stat  # noqa: E402

from graphdriver.archive.changes import overlay_changes  # noqa: E402
from graphdriver.archive.whiteout import (  # noqa: E402
    OVERLAY,
    OVERLAY_USERXATTR,
    WhiteoutFormat,
)

_NAMES = ("a", "b", "c")
_MTIMES = (1000 * 10**9, 1000 * 10**9 + 500_000_000, 2000 * 10**9)


def _overlay_supported() -> bool:
    if not IS_ROOT:
        return False
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


needs_overlay = pytest.mark.skipif(
    not _overlay_supported(), reason="needs root and overlayfs (0/0 devices, trusted.* xattrs)"
)


def _fill(d: Path, rng: random.Random, depth: int, wf: WhiteoutFormat) -> None:
    for name in _NAMES:
        p = d / name
        r = rng.random()
        if r < 0.25:
            continue
        if r < 0.5:
            p.write_bytes(b"x" * rng.choice((0, 1, 2)))
            os.chmod(p, rng.choice((0o644, 0o600)))
            if rng.random() < 0.1:
                os.chown(p, 1, 1)
            os.utime(p, ns=(0, rng.choice(_MTIMES)))
        elif r < 0.6:
            os.symlink(rng.choice(("x", "yy")), p)
            os.utime(p, ns=(0, rng.choice(_MTIMES)), follow_symlinks=False)
        elif r < 0.72:
            os.mknod(p, 0o600 | stat.S_IFCHR, 0)  # overlay whiteout
        else:
            p.mkdir()
            os.chmod(p, rng.choice((0o755, 0o700)))
            if rng.random() < 0.2:
                assert wf.opaque_xattr is not None
                os.setxattr(p, wf.opaque_xattr, b"y")
            if depth < 3:
                _fill(p, rng, depth + 1, wf)
            os.utime(p, ns=(0, rng.choice(_MTIMES)))


def _mount(target: Path, options: str) -> None:
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
        check=True,
        capture_output=True,
    )


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=False, capture_output=True)


_FORMAT_SEEDS = [(OVERLAY, seed) for seed in range(60)] + [
    (OVERLAY_USERXATTR, seed) for seed in range(20)]  # userxattr: user.overlay.* on tmpfs


@needs_overlay
@pytest.mark.parametrize(("wf", "seed"), _FORMAT_SEEDS, ids=[f"{w.name}-{s}" for w, s in
                                                           _FORMAT_SEEDS])
def test_overlay_changes_equal_changes_of_mounted_views(wf: WhiteoutFormat, seed: int) -> None:
    rng = random.Random(seed)
    extra = ",userxattr" if wf is OVERLAY_USERXATTR else ""
    base = Path("/dev/shm") / f"gd-ovl-changes-{os.getpid()}-{seed}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    merged, lower_merged = base / "merged", base / "lower_merged"
    mounted: list[Path] = []
    try:
        nlowers = rng.randint(1, 3)
        lowers = [base / f"l{i}" for i in range(nlowers)]  # nearest first
        for layer in (*reversed(lowers), base / "upper"):
            layer.mkdir()
            _fill(layer, rng, 1, wf)
        empty, work = base / "empty", base / "work"
        for p in (empty, work, merged, lower_merged):
            p.mkdir()
        want_from_upper = overlay_changes(base / "upper", lowers, wf)
        lowerdir = ":".join(str(p) for p in lowers)
        _mount(merged, f"lowerdir={lowerdir},upperdir={base / 'upper'},workdir={work}{extra}")
        mounted.append(merged)
        _mount(lower_merged, f"lowerdir={lowerdir}:{empty}{extra}")
        mounted.append(lower_merged)
        expected = changes_dirs(merged, lower_merged)
        assert want_from_upper == expected
        assert overlay_changes(base / "upper", [str(p) for p in lowers], wf) == expected
    finally:
        for m in reversed(mounted):
            _umount(m)
        shutil.rmtree(base, ignore_errors=True)


@needs_overlay
def test_overlay_whiteout_without_lower_is_not_a_change(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    _write(lower / "kept")
    upper.mkdir()
    os.mknod(upper / "kept", 0o600 | stat.S_IFCHR, 0)
    os.mknod(upper / "never", 0o600 | stat.S_IFCHR, 0)
    assert overlay_changes(upper, [lower]) == [Change("/kept", D)]


@needs_overlay
@pytest.mark.parametrize("wf", [OVERLAY, OVERLAY_USERXATTR], ids=lambda w: w.name)
def test_overlay_opaque_dir_deletes_lower_children(tmp_path: Path, wf: WhiteoutFormat) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    _write(lower / "d" / "old1")
    _write(lower / "d" / "old2")
    _write(lower / "d" / "same", "s")
    shutil.copytree(lower, upper, copy_function=shutil.copy2)
    os.unlink(upper / "d" / "old1")
    os.unlink(upper / "d" / "old2")
    os.utime(upper / "d", ns=(0, os.lstat(lower / "d").st_mtime_ns))
    assert wf.opaque_xattr is not None
    os.setxattr(upper / "d", wf.opaque_xattr, b"y")
    other = OVERLAY_USERXATTR if wf is OVERLAY else OVERLAY  # the other namespace: not opaque
    assert overlay_changes(upper, [lower], other) == []  # the lower files still show
    assert overlay_changes(upper, [lower], wf) == [
        Change("/d", C),
        Change("/d/old1", D),
        Change("/d/old2", D),
    ]


def test_changes_size_counts_symlink_length_as_moby(tmp_path: Path) -> None:
    """moby's ChangesSize sums Lstat sizes of every non-directory: a symlink counts its target."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "sh3").symlink_to("/bin/sh")
    os.mkfifo(root / "fifo")
    assert changes_size(root, changes_dirs(root, None)) == len("/bin/sh")


def _deep(root: Path, depth: int, content: str) -> None:
    """root/d/d/.../d/f, built through directory fds (the path is longer than PATH_MAX)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, content.encode())
        os.close(f)
    finally:
        os.close(fd)


def test_deep_trees_do_not_hit_the_recursion_limit(tmp_path: Path) -> None:
    import sys

    depth = sys.getrecursionlimit() + 300
    old, new = tmp_path / "old", tmp_path / "new"
    _deep(new, depth, "x")
    got = changes_dirs(new, None)
    assert len(got) == depth + 1 and got[-1] == Change("/d" * depth + "/f", A)
    _deep(old, depth, "longer")
    got = changes_dirs(new, old)
    assert len(got) == depth + 1 and all(c.kind == C for c in got)
    lower = tmp_path / "lower"
    lower.mkdir()
    assert overlay_changes(new, [lower]) == changes_dirs(new, None)
    subprocess.run(["rm", "-rf", str(tmp_path / "old"), str(tmp_path / "new")], check=True)


def test_tree_size_one_fd_at_any_width_and_depth(tmp_path: Path) -> None:
    """moby's directory.Size: every non-directory once (a hard-linked inode once), walked with
    one directory fd open whatever the tree's width or depth (the soft limit of open files is
    lowered below the number of directories for the walk)."""
    import resource

    root = tmp_path / "t"
    deep = root.joinpath(*["d"] * 200)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"12345")
    os.link(deep / "f", root / "link")
    for i in range(100):
        (root / f"w{i}").mkdir()
    (root / "w7" / "g").write_bytes(b"123")
    (root / "s").symlink_to("ab")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        size = tree_size(root)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert size == 5 + 3 + 2
