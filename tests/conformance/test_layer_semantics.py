"""The OCI layer changeset rules (image-spec layer.md), the same on every driver (issue 15).

Each test builds layers from tars and looks at the assembled tree through ``mounted``; none
depends on how a driver keeps whiteouts on disk.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from graphdriver import ChangeKind
from graphdriver.errors import GraphDriverError
from tests.conftest import IS_ROOT
from tests.treeutil import TarBuilder, diff_snapshots, snapshot

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the conformance suite runs as root")

T0 = 1_600_000_000


@pytest.fixture(autouse=True)
def _linux_layers(driver: Any) -> None:
    if driver.name == "windowsfilter":
        pytest.skip("windowsfilter: Windows layer tars (Files/, Hives/) follow their own rules")


def apply(d: Any, layer_id: str, parent: str | None, data: bytes) -> None:
    d.create(layer_id, parent)
    d.apply_diff(layer_id, None, io.BytesIO(data))


def listing(d: Any, layer_id: str) -> dict[str, Any]:
    """Every path of the assembled tree; each one lstat-able (no phantom readdir names)."""
    with d.mounted(layer_id) as root:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))  # FileNotFoundError: a phantom
                assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), name
        return snapshot(root)


def lower_tar() -> bytes:
    return (TarBuilder().dir("x").file("x/old", b"old").file("f", b"lower f")
            .dir("o").file("o/a", b"a").file("o/b", b"b").dir("keep").file("keep/k", b"k")
            .bytes())


# ---- rule 1: a whiteout hides only what lies below --------------------------------------------


@pytest.mark.parametrize("order", ["entry-first", "whiteout-first"])
def test_whiteout_keeps_the_layers_own_file(driver: Any, order: str) -> None:
    apply(driver, "base", None, lower_tar())
    t = TarBuilder()
    if order == "entry-first":
        t.file("f", b"mine").whiteout("f")
    else:
        t.whiteout("f").file("f", b"mine")
    apply(driver, "top", "base", t.bytes())
    with driver.mounted("top") as root:
        assert (root / "f").read_bytes() == b"mine"


@pytest.mark.parametrize("order", ["entry-first", "whiteout-first"])
def test_whiteout_keeps_own_dir_and_makes_it_opaque(driver: Any, order: str) -> None:
    apply(driver, "base", None, lower_tar())
    t = TarBuilder()
    if order == "entry-first":
        t.dir("x").file("x/new", b"n").whiteout("x")
    else:
        t.whiteout("x").dir("x").file("x/new", b"n")
    apply(driver, "top", "base", t.bytes())
    with driver.mounted("top") as root:
        assert sorted(os.listdir(root / "x")) == ["new"]
    # what the layer's diff says rebuilds the same tree
    with driver.diff("top") as s:
        data = s.read()
    apply(driver, "copy", "base", data)
    assert diff_snapshots(listing(driver, "top"), listing(driver, "copy")) == []


@pytest.mark.parametrize("order", ["entry-first", "whiteout-first"])
@pytest.mark.parametrize("depth", ["x", "x/sub"])
def test_whiteout_keeps_own_entries_under_an_implicit_dir(driver: Any, order: str,
                                                          depth: str) -> None:
    """The layer lists ``x/new`` (or ``x/sub/new``) but never ``x``: ``.wh.x`` still hides only
    the lower ``x/old``; the layer's own entry beneath stays, in either order."""
    lower = TarBuilder().dir("x").file("x/old", b"old").dir("x/sub").file("x/sub/old", b"o")
    apply(driver, "base", None, lower.bytes())
    t = TarBuilder()
    if order == "entry-first":
        t.file(f"{depth}/new", b"n").whiteout("x")
    else:
        t.whiteout("x").file(f"{depth}/new", b"n")
    apply(driver, "top", "base", t.bytes())
    tree = listing(driver, "top")
    names = sorted(p for p in tree if p.startswith("x"))
    expected = ["x", "x/new"] if depth == "x" else ["x", "x/sub", "x/sub/new"]
    assert names == expected
    with driver.diff("top") as s:
        data = s.read()
    apply(driver, "copy", "base", data)
    assert diff_snapshots(tree, listing(driver, "copy")) == []


