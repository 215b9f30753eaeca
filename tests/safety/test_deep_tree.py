"""Nothing can brick a store: a 2000-level tree is copied, compared, exported and removed by
iterative, fd-based walkers (issue 12, third item; RecursionError before)."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import open_driver
from graphdriver.archive.apply import ApplyOptions, apply_tar
from graphdriver.archive.changes import Change, ChangeKind, changes_size
from graphdriver.fsutil import copy_tree, remove_tree
from tests.safety.safetyutil import cli, cli_argv, cli_env

DEPTH = 2000
COMMAND_SECONDS = 30  # a few seconds each here; generous for a loaded CI machine
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the drivers' stores)")


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """pytest's own removal of old temporary directories recurses: leave no deep tree to it."""
    yield
    from tests.mountutil import mount_points_under, umount

    for mp in sorted(mount_points_under(tmp_path), key=len, reverse=True):
        with contextlib.suppress(OSError):
            umount(Path(mp), detach=True)
    for entry in list(tmp_path.iterdir()):
        with contextlib.suppress(OSError):
            remove_tree(entry)


def make_deep(root: Path, depth: int = DEPTH) -> None:
    """``d/d/.../d/f``, *depth* directories deep, made by fd (no path is longer than a name)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", 0o755, dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"deep\n")
        os.link("f", "hard", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink("f", "link", dir_fd=fd)
        os.close(out)
    finally:
        os.close(fd)


def descend(root: Path, depth: int = DEPTH) -> int:
    """An fd of ``root/d/d/.../d``, *depth* levels down, opened one name at a time."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def deepest(root: Path, depth: int = DEPTH) -> os.stat_result:
    fd = descend(root, depth)
    try:
        assert os.readlink("link", dir_fd=fd) == "f"
        assert os.stat("hard", dir_fd=fd).st_ino == os.stat("f", dir_fd=fd).st_ino
        return os.stat("f", dir_fd=fd)
    finally:
        os.close(fd)


