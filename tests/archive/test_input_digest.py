"""The parent's hash of a plain layer file, and the child's reader taking it over
(archive/inputdigest.py, ``_fastdigest.FileHash``, TarReader's *handoff*).

The reader is run in process here, on a map of the file as the confined child's is, beside a
``FileHash`` with its hand-off page: a real one that hashed the whole file (the reader must
never take it over), or one stalled at a chosen offset (it hashed a file of the layer's first
bytes; the page says "running" until the reader asks it to stop, then "done", as the parent's
thread does), so that the reader takes over wherever the parent may have got to by its first
read: at 0, inside a block, in a header, in a big file's data.  Each apply's diffID must be the
file's sha256, its tree GNU tar's, and its tar-split recording the one of an apply that hashed
everything itself.  Then the store's apply with its real confined child, on layers of small
files and of big files, and the rule that a child which read other bytes than the parent
hashed fails the apply.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tarbuild import gnu_extract, gnu_tar, make_rich_tree, needs_gnu_tar, needs_root
from tests.treeutil import diff_snapshots, snapshot

from graphdriver.archive import inputdigest
from graphdriver.archive.apply import ApplyOptions, apply_reader
from graphdriver.archive.compression import open_decompressed
from graphdriver.archive.native import native_module
from graphdriver.archive.recframes import BufferedRecorder
from graphdriver.archive.tarsplit import TarSplitPacker
from graphdriver.archive.tarstream import TarReader
from graphdriver.errors import GraphDriverError

fastdigest: Any = native_module("_fastdigest")
pytestmark = pytest.mark.skipif(fastdigest is None or not fastdigest.FUSED,
                                reason="the native helper's own SHA-NI sha256 is not here")

ALL_FACTS = {"dir_mtimes": True, "with_root": True}
MIB = 1 << 20


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~30 MB: the rich tree, 2000 small files, and big files (bigger than MAP_STEP: their
    data goes through the mapped reader's own buffer) among them."""
    src = tmp_path_factory.mktemp("src")
    make_rich_tree(src / "rich")
    rng = random.Random(18)
    for i in range(2000):
        d = src / f"d{i % 9}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:04d}").write_bytes(rng.randbytes(rng.choice((0, 1, 511, 513, 4096, 9000))))
        if i % 400 == 0:
            (d / f"big{i:04d}").write_bytes(rng.randbytes(3 * MIB + i))
    out = tmp_path_factory.mktemp("tar") / "layer.tar"
    gnu_tar("--numeric-owner", "--format=pax", "--xattrs", "--xattrs-include=*", "-cf", out,
            "-C", src, ".")
    return out


