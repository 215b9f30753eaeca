"""The native runs' file writer (``_fastapply.Writer``): the runs create each regular file and
hand the rest of it (data, owner, mode, times, close) to a thread of its own.

The confined child's apply maps an uncompressed layer file; these tests map one in process too
(``open_decompressed(fd, mappable=True)``), or read a file, a pipe or a compressed stream into
the reader's buffer (whose front the reader reuses only once the writer is past the files in
it), so that they can see the writer take files.  Each compares with GNU tar's extraction of the
same archive, or fails the apply for real (a full tmpfs), and checks that the writer was handed
files: a test that passed without it would prove nothing about it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tarbuild import (
    build,
    gnu_extract,
    gnu_tar,
    make_rich_tree,
    member,
    needs_gnu_tar,
    needs_root,
    pax_member,
)
from tests.safety.safetyutil import tmpfs
from tests.treeutil import diff_snapshots, snapshot

from graphdriver.archive import tarstream, whiteout
from graphdriver.archive.apply import ApplyOptions, apply_reader, apply_tar
from graphdriver.archive.compression import open_decompressed
from graphdriver.archive.tarstream import TarReader
from graphdriver.errors import GraphDriverError, NoSpace
from graphdriver.fsutil import fs_name

pytestmark = [needs_gnu_tar, needs_root,
              pytest.mark.skipif(tarstream._FileWriter is None,
                                 reason="the native helpers are not built")]

ALL_FACTS = {"dir_mtimes": True, "with_root": True}


@pytest.fixture(autouse=True, params=["runs create", "writer creates"])
def creation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: the runs create every file (the writer finishes them), and the writer
    creates the files it is handed too (what an apply does off tmpfs; ``work`` is on tmpfs)."""
    monkeypatch.setenv("GRAPHDRIVER_WRITER_CREATES", "1" if request.param == "writer creates"
                       else "0")
    return str(request.param)


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every Writer the readers make during the test, kept (they stay readable once closed)."""
    made: list[Any] = []
    real = tarstream._FileWriter
    assert real is not None

    def make() -> Any:
        w = real()
        made.append(w)
        return w

    monkeypatch.setattr(tarstream, "_FileWriter", make)
    return made


def _apply_mapped(tar: Path, target: Path, opts: ApplyOptions | None = None) -> Any:
    """Apply *tar* onto *target* in process, through a map of the file (as the child does)."""
    fd = os.open(tar, os.O_RDONLY)
    root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stream = open_decompressed(fd, mappable=True)
        try:
            reader = TarReader(stream)
            assert reader.mapped
            return apply_reader(reader, root_fd, opts or ApplyOptions())
        finally:
            stream.close()
    finally:
        os.close(root_fd)
        os.close(fd)


def _many_files(src: Path, count: int, size: int) -> None:
    """*count* files of *size* bytes in a few directories, with owners, modes and times of
    their own, and hard links to some (a link to a file the writer may still be writing)."""
    for i in range(count):
        d = src / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"f{i:05d}"
        f.write_bytes(bytes([i % 251]) * (size + i % 977))
        os.chown(f, i % 5, i % 3)
        os.chmod(f, (0o4755, 0o2750, 0o1644, 0o600, 0o644)[i % 5])
        t = 1_600_000_000_000_000_000 + i * 1_000_003
        os.utime(f, ns=(t, t))
        if i % 97 == 0:
            os.link(f, d / f"link{i:05d}")


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_same_tree_as_gnu_tar(work: Path, writers: list[Any], fmt: str) -> None:
    src = work / "src"
    make_rich_tree(src, **({} if fmt == "pax" else {"xattrs": False, "long_names": False}))
    _many_files(src / "many", 600, 3000)
    tar = work / "layer.tar"
    gnu_tar("--numeric-owner", f"--format={fmt}",
            *(["--xattrs", "--xattrs-include=*"] if fmt == "pax" else []),
            "-cf", tar, "-C", src, ".")
    ex, mine = work / "gnu", work / "mine"
    ex.mkdir()
    mine.mkdir()
    gnu_extract(tar, ex)
    _apply_mapped(tar, mine)
    problems = diff_snapshots(snapshot(ex, **ALL_FACTS), snapshot(mine, **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])
    assert writers and writers[0].handed() > 0, "the writer finished no file"


@pytest.mark.parametrize("source", ["file", "pipe", "gzip", "zstd", "map"])
def test_buffered_streams_give_the_same_tree(work: Path, writers: list[Any],
                                            source: str) -> None:
    """Unmapped input: the reader's 4 MiB buffer goes round many times (30 MB of files), and
    its front is read into again while the writer still holds files in it.  Mapped input: the
    reader gets WRITER_LAG ahead of the writer's oldest file and waits, the map's pages of the
    files the writer has yet to write stay in the process, the rest go.  On two idle CPUs
    the writer keeps up, and a reader that did not wait for it would seldom be caught; so the
    writer is starved here (_starved_writer) for the first second of the apply, and the reader
    goes round its buffer while the writer holds files in it."""
    src = work / "src"
    _many_files(src, 3000, 9000)
    make_rich_tree(src / "rich")
    tar = work / ("layer.tar" + {"gzip": ".gz", "zstd": ".zst"}.get(source, ""))
    gnu_tar("--numeric-owner", "--format=pax", "--xattrs", "--xattrs-include=*",
            *{"gzip": ["-z"], "zstd": ["--zstd"]}.get(source, []), "-cf", tar, "-C", src, ".")
    ex, mine = work / "gnu", work / "mine"
    ex.mkdir()
    mine.mkdir()
    gnu_extract(tar, ex)
    with _starved_writer():
        if source == "pipe":
            r, w = os.pipe()
            feeder = threading.Thread(target=_feed, args=(tar, w))
            feeder.start()
            try:
                apply_tar(r, mine, ApplyOptions())
            finally:
                os.close(r)
                feeder.join()
        elif source == "map":
            peak = _peak_mapped_rss_kb(tar, lambda: _apply_mapped(tar, mine))
            bound = (2 * tarstream.MAP_KEEP + max(tarstream.MAP_LAG, tarstream.WRITER_LAG)
                     + 2 * tarstream.MAP_STEP) // 1024
            assert 0 < peak <= bound, (peak, bound)
        else:
            fd = os.open(tar, os.O_RDONLY)
            try:
                apply_tar(fd, mine, ApplyOptions())
            finally:
                os.close(fd)
    problems = diff_snapshots(snapshot(ex, **ALL_FACTS), snapshot(mine, **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])
    assert writers and writers[0].handed() > 1000, "the writer finished few files"


def _peak_mapped_rss_kb(path: Path, work: Any) -> int:
    """Run *work*; the most of *path* this process had mapped in meanwhile (kB)."""
    from tests.archive.test_mapped_input import _mapped_rss_kb

    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, _mapped_rss_kb(path))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return peak


@contextlib.contextmanager
def _starved_writer(seconds: float = 1.0) -> Iterator[None]:
    """While in the block: this thread (and the threads it starts) on one CPU; a process
    spinning at nice -20 for *seconds* on another, where each file writer thread is moved, in
    the idle scheduling class, as it appears: it gets next to no CPU until the spinner ends."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to starve the writer on one of them")
    spinner = subprocess.Popen(
        [sys.executable, "-c", f"import time\nend = time.monotonic() + {seconds}\n"
         "while time.monotonic() < end: pass"],
        preexec_fn=lambda: (os.sched_setaffinity(0, {cpus[1]}), os.nice(-20)))
    stop = threading.Event()

    def starve() -> None:
        done: set[str] = set()
        while not stop.wait(0.0002):
            for tid in os.listdir("/proc/self/task"):
                if tid in done:
                    continue
                try:
                    with open(f"/proc/self/task/{tid}/comm") as f:
                        if f.read().strip() != "layer-writer":
                            continue
                    os.sched_setaffinity(int(tid), {cpus[1]})
                    os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
                except (FileNotFoundError, ProcessLookupError):
                    continue
                done.add(tid)

    os.sched_setaffinity(0, {cpus[0]})
    starver = threading.Thread(target=starve)
    starver.start()
    try:
        yield
    finally:
        stop.set()
        starver.join()
        os.sched_setaffinity(0, cpus)
        spinner.kill()
        spinner.wait()


