"""apply_tar semantics: whiteouts, replacement, confinement, rollback (hand-built archives)."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from tarbuild import build, header, member, needs_root, pad, pax_member
from tests.treeutil import diff_snapshots, snapshot

from graphdriver.archive import whiteout
from graphdriver.archive.apply import SCRATCH_PREFIX, ApplyOptions, apply_tar
from graphdriver.errors import InvalidArchive, InvalidArgument, UnsafeArchive

#: every fact an apply is responsible for (the root and directory mtimes too)
ALL_FACTS = {"dir_mtimes": True, "with_root": True}

NAIVE = ApplyOptions()
OVERLAY = ApplyOptions(whiteout_format=whiteout.OVERLAY)
USERXATTR = ApplyOptions(whiteout_format=whiteout.OVERLAY_USERXATTR)


def apply(data: bytes, target: Path, opts: ApplyOptions = NAIVE) -> int:
    return apply_tar(io.BytesIO(data), target, opts).size


def d(name: str, **kw: object) -> bytes:
    kw.setdefault("mode", 0o755)
    return member(name, type=b"5", **kw)  # type: ignore[arg-type]


def f(name: str, data: bytes = b"x", **kw: object) -> bytes:
    return member(name, data, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> bytes:
    return member(name, type=b"2", linkname=target, mode=0o777)


def link(name: str, target: str) -> bytes:
    return member(name, type=b"1", linkname=target)


@pytest.fixture
def target(work: Path) -> Path:
    t = work / "layer"
    t.mkdir()
    return t


def lower(t: Path) -> None:
    """A pre-existing layer content (what a vfs child starts with)."""
    (t / "a").mkdir()
    (t / "a/x").write_text("lower x")
    (t / "a/y").write_text("lower y")
    (t / "b").write_text("lower b")
    (t / "dir/old/sub").mkdir(parents=True)
    (t / "dir/old/sub/f").write_text("old")
    (t / "dir/keep").write_text("lower keep")
    (t / "usr/bin").mkdir(parents=True)
    os.symlink("usr/bin", t / "bin")
    os.symlink("/usr/lib", t / "lib")
    (t / "usr/lib").mkdir()
    for p in sorted(t.rglob("*"), reverse=True):
        os.utime(p, ns=(1_000_000_000, 1_000_000_000), follow_symlinks=False)


def no_scratch(t: Path) -> None:
    assert not [n for n in os.listdir(t) if n.startswith(SCRATCH_PREFIX)]


# ---- basics ------------------------------------------------------------------------------------
def test_size_and_dot_slash_names(target: Path) -> None:
    size = apply(build(d("./"), d("./d"), f("./d/f", b"hello"), f("g", b"12")), target)
    assert size == 7
    assert (target / "d/f").read_bytes() == b"hello"
    assert (target / "g").read_bytes() == b"12"


def test_missing_parents_are_created(target: Path) -> None:
    apply(build(f("p/q/r/file", b"z")), target)
    st = os.stat(target / "p/q")
    assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
    assert (target / "p/q/r/file").read_bytes() == b"z"


def test_parent_is_a_regular_file_fails_like_gnu_tar(target: Path) -> None:
    with pytest.raises(InvalidArchive, match="not a directory"):
        apply(build(f("f"), f("f/x")), target)
    assert os.listdir(target) == []


def test_duplicate_entries_last_wins(target: Path) -> None:
    apply(build(f("a", b"first"), f("a", b"second"), d("x"), f("x", b"file now")), target)
    assert (target / "a").read_bytes() == b"second"
    assert (target / "x").read_bytes() == b"file now"


@needs_root
def test_setuid_survives_chown(target: Path) -> None:
    apply(build(f("s", b"x", mode=0o6755, uid=1000, gid=1000)), target)
    st = os.stat(target / "s")
    assert stat.S_IMODE(st.st_mode) == 0o6755 and st.st_uid == 1000


def test_mtime_from_pax_with_nanoseconds(target: Path) -> None:
    pax = pax_member([("mtime", "1234567890.123456789")])
    data = build(pax, f("t"), d("dd", mtime=5), f("dd/x"))
    apply(data, target)
    assert os.stat(target / "t").st_mtime_ns == 1234567890_123456789
    assert os.stat(target / "dd").st_mtime_ns == 5_000_000_000  # set after its contents


def test_dir_over_dir_merges(target: Path) -> None:
    lower(target)
    apply(build(d("a", mode=0o700), f("a/z")), target)
    assert sorted(os.listdir(target / "a")) == ["x", "y", "z"]
    assert stat.S_IMODE(os.stat(target / "a").st_mode) == 0o700


def test_replacing_a_symlink_does_not_follow_it(target: Path, work: Path) -> None:
    outside = work / "outside"
    outside.write_text("canary")
    os.symlink(str(outside), target / "victim")
    apply(build(f("victim", b"new")), target)
    assert outside.read_text() == "canary"
    assert not (target / "victim").is_symlink()
    assert (target / "victim").read_bytes() == b"new"


def test_file_replaces_dir_and_dir_replaces_file(target: Path) -> None:
    lower(target)
    apply(build(f("a", b"now a file"), d("b"), f("b/in")), target)
    assert (target / "a").read_bytes() == b"now a file"
    assert (target / "b/in").exists()
    no_scratch(target)


# ---- whiteouts ---------------------------------------------------------------------------------
def test_naive_whiteouts(target: Path) -> None:
    lower(target)
    apply(build(f("a/.wh.x", b""), f(".wh.b", b""), f(".wh.nothing-here", b"")), target)
    assert not (target / "a/x").exists() and (target / "a/y").exists()
    assert not (target / "b").exists()
    assert not (target / ".wh.b").exists()
    no_scratch(target)


def test_naive_opaque_keeps_what_this_layer_put_there(target: Path) -> None:
    lower(target)
    apply(build(d("dir"), f("dir/new", b"n"), f("dir/.wh..wh..opq", b""), f("dir/after")), target)
    assert sorted(os.listdir(target / "dir")) == ["after", "new"]


def test_naive_opaque_of_missing_dir_is_fine(target: Path) -> None:
    apply(build(f("nope/.wh..wh..opq", b"")), target)
    assert not (target / "nope").exists()


@needs_root
def test_overlay_whiteout_is_a_char_device(target: Path) -> None:
    lower(target)
    apply(build(f("a/.wh.x", b""), f(".wh.gone", b"")), target, OVERLAY)
    for p in ("a/x", "gone"):
        st = os.lstat(target / p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (target / "a/y").exists()


@needs_root
def test_overlay_opaque(target: Path) -> None:
    lower(target)
    apply(build(d("dir"), f("dir/new"), f("dir/.wh..wh..opq", b"")), target, OVERLAY)
    assert os.getxattr(target / "dir", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(target / "dir")) == ["new"]


@needs_root
def test_overlay_refuses_whiteout_devices_and_overlay_xattrs(target: Path) -> None:
    dev = member("w", type=b"3", devmajor=0, devminor=0)
    with pytest.raises(UnsafeArchive, match="whiteout"):
        apply(build(dev), target, OVERLAY)
    assert os.listdir(target) == []
    xa = build(pax_member([("SCHILY.xattr.trusted.overlay.opaque", "y")]), d("o"))
    with pytest.raises(UnsafeArchive, match="overlay xattr"):
        apply(xa, target, OVERLAY)
    assert os.listdir(target) == []
    apply(build(dev), target, NAIVE)  # a vfs layer may hold one
    assert stat.S_ISCHR(os.lstat(target / "w").st_mode)


@needs_root
def test_userxattr_overlay_keeps_whiteouts_in_the_user_namespace(target: Path) -> None:
    lower(target)
    apply(build(f("a/.wh.x", b""), d("dir"), f("dir/new"), f("dir/.wh..wh..opq", b"")),
          target, USERXATTR)
    st = os.lstat(target / "a/x")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(target / "dir", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(target / "dir")
    assert sorted(os.listdir(target / "dir")) == ["new"]


@needs_root
def test_userxattr_overlay_refuses_user_overlay_xattrs(target: Path) -> None:
    xa = build(pax_member([("SCHILY.xattr.user.overlay.opaque", "y")]), d("o"))
    with pytest.raises(UnsafeArchive, match=r"overlay xattr 'user\.overlay\.opaque'"):
        apply(xa, target, USERXATTR)
    assert os.listdir(target) == []
    xa = build(pax_member([("SCHILY.xattr.trusted.overlay.opaque", "y")]), d("o"))
    with pytest.raises(UnsafeArchive, match=r"overlay xattr 'trusted\.overlay\.opaque'"):
        apply(xa, target, OVERLAY)
    assert os.listdir(target) == []


def test_unknown_whiteout_format_refused(target: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown whiteout format 'overlay'"):
        apply(build(f("x")), target, ApplyOptions(whiteout_format="overlay"))  # type: ignore[arg-type]


def test_aufs_metadata_skipped_and_plnk_links_resolved(target: Path) -> None:
    data = build(
        d(".wh..wh.aufs"),
        f(".wh..wh.aufs/x", b"meta"),
        d(".wh..wh.plnk"),
        f(".wh..wh.plnk/42.7", b"shared content", mode=0o640),
        d("a"),
        link("a/one", ".wh..wh.plnk/42.7"),
        link("a/two", "/.wh..wh.plnk/42.7"),
    )
    apply(data, target)
    assert sorted(os.listdir(target)) == ["a"]
    one, two = os.stat(target / "a/one"), os.stat(target / "a/two")
    assert (one.st_ino == two.st_ino) and (target / "a/one").read_bytes() == b"shared content"
    assert stat.S_IMODE(one.st_mode) == 0o640


def test_hard_links_inside_layer(target: Path) -> None:
    apply(build(f("orig", b"data"), link("copy", "orig"), link("./abs", "/orig")), target)
    assert os.stat(target / "copy").st_ino == os.stat(target / "orig").st_ino
    assert os.stat(target / "abs").st_nlink == 3


def test_hard_link_to_missing_target(target: Path) -> None:
    with pytest.raises(InvalidArchive, match="does not exist"):
        apply(build(link("l", "missing/file")), target)


# ---- confinement -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["/etc/evil", "../evil", "a/../../evil", "a/b/../../../evil", ".."]
)
def test_names_leaving_the_layer_are_refused(target: Path, name: str) -> None:
    with pytest.raises(UnsafeArchive):
        apply(build(f(name)), target)
    assert os.listdir(target) == []


def test_dotdot_that_stays_inside_is_normalized(target: Path) -> None:
    apply(build(d("a"), f("a/../b", b"in")), target)
    assert (target / "b").read_bytes() == b"in"


def test_hard_link_outside_is_refused(target: Path) -> None:
    with pytest.raises(UnsafeArchive, match="outside"):
        apply(build(link("l", "../../etc/passwd")), target)


@pytest.mark.parametrize(
    "evil",
    [
        [sym("evil", "/etc"), f("evil/passwd", b"pwned")],
        [sym("evil", "../../.."), f("evil/x", b"pwned")],
        [d("a"), sym("a/s", "."), f("a/s/x")],
        [sym("evil", "/tmp"), f("evil/.wh.x", b"")],
        [sym("evil", "/"), link("evil/h", "x")],
        [f("x"), sym("evil", "/"), link("h", "evil/x")],
    ],
)
def test_writes_through_archive_symlinks_are_refused(
    target: Path, work: Path, evil: list[bytes]
) -> None:
    with pytest.raises(UnsafeArchive, match="crosses symlink"):
        apply(build(*evil), target)
    assert os.listdir(target) == []


@pytest.mark.parametrize("entry", ["bin/tool", "lib/libc.so", "up/top"])
def test_preexisting_symlinks_on_the_way_are_refused(target: Path, work: Path,
                                                     entry: str) -> None:
    """A path beneath a lower layer's symlink (``/bin -> usr/bin``) is refused in one line: vfs
    wrote through the symlink where overlay shadowed it with a directory, so the layer meant
    something different on each driver (issue 15; test_layer_differential.py)."""
    lower(target)
    os.symlink("../../../../..", target / "up")
    before = snapshot(target, **ALL_FACTS)
    with pytest.raises(UnsafeArchive, match="beneath symlink"):
        apply(build(f(entry, b"t")), target)
    assert snapshot(target, **ALL_FACTS) == before
    assert not (work / "top").exists()


def test_symlink_targets_stored_as_is(target: Path) -> None:
    apply(build(sym("abs", "/etc/passwd"), sym("rel", "../../x")), target)
    assert os.readlink(target / "abs") == "/etc/passwd"
    assert os.readlink(target / "rel") == "../../x"


# ---- rollback ----------------------------------------------------------------------------------
BAD = header("bad", size=1, checksum=12345)


def test_rollback_of_an_empty_target(target: Path) -> None:
    os.chmod(target, 0o711)
    before = snapshot(target, **ALL_FACTS)
    data = build(d("./", mode=0o700), d("d"), f("d/f"), sym("s", "d"), f("g" * 10)) [:-1024]
    with pytest.raises(InvalidArchive, match="checksum"):
        apply(data + BAD, target)
    assert os.listdir(target) == []
    assert snapshot(target, **ALL_FACTS) == before


def test_rollback_of_a_non_empty_target(target: Path) -> None:
    lower(target)
    os.setxattr(target / "a", "user.keep", b"1")
    before = snapshot(target, **ALL_FACTS)
    body = build(
        d("./", mode=0o700),
        d("a", mode=0o700, uid=5),
        pax_member([("SCHILY.xattr.user.new", "v")]),
        d("usr"),
        f("a/x", b"replaced"),
        f("a/new", b"new"),
        f("b/c", b"b was a file"),
        f(".wh.usr", b""),
        f("dir/.wh..wh..opq", b""),
        f("bin/through-old-link", b"ok"),
        d("fresh"),
        f("fresh/deep/file"),
        sym("a/y", "/elsewhere"),
    )[:-1024]
    with pytest.raises(InvalidArchive):
        apply(body + BAD, target)
    after = snapshot(target, **ALL_FACTS)
    assert not diff_snapshots(before, after), "\n".join(diff_snapshots(before, after))
    no_scratch(target)


def test_keyboard_interrupt_rolls_back(target: Path) -> None:
    lower(target)
    before = snapshot(target, **ALL_FACTS)

    def progress(n: int) -> None:
        raise KeyboardInterrupt

    data = build(f("big", os.urandom(5 << 20)), f("a/x", b"changed"), f("more"))
    with pytest.raises(KeyboardInterrupt):
        apply(data, target, ApplyOptions(progress=progress))
    assert not diff_snapshots(before, snapshot(target, **ALL_FACTS))


def test_success_leaves_no_scratch_and_sets_root_times(target: Path) -> None:
    lower(target)
    apply(build(d("./", mtime=777), f("a/x", b"new"), f(".wh.b", b"")), target)
    no_scratch(target)
    assert os.stat(target).st_mtime_ns == 777_000_000_000


def test_scratch_name_cannot_be_targeted(target: Path) -> None:
    # the scratch dir has a random name; names that merely look like it are ordinary
    apply(build(f(SCRATCH_PREFIX + "x", b"ordinary")), target)
    assert (target / (SCRATCH_PREFIX + "x")).exists()


def test_unknown_entry_type_is_refused(target: Path) -> None:
    with pytest.raises(InvalidArchive, match="unsupported entry type"):
        apply(build(member("q", type=b"Z")), target)


def test_pad_helper_sanity() -> None:
    assert len(pad(b"x")) == 512