def test_whiteout_in_a_base_layer_keeps_its_own_file(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder().file("x", b"mine").whiteout("x").bytes())
    with driver.mounted("base") as root:
        assert (root / "x").read_bytes() == b"mine"


# ---- rule 2: deleted and re-created in one layer ----------------------------------------------


def test_dir_deleted_and_recreated_hides_old_contents(driver: Any) -> None:
    apply(driver, "base", None, lower_tar())
    apply(driver, "top", "base", TarBuilder().whiteout("o").dir("o").file("o/c", b"c").bytes())
    with driver.mounted("top") as root:
        assert sorted(os.listdir(root / "o")) == ["c"]
    apply(driver, "child", "top", TarBuilder().file("o/d", b"d").bytes())
    with driver.mounted("child") as root:
        assert sorted(os.listdir(root / "o")) == ["c", "d"]


# ---- rule 3: an opaque marker at the layer's root ---------------------------------------------


def test_opaque_root_hides_everything_below(driver: Any) -> None:
    apply(driver, "base", None, lower_tar())
    apply(driver, "top", "base",
          TarBuilder().opaque(".").file("n", b"n").dir("keep").file("keep/new", b"k2").bytes())
    got = listing(driver, "top")
    assert sorted(got) == ["keep", "keep/new", "n"]
    apply(driver, "child", "top", TarBuilder().file("c", b"c").bytes())
    assert sorted(listing(driver, "child")) == ["c", "keep", "keep/new", "n"]
    assert {c.path for c in driver.changes("top") if c.kind == ChangeKind.DELETE} >= {
        "/f", "/o", "/x"}


# ---- rule 4: whiteouts with nothing to hide ---------------------------------------------------


def test_whiteouts_with_nothing_to_hide_leave_no_trace(driver: Any) -> None:
    apply(driver, "base", None,
          TarBuilder().whiteout("ghost").dir("d").whiteout("d/ghost2").file("d/f", b"f").bytes())
    assert sorted(listing(driver, "base")) == ["d", "d/f"]
    apply(driver, "top", "base",
          TarBuilder().whiteout("nothing").whiteout("new/nothing").file("g", b"g").bytes())
    assert sorted(listing(driver, "top")) == ["d", "d/f", "g"]


# ---- rule 5: implicit parents keep the lower directory ----------------------------------------


def test_implicit_parent_keeps_lower_metadata(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder()
          .dir("usr", mode=0o751, uid=3, gid=4, mtime=T0)
          .dir("usr/share", mode=0o750, uid=5, gid=6, mtime=T0 + 1, pax_headers={
              "SCHILY.xattr.user.note": "kept"})
          .dir("usr/share/doc", mode=0o2775, uid=7, gid=8, mtime=T0 + 2)
          .file("usr/share/doc/README", b"r").bytes())
    with driver.mounted("base") as root:
        before = snapshot(root, dir_mtimes=True)
    apply(driver, "top", "base", TarBuilder().file("usr/share/doc/pkg/copyright", b"c")
          .whiteout("usr/share/doc/README").bytes())
    with driver.mounted("top") as root:
        after = snapshot(root, dir_mtimes=True)
    for path in ("usr", "usr/share", "usr/share/doc"):
        assert after[path] == before[path], path


# ---- rule 6: an entry over an existing path replaces its attributes ---------------------------


def test_dir_entry_replaces_lower_xattrs(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder().dir("d", pax_headers={
        "SCHILY.xattr.user.old": "1"}).file("d/f", b"f").bytes())
    apply(driver, "top", "base", TarBuilder().dir("d", mode=0o700, uid=9, pax_headers={
        "SCHILY.xattr.user.new": "2"}).bytes())
    with driver.mounted("top") as root:
        assert os.listxattr(root / "d") == ["user.new"]
        st = os.lstat(root / "d")
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 9)
        assert (root / "d/f").read_bytes() == b"f"