def test_copy_and_remove_a_deep_tree(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_deep(src)
    copy_tree(src, dst)
    assert deepest(dst).st_size == 5
    assert deepest(dst).st_nlink == 2
    remove_tree(dst)
    remove_tree(src)
    assert os.listdir(tmp_path) == []


def test_deep_layer_through_the_store(driver_name: str, tmp_path: Path) -> None:
    """create --parent, changes, diff and rm of a 2000-deep tree on each driver."""
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("deep")
    with d.mounted("deep") as top:
        make_deep(top)
    d.create("child", "deep")
    with d.mounted("child") as top:
        assert deepest(top).st_size == 5
    changes = d.changes("deep")
    assert len(changes) == DEPTH + 3
    with d.diff("deep") as stream:
        total = 0
        while chunk := stream.read(1 << 20):
            total += len(chunk)
    assert total > DEPTH * 512
    d.remove("child")
    d.remove("deep")
    assert d.layers() == []
    again = open_driver(driver_name, root, runroot=run)  # the store still opens
    assert again.layers() == []
    again.cleanup()


def write_deep_tar(path: Path, top: str, depth: int = DEPTH, *, then_refused: bool = False) -> None:
    """A layer tar of ``TOP/d/d/.../d/f`` (*depth* directories below TOP), parents listed first;
    *then_refused*: one more entry after it that every apply refuses (an absolute name)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        name = top
        tar.addfile(_dir_info(name))
        for _ in range(depth):
            name += "/d"
            tar.addfile(_dir_info(name))
        body = b"deep\n"
        info = tarfile.TarInfo(name + "/f")
        info.size, info.mode, info.mtime = len(body), 0o644, 1_600_000_000
        tar.addfile(info, io.BytesIO(body))
        if then_refused:
            info = tarfile.TarInfo("/etc/refused")
            info.size, info.mtime = 0, 1_600_000_000
            tar.addfile(info, io.BytesIO(b""))


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
    return info


def timed_cli(root: Path, run: Path, driver: str, *args: str, ok: bool = True) -> str:
    """The command, which must finish in a few seconds (150 s per deep apply before)."""
    started = time.monotonic()
    res = cli(root, run, driver, *args, timeout=120)
    took = time.monotonic() - started
    assert (res.returncode == 0) == ok, f"{' '.join(args)}: rc={res.returncode} {res.stderr}"
    assert took < COMMAND_SECONDS, f"{' '.join(args)} took {took:.1f} s at depth {DEPTH}"
    return res.stdout


def test_deep_layer_through_the_command(driver_name: str, tmp_path: Path) -> None:
    """apply, import, create --parent, diff, changes, diff-size, mount, rm of a 2000-level tar,
    and a refused apply at that depth that rolls back: each command in seconds, on each driver."""
    root, run = tmp_path / "store", tmp_path / "run"
    deep_tar, refused_tar = tmp_path / "deep.tar", tmp_path / "refused.tar"
    write_deep_tar(deep_tar, "t")
    write_deep_tar(refused_tar, "u", then_refused=True)
    timed_cli(root, run, driver_name, "create", "a")
    timed_cli(root, run, driver_name, "apply", "a", str(deep_tar))
    timed_cli(root, run, driver_name, "import", "b", str(deep_tar))
    timed_cli(root, run, driver_name, "create", "--parent", "a", "c")
    timed_cli(root, run, driver_name, "diff", "a", "-o", str(tmp_path / "a.tar"))
    for layer in ("a", "b"):
        listed = timed_cli(root, run, driver_name, "changes", layer).splitlines()
        assert len(listed) == DEPTH + 2 and listed[0] == "A /t", listed[:3]
        assert int(timed_cli(root, run, driver_name, "diff-size", layer)) == 5
    with tarfile.open(tmp_path / "a.tar") as exported:
        assert len(exported.getmembers()) == DEPTH + 2
    before = timed_cli(root, run, driver_name, "changes", "a")
    # refused at depth: onto a layer with content (the undo journal) and as a new layer
    timed_cli(root, run, driver_name, "apply", "a", str(refused_tar), ok=False)
    assert timed_cli(root, run, driver_name, "changes", "a") == before
    timed_cli(root, run, driver_name, "import", "r", str(refused_tar), ok=False)
    assert timed_cli(root, run, driver_name, "exists", "r", ok=False) == ""
    merged = Path(timed_cli(root, run, driver_name, "mount", "c").strip())
    assert deepest_file(merged / "t") == b"deep\n"
    timed_cli(root, run, driver_name, "unmount", "c")
    timed_cli(root, run, driver_name, "rm", "c", "a", "b")
    assert timed_cli(root, run, driver_name, "ls", "-q") == ""


def deepest_file(top: Path, depth: int = DEPTH) -> bytes:
    fd = descend(top, depth)
    try:
        out = os.open("f", os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(out, 100)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def test_changes_size_past_path_max(tmp_path: Path) -> None:
    """diff-size counts a file whose full path is longer than PATH_MAX (it was skipped)."""
    name, depth = "d" * 100, 50  # 5050 bytes of path
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"deep\n")
        os.close(out)
    finally:
        os.close(fd)
    deep = "/" + "/".join([name] * depth)
    listed = [Change(deep + "/f", ChangeKind.ADD), Change(deep, ChangeKind.ADD)]
    assert changes_size(tmp_path, listed) == 5


def test_apply_into_a_deep_tree_with_few_descriptors(tmp_path: Path) -> None:
    """A tar whose first entry lies 2000 directories down in an existing tree applies under a
    1024-descriptor limit (each directory on the way was held open before: EMFILE)."""
    deep_tar, into_tar, target = tmp_path / "deep.tar", tmp_path / "into.tar", tmp_path / "t"
    write_deep_tar(deep_tar, "t")
    with tarfile.open(into_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("t" + "/d" * DEPTH + "/g")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"new"))
    target.mkdir()
    with open(deep_tar, "rb") as src:
        apply_tar(src, target, ApplyOptions())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))
    try:
        with open(into_tar, "rb") as src:
            apply_tar(src, target, ApplyOptions())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    fd = descend(target / "t")
    try:
        assert os.stat("g", dir_fd=fd).st_size == 3
    finally:
        os.close(fd)
        remove_tree(target)  # pytest's own clean-up recurses


def _soft_fd_limit_1024() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


def test_deep_walks_under_the_usual_soft_fd_limit(driver_name: str, tmp_path: Path) -> None:
    """changes, diff and diff-size of a 2000-level layer with a soft limit of 1024 open files
    (a walk holds a directory fd per level, two when it compares: EMFILE before)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3 * DEPTH:
        pytest.skip(f"the hard limit of open files ({hard}) is below what the walk needs")
    root, run, deep_tar = tmp_path / "store", tmp_path / "run", tmp_path / "deep.tar"
    write_deep_tar(deep_tar, "t")
    timed_cli(root, run, driver_name, "import", "a", str(deep_tar))
    timed_cli(root, run, driver_name, "create", "--parent", "a", "c")
    outputs = {}
    for args in (("changes", "a"), ("changes", "c"), ("diff-size", "a"),
                 ("diff", "a", "-o", str(tmp_path / "a.tar"))):
        res = subprocess.run(cli_argv(root, run, driver_name, *args), capture_output=True,
                             text=True, env=cli_env(), timeout=120, check=False,
                             preexec_fn=_soft_fd_limit_1024)
        assert res.returncode == 0, f"{' '.join(args)}: {res.stderr}"
        outputs[args[0], args[1]] = res.stdout
    assert len(outputs["changes", "a"].splitlines()) == DEPTH + 2
    assert outputs["changes", "c"] == ""
    assert int(outputs["diff-size", "a"]) == 5
    with tarfile.open(tmp_path / "a.tar") as exported:
        assert len(exported.getmembers()) == DEPTH + 2
    timed_cli(root, run, driver_name, "rm", "c", "a")
