"""zstd layers read from a descriptor: the native decoder thread (``_fastzstd``) and the
python-zstandard path it replaces decode the same bytes and fail the same way (corrupt data, a
stream cut short inside a frame), whatever the input is (a file, a pipe)."""

from __future__ import annotations

import fcntl
import itertools
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from graphdriver.archive import compression
from graphdriver.archive.native import native_module
from graphdriver.errors import InvalidArchive

_native = native_module("_fastzstd")
_NOT_BUILT = "_fastzstd not compiled, libzstd.so.1 absent, or GRAPHDRIVER_NO_NATIVE set"


@pytest.fixture(params=["native", "python"])
def path_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "native":
        if _native is None:
            pytest.skip(_NOT_BUILT)
    else:
        monkeypatch.setenv("GRAPHDRIVER_NO_NATIVE", "1")
    yield request.param


def _payload(size: int, seed: int = 1) -> bytes:
    """Compressible but not trivial: words from a small vocabulary, some random runs."""
    rnd = random.Random(seed)
    words = [bytes(rnd.randrange(97, 123) for _ in range(rnd.randrange(2, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words) + b" "
        if rnd.random() < 0.01:
            out += rnd.randbytes(rnd.randrange(1, 3000))
    return bytes(out[:size])


def _decode_file(tmp_path: Path, blob: bytes, read_size: int = 256 << 10,
                 out: bytearray | None = None) -> bytes:
    """*blob* decoded from a file; what was decoded before a failure is left in *out*."""
    p = tmp_path / "blob.zst"
    p.write_bytes(blob)
    fd = os.open(p, os.O_RDONLY)
    try:
        s = compression.open_decompressed(fd)
        out = bytearray() if out is None else out
        buf = bytearray(read_size)
        try:
            while n := s.readinto(buf):  # type: ignore[attr-defined]
                out += buf[:n]
        finally:
            s.close()
        return bytes(out)
    finally:
        os.close(fd)


def test_the_native_decoder_is_the_one_used() -> None:
    if _native is None:
        pytest.skip(_NOT_BUILT)
    data = zstandard.ZstdCompressor().compress(b"x" * 100)
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        s = compression.open_decompressed(r)
        assert isinstance(s._inner, _native.Decoder)  # type: ignore[attr-defined]
        assert compression.stream_kind(s) == "zstd"
        assert s.read() == b"x" * 100
    finally:
        os.close(r)


def test_warm_kind_names_the_decoder_still_to_load(path_kind: str) -> None:
    r, w = os.pipe()
    os.write(w, zstandard.ZstdCompressor().compress(b"x"))
    os.close(w)
    try:
        s = compression.open_decompressed(r)
        assert compression.stream_kind(s) == "zstd"
        assert compression.warm_kind(s) == ("none" if path_kind == "native" else "zstd")
        s.close()
    finally:
        os.close(r)


@pytest.mark.parametrize("read_size", [1, 4096, 256 << 10, 3 << 20])
def test_large_stream_many_frames_and_a_skippable_frame(
        tmp_path: Path, path_kind: str, read_size: int) -> None:
    # larger than the native ring (2 MiB), several frames of different levels and checksum
    # settings, a skippable frame between two, and an empty frame
    size = 9 << 20 if read_size > 1 else 300_000
    data = _payload(size)
    cut = [0, size // 3, size // 3 + 1, size // 2, size]
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    blob = b""
    for i, (a, b) in enumerate(itertools.pairwise(cut)):
        blob += zstandard.ZstdCompressor(level=1 + 5 * i, write_checksum=bool(i % 2)).compress(
            data[a:b])
        if i == 1:
            blob += skippable
    blob += zstandard.ZstdCompressor().compress(b"")
    assert _decode_file(tmp_path, blob, read_size) == data


def test_a_stream_from_a_pipe(path_kind: str) -> None:
    data = _payload(5 << 20, seed=2)
    blob = zstandard.ZstdCompressor(level=3).compress(data)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            for i in range(0, len(blob), 7777):
                f.write(blob[i : i + 7777])

    t = threading.Thread(target=feed)
    t.start()
    try:
        s = compression.open_decompressed(r)
        out = bytearray()
        while chunk := s.read(100_000):
            out += chunk
        assert bytes(out) == data
        s.close()
    finally:
        t.join()
        os.close(r)


def test_frames_with_growing_windows(tmp_path: Path, path_kind: str) -> None:
    # a tiny frame (its window is its size), then frames whose windows outgrow the native ring
    # (it is replaced between frames, once the reader took everything before), then a small one
    parts = [_payload(3000, seed=7), _payload(6 << 20, seed=8), _payload(9 << 20, seed=9),
             _payload(100_000, seed=10)]
    blob = b""
    for part, window_log in zip(parts, (10, 22, 23, 17), strict=True):
        params = zstandard.ZstdCompressionParameters.from_level(
            3, window_log=window_log, source_size=len(part))
        blob += zstandard.ZstdCompressor(compression_params=params).compress(part)
    assert _decode_file(tmp_path, blob) == b"".join(parts)


def test_a_window_beyond_the_limit_is_refused(tmp_path: Path, path_kind: str) -> None:
    # 256 MiB: libzstd's default limit (the zstd command's too) is 128 MiB
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=28)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    blob = cobj.compress(b"x" * 1000) + cobj.flush()
    with pytest.raises(InvalidArchive, match="corrupt zstd stream"):
        _decode_file(tmp_path, blob)


@pytest.mark.parametrize("where", ["in the header", "in a block", "before the checksum",
                                   "in the second frame"])
def test_a_stream_cut_inside_a_frame_is_corrupt(
        tmp_path: Path, path_kind: str, where: str) -> None:
    data = _payload(3 << 20, seed=3)
    one = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    cut = {"in the header": one[:6], "in a block": one[: len(one) // 2],
           "before the checksum": one[:-2],
           "in the second frame": one + one[: len(one) // 3]}[where]
    with pytest.raises(InvalidArchive, match="corrupt zstd stream"):
        _decode_file(tmp_path, cut)


def test_a_stream_cut_between_frames_ends_there(tmp_path: Path, path_kind: str) -> None:
    z = zstandard.ZstdCompressor()
    assert _decode_file(tmp_path, z.compress(b"a" * 1000) + z.compress(b"b" * 10)) == (
        b"a" * 1000 + b"b" * 10)


@pytest.mark.parametrize("damage", ["flipped bytes", "garbage after the frame"])
def test_corrupt_data(tmp_path: Path, path_kind: str, damage: str) -> None:
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(_payload(1 << 20)))
    if damage == "flipped bytes":
        for i in range(len(blob) // 2, len(blob) // 2 + 64):
            blob[i] ^= 0x5A
    else:
        blob += b"this is not a zstd frame"
    with pytest.raises(InvalidArchive, match="corrupt zstd stream"):
        _decode_file(tmp_path, bytes(blob))


def test_the_bytes_before_an_error_are_delivered_first(tmp_path: Path, path_kind: str) -> None:
    z = zstandard.ZstdCompressor()
    good = _payload(3 << 20, seed=4)
    blob = z.compress(good) + b"\x28\xb5\x2f\xfd" + b"\xff" * 20
    out = bytearray()
    with pytest.raises(InvalidArchive):
        _decode_file(tmp_path, blob, 65536, out)
    # python-zstandard's reader drops the chunk it was decoding when it fails
    assert bytes(out) == good if path_kind == "native" else good.startswith(bytes(out))


def test_close_stops_a_decoder_waiting_on_a_pipe() -> None:
    if _native is None:
        pytest.skip(_NOT_BUILT)
    data = _payload(1 << 20, seed=5)
    blob = zstandard.ZstdCompressor().compress(data)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    os.write(w, blob[: len(blob) // 2])  # the writer stays open and sends nothing more
    try:
        s = compression.open_decompressed(r)
        assert s.read(1000) == data[:1000]
        start = time.monotonic()
        s.close()
        assert time.monotonic() - start < 1.0
    finally:
        os.close(w)
        os.close(r)


def test_close_while_the_ring_is_full() -> None:
    if _native is None:
        pytest.skip(_NOT_BUILT)
    blob = zstandard.ZstdCompressor().compress(_payload(8 << 20, seed=6))
    r, w = os.pipe()

    def feed() -> None:
        try:
            with os.fdopen(w, "wb") as f:
                f.write(blob)
        except BrokenPipeError:
            pass

    t = threading.Thread(target=feed)
    t.start()
    s = compression.open_decompressed(r)
    assert len(s.read(10)) == 10
    time.sleep(0.2)  # the worker fills the ring and sleeps
    start = time.monotonic()
    s.close()
    assert time.monotonic() - start < 1.0
    os.close(r)
    t.join()


def test_a_read_after_close_fails() -> None:
    if _native is None:
        pytest.skip(_NOT_BUILT)
    r, w = os.pipe()
    os.close(w)
    try:
        d = _native.Decoder(r, zstandard.ZstdCompressor().compress(b"abc"))
        d.close()
        with pytest.raises(ValueError, match="closed"):
            d.readinto(bytearray(10))
    finally:
        os.close(r)