# ---- rule 7: the layer root's own entry -------------------------------------------------------


def test_root_entry_applies_and_round_trips(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder().file("f", b"f").bytes())
    root_entry = TarBuilder().dir("./", mode=0o710, uid=11, gid=12, mtime=T0, pax_headers={
        "SCHILY.xattr.user.root": "r"}).file("g", b"g").bytes()
    apply(driver, "top", "base", root_entry)
    with driver.mounted("top") as root:
        st = os.lstat(root)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
            0o710, 11, 12, T0 * 1_000_000_000)
        assert os.getxattr(root, "user.root") == b"r"
        want = os.lstat(root), os.listxattr(root)
    with driver.diff("top") as s:
        data = s.read()
    apply(driver, "copy", "base", data)
    with driver.mounted("copy") as root:
        st = os.lstat(root)
        w = want[0]
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (
            w.st_mode, w.st_uid, w.st_gid, w.st_mtime_ns)
        assert os.listxattr(root) == want[1]


# ---- rule 8: changes see every changed file ---------------------------------------------------


def test_changes_see_a_same_size_same_mtime_rewrite(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder().file("f", b"aaaa").file("g", b"gggg").bytes())
    driver.create_rw("ctr", "base")
    with driver.mounted("ctr") as root:
        st = os.lstat(root / "f")
        (root / "f").write_bytes(b"bbbb")
        os.utime(root / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [(c.path, c.kind) for c in driver.changes("ctr")] == [("/f", ChangeKind.MODIFY)]
    with driver.diff("ctr") as s, tarfile.open(fileobj=s, mode="r|") as t:
        assert [m.name for m in t] == ["f"]


# ---- done when: a Dockerfile-style sequence, as GNU tar with the spec's rules would build it ---


def _gnu_tar_extract(layers: list[bytes], dest: Path, tmp: Path, gnu_tar: str) -> None:
    """Each layer in order: its whiteouts remove what the layers below left (spec), then GNU tar
    extracts the layer's own entries."""
    for i, data in enumerate(layers):
        path = tmp / f"layer{i}.tar"
        path.write_bytes(data)
        with tarfile.open(path) as t:
            names = [m.name.rstrip("/") for m in t]
        for name in names:
            head, _, base = name.rpartition("/")
            if base == ".wh..wh..opq" and (dest / head).is_dir():
                for child in (dest / head).iterdir():
                    subprocess.run(["rm", "-rf", str(child)], check=True)
            elif base.startswith(".wh.") and base != ".wh..wh..opq":
                subprocess.run(["rm", "-rf", str(dest / head / base[4:])], check=True)
        subprocess.run([gnu_tar, "--numeric-owner", "--xattrs", "--xattrs-include=*",
                        "--exclude=.wh.*", "-xpf", str(path), "-C", str(dest)], check=True)


def test_dockerfile_sequence_matches_gnu_tar(driver: Any, tmp_path: Path, gnu_tar: str) -> None:
    base = (TarBuilder().dir("o").file("o/old", b"old").dir("usr", mtime=T0)
            .dir("usr/share", mtime=T0).dir("usr/share/doc", mode=0o755, mtime=T0)
            .file("usr/share/doc/base", b"b").bytes())
    apply(driver, "base", None, base)
    # RUN rm -rf /o && mkdir /o, committed from a container
    driver.create_rw("ctr1", "base")
    with driver.mounted("ctr1") as root:
        subprocess.run(["rm", "-rf", str(root / "o")], check=True)
        (root / "o").mkdir()
        (root / "o" / "new").write_bytes(b"new")
        os.utime(root / "o" / "new", ns=(T0 * 10**9, T0 * 10**9))
    with driver.diff("ctr1") as s:
        rm_mkdir = s.read()
    # RUN apt-get install: files under the existing /usr/share/doc
    apt = TarBuilder().dir("usr/share/doc/pkg").file("usr/share/doc/pkg/copyright", b"c").bytes()
    # the same shape written by hand, as other builders emit it
    by_hand = TarBuilder().whiteout("o").dir("o").file("o/again", b"a").bytes()
    apply(driver, "l1", "base", rm_mkdir)
    apply(driver, "l2", "l1", apt)
    apply(driver, "l3", "l2", by_hand)
    ref = tmp_path / "ref"
    ref.mkdir()
    _gnu_tar_extract([base, rm_mkdir, apt, by_hand], ref, tmp_path, gnu_tar)
    assert diff_snapshots(snapshot(ref), listing(driver, "l3")) == []
    with driver.mounted("l3") as root:
        assert sorted(os.listdir(root / "o")) == ["again"]
        assert sorted(os.listdir(root / "usr/share/doc")) == ["base", "pkg"]


# ---- found by the differential tester (test_layer_differential.py) ----------------------------


def _refused(d: Any, layer_id: str, parent: str | None, data: bytes) -> str:
    """Apply a layer the rules refuse: one error, and the layer left as its parent was."""
    d.create(layer_id, parent)
    with pytest.raises(GraphDriverError) as info:
        d.apply_diff(layer_id, None, io.BytesIO(data))
    assert "\n" not in str(info.value)
    if parent is not None:
        assert diff_snapshots(listing(d, parent), listing(d, layer_id)) == []
    return str(info.value)


def test_whiteout_beneath_a_lower_file_hides_nothing(driver: Any) -> None:
    """``b/.wh.x`` over a lower file ``b``: nothing to hide, no trace; ``changes`` and ``diff``
    say only what the layer added (vfs's record replay listed ``/b/x``; overlay made a directory
    ``b`` over the lower file)."""
    apply(driver, "base", None, TarBuilder().file("b", b"b").bytes())
    apply(driver, "top", "base", TarBuilder().whiteout("b/x/p").file("c", b"c").bytes())
    assert sorted(listing(driver, "top")) == ["b", "c"]
    assert [(c.path, c.kind) for c in driver.changes("top")] == [("/c", ChangeKind.ADD)]
    with driver.diff("top") as s, tarfile.open(fileobj=s, mode="r|") as t:
        assert [m.name for m in t] == ["c"]


def test_whiteout_or_opaque_beneath_the_layers_own_file_hides_nothing(driver: Any) -> None:
    """The same in one layer (overlay refused it: "parent 'b' is not a directory")."""
    apply(driver, "base", None, TarBuilder().file("b", b"b").opaque("b").whiteout("b/x").bytes())
    assert sorted(listing(driver, "base")) == ["b"]


@pytest.mark.parametrize("parent_kind", ["file", "symlink"])
def test_entry_beneath_a_lower_non_directory_is_refused(driver: Any, parent_kind: str) -> None:
    """A path beneath a lower file is refused (GNU tar: "Not a directory"); beneath a lower
    symlink too: vfs wrote through it, overlay shadowed it with a directory."""
    base = TarBuilder().dir("d")
    base = base.file("b", b"b") if parent_kind == "file" else base.symlink("b", "d")
    apply(driver, "base", None, base.bytes())
    _refused(driver, "top", "base", TarBuilder().file("b/x", b"x").bytes())


def test_dir_times_stay_with_the_dir_not_what_replaced_it(driver: Any) -> None:
    """A directory listed, then replaced in the same layer by a file or a hard link: the
    directory's times were restored onto the replacement (and so onto the link's target)."""
    apply(driver, "base", None, TarBuilder().dir("a", mtime=T0).file("a", b"f", mtime=T0 + 77)
          .dir("h", mtime=T0).file("t", b"t", mtime=T0 + 3).hardlink("h", "t").bytes())
    with driver.mounted("base") as root:
        assert os.lstat(root / "a").st_mtime == T0 + 77
        assert os.lstat(root / "t").st_mtime == T0 + 3


def test_dir_listed_twice_takes_the_later_entry(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder().dir("a", mode=0o755, mtime=T0).file("a/f")
          .dir("a", mode=0o700, mtime=T0 + 5).bytes())
    with driver.mounted("base") as root:
        st = os.lstat(root / "a")
        assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o700, T0 + 5)


