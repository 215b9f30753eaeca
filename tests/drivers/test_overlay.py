"""The overlay driver: overlay2's layout, real mounts, native vs naive changes, repair.

Every layer here is built the way Docker builds them: files written into a base layer's ``diff``
and then through the real merged overlay mount of each writable child, so the upper directories
hold what the kernel itself made (copy-ups, 0/0 whiteouts, opaque directories).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IS_ROOT
from tests.mountutil import is_mountpoint, mount_points_under, umount

from graphdriver import InUse, InvalidArgument, open_driver
from graphdriver.store import LayerStore

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="overlay mounts need root")

Op = Callable[[Path], None]


@pytest.fixture
def ov(store_root: Path, runroot: Path, mount_cleanup: Callable[[Path], None]) -> Iterator[Any]:
    from graphdriver import NotSupported

    mount_cleanup(store_root)
    try:
        d = open_driver("overlay", store_root, runroot=runroot)
    except NotSupported as exc:
        pytest.skip(f"overlay is not supported here: {exc}")
    try:
        yield d
    finally:
        d.cleanup()


# ---- building layers ----------------------------------------------------------------------


def w(rel: str, data: bytes = b"x", mode: int = 0o644) -> Op:
    def op(root: Path) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
    return op


def mkdir(rel: str, mode: int = 0o755) -> Op:
    def op(root: Path) -> None:
        (root / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(root / rel, mode)
    return op


def rm(rel: str) -> Op:
    def op(root: Path) -> None:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return op


def chmod(rel: str, mode: int) -> Op:
    return lambda root: os.chmod(root / rel, mode)


def chown(rel: str, uid: int, gid: int) -> Op:
    return lambda root: os.chown(root / rel, uid, gid, follow_symlinks=False)


def touch(rel: str, mtime: int) -> Op:
    return lambda root: os.utime(root / rel, (mtime, mtime), follow_symlinks=False)


def link(rel: str, target: str) -> Op:
    return lambda root: os.link(root / target, root / rel)


def symlink(rel: str, target: str) -> Op:
    return lambda root: os.symlink(target, root / rel)


def setcap(rel: str, value: bytes) -> Op:
    return lambda root: os.setxattr(root / rel, "security.capability", value)


def mkfifo(rel: str) -> Op:
    return lambda root: os.mkfifo(root / rel)


def append(rel: str, data: bytes) -> Op:
    def op(root: Path) -> None:
        with open(root / rel, "ab") as f:
            f.write(data)
    return op


def rename(a: str, b: str) -> Op:
    return lambda root: os.rename(root / a, root / b)


def move(a: str, b: str) -> Op:
    """mv: rename, or copy and delete when overlay says EXDEV (a lower dir, redirect_dir=off)."""
    return lambda root: shutil.move(root / a, root / b)


CAP_V2 = (b"\x01\x00\x00\x02" + b"\x00\x20\x00\x00" + b"\x00\x00\x00\x00" * 3)
CAP_V2_OTHER = (b"\x01\x00\x00\x02" + b"\x00\x10\x00\x00" + b"\x00\x00\x00\x00" * 3)

BASE: list[Op] = [
    mkdir("etc"), w("etc/hostname", b"base\n"), w("etc/passwd", b"root:x:0:0\n"),
    mkdir("bin"), w("bin/sh", b"\x7fELF" + b"s" * 4000, 0o755), link("bin/sh2", "bin/sh"),
    symlink("bin/sh3", "/bin/sh"),
    mkdir("a/b/c"), w("a/b/c/deep", b"deep"), w("a/b/keep", b"keep"),
    mkdir("gone"), w("gone/x", b"x"), mkdir("gone/sub"), w("gone/sub/y", b"y"),
    mkdir("opq"), w("opq/old1", b"1"), w("opq/old2", b"2"),
    mkdir("d2f"), w("d2f/inner", b"i"), w("f2d", b"file"),
    w("caps", b"cap"), w("mode", b"m"), mkdir("dmode"), w("owner", b"o"),
    w("mtime", b"t"), touch("mtime", 1_600_000_000),
    mkdir("var/lib"), w("var/lib/db", b"db" * 100),
]

#: name -> (ops in the middle layer, ops in the top layer)
SCENARIOS: dict[str, tuple[list[Op], list[Op]]] = {
    "add": ([w("new", b"n"), mkdir("newdir/sub"), w("newdir/sub/f")],
            [w("etc/added", b"a"), w("newdir/sub/g")]),
    "modify": ([w("etc/hostname", b"mid\n")], [append("etc/passwd", b"u:x:1:1\n")]),
    "delete-file": ([rm("etc/passwd")], [rm("bin/sh3")]),
    "delete-dir": ([rm("gone")], [rm("a/b/c")]),
    "delete-then-readd": ([rm("etc/hostname")], [w("etc/hostname", b"again")]),
    "opaque": ([rm("opq"), mkdir("opq"), w("opq/fresh", b"f")], [w("opq/fresh2")]),
    "opaque-nested": ([rm("a"), mkdir("a/b"), w("a/b/new")], [rm("a/b/new")]),
    "dir-to-file": ([rm("d2f"), w("d2f", b"now a file")], [rm("d2f"), mkdir("d2f")]),
    "file-to-dir": ([rm("f2d"), mkdir("f2d"), w("f2d/inside")], [rm("f2d"), w("f2d", b"f")]),
    "nested-modify": ([w("a/b/c/deep", b"changed")], [w("a/b/c/deeper", b"x")]),
    "hardlinks": ([link("bin/sh4", "bin/sh"), w("h1", b"h"), link("h2", "h1")],
                  [append("bin/sh2", b"more"), link("h3", "h1")]),
    "chmod-only": ([chmod("mode", 0o600), chmod("dmode", 0o700)], [chmod("etc", 0o750)]),
    "chown-only": ([chown("owner", 1000, 1000)], [chown("var/lib", 5, 5)]),
    "mtime-only": ([touch("mtime", 1_700_000_000)], [touch("etc/hostname", 1_500_000_000)]),
    "capability": ([setcap("caps", CAP_V2)], [setcap("caps", CAP_V2_OTHER)]),
    "symlinks": ([rm("bin/sh3"), symlink("bin/sh3", "sh2")], [symlink("link2", "a/b")]),
    "fifo": ([mkfifo("fifo")], [rm("fifo")]),
    "rename-file": ([rename("etc/hostname", "etc/hn")], [rename("var/lib/db", "db")]),
    "rename-dir": ([move("a/b", "a/moved"), mkdir("up/x"), move("up", "up2")],
                   [move("etc", "etc2"), move("a/moved/c", "c")]),
    "delete-added": ([w("tmpfile"), mkdir("tmpdir/x")], [rm("tmpfile"), rm("tmpdir")]),
    "noop": ([], []),
    "many": ([w(f"many/{i:03d}", b"%d" % i) for i in range(50)] + [rm("etc/passwd")],
             [rm(f"many/{i:03d}") for i in range(0, 50, 3)] + [w("many/050")]),
}


def build(ov: Any, mid_ops: list[Op], top_ops: list[Op]) -> None:
    """base (written into diff) <- mid (rw, through the mount) <- top (rw, through the mount)."""
    ov.create("base")
    with ov.mounted("base") as root:
        for op in BASE:
            op(root)
    ov.create_rw("mid", "base")
    with ov.mounted("mid") as root:
        for op in mid_ops:
            op(root)
    ov.create_rw("top", "mid")
    with ov.mounted("top") as root:
        for op in top_ops:
            op(root)


def naive_changes(ov: Any, layer_id: str, parent: str) -> list[Any]:
    """The base class's comparison of the two mounted trees (moby's ChangesDirs)."""
    return LayerStore.changes(ov, layer_id, parent)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_native_changes_equal_naive(ov: Any, name: str) -> None:
    mid_ops, top_ops = SCENARIOS[name]
    build(ov, mid_ops, top_ops)
    for layer, parent in (("mid", "base"), ("top", "mid")):
        native = ov.changes(layer)
        naive = naive_changes(ov, layer, parent)
        assert [str(c) for c in native] == [str(c) for c in naive], (layer, name)
    # And against a non-parent the naive comparison is what answers.
    assert ov.changes("top", "base") == naive_changes(ov, "top", "base")


def test_native_changes_seen(ov: Any) -> None:
    """A sanity check that the scenarios produce the expected kinds (not just equal lists)."""
    build(ov, SCENARIOS["opaque"][0] + [rm("etc/passwd"), w("etc/hostname", b"m")], [])
    got = {str(c) for c in ov.changes("mid")}
    assert {"D /etc/passwd", "C /etc/hostname", "C /etc", "D /opq/old1", "D /opq/old2",
            "A /opq/fresh", "C /opq"} <= got


def test_native_diff_size(ov: Any) -> None:
    build(ov, [w("new", b"n" * 1000), w("etc/hostname", b"m" * 10), link("new2", "new")], [])
    assert ov.diff_size("mid") == 1010
    assert ov.diff_size("base") > 4004  # bin/sh and its hard link count once


# ---- layout ------------------------------------------------------------------------------


def test_layout_is_overlay2(ov: Any) -> None:
    ov.create("base")
    ov.create("mid", "base")
    ov.create_rw("top", "mid")
    home = ov.home
    for lid in ("base", "mid", "top"):
        d = home / lid
        short = (d / "link").read_text()
        assert re.fullmatch("[A-Z2-7]{26}", short), short
        assert os.readlink(home / "l" / short) == f"../{lid}/diff"
        assert (d / "diff").is_dir()
    assert not (home / "base" / "lower").exists()
    base_short = (home / "base" / "link").read_text()
    mid_short = (home / "mid" / "link").read_text()
    assert (home / "mid" / "lower").read_text() == f"l/{base_short}"
    assert (home / "top" / "lower").read_text() == f"l/{mid_short}:l/{base_short}"
    for sub in ("work", "merged"):
        assert (home / "top" / sub).is_dir()
    assert (home / "base" / "committed").exists() and (home / "mid" / "committed").exists()
    assert not (home / "top" / "committed").exists()
    assert ov._disk_ids() == {"base", "mid", "top"}
    meta = ov.metadata("top")
    assert meta["UpperDir"] == str(home / "top" / "diff")
    assert meta["WorkDir"] == str(home / "top" / "work")
    assert meta["MergedDir"] == str(home / "top" / "merged")
    assert meta["LowerDir"] == f"{home}/mid/diff:{home}/base/diff"
    assert ov.metadata("base") == {"UpperDir": str(home / "base" / "diff")}
    status = dict(ov.status())
    assert status["Supports d_type"] == "true" and status["Native Overlay Diff"] == "true"
    assert status["Backing Filesystem"] and status["Layers"] == "3"


def test_get_base_is_diff_child_is_mount(ov: Any) -> None:
    ov.create("base")
    assert ov.get("base") == ov.home / "base" / "diff"
    (ov.home / "base" / "diff" / "f").write_bytes(b"base")
    ov.put("base")
    ov.create_rw("rw", "base")
    root = ov.get("rw")
    try:
        assert root == ov.home / "rw" / "merged" and is_mountpoint(root)
        assert (root / "f").read_bytes() == b"base"
        (root / "g").write_bytes(b"rw")
        assert (ov.home / "rw" / "diff" / "g").read_bytes() == b"rw"
        assert ov.get("rw") == root  # a second get reuses the mount
        ov.put("rw")
        assert is_mountpoint(root)
    finally:
        ov.put("rw")
    assert not is_mountpoint(ov.home / "rw" / "merged")


def test_committed_layer_mounts_read_only(ov: Any) -> None:
    ov.create("base")
    ov.create("img", "base")
    with ov.mounted("img") as root:
        (root / "built").write_bytes(b"docker build writes here")  # writable until a child
    ov.create("child", "img")
    with ov.mounted("img") as root:
        assert (root / "built").read_bytes() == b"docker build writes here"
        with pytest.raises(OSError) as info:
            (root / "more").write_bytes(b"no")
        assert info.value.errno == errno.EROFS
    with ov.mounted("child") as root:
        assert (root / "built").exists()


def test_depth_limit(ov: Any) -> None:
    ov.create("l0")
    for i in range(1, 129):
        ov.create(f"l{i}", f"l{i - 1}")
    with ov.mounted("l128") as root:
        assert root.is_dir()
    with pytest.raises(InvalidArgument, match="max 128"):
        ov.create("l129", "l128")
    assert not ov.exists("l129")
    assert not (ov.home / "l129").exists()


def test_remove_drops_dir_and_link(ov: Any) -> None:
    ov.create("base")
    ov.create_rw("c", "base")
    short = (ov.home / "c" / "link").read_text()
    with ov.mounted("c"), pytest.raises(InUse):
        ov.remove("c")
    ov.remove("c")
    assert not (ov.home / "c").exists()
    assert not os.path.lexists(ov.home / "l" / short)
    assert not list(ov.home.glob("*-removing"))


def test_repair_never_follows_a_mount_into_a_lower(ov: Any, store_root: Path,
                                                    runroot: Path) -> None:
    ov.create("base")
    (ov.home / "base" / "diff" / "precious").write_bytes(b"keep me")
    ov.create_rw("c", "base")
    root = ov.get("c")
    assert (root / "precious").exists()
    # A crash before the record of "c" was written: its directory is there, mounted.
    shutil.rmtree(ov.home / "meta" / "c")
    reopened = open_driver("overlay", store_root, runroot=runroot)
    assert not (reopened.home / "c").exists()
    assert (ov.home / "base" / "diff" / "precious").read_bytes() == b"keep me"
    assert not mount_points_under(ov.home)


def test_reconcile_after_lost_mount(ov: Any, store_root: Path, runroot: Path) -> None:
    ov.create("base")
    ov.create("c", "base")
    ov.get("c")
    umount(ov.home / "c" / "merged")  # as a reboot would
    reopened = open_driver("overlay", store_root, runroot=runroot)
    assert reopened.mount_count("c") == 0
    with reopened.mounted("c") as root:
        assert is_mountpoint(root)


def test_mount_in_one_process_unmount_in_another(ov: Any, store_root: Path,
                                                 runroot: Path) -> None:
    ov.create("base")
    ov.create("c", "base")
    code = (
        "import sys; from graphdriver import open_driver; "
        f"d = open_driver('overlay', {str(store_root)!r}, runroot={str(runroot)!r}); "
        "getattr(d, sys.argv[1])('c')"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code, "get"], check=True, env=env)
    assert is_mountpoint(ov.home / "c" / "merged") and ov.mount_count("c") == 1
    subprocess.run([sys.executable, "-c", code, "put"], check=True, env=env)
    assert not is_mountpoint(ov.home / "c" / "merged") and ov.mount_count("c") == 0


def test_cleanup_unmounts_everything(ov: Any) -> None:
    ov.create("base")
    ov.create("a", "base")
    ov.create_rw("b", "a")
    ov.get("a")
    ov.get("b")
    ov.get("b")
    ov.cleanup()
    assert not mount_points_under(ov.home)
    assert ov.mount_count("b") == 0


def test_legacy_mount_relative_lowers(ov: Any) -> None:
    """The mount(2) fallback (a child that chdirs to the home) mounts the same tree."""
    from graphdriver import mount as m

    ov.create("l0")
    (ov.home / "l0" / "diff" / "bottom").write_bytes(b"0")
    for i in range(1, 128):
        ov.create(f"l{i}", f"l{i - 1}")
    ov.create_rw("top", "l127")  # 128 lowers: the deepest chain allowed
    saved = m._Probe.lowerdir_plus
    m._Probe.lowerdir_plus = False
    try:
        with ov.mounted("top") as root:
            assert (root / "bottom").read_bytes() == b"0"
            mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
            opts = next(line for line in mountinfo if str(root) in line)
            assert "lowerdir=l/" in opts
    finally:
        m._Probe.lowerdir_plus = saved
    text = m.legacy_option_string(m.OverlayOptions(
        lowers=[], relative_lowers=[f"l/{'A' * 26}"] * 128, upper="/" + "u" * 90,
        work="/" + "w" * 90, extra=["index=off"]))
    assert len(text) < 4096


def test_not_supported_on_overlay(tmp_path: Path, runroot: Path) -> None:
    """A home that is itself on overlayfs is refused with the reason."""
    from graphdriver import NotSupported
    from graphdriver.mount import OverlayOptions, mount_overlay, unmount

    for sub in ("lo1", "lo2", "up", "wk", "mnt"):
        (tmp_path / sub).mkdir()
    mount_overlay(tmp_path / "mnt", OverlayOptions(
        lowers=[str(tmp_path / "lo1"), str(tmp_path / "lo2")], upper=str(tmp_path / "up"),
        work=str(tmp_path / "wk")))
    try:
        with pytest.raises(NotSupported, match="overlay"):
            open_driver("overlay", tmp_path / "mnt" / "root", runroot=runroot)
    finally:
        unmount(tmp_path / "mnt")


def test_mode_of_whiteout_is_overlay(ov: Any) -> None:
    build(ov, [rm("etc/passwd"), rm("opq"), mkdir("opq")], [])
    st = os.lstat(ov.home / "mid" / "diff" / "etc" / "passwd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(ov.home / "mid" / "diff" / "opq", "trusted.overlay.opaque") == b"y"


# ---- mount.py ----------------------------------------------------------------------------


def test_mount_api_errors_and_unmount_of_non_mount(tmp_path: Path) -> None:
    from graphdriver.mount import OverlayOptions, is_mounted, mount_overlay, unmount

    (tmp_path / "m").mkdir()
    with pytest.raises(OSError) as info:
        mount_overlay(tmp_path / "m", OverlayOptions(lowers=[str(tmp_path / "missing"),
                                                             str(tmp_path / "m")]))
    assert info.value.errno == errno.ENOENT and "missing" in str(info.value)
    assert not is_mounted(tmp_path / "m")
    unmount(tmp_path / "m")  # not mounted: fine
    unmount(tmp_path / "nowhere")


def test_mount_point_with_space_and_unmount_all_under(tmp_path: Path) -> None:
    from graphdriver.mount import OverlayOptions, is_mounted, mount_overlay, unmount_all_under

    top = tmp_path / "a dir"
    for sub in ("l1", "l2", "m 1", "m 1/inner"):
        (top / sub).mkdir(parents=True)
    (top / "l1" / "inner").mkdir()
    opts = OverlayOptions(lowers=[str(top / "l1"), str(top / "l2")], readonly=True)
    mount_overlay(top / "m 1", opts)
    mount_overlay(top / "m 1" / "inner", opts)
    assert is_mounted(top / "m 1") and is_mounted(top / "m 1" / "inner")
    unmount_all_under(top, include_self=False)
    assert not is_mounted(top / "m 1") and not is_mounted(top / "m 1" / "inner")


def test_mount_table_read_once_for_several_paths(tmp_path: Path) -> None:
    """unmount_all_under(*paths) and is_mounted answer from mountinfo's escaped spelling
    (backslash, tab, space) without a parse when a path is absent; a sibling that only shares
    a name prefix ("m" / "m2") is not beneath."""
    from graphdriver.mount import OverlayOptions, is_mounted, mount_overlay, unmount_all_under

    top = tmp_path / "back\\slash\ttab"
    for sub in ("l1", "l2", "m", "m2", "n x"):
        (top / sub).mkdir(parents=True)
    opts = OverlayOptions(lowers=[str(top / "l1"), str(top / "l2")], readonly=True)
    try:
        for sub in ("m", "m2", "n x"):
            mount_overlay(top / sub, opts)
        assert all(is_mounted(top / sub) for sub in ("m", "m2", "n x"))
        assert not is_mounted(top) and not is_mounted(top / "l1")
        unmount_all_under(top / "m", top / "n x", tmp_path / "nothing here")
        assert not is_mounted(top / "m") and not is_mounted(top / "n x")
        assert is_mounted(top / "m2")
        unmount_all_under()  # no path: nothing read, nothing done
        assert is_mounted(top / "m2")
    finally:
        unmount_all_under(tmp_path, include_self=False)
    assert not is_mounted(top / "m2")


def test_home_reached_through_a_symlink(tmp_path: Path, runroot: Path,
                                        mount_cleanup: Callable[[Path], None]) -> None:
    mount_cleanup(tmp_path)
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "alias")
    d = open_driver("overlay", tmp_path / "alias", runroot=runroot)
    try:
        d.create("base")
        d.create("c", "base")
        root = d.get("c")
        assert d.get("c") == root
        assert len([mp for mp in mount_points_under(tmp_path) if mp.endswith("/c/merged")]) == 1
        d.put("c")
        d.put("c")
        assert not mount_points_under(tmp_path)
    finally:
        d.cleanup()


def _random_ops(rng: Any, root: Path) -> None:
    """Random edits through a mounted layer: adds, rewrites, deletes, chmods, dir<->file."""
    names = ["a", "b", "c", "d"]
    for _ in range(rng.randint(5, 25)):
        rel = "/".join(rng.choice(names) for _ in range(rng.randint(1, 3)))
        p = root / rel
        action = rng.choice(["write", "mkdir", "rm", "chmod", "touch", "link", "symlink"])
        try:
            if action == "write":
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(rng.randbytes(rng.randint(0, 64)))
            elif action == "mkdir":
                p.mkdir(parents=True, exist_ok=True)
            elif action == "rm":
                rm(rel)(root)
            elif action == "chmod":
                os.chmod(p, rng.choice([0o600, 0o644, 0o755, 0o700]))
            elif action == "touch":
                t = rng.randint(1_000_000_000, 1_700_000_000)
                os.utime(p, (t, t), follow_symlinks=False)
            elif action == "link":
                other = root / rng.choice(names)
                if other.is_file() and not other.is_symlink():
                    os.link(other, p)
            else:
                os.symlink(rng.choice(names), p)
        except OSError:
            pass  # a path the random walk made impossible (ENOENT, EEXIST, ELOOP, ...)


@pytest.mark.parametrize("seed", range(30))
def test_native_changes_equal_naive_random(ov: Any, seed: int) -> None:
    import random

    rng = random.Random(seed)
    ov.create("l0")
    _random_ops(rng, ov.get("l0"))
    ov.put("l0")
    for i in range(1, 4):
        ov.create_rw(f"l{i}", f"l{i - 1}")
        with ov.mounted(f"l{i}") as root:
            _random_ops(rng, root)
    for i in range(1, 4):
        native = [str(c) for c in ov.changes(f"l{i}")]
        naive = [str(c) for c in naive_changes(ov, f"l{i}", f"l{i - 1}")]
        assert native == naive, (seed, i)


def _seconds(snap: dict[str, Any]) -> dict[str, Any]:
    """Layer tars keep whole-second mtimes (moby's rule): compare at that precision."""
    return {k: (*v[:4], v[4] // 10**9 if v[4] is not None else None, *v[5:])
            for k, v in snap.items()}


def _unlinked(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: v[:6] for k, v in snap.items()}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_native_and_naive_diffs_reapply_to_the_same_tree(
        ov: Any, name: str, tmp_path: Path, runroot: Path,
        mount_cleanup: Callable[[Path], None]) -> None:
    from tests.treeutil import diff_snapshots, snapshot

    mount_cleanup(tmp_path / "two")
    build(ov, *SCENARIOS[name])
    two = open_driver("overlay", tmp_path / "two", runroot=runroot)
    try:
        two.create("base")
        with ov.diff("base") as stream:
            two.apply_diff("base", None, stream)
        for layer, parent in (("mid", "base"), ("top", "mid")):
            two.create(layer, parent)
            with ov.diff(layer) as stream:  # native: the upper dir, whiteouts converted
                two.apply_diff(layer, None, stream)
            naive_tar = tmp_path / f"{layer}.naive.tar"
            with open(naive_tar, "wb") as f:
                LayerStore.write_diff(ov, f.fileno(), layer, parent)
            two.create(f"{layer}-naive", parent)
            with open(naive_tar, "rb") as f:
                two.apply_diff(f"{layer}-naive", None, f)
            with ov.mounted(layer) as a, two.mounted(layer) as b, \
                    two.mounted(f"{layer}-naive") as c:
                want = _seconds(snapshot(a))
                assert diff_snapshots(want, _seconds(snapshot(b))) == [], (name, layer, "native")
                # moby's naive diff lists changed names only, so it cannot carry a hard link
                # that overlay's copy-up split or joined; compare it without link groups.
                assert diff_snapshots(_unlinked(want), _unlinked(_seconds(snapshot(c)))) == [], \
                    (name, layer, "naive")
    finally:
        two.cleanup()


def test_kernel_ignores_opaque_on_a_layer_root(tmp_path: Path) -> None:
    """Why an opaque root is written as whiteouts (issue 15 rule 3): a raw overlay mount shows
    the lower layer's files although the layer above has ``trusted.overlay.opaque=y`` on its
    root."""
    from graphdriver.mount import OverlayOptions, mount_overlay, unmount

    for sub in ("low", "mid", "up", "work", "m"):
        (tmp_path / sub).mkdir()
    (tmp_path / "low" / "below").write_bytes(b"b")
    (tmp_path / "mid" / "above").write_bytes(b"a")
    os.setxattr(tmp_path / "mid", "trusted.overlay.opaque", b"y")
    try:
        mount_overlay(tmp_path / "m", OverlayOptions(
            lowers=[str(tmp_path / "mid"), str(tmp_path / "low")], upper=str(tmp_path / "up"),
            work=str(tmp_path / "work")))
    except OSError as exc:
        pytest.skip(f"overlay mount failed: {exc}")
    try:
        assert sorted(os.listdir(tmp_path / "m")) == ["above", "below"]
    finally:
        unmount(tmp_path / "m")
