"""The background sha256 (archive/digest.py) and the reader's use of it: the diffID must be the
sha256 of every byte read, whatever the sizes of the reads and however the buffer is reused.
Both workers are tested: the Python thread and the native one (when it is built)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import itertools
import os
import random
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from graphdriver.archive import digest as digest_module
from graphdriver.archive import tarstream
from graphdriver.archive.digest import INLINE_BELOW, ThreadDigest
from graphdriver.archive.native import native_module
from graphdriver.archive.tarstream import TarReader

_native = native_module("_fastdigest")
_NOT_BUILT = "_fastdigest not compiled (or GRAPHDRIVER_NO_NATIVE set)"
_WORKERS = [pytest.param(ThreadDigest, id="python")]
if _native is not None:
    _WORKERS.append(pytest.param(_native.Digest, id="native"))
else:
    _WORKERS.append(pytest.param(None, id="native", marks=pytest.mark.skip(reason=_NOT_BUILT)))
_INLINE = {ThreadDigest: INLINE_BELOW}
if _native is not None:
    _INLINE[_native.Digest] = _native.INLINE_BELOW

if TYPE_CHECKING:
    from collections.abc import Callable

    from graphdriver._fastdigest import Digest

    Worker = type[ThreadDigest] | type[Digest]


def _comm(path: Path) -> str:
    """A thread's kernel name ("" for one that ended since its task directory was listed)."""
    try:
        return path.read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _digest_threads() -> int:
    """Threads named layer-digest: Python's, or native ones (their kernel name)."""
    python = sum(1 for t in threading.enumerate() if t.name == "layer-digest")
    native = sum(1 for comm in Path("/proc/self/task").glob("*/comm")
                 if _comm(comm) == "layer-digest")
    return python + native