def test_lower_root_entry_shows_through_later_layers(driver: Any) -> None:
    """The root is every later layer's implicit parent: it keeps the lower root's mode, owner,
    times and xattrs (overlay showed its own diff directory's: 0755 root, no xattrs; vfs took
    the apply's time)."""
    apply(driver, "base", None, TarBuilder().dir("./", mode=0o711, uid=5, gid=6, mtime=T0,
                                                 pax_headers={"SCHILY.xattr.user.r": "r"})
          .file("f", b"f").bytes())
    apply(driver, "top", "base", TarBuilder().file("g", b"g").bytes())
    for layer_id in ("base", "top"):
        with driver.mounted(layer_id) as root:
            st = os.lstat(root)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (
                0o711, 5, 6, T0), layer_id
            assert os.listxattr(root) == ["user.r"], layer_id


def test_opaque_marker_with_nothing_to_hide_leaves_no_trace(driver: Any) -> None:
    """An opaque marker in a base layer, for a directory that does not exist, or for one a lower
    opaque marker already emptied: no directory made, no overlay xattr visible."""
    apply(driver, "base", None, TarBuilder().dir("a").opaque("a").opaque("ghost")
          .dir("e").dir("e/x").bytes())
    assert sorted(listing(driver, "base")) == ["a", "e", "e/x"]
    with driver.mounted("base") as root:
        assert os.listxattr(root / "a") == []
    apply(driver, "mid", "base", TarBuilder().opaque("e").bytes())
    apply(driver, "top", "mid", TarBuilder().opaque("e/x").whiteout("e/x").bytes())
    assert sorted(listing(driver, "top")) == ["a", "e"]
    assert driver.changes("top") == []


