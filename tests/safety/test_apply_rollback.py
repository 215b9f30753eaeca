"""A failed apply never destroys what was committed before it (issue 12, first and fifth items).

Every failure between the incomplete marker and the commit rolls the apply back and clears the
marker: a full disk at each step after the tar engine (tar-split, the record, the commit marker),
a transport that breaks after a clean entry boundary, and a kill -9 of the command after the
apply child finished (repair then rolls back from the journal kept on disk, or finishes an
apply that had passed its commit point).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from graphdriver import GraphDriverError, NoSpace, open_driver
from tests.safety.safetyutil import tmpfs
from tests.treeutil import TarBuilder, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs, chown)")


def base_tar() -> bytes:
    return TarBuilder().dir("etc").file("etc/keep", b"committed before\n").bytes()


def top_tar(files: int = 200) -> bytes:
    b = TarBuilder().dir("etc").file("etc/keep", b"replaced\n").dir("data")
    for i in range(files):
        b = b.file(f"data/f{i:04d}", b"x" * (i % 7 + 1) * 100)
    return b.bytes()


def tree(d: Any, layer_id: str) -> dict[str, Any]:
    with d.mounted(layer_id) as root:
        return snapshot(root)


def committed_store(home_root: Path, run: Path, name: str) -> Any:
    """A store with layer "base" (applied) and "top" on it, once applied already."""
    d = open_driver(name, home_root, runroot=run)
    d.create("base")
    d.apply_diff("base", None, io.BytesIO(base_tar()))
    d.create("top", "base")
    d.apply_diff("top", None, io.BytesIO(TarBuilder().file("first", b"first apply\n").bytes()))
    return d


def assert_as_before(d: Any, before: dict[str, Any], record_before: Any) -> None:
    assert d.layers() == ["base", "top"]
    assert not d.meta.is_incomplete("top")
    assert tree(d, "top") == before
    assert d.record("top") == record_before
    again = type(d)(d.home, runroot=d.runroot)  # repair finds nothing to do
    assert again.layers() == ["base", "top"]
    assert tree(again, "top") == before


def test_full_meta_disk_at_each_step_after_the_engine(driver_name: str, tmp_path: Path) -> None:
    """meta/ on a small tmpfs, filled to leave 0..N pages: whatever step runs out of space
    (the marker, tar-split, the next record, the commit marker), the apply either completes or
    leaves the layer exactly as it was, its earlier apply included."""
    run = tmp_path / "run"
    home_root = tmp_path / "store"
    meta = home_root / driver_name / "meta"
    data = top_tar()
    outcomes = set()
    with tmpfs(meta, "1m"):
        d = committed_store(home_root, run, driver_name)
        before, record_before = tree(d, "top"), d.record("top")
        filler = meta / "filler"
        for pages in range(0, 12):
            filler.unlink(missing_ok=True)
            st = os.statvfs(meta)
            free = st.f_bavail * st.f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - pages * 4096))
            try:
                d.apply_diff("top", None, io.BytesIO(data))
            except NoSpace:
                outcomes.add("refused")
                filler.unlink()
                assert_as_before(d, before, record_before)
                continue
            except GraphDriverError as exc:
                pytest.fail(f"{pages} free pages: not a NoSpace error: {exc!r}")
            outcomes.add("applied")
            break
        filler.unlink(missing_ok=True)
        assert "refused" in outcomes
        d.cleanup()


class BreaksAfter(io.RawIOBase):
    """A stream without a file descriptor whose read raises once *limit* bytes went by (a
    registry connection dropped): the apply sees a clean entry boundary first."""

    def __init__(self, data: bytes, limit: int) -> None:
        self._data, self._pos, self._limit = data, 0, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._pos >= self._limit:
            raise ConnectionResetError("connection reset by peer")
        n = min(len(b), self._limit - self._pos)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def test_broken_transport_after_complete_entries_rolls_back(driver_name: str,
                                                             tmp_path: Path) -> None:
    d = committed_store(tmp_path / "store", tmp_path / "run", driver_name)
    before, record_before = tree(d, "top"), d.record("top")
    data = top_tar()
    for entries in (2, 40):
        # a limit at an entry boundary: everything after the first *entries* headers is cut
        limit = _entry_boundary(data, entries)
        with pytest.raises(GraphDriverError, match="connection reset"):
            d.apply_diff("top", None, BreaksAfter(data, limit))
        assert_as_before(d, before, record_before)
    d.cleanup()


def _entry_boundary(data: bytes, entries: int) -> int:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        members = t.getmembers()
    m = members[entries]
    return int(m.offset)


_KILLER = r"""
import io, os, signal, sys
from graphdriver import open_driver
from graphdriver.layers import MetaDir
from graphdriver.store import LayerStore

where = sys.argv[4]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if where == "after-child":
    LayerStore._decide_apply = die        # the child finished; the commit decision not taken
else:
    MetaDir.promote_next = die            # the commit point passed; not finished
d = open_driver(sys.argv[1], sys.argv[2], runroot=sys.argv[3])
d.apply_diff("top", None, open(sys.argv[5], "rb"))
"""


@pytest.mark.parametrize("where", ["after-child", "after-commit-point"])
def test_kill_after_the_child_finished(driver_name: str, tmp_path: Path, where: str) -> None:
    root, run = tmp_path / "store", tmp_path / "run"
    d = committed_store(root, run, driver_name)
    before, record_before = tree(d, "top"), d.record("top")
    tar = tmp_path / "top.tar"
    tar.write_bytes(top_tar())
    proc = subprocess.run([sys.executable, "-c", _KILLER, driver_name, str(root), str(run), where,
                           str(tar)], capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr.decode()
    assert d.meta.is_incomplete("top")
    reopened = open_driver(driver_name, root, runroot=run)
    assert reopened.layers() == ["base", "top"]
    assert not reopened.meta.is_incomplete("top")
    if where == "after-child":
        assert_as_before(reopened, before, record_before)
    else:
        with reopened.mounted("top") as top:
            assert (top / "etc/keep").read_bytes() == b"replaced\n"
            assert (top / "first").read_bytes() == b"first apply\n"
            assert not [n for n in os.listdir(top) if n.startswith(".graphdriver-apply-")]
        assert reopened.record("top").diff_id != record_before.diff_id
    reopened.cleanup()