def _wait_for_threads(done: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + 5
    while not done(_digest_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_native_worker_is_used_when_built() -> None:
    expected = ThreadDigest if _native is None else _native.Digest
    assert digest_module.BackgroundDigest is expected


@pytest.mark.parametrize("worker", _WORKERS)
def test_regions_of_every_size_hash_in_order(worker: Worker) -> None:
    rng = random.Random(7)
    data = rng.randbytes(6 << 20)
    inline = _INLINE[worker]
    sizes = [1, 100, inline - 1, inline, 3 << 20, 5, 2 << 10, 700_000, 63, 64, 65, 0]
    d = worker()
    pos = 0
    view = memoryview(data)
    for size in sizes * 2:
        if pos >= len(data):
            break
        d.update(view[pos : pos + size])
        pos += size
    assert d.hexdigest() == hashlib.sha256(data[:pos]).hexdigest()


@pytest.mark.parametrize("worker", _WORKERS)
def test_small_inputs_and_many_regions(worker: Worker) -> None:
    rng = random.Random(11)
    cases = [[], [0], [1], [63], [64], [65], [127, 128, 129], [1] * 3000, [64] * 500,
             [rng.randint(0, 200) for _ in range(2000)], [5000] * 3000,  # more than the slots
             [rng.choice((1, 64, 4095, 4096, 4097, 65_535, 65_536, 300_000)) for _ in range(400)]]
    for sizes in cases:
        data = rng.randbytes(sum(sizes))
        view = memoryview(data)
        d = worker()
        pos = 0
        for size in sizes:
            d.update(view[pos : pos + size])
            pos += size
        assert d.hexdigest() == hashlib.sha256(data).hexdigest(), sizes[:8]


@pytest.mark.parametrize("worker", _WORKERS)
def test_wait_for_lets_the_front_be_reused(worker: Worker) -> None:
    """The reader's pattern: regions of one buffer, its front overwritten after wait_for."""
    rng = random.Random(5)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    expected = hashlib.sha256()
    d = worker()
    pending: list[tuple[int, int]] = []  # (end of the region in buf, its number)
    pos = 0
    for _ in range(600):
        n = rng.choice((1, 100, 5000, 70_000, 256 << 10))
        if pos + n > len(buf):
            pos = 0
        for end, seq in pending:
            if pos < end:  # this region and the ones before it are about to be overwritten
                d.wait_for(seq)
        pending = [(end, seq) for end, seq in pending if end <= pos]
        buf[pos : pos + n] = rng.randbytes(n)
        expected.update(buf[pos : pos + n])
        pending.append((pos + n, d.update(view[pos : pos + n])))
        pos += n
    assert d.hexdigest() == expected.hexdigest()


@pytest.mark.parametrize("worker", _WORKERS)
def test_wait_means_the_regions_may_be_overwritten(worker: Worker) -> None:
    buf = bytearray(os.urandom(1 << 20))
    expected = hashlib.sha256()
    d = worker()
    for _ in range(20):
        d.update(memoryview(buf))
        expected.update(buf)
        d.wait()
        buf[:] = os.urandom(len(buf))  # reused, as the reader reuses its buffer
    assert d.hexdigest() == expected.hexdigest()


@pytest.mark.parametrize("worker", _WORKERS)
def test_a_dropped_digest_stops_its_thread(worker: Worker) -> None:
    before = _digest_threads()
    d = worker()
    d.update(memoryview(bytes(1 << 20)))
    _wait_for_threads(lambda n: n > before)  # a native thread names itself once running
    assert _digest_threads() == before + 1
    del d
    gc.collect()
    _wait_for_threads(lambda n: n <= before)
    assert _digest_threads() == before


class _Trickle(io.RawIOBase):
    """A stream handing out random-sized pieces (1 byte .. 300 KiB), like a pipe does."""

    def __init__(self, data: bytes, seed: int) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), len(self._data), self._rng.choice((1, 511, 4096, 70_000, 300_000)))
        buf[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def _tar_bytes(seed: int) -> bytes:
    rng = random.Random(seed)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(60):
            size = rng.choice((0, 10, 5000, 200_000, 1_500_000))
            info = tarfile.TarInfo(f"d{i % 5}/" + "n" * rng.randint(1, 150) + str(i))
            info.size = size
            tf.addfile(info, io.BytesIO(rng.randbytes(size)))
    return out.getvalue() + b"trailing garbage after the end"


@pytest.mark.parametrize("worker", _WORKERS)
def test_a_closed_digest_stops_its_thread(worker: Worker) -> None:
    before = _digest_threads()
    d = worker()
    d.update(memoryview(bytes(1 << 20)))
    d.wait()
    d.close()
    _wait_for_threads(lambda n: n <= before)
    assert _digest_threads() == before


@pytest.mark.parametrize("worker", _WORKERS)
def test_reader_diff_id_is_the_sha256_of_every_byte_read(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tarstream, "BackgroundDigest", worker)
    for seed in (1, 2, 3):
        blob = _tar_bytes(seed)
        reader = TarReader(_Trickle(blob, seed))  # type: ignore[arg-type]
        names = 0
        for entry in reader:
            names += 1
            for _ in reader.chunks():
                pass
            assert entry.name
        assert names == 60
        assert reader.diff_id == "sha256:" + hashlib.sha256(blob).hexdigest()


@pytest.mark.skipif(_native is None, reason=_NOT_BUILT)
def test_a_forked_child_neither_waits_for_nor_joins_the_parents_thread() -> None:
    assert _native is not None
    d = _native.Digest()
    data = bytes(1 << 20)
    d.update(memoryview(data))
    pid = os.fork()
    if pid == 0:  # the worker thread is not in this process: waiting for it would never end
        status = 1
        try:
            # the region may have been hashed before the fork (then there is no wait), or be
            # pending (then waiting is refused, not endless)
            with contextlib.suppress(ValueError):
                d.wait()
            del d  # nor may dropping it join a thread that is not here
            status = 0
        finally:
            os._exit(status)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    assert d.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(_native is None or not _native.CRC,
                    reason="_fastdigest (with anycrc) not built")
def test_native_frame_jobs_in_order_with_the_regions() -> None:
    """fill_frames: jobs over a buffer -- CRC-64s, and copies (bit 63 of the length) -- written
    into a frames bytearray by the worker in order with the regions (waiting for its number
    means they are there); a bytearray in use cannot be resized; jobs out of bounds are
    refused."""
    import struct

    from graphdriver.archive.crc64 import crc64

    assert _native is not None
    copy = 1 << 63
    d = _native.Digest()
    src = bytearray(random.Random(7).randbytes(3 << 20))
    spans = [(i * 70_001, 1 + i * 1_237) for i in range(40)]
    frames = bytearray(3 + 8 * 40 + sum(n for _, n in spans))
    jobs = b"".join(struct.pack("<QQQ", off, n, 3 + 8 * i) for i, (off, n) in enumerate(spans))
    at = 3 + 8 * 40
    for off, n in spans:
        jobs += struct.pack("<QQQ", off, n | copy, at)
        at += n
    d.update(memoryview(src)[: 1 << 20])
    seq = d.fill_frames(src, frames, jobs)
    with pytest.raises(BufferError):
        frames.append(0)  # the worker may be writing into it
    d.update(memoryview(src)[1 << 20 :])
    d.wait_for(seq)
    assert [struct.unpack_from("<Q", frames, 3 + 8 * i)[0] for i in range(40)] == [
        crc64(src[off : off + n]) for off, n in spans]
    assert frames[3 + 8 * 40 :] == b"".join(src[off : off + n] for off, n in spans)
    # a CRC in pieces: added up (bit 62), then written (bit 61) and started again
    pieces = bytearray(16)
    add, end = 1 << 62, 1 << 61
    seq = d.fill_frames(src, pieces, struct.pack("<9Q", 0, 1000 | add, 0, 1000, 77 | add, 0,
                                                 0, end, 0))
    seq = d.fill_frames(src, pieces, struct.pack("<6Q", 5, 3 | add, 0, 0, end, 8))
    d.wait_for(seq)
    assert struct.unpack("<QQ", pieces) == (crc64(src[:1077]), crc64(src[5:8]))
    for bad in ((len(src) - 4, 5, 0), (0, 1, len(frames) - 7), (0, 1 | add | end, 0),
                (0, 10 | copy, len(frames) - 9), (len(src) - 4, 5 | copy, 0)):
        with pytest.raises(ValueError, match="out of its buffers' bounds"):
            d.fill_frames(src, frames, struct.pack("<QQQ", *bad))
    assert d.hexdigest() == hashlib.sha256(src).hexdigest()
    with pytest.raises(ValueError, match="closed"):
        d.fill_frames(src, frames, jobs)


@pytest.mark.skipif(_native is None or not _native.CRC,
                    reason="_fastdigest (with anycrc) not built")
def test_a_piece_crc_computed_by_the_caller_joins_the_running_one() -> None:
    """fill_frames' join job (bit 60: the offset field holds a piece's CRC-64, the length is
    the piece's): pieces added by the worker and pieces the caller computed, in any order and
    of any length (empty, first, last), give the CRC-64 of the whole."""
    import struct

    from graphdriver.archive.crc64 import crc64

    assert _native is not None
    add, end, join = 1 << 62, 1 << 61, 1 << 60
    rng = random.Random(60)
    src = bytearray(rng.randbytes(1 << 20))
    d = _native.Digest()
    for trial in range(100):
        cuts = sorted(rng.sample(range(len(src)), rng.randrange(1, 6)))
        bounds = [0, *cuts, len(src)] if trial % 2 else [cuts[0], *cuts, cuts[-1]]
        jobs = b""
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            if (i + trial) % 2:
                jobs += struct.pack("<QQQ", crc64(src[a:b]), (b - a) | join, 0)
            else:
                jobs += struct.pack("<QQQ", a, (b - a) | add, 0)
        out = bytearray(8)
        d.wait_for(d.fill_frames(src, out, jobs + struct.pack("<QQQ", 0, end, 0)))
        assert struct.unpack("<Q", out)[0] == crc64(src[bounds[0] : bounds[-1]]), trial
    d.close()


@pytest.mark.skipif(_native is None or not _native.FUSED or not _native.CRC,
                    reason="_fastdigest without the SHA extensions (or anycrc)")
def test_a_crc_job_over_a_region_is_folded_into_its_hash() -> None:
    """A region, then a fill_frames slot of one job adding a range of it to the running CRC,
    both waiting while the worker is busy: the worker does them in one pass (fused_bytes), at
    any offset of the hash's stream and of the region, and the sha256 and the CRC-64 are those
    of hashlib and anycrc."""
    import struct

    from graphdriver.archive.crc64 import crc64

    assert _native is not None
    add, end = 1 << 62, 1 << 61
    rng = random.Random(64)
    fused = 0
    for trial in range(60):
        d = _native.Digest()
        busy = rng.randbytes(rng.randrange(1 << 20, 3 << 20))  # the worker hashes it meanwhile
        lead = rng.randbytes(rng.randrange(0, 130))  # the hash's stream off a block's start
        src = bytearray(rng.randbytes(rng.randrange(64, 400_000)))
        a = rng.randrange(0, len(src))
        b = rng.randrange(a, len(src) + 1)
        for region in (busy, lead, src):
            if region:
                d.update(memoryview(region))
        frame = bytearray(8)
        d.fill_frames(src, frame, struct.pack("<QQQ", a, (b - a) | add, 0))
        d.wait_for(d.fill_frames(src, frame, struct.pack("<QQQ", 0, end, 0)))
        assert struct.unpack("<Q", frame)[0] == crc64(bytes(src[a:b])), trial
        fused += d.fused_bytes() > 0
        assert d.hexdigest() == hashlib.sha256(busy + lead + src).hexdigest(), trial
    assert fused > 40  # the worker was busy when the two came, most times


@pytest.mark.skipif(_native is None or not _native.FUSED or not _native.CRC,
                    reason="_fastdigest without the SHA extensions (or anycrc)")
def test_libcrypto_is_used_where_sha_ni_is_refused(tmp_path: Path) -> None:
    """GRAPHDRIVER_NO_SHA_NI: libcrypto's sha256 (and anycrc's CRC, never fused), as on a CPU
    without the SHA extensions; the same digests."""
    script = (
        "import hashlib, struct\n"
        "from graphdriver.archive import digest\n"
        "from graphdriver.archive.crc64 import crc64\n"
        "assert digest.NATIVE_CRC and not digest.FUSED_CRC\n"
        "d = digest.BackgroundDigest()\n"
        "src = bytes(range(256)) * 4099\n"
        "frame = bytearray(8)\n"
        "d.update(memoryview(src))\n"
        "d.wait_for(d.fill_frames(src, frame, struct.pack('<QQQ', 7, (len(src) - 9) | 1 << 62,"
        " 0) + struct.pack('<QQQ', 0, 1 << 61, 0)))\n"
        "assert struct.unpack('<Q', frame)[0] == crc64(src[7:-2])\n"
        "assert d.fused_bytes() == 0\n"
        "assert d.hexdigest() == hashlib.sha256(src).hexdigest()\n"
    )
    env = {**os.environ, "GRAPHDRIVER_NO_SHA_NI": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


@pytest.mark.parametrize("worker", _WORKERS)
def test_is_done_says_without_waiting_whether_a_region_is_hashed(worker: Worker) -> None:
    """is_done(n): True once the region numbered n is hashed (after wait_for(n) at the
    latest), and for every region before it; never for a number not handed over yet."""
    d = worker()
    data = random.Random(5).randbytes(3 << 20)
    seqs = [d.update(memoryview(data)[i : i + (256 << 10)]) for i in range(0, len(data), 256 << 10)]
    assert not d.is_done(seqs[-1] + 1000)
    d.wait_for(seqs[-1])
    assert all(d.is_done(n) for n in seqs)
    assert not d.is_done(seqs[-1] + 1000)
    assert d.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("worker", _WORKERS)
def test_pending_counts_what_the_worker_has_not_done(worker: Worker) -> None:
    """pending: the regions handed over and not done yet (0 once waited for)."""
    d = worker()
    big = bytes(8 << 20)
    seqs = [d.update(memoryview(big)) for _ in range(3)]
    assert 0 <= d.pending() <= 3
    d.wait_for(seqs[-1])
    assert d.pending() == 0
    d.close()


@pytest.mark.skipif(_native is None, reason=_NOT_BUILT)
def test_a_second_waiting_thread_is_woken_and_released() -> None:
    """wait_for from two threads at once (the reader's and the tar-split packer's): both return
    once the worker is past their regions; a thread still waiting when the digest is closed gets
    an error instead of sleeping for ever."""
    assert _native is not None
    d = _native.Digest()
    data = bytes(8 << 20)
    seqs = [d.update(memoryview(data)[i << 20 : (i + 1) << 20]) for i in range(8)]
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(d.wait_for(seqs[-1])))
    t.start()
    d.wait_for(seqs[3])
    t.join(10)
    assert got == [None]
    # a waiter on a region never handed over: not possible (refused); on one pending when closed
    d2 = _native.Digest()
    errors: list[BaseException] = []

    def wait_long() -> None:
        try:
            for _ in range(2000):
                d2.wait_for(s)
        except ValueError as exc:
            errors.append(exc)

    big = bytes(64 << 20)
    s = d2.update(memoryview(big))
    t2 = threading.Thread(target=wait_long)
    t2.start()
    d2.close()
    t2.join(10)
    assert not t2.is_alive()


# ---- the CRC-64 of tar-split payloads (archive/crc64.py) --------------------------------------

_CRC_PROBE = """
import json, os, random, sys
from graphdriver.archive.native import native_module
fast = native_module("_fastdigest")
if sys.argv[1] == "anycrc":  # its extension's CRC taken first: crc64 is then anycrc's
    from importlib.machinery import PathFinder
    where = PathFinder.find_spec("anycrc").submodule_search_locations
    assert fast.load_crc(PathFinder.find_spec("anycrc.crc", where).origin)
from graphdriver.archive.crc64 import crc64
data = bytes(range(256)) * 4099
rng = random.Random(64)
lengths = [*range(300), 511, 512, 513, 1023, 4095, 4096, 4097, 65537, 1 << 20]
blobs = [rng.randbytes(n) for n in lengths]
maps = open("/proc/self/maps").read()
packages = ("anycrc", "isal")
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] in packages),
                  "native": fast is not None and crc64 is fast.crc64,
                  "isal": "/isal/isal_zlib." in maps, "anycrc": "/anycrc/crc." in maps,
                  "crcs": [crc64(b""), crc64(b"123456789"), crc64(data), crc64(data[7:], 99),
                           crc64(memoryview(bytearray(data))[3:70000])]
                          + [crc64(b) for b in blobs]
                          + [crc64(b[len(b) // 3 :], crc64(b[: len(b) // 3])) for b in blobs]}))
"""


def _crc_probe(native: bool, first: str = "") -> dict[str, Any]:
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GRAPHDRIVER_NO_NATIVE"}
    if not native:
        env["GRAPHDRIVER_NO_NATIVE"] = "1"
    out = subprocess.run([sys.executable, "-c", _CRC_PROBE, first], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.mark.skipif(_native is None, reason=_NOT_BUILT)
def test_the_native_crc_is_isals_or_anycrcs_without_their_modules() -> None:
    """Where _fastdigest is built, crc64 is its function over ISA-L's crc64_iso_refl (isal's
    extension loaded as a library: ~4x anycrc's speed), or over anycrc's crc_calc when that
    is the extension it was given; neither package's Python modules run (start-up time of the
    confined child); and each gives what anycrc's own Model gives -- Go's CRC-64/ISO check
    value, a CRC continued from another, buffers of every length up to a few blocks."""
    native, python = _crc_probe(True), _crc_probe(False)
    anycrc = _crc_probe(True, "anycrc")
    assert native["native"] and native["modules"] == [] and native["isal"]
    assert anycrc["native"] and anycrc["modules"] == [] and anycrc["anycrc"]
    assert not anycrc["isal"]  # the test can tell the two apart
    assert not python["native"] and "anycrc" in python["modules"]  # the test can fail
    assert native["crcs"] == python["crcs"] == anycrc["crcs"]
    assert native["crcs"][:2] == [0, 0xB90956C775A41001]
