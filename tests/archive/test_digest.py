"""The background sha256 (archive/digest.py) and the reader's use of it: the diffID must be the
sha256 of every byte read, whatever the sizes of the reads and however the buffer is reused."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import random
import tarfile
import threading
import time

from graphdriver.archive.digest import INLINE_BELOW, BackgroundDigest
from graphdriver.archive.tarstream import TarReader


def _digest_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "layer-digest")


def test_regions_of_every_size_hash_in_order() -> None:
    rng = random.Random(7)
    data = rng.randbytes(6 << 20)
    sizes = [1, 100, INLINE_BELOW - 1, INLINE_BELOW, 3 << 20, 5, 2 << 10, 700_000]
    d = BackgroundDigest()
    pos = 0
    view = memoryview(data)
    for size in sizes * 2:
        if pos >= len(data):
            break
        d.update(view[pos : pos + size])
        pos += size
    assert d.hexdigest() == hashlib.sha256(data[:pos]).hexdigest()


def test_wait_means_the_regions_may_be_overwritten() -> None:
    buf = bytearray(os.urandom(1 << 20))
    expected = hashlib.sha256()
    d = BackgroundDigest()
    for _ in range(20):
        d.update(memoryview(buf))
        expected.update(buf)
        d.wait()
        buf[:] = os.urandom(len(buf))  # reused, as the reader reuses its buffer
    assert d.hexdigest() == expected.hexdigest()


def test_a_dropped_digest_stops_its_thread() -> None:
    before = _digest_threads()
    d = BackgroundDigest()
    d.update(memoryview(bytes(1 << 20)))
    assert _digest_threads() == before + 1
    del d
    gc.collect()
    deadline = time.monotonic() + 5
    while _digest_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
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


def test_reader_diff_id_is_the_sha256_of_every_byte_read() -> None:
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