@pytest.fixture(scope="module")
def expected(layer: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ex = tmp_path_factory.mktemp("gnu")
    gnu_extract(layer, ex)
    return snapshot(ex, **ALL_FACTS)


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_FUTEX, _FUTEX_WAKE = 202, 1


def _wake(page: mmap.mmap, offset: int) -> None:
    """FUTEX_WAKE (shared) on the page's word at *offset*, as the parent's thread does."""
    word = ctypes.c_uint32.from_buffer(page, offset)
    _libc.syscall(_SYS_FUTEX, ctypes.byref(word), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)
    del word


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[Any]:
    """stalled(layer, at) -> a hand-off page of a parent that hashed the layer's first *at*
    bytes and runs on (never further) until the reader asks it to stop.  The page's first
    words are _fastdigest's handoff_t: stop (u32), done (u32)."""
    helpers: list[threading.Thread] = []
    pages: list[mmap.mmap] = []

    def make(layer: Path, at: int) -> mmap.mmap:
        head = tmp_path / f"head-{at}"
        with open(layer, "rb") as f:
            head.write_bytes(f.read(at))
        page = mmap.mmap(-1, fastdigest.HANDOFF_BYTES)
        fd = os.open(head, os.O_RDONLY)
        try:
            h = fastdigest.FileHash(fd, 0, page)
            assert h.result()[1:] == (at, False)
        finally:
            os.close(fd)
        assert fastdigest.handoff_hashed(page) == (at, True)
        struct.pack_into("<II", page, 0, 0, 0)  # running again, never to get further

        def stop_when_asked() -> None:
            while struct.unpack_from("<I", page, 0)[0] == 0:
                threading.Event().wait(0.001)
            struct.pack_into("<I", page, 4, 1)
            _wake(page, 4)

        helper = threading.Thread(target=stop_when_asked, daemon=True)
        helper.start()
        helpers.append(helper)
        pages.append(page)
        return page

    yield make
    for page in pages:
        struct.pack_into("<I", page, 0, 1)  # a helper whose reader never asked ends too
    for helper in helpers:
        helper.join(5)


def _apply(layer: Path, target: Path, handoff: Any = None, recorded: bool = False
           ) -> tuple[TarReader, Any, bytes]:
    """Apply *layer* onto *target* through a map, as the child does; (reader, result, the
    tar-split lines when *recorded*)."""
    target.mkdir()
    fd = os.open(layer, os.O_RDONLY)
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    out = io.BytesIO()
    packer = TarSplitPacker(out) if recorded else None  # type: ignore[arg-type]
    rec = BufferedRecorder(packer, batch=64 << 10, threaded=True) if packer else None
    try:
        stream = open_decompressed(fd, mappable=True)
        try:
            reader = TarReader(stream, rec, handoff=handoff)
            assert reader.mapped
            result = apply_reader(reader, root, ApplyOptions(recorder=rec))
        finally:
            stream.close()
        if rec is not None and packer is not None:
            rec.close()
            packer.close()
            assert packer.problem is None and packer.missing == 0
    finally:
        os.close(root)
        os.close(fd)
    return reader, result, out.getvalue()


@needs_gnu_tar
@needs_root
@pytest.mark.parametrize("where", ["start", "inside a block", "early", "in a big file",
                                   "half", "near the end"])
def test_the_reader_takes_the_hash_over_at_its_first_read(
        layer: Path, expected: dict[str, Any], stalled: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Wherever the parent got to while the child started, the reader stops it before it
    reads anything and hashes on from its state: from where it stopped, ahead of the reads."""
    size = layer.stat().st_size
    data = layer.read_bytes()
    big = data.index(b"big0400") + 2048  # in the data of a big file (after its headers)
    at = {"start": 0, "inside a block": 1000, "early": 4 * MIB + 7, "in a big file": big,
          "half": size // 2 + 3, "near the end": size - 3 * MIB + 5}[where]
    took = []
    real = TarReader._take_over

    def take_over(self: TarReader) -> None:
        real(self)
        took.append((self._end - self._map_start, self._hash_from - self._map_start))

    monkeypatch.setattr(TarReader, "_take_over", take_over)
    reader, result, lines = _apply(layer, tmp_path / "mine", stalled(layer, at), recorded=True)
    assert took == [(0, at)], "the reader did not take the parent's hash over at its start"
    assert reader.hashes and result.diff_id == _sha(layer)
    problems = diff_snapshots(expected, snapshot(tmp_path / "mine", **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])
    _, own, own_lines = _apply(layer, tmp_path / "own", recorded=True)  # hashing it all
    assert own.diff_id == result.diff_id and own_lines == lines


@needs_gnu_tar
@needs_root
def test_a_parent_done_before_the_reads_keeps_the_hash(layer: Path, expected: dict[str, Any],
                                                       tmp_path: Path) -> None:
    """The parent's hash done before the reads get anywhere (a small layer, a slow start):
    the reader hashes nothing, has no diffID of its own, and the parent's is the file's."""
    page = mmap.mmap(-1, fastdigest.HANDOFF_BYTES)
    fd = os.open(layer, os.O_RDONLY)
    try:
        h = fastdigest.FileHash(fd, 0, page)
        hexdigest, hashed, handed = h.result()
    finally:
        os.close(fd)
    assert "sha256:" + hexdigest == _sha(layer) and hashed == layer.stat().st_size
    assert not handed
    reader, result, _ = _apply(layer, tmp_path / "mine", page)
    assert not reader.hashes and result.diff_id == ""
    with pytest.raises(ValueError):
        reader.diff_id  # noqa: B018
    problems = diff_snapshots(expected, snapshot(tmp_path / "mine", **ALL_FACTS))
    assert not problems, "\n".join(problems[:20])


_WAITER = """
import mmap, os, signal, sys
from graphdriver.archive.native import native_module
fast = native_module("_fastdigest")
page = mmap.mmap(-1, fast.HANDOFF_BYTES)  # a parent's hash that never answers
def on_term(signum, frame):
    raise SystemExit(42)
signal.signal(signal.SIGTERM, on_term)
# as the confined child is spawned (an empty mask), whatever the test process had blocked
signal.pthread_sigmask(signal.SIG_SETMASK, [])
print(os.getpid(), flush=True)
try:
    fast.handoff_take(page)
except OSError as exc:
    print(exc, flush=True)
    sys.exit(43)
"""


@pytest.mark.parametrize("delay", [0.15, 0.2, 0.25, 0.3, 0.4])
def test_a_wait_for_the_parents_hash_takes_the_childs_signals(delay: float) -> None:
    """The confined child's SIGTERM (its parent-death signal too) is handled while it waits
    for the parent's hash to stop, whenever in the wait it comes (one that came just before a
    futex wait did not interrupt it): the wait does not keep it alive."""
    proc = subprocess.Popen([sys.executable, "-c", _WAITER], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip().isdigit()
        time.sleep(delay)  # in its wait by now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 42
    finally:
        proc.kill()
        proc.wait()


def test_a_wait_for_a_dead_parents_hash_fails() -> None:
    """The parent killed while its child waits for its hash to stop (its thread died with it:
    nothing would ever answer): the wait fails (ESRCH) instead of keeping the child."""
    middle = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, "
         "'-c', sys.argv[1]], stdout=subprocess.PIPE); print(p.stdout.readline().decode().strip(),"
         " flush=True); print(p.stdout.readline().decode().strip(), flush=True); "
         "sys.exit(p.wait())", _WAITER], stdout=subprocess.PIPE)
    try:
        assert middle.stdout is not None
        pid = int(middle.stdout.readline())
        time.sleep(0.3)
        middle.kill()  # SIGKILL: no parent-death signal was set for this waiter
        middle.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the waiter outlived its parent")
    finally:
        middle.kill()
        middle.wait()


@needs_root
def test_an_unmapped_reader_hashes_it_all(layer: Path, tmp_path: Path) -> None:
    """A reader that could not map the file (here: it reads a pipe) stops the parent's hash
    at once and hashes everything itself (what the parent hashed is gone from its buffer by
    the time it would take over)."""
    page = mmap.mmap(-1, fastdigest.HANDOFF_BYTES)
    fd = os.open(layer, os.O_RDONLY)
    r, w = os.pipe()
    def feed() -> None:
        try:
            os.write(w, layer.read_bytes())
        except BrokenPipeError:  # the reader is gone: the test has failed already
            pass
        finally:
            os.close(w)

    feeder = threading.Thread(target=feed)
    try:
        h = fastdigest.FileHash(fd, 0, page)
        feeder.start()
        stream = open_decompressed(r)
        reader = TarReader(stream, handoff=page)
        assert not reader.mapped and reader.hashes
        assert fastdigest.handoff_hashed(page)[1]  # the parent's thread was stopped
        h.result()
        (tmp_path / "t").mkdir()
        root = os.open(tmp_path / "t", os.O_RDONLY | os.O_DIRECTORY)
        try:
            result = apply_reader(reader, root, ApplyOptions())
        finally:
            os.close(root)
        assert result.diff_id == _sha(layer)
    finally:
        os.close(r)  # first: a feeder still writing (the reader failed early) then stops
        feeder.join()
        os.close(fd)


def test_the_parent_hashes_only_a_plain_regular_file(layer: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gz = tmp_path / "layer.tar.gz"
    gz.write_bytes(subprocess.run(["gzip", "-1c", str(layer)], capture_output=True,
                                  check=True).stdout)
    for path, hashed in ((layer, True), (gz, False)):
        fd = os.open(path, os.O_RDONLY)
        try:
            digest = inputdigest.start(fd)
            assert (digest is not None) == hashed, path
            if digest is not None:
                size = path.stat().st_size
                assert digest.diff_id(None, "none", size) == _sha(path)
                digest.close()
        finally:
            os.close(fd)
    r, w = os.pipe()
    try:
        assert inputdigest.start(r) is None
    finally:
        os.close(r)
        os.close(w)
    monkeypatch.setattr(inputdigest, "_memory", lambda: 3 * layer.stat().st_size)
    fd = os.open(layer, os.O_RDONLY)
    try:
        assert inputdigest.start(fd) is None  # more than a quarter of the memory
    finally:
        os.close(fd)


def test_the_hash_starts_at_the_files_offset(layer: Path) -> None:
    """A stream that starts inside its file (the caller read some): hashed from there, and
    the file's offset is left where it was (the child reads from it)."""
    fd = os.open(layer, os.O_RDONLY)
    try:
        os.lseek(fd, 512, os.SEEK_SET)
        digest = inputdigest.start(fd)
        assert digest is not None
        try:
            size = layer.stat().st_size - 512
            want = "sha256:" + hashlib.sha256(layer.read_bytes()[512:]).hexdigest()
            assert digest.diff_id(None, "none", size) == want
            assert os.lseek(fd, 0, os.SEEK_CUR) == 512
        finally:
            digest.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize(("kind", "delta"), [("none", -1), ("none", 1), ("gzip", 0)])
def test_a_child_that_read_other_bytes_fails_the_apply(layer: Path, kind: str,
                                                       delta: int) -> None:
    """The file cut or grown while it was applied, or replaced by a compressed one: the
    parent's hash is not of what was applied, and the apply fails (the store rolls it back)."""
    fd = os.open(layer, os.O_RDONLY)
    try:
        digest = inputdigest.start(fd)
        assert digest is not None
        try:
            with pytest.raises(GraphDriverError, match="changed while it was applied"):
                digest.diff_id(None, kind, layer.stat().st_size + delta)
        finally:
            digest.close()
    finally:
        os.close(fd)


def test_nothing_of_the_file_stays_open(layer: Path) -> None:
    """The thread's duplicate of the fd is closed once it ended (result or cancel), and the
    page is let go (its map can be closed), while the object is still kept (a traceback's
    frame may keep it after a failed apply)."""
    fd = os.open(layer, os.O_RDONLY)
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        for stop in ("result", "cancel"):
            page = mmap.mmap(-1, fastdigest.HANDOFF_BYTES)
            h = fastdigest.FileHash(fd, 0, page)
            getattr(h, stop)()
            assert sorted(os.listdir("/proc/self/fd")) == before, stop
            page.close()  # no BufferError: the object let the page go
            del h
    finally:
        os.close(fd)


def test_a_child_that_took_over_gives_the_diff_id(layer: Path) -> None:
    """The child's diffID (it went on from the parent's state) is the layer's; the parent's
    thread, stopped by then, is not waited for."""
    fd = os.open(layer, os.O_RDONLY)
    try:
        digest = inputdigest.start(fd)
        assert digest is not None
        try:
            assert digest.diff_id("sha256:" + "ab" * 32, "none", 1) == "sha256:" + "ab" * 32
        finally:
            digest.close()
    finally:
        os.close(fd)


@needs_root
@pytest.mark.parametrize("shape", ["small files", "big files"])
def test_the_store_apply_gives_the_files_sha256(shape: str, tmp_path: Path) -> None:
    """Through the store and its confined child: a layer of small files and one of big
    files (the child takes the hash over unless the parent was done by its first read, which
    is not up to the test): the file's sha256 either way, and the files applied."""
    from graphdriver import open_driver

    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(shape)
    if shape == "small files":
        for i in range(3000):
            (src / f"f{i:04d}").write_bytes(rng.randbytes(i % 3000))
    else:
        for i in range(6):
            (src / f"big{i}").write_bytes(rng.randbytes(24 * MIB + i))
    tar = tmp_path / "layer.tar"
    gnu_tar("--numeric-owner", "-cf", tar, "-C", src, ".")
    d = open_driver("vfs", tmp_path / "store", options={}, runroot=tmp_path / "run")
    try:
        d.create("layer1", None)
        with open(tar, "rb") as f:
            result = d.apply_diff_result("layer1", None, f)
        assert result.diff_id == _sha(tar)
        root = Path(d.get("layer1"))
        try:
            for p in src.iterdir():
                assert (root / p.name).read_bytes() == p.read_bytes(), p.name
        finally:
            d.put("layer1")
    finally:
        d.cleanup()
