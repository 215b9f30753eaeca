"""The OCI changeset rules in the apply engine itself (issue 15), on the Python and the native
paths: whiteouts hide only what lies below, in either order; an overlay apply that knows its
lower layers (``ApplyOptions.lower_fds``) writes no whiteout with nothing to hide, copies an
implicit parent's metadata up, and whites out each lower entry for an opaque root.  The
driver-level view of the same rules is tests/conformance/test_layer_semantics.py."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.treeutil import TarBuilder

from graphdriver.archive import apply as apply_mod
from graphdriver.archive import tarstream as ts
from graphdriver.archive.apply import ApplyOptions, apply_reader
from graphdriver.archive.whiteout import NAIVE, OVERLAY, WhiteoutFormat

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices and trusted xattrs")


@pytest.fixture(params=["native", "python"])
def path_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "python":
        monkeypatch.setattr(ts, "_native_files", None)
        monkeypatch.setattr(apply_mod, "_native_create", None)
    elif apply_mod._native_create is None:
        pytest.skip("native extension not compiled")
    yield request.param


def _apply(data: bytes, target: Path, fmt: WhiteoutFormat = NAIVE,
           lowers: list[Path] | None = None) -> None:
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in lowers or []]
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        apply_reader(ts.TarReader(io.BytesIO(data)), root, ApplyOptions(
            whiteout_format=fmt, lower_fds=fds if lowers is not None else None))
    finally:
        os.close(root)
        for fd in fds:
            os.close(fd)


def _lower(work: Path) -> Path:
    low = work / "lower"
    low.mkdir()
    _apply(TarBuilder().file("x", b"lower").dir("d", mode=0o750, uid=5, gid=6, pax_headers={
        "SCHILY.xattr.user.k": "v"}).file("d/old", b"o").file("y", b"y").bytes(), low)
    return low


def _whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.mark.parametrize("entry_first", [True, False])
def test_naive_whiteout_keeps_own_entries(work: Path, path_kind: str, entry_first: bool) -> None:
    target = work / "t"
    target.mkdir()
    _apply(TarBuilder().file("x", b"lower").dir("d").file("d/old", b"o").bytes(), target)
    t = TarBuilder()
    if entry_first:
        t.file("x", b"mine").dir("d").file("d/new", b"n").whiteout("x").whiteout("d")
    else:
        t.whiteout("x").whiteout("d").file("x", b"mine").dir("d").file("d/new", b"n")
    _apply(t.bytes(), target)
    assert (target / "x").read_bytes() == b"mine"
    assert sorted(os.listdir(target / "d")) == ["new"]


def test_naive_whiteout_in_an_empty_target_hides_nothing(work: Path, path_kind: str) -> None:
    target = work / "t"
    target.mkdir()
    _apply(TarBuilder().file("x", b"mine").whiteout("x").whiteout("ghost").bytes(), target)
    assert sorted(os.listdir(target)) == ["x"]


@pytest.mark.parametrize("entry_first", [True, False])
def test_overlay_own_dir_over_whiteout_is_opaque(work: Path, path_kind: str,
                                                 entry_first: bool) -> None:
    low = _lower(work)
    up = work / "up"
    up.mkdir()
    t = TarBuilder()
    if entry_first:
        t.dir("d").file("d/new", b"n").file("x", b"mine").whiteout("d").whiteout("x")
    else:
        t.whiteout("d").whiteout("x").dir("d").file("d/new", b"n").file("x", b"mine")
    _apply(t.bytes(), up, OVERLAY, [low])
    assert OVERLAY.is_opaque(str(up / "d"))
    assert (up / "x").read_bytes() == b"mine"


def test_overlay_whiteouts_only_where_a_lower_has_something(work: Path, path_kind: str) -> None:
    low = _lower(work)
    up = work / "up"
    up.mkdir()
    _apply(TarBuilder().whiteout("x").whiteout("ghost").whiteout("no/such").whiteout("d/old")
           .whiteout("d/gone").bytes(), up, OVERLAY, [low])
    assert sorted(os.listdir(up)) == ["d", "x"]
    assert _whiteout(up / "x") and _whiteout(up / "d/old")
    assert os.listdir(up / "d") == ["old"]
    # lowers unknown: every whiteout is kept, as before
    blind = work / "blind"
    blind.mkdir()
    _apply(TarBuilder().whiteout("ghost").bytes(), blind, OVERLAY)
    assert _whiteout(blind / "ghost")


def test_overlay_implicit_parent_is_copied_up(work: Path, path_kind: str) -> None:
    low = _lower(work)
    up = work / "up"
    up.mkdir()
    _apply(TarBuilder().file("d/new", b"n").bytes(), up, OVERLAY, [low])
    a, b = os.lstat(low / "d"), os.lstat(up / "d")
    assert (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns) == (
        a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns)
    assert os.getxattr(up / "d", "user.k") == b"v"


def test_overlay_opaque_root_whites_out_each_lower_entry(work: Path, path_kind: str) -> None:
    low = _lower(work)
    up = work / "up"
    up.mkdir()
    _apply(TarBuilder().dir("d").file("d/n", b"n").opaque(".").file("z", b"z").bytes(), up,
           OVERLAY, [low])
    assert sorted(os.listdir(up)) == ["d", "x", "y", "z"]
    assert _whiteout(up / "x") and _whiteout(up / "y")
    assert OVERLAY.is_opaque(str(up / "d"))
