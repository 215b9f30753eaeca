"""bench/run.py's runner: each run starts with the layer it reads in the page cache (a file in
the cache directory that the run's command line names is read through first, untimed), and
only that one: another layer of the cache stays where it was."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import run as bench  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)


def _resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore over a private map)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        buf = (ctypes.c_char * size).from_buffer(m)
        try:
            done = _libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size),
                                 vec)
        finally:
            del buf
    if done != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_run_starts_with_the_layer_it_names_in_the_page_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    named, other, longer = cache / "layer.tar", cache / "other.tar", cache / "layer.tar.gz"
    for p in (named, other, longer):
        p.write_bytes(os.urandom(4 << 20))
        _evict(p)
    if _resident_pages(named) > 64:
        pytest.skip("this filesystem keeps the file's pages in memory (tmpfs?)")
    seen: list[int] = []

    def per_run(d: Path) -> bench.Cmd:
        seen.append(_resident_pages(named))  # the command is made before the file is read
        return bench.Cmd(["true", str(named)])

    w = bench.Workload("warm", [bench.Side("gd", per_run)], [])
    res = bench.run_workload(w, tmp_path / "work", 2, cache)
    (result,) = res.values()
    assert len(result.samples) == 2 and result.note is None
    assert _resident_pages(named) == (4 << 20) // mmap.PAGESIZE
    assert _resident_pages(other) < 64 and _resident_pages(longer) < 64
    assert seen[0] < 64  # it was out before the first run: the runner read it in


def test_warmup_rounds_are_not_counted_and_the_order_turns_each_round(tmp_path: Path) -> None:
    order: list[str] = []

    def side(name: str) -> bench.Side:
        def per_run(d: Path) -> bench.Cmd:
            order.append(name)
            # the n-th run of a side sleeps n * 10 ms: the counted samples are the last ones
            return bench.Cmd(["sleep", f"{order.count(name) * 0.01:.2f}"])
        return bench.Side(name, per_run)

    w = bench.Workload("warmup", [side("gd")], [side("peer")])
    res = bench.run_workload(w, tmp_path / "work", 2, None, warmup=1)
    assert order.count("gd") == 3 and order.count("peer") == 3
    assert order == ["gd", "peer", "peer", "gd", "gd", "peer"]  # every other round reversed
    for result in res.values():
        assert result.note is None and len(result.samples) == 2
        assert min(s.seconds for s in result.samples) >= 0.02


def test_one_untimed_round_where_the_work_dir_is_not_tmpfs() -> None:
    assert bench.default_warmup("tmpfs") == 0
    assert bench.default_warmup("ext4") == 1


def test_a_target_set_for_one_filesystem_is_marked_on_another() -> None:
    """Issue 7's targets against containers-storage are tmpfs's, issue 18's whole command is
    ext4's: elsewhere the ratio is shown and the target marked, not held against the row."""

    def result(label: str, seconds: float) -> bench.SideResult:
        return bench.SideResult(label, [bench.Sample(seconds, seconds, 0, 0, 0)])

    w = bench.Workload("apply", [bench.Side("gd", lambda d: bench.Cmd(["true"]))],
                       [bench.Side(p, lambda d: bench.Cmd(["true"])) for p in ("cs", "tar")],
                       {"cs": "<= 0.3", "tar": "<= 1.0"}, target_fs={"cs": "tmpfs"})
    res = {"gd": result("gd", 1.0), "cs": result("cs", 2.0), "tar": result("tar", 1.25)}
    on = {fs: {r["peer"]: (r["target"], r["ratio"]) for r in bench.table_rows(w, res, fs)}
          for fs in ("tmpfs", "ext4")}
    assert on["tmpfs"] == {"cs": ("<= 0.3", 0.5), "tar": ("<= 1.0", 0.8)}
    assert on["ext4"] == {"cs": ("(tmpfs only)", 0.5), "tar": ("<= 1.0", 0.8)}