def test_whiteout_then_opaque_parent_leaves_no_phantom(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder().file("a/x/p", b"p").bytes())
    apply(driver, "top", "base", TarBuilder().file("a/x/q", b"q").whiteout("a/x/p")
          .opaque("a").bytes())
    assert sorted(listing(driver, "top")) == ["a", "a/x", "a/x/q"]


def test_dir_made_again_after_a_file_replaced_it_hides_the_lower(driver: Any) -> None:
    apply(driver, "base", None, TarBuilder().dir("a").dir("a/x").file("a/x/p", b"p").bytes())
    apply(driver, "top", "base", TarBuilder().file("a", b"f").dir("a").dir("a/x").bytes())
    assert sorted(listing(driver, "top")) == ["a", "a/x"]


def test_dir_needed_beneath_a_whited_out_dir_is_made_anew(driver: Any) -> None:
    """``.wh.a`` hides the lower ``a`` with its ``a/x``: the ``a/x`` this layer needs is a new
    directory (0755 root, no xattrs), not overlay's copy of the hidden lower one."""
    apply(driver, "base", None, TarBuilder().dir("a").dir("a/x", mode=0o700, uid=3, pax_headers={
        "SCHILY.xattr.user.b": "0"}).file("a/x/p", b"p").bytes())
    apply(driver, "top", "base", TarBuilder().whiteout("a").file("a/x/p", b"new").dir("a")
          .bytes())
    with driver.mounted("top") as root:
        st = os.lstat(root / "a/x")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, os.listxattr(root / "a/x")) == (
            0o755, 0, [])


def test_hard_link_to_a_lower_file_survives_diff_and_apply(driver: Any) -> None:
    """A layer that hard-links ``c`` to the lower ``b``: its ``diff`` applied again on the parent
    gives ``b`` and ``c`` as one file: the diff carries the whole link group (overlay's copy-up
    of ``b``; vfs's ``b``, a copy only the new link changed), found by test_layer_differential.py,
    seed 7."""
    apply(driver, "base", None, TarBuilder().file("b", b"b").bytes())
    apply(driver, "top", "base", TarBuilder().hardlink("c", "b").bytes())
    with driver.diff("top") as s:
        data = s.read()
    apply(driver, "copy", "base", data)
    with driver.mounted("copy") as root:
        assert os.lstat(root / "b").st_ino == os.lstat(root / "c").st_ino