def _feed(path: Path, fd: int) -> None:
    """Write the file into the pipe in odd-sized pieces, then close it."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(70_001):
                os.write(fd, chunk)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("files", "size", "options"),
                         [(2000, 8000, "6m"), (1500, 10, "64m,nr_inodes=600")],
                         ids=["no-space", "no-inode"])
def test_a_full_disk_fails_the_apply_and_leaves_nothing(work: Path, writers: list[Any],
                                                        files: int, size: int,
                                                        options: str) -> None:
    """The writes meet ENOSPC, or the creates do (a tmpfs with few inodes), whichever thread
    meets it: the apply fails with NoSpace, no file is written after the failure, and the
    rollback empties the target (the writer stopped first)."""
    src = work / "src"
    _many_files(src, files, size)
    tar = work / "layer.tar"
    gnu_tar("--numeric-owner", "--format=pax", "-cf", tar, "-C", src, ".")
    with tmpfs(work / "small", options) as target:
        with pytest.raises(NoSpace):
            _apply_mapped(tar, target)
        assert os.listdir(target) == []
    assert writers and writers[0].handed() > 0
    assert writers[0].pending() == 0  # stopped: every file it held was closed


def test_an_error_after_many_files_rolls_back_their_writes(work: Path,
                                                          writers: list[Any]) -> None:
    """An unsafe entry after a run of files the writer took: the apply stops it, then rolls
    back; nothing is left, and a later apply of a good layer onto the same target works."""
    src = work / "src"
    _many_files(src, 800, 20_000)
    good = work / "good.tar"
    gnu_tar("--numeric-owner", "--format=pax", "-cf", good, "-C", src, ".")
    bad = work / "bad.tar"
    body = good.read_bytes().rstrip(b"\0")
    body += b"\0" * (-len(body) % 512)
    with open(bad, "wb") as f:  # the good entries, then one that leaves the layer
        f.write(body)
    subprocess.run(["tar", "--format=pax", "-rf", str(bad), "--absolute-names",
                    "--transform", "s,^.*$,../escape,", str(src / "d0" / "f00000")],
                   check=True, capture_output=True)
    target = work / "target"
    target.mkdir()
    with pytest.raises(GraphDriverError):
        _apply_mapped(bad, target)
    assert os.listdir(target) == []
    assert writers and writers[0].handed() > 0
    ex = work / "gnu"
    ex.mkdir()
    gnu_extract(good, ex)
    _apply_mapped(good, target)
    problems = diff_snapshots(snapshot(ex, **ALL_FACTS), snapshot(target, **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])


def test_which_writer_creates_files(work: Path, writers: list[Any], creation: str,
                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """GRAPHDRIVER_WRITER_CREATES says whether the writer is handed whole files; unset, it is
    where new inodes are not cheap: not on tmpfs, yes on the test's own disk (when that is not
    tmpfs or ramfs)."""
    src = work / "src"
    _many_files(src, 300, 100)
    tar = work / "layer.tar"
    gnu_tar("--numeric-owner", "--format=pax", "-cf", tar, "-C", src, ".")
    first = work / "first"
    first.mkdir()
    _apply_mapped(tar, first)
    assert writers[-1].handed() > 0
    if creation == "writer creates":
        assert writers[-1].handed_whole() > 0, "the writer created no file"
    else:
        assert writers[-1].handed_whole() == 0
    monkeypatch.delenv("GRAPHDRIVER_WRITER_CREATES")
    on_tmpfs = work / "tmpfs-target"
    on_tmpfs.mkdir()
    _apply_mapped(tar, on_tmpfs)  # work is on tmpfs (or the tmp dir: see below)
    cheap = fs_name(on_tmpfs) in ("tmpfs", "ramfs")
    disk_cheap = fs_name(tmp_path) in ("tmpfs", "ramfs")
    assert (writers[-1].handed_whole() > 0) == (not cheap)
    if disk_cheap:
        pytest.skip("the test's tmp dir is on tmpfs too: no disk to apply onto here")
    on_disk = tmp_path / "disk-target"
    on_disk.mkdir()
    _apply_mapped(tar, on_disk)
    assert writers[-1].handed_whole() > 0
    problems = diff_snapshots(snapshot(first, **ALL_FACTS), snapshot(on_disk, **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])


def _names_met_again() -> bytes:
    """A layer that names paths again after the runs met them (possibly while the writer still
    had them to create): files replaced by files, symlinks, directories; a hard link to a file
    just handed over; entries the Python code applies (an xattr, a whiteout, parents it makes
    itself) before or after plain entries of the same names; and more directories than the
    applier keeps open."""
    # first, more directories than the applier keeps open: files in the oldest, then more
    # directories, so that those are closed while the (starved) writer has files to make there
    # (the writer's thread, started by the first file, is starved by the time the others come)
    parts = [member("m/", type=b"5"), member("m/first", b"starts the writer")]
    parts += [member(f"m/d{i:03d}/", type=b"5") for i in range(200)]
    parts += [member(f"m/d{i:03d}/f", b"%d" % i) for i in range(100)]
    parts += [member(f"m/d{i:03d}/", type=b"5") for i in range(200, 320)]
    parts += [member("a/", type=b"5", mode=0o755)]
    parts += [member(f"a/f{i:03d}", b"%d" % i * 50) for i in range(300)]
    parts += [
        member("a/f005", b"second"),                               # a file again
        member("a/f007", type=b"2", linkname="f008"),              # a file, now a symlink
        member("a/f010/", type=b"5", mode=0o700),                  # a file, now a directory
        member("a/f010/in", b"inside"),
        member("a/h", type=b"1", linkname="a/f299"),               # a link to the last file
        member("b/", type=b"5"),
        member("b/s", type=b"2", linkname="x"),
        member("b/s", b"a file where the symlink was"),
        pax_member([("SCHILY.xattr.user.k", b"v")]), member("c/p", b"xattr"),  # Python's
        member("c/p", b"plain again"),
        pax_member([("SCHILY.xattr.user.k", b"v")]), member("e/q/r", b"deep"),  # makes e, e/q
        member("e/z", b"beside"),
        member("g/", type=b"5"),
        member("g/.wh.w1"),
        member("g/w1", b"after its whiteout"),
        member("a/new1", b"plain first"),                          # Python's, a file just made
        pax_member([("SCHILY.xattr.user.k", b"v")]), member("a/new1", b"with an xattr"),
        member("a/new2", b"a link's target"),
        member("n/deep/l", type=b"1", linkname="a/new2"),          # Python's (n, n/deep made)
    ]
    parts += [member(f"a/f{i:03d}", b"late %d" % i) for i in range(0, 300, 37)]
    return build(*parts)


@pytest.mark.parametrize("whiteouts", ["naive", "overlay"])
def test_names_met_again_keep_the_archive_order(work: Path, writers: list[Any],
                                                creation: str, whiteouts: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever creates the files, each later entry of a name wins as it does when one thread
    makes everything: the same tree as the apply where the runs create every file (and the
    starved writer still holds files when the names come again).  In overlay's format a
    whiteout leaves its marker where the name it hides goes: the layer's own file of that name,
    after it, replaces the marker."""
    opts = ApplyOptions(whiteout_format=whiteout.NAIVE if whiteouts == "naive"
                        else whiteout.OVERLAY)
    tar = work / "again.tar"
    tar.write_bytes(_names_met_again())
    mine, ref = work / "mine", work / "ref"
    mine.mkdir()
    ref.mkdir()
    with _starved_writer(0.5):
        _apply_mapped(tar, mine, opts)
    monkeypatch.setenv("GRAPHDRIVER_WRITER_CREATES", "0")
    _apply_mapped(tar, ref, opts)
    assert writers[-1].handed_whole() == 0
    # (the directories the apply makes itself, c, e and e/q, get the time they were made)
    problems = diff_snapshots(snapshot(ref, with_root=True), snapshot(mine, with_root=True))
    assert not problems, "\n".join(problems[:20])
    assert (mine / "a" / "f005").read_bytes() == b"second"
    assert (mine / "c" / "p").read_bytes() == b"plain again"
    assert os.path.islink(mine / "a" / "f007")
    if creation == "writer creates":
        assert writers[0].handed_whole() > 0
