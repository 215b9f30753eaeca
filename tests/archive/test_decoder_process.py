"""The confined apply's decoder process (``compression.open_decoded``): the tar it passes on, the
one-line error of a broken stream, and that it never outlives its reader on any exit path."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from tarbuild import build, member
from tests.childproc import children_of, is_gone, wait_until_gone

from graphdriver.archive.compression import open_decoded
from graphdriver.archive.tarstream import TarReader
from graphdriver.errors import GraphDriverError, InvalidArchive

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "zstd": lambda b: zstandard.ZstdCompressor(write_checksum=True).compress(b),
    "xz": lzma.compress,
    "bzip2": bz2.compress,
}
TAR = build(member("a", b"hello" * 1000), member("r", os.urandom(300_000)), member("b", b"x"))


def zstd_begun(tar: bytes = TAR[:20_000]) -> bytes:
    """The first blocks of a zstd stream that goes on (its frame is not ended): small enough for
    a pipe's default size, decodable as far as it goes."""
    obj = zstandard.ZstdCompressor().compressobj()
    return obj.compress(tar) + obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


def kids() -> list[int]:
    """This process's children, zombies too (an unreaped decoder counts)."""
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as fh:
        return [int(pid) for pid in fh.read().split()]


def read_all(stream: object) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(64 << 10))
    while n := stream.readinto(buf):  # type: ignore[attr-defined]
        out += buf[:n]
    return bytes(out)


def from_file(path: Path, blob: bytes) -> int:
    path.write_bytes(blob)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_the_decoded_tar_is_the_tar_and_the_decoder_is_reaped(tmp_path: Path, kind: str) -> None:
    blob = COMPRESSORS[kind](TAR[:5000]) + COMPRESSORS[kind](TAR[5000:])  # frames, members
    fd = from_file(tmp_path / "layer", blob)
    try:
        stream = open_decoded(fd)
        assert len(kids()) == 1
        assert read_all(stream) == TAR
        assert kids() == []  # exited and reaped at the end of its stream
        stream.close()
    finally:
        os.close(fd)


def test_a_plain_tar_needs_no_decoder(tmp_path: Path) -> None:
    fd = from_file(tmp_path / "layer", TAR)
    try:
        stream = open_decoded(fd)
        assert kids() == []
        assert read_all(stream) == TAR
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_broken_stream_is_one_clear_error(tmp_path: Path, kind: str, damage: str) -> None:
    blob = bytearray(COMPRESSORS[kind](TAR))
    if damage == "flip":
        for i in range(len(blob) // 2, len(blob) // 2 + 40):
            blob[i] ^= 0x5A
    else:
        del blob[len(blob) // 2:]
    fd = from_file(tmp_path / "layer", bytes(blob))
    try:
        stream = open_decoded(fd)
        reader = TarReader(stream)
        with pytest.raises(InvalidArchive) as caught:  # the decoder's, or the tar reader's
            for entry in reader:
                reader.read_data(entry, 1 << 20)
        assert "\n" not in str(caught.value)
        stream.close()
        assert kids() == []
    finally:
        os.close(fd)


def test_close_before_the_end_stops_and_reaps_the_decoder() -> None:
    r, w = os.pipe()
    try:
        os.write(w, zstd_begun())  # no end: the decoder waits for more
        stream = open_decoded(r)
        (decoder,) = kids()
        stream.close()
        assert kids() == []
        with pytest.raises(ProcessLookupError):
            os.kill(decoder, 0)
    finally:
        os.close(r)
        os.close(w)


def test_the_decoder_holds_none_of_the_readers_descriptors() -> None:
    r, w = os.pipe()
    other_r, other_w = os.pipe()  # stands for the result pipe, the target, the packer's file
    try:
        os.write(w, gzip.compress(TAR)[:100])
        stream = open_decoded(r)
        (decoder,) = kids()
        deadline = time.monotonic() + 30
        while len(held := {int(fd) for fd in os.listdir(f"/proc/{decoder}/fd")}) > 7:
            # stdio, its input, its ready, free and report pipes
            assert time.monotonic() < deadline, held
            time.sleep(0.01)
        assert other_r not in held and other_w not in held and w not in held
        stream.close()
    finally:
        for fd in (r, w, other_r, other_w):
            os.close(fd)


def test_a_killed_decoder_is_an_error_not_an_end() -> None:
    r, w = os.pipe()
    try:
        os.write(w, zstd_begun())
        stream = open_decoded(r)
        (decoder,) = kids()
        os.kill(decoder, signal.SIGKILL)
        with pytest.raises(GraphDriverError, match="zstd decoder process exited with signal 9"):
            TarReader(stream).drain()
        assert kids() == []
        stream.close()
    finally:
        os.close(r)
        os.close(w)


def test_the_decoder_ignores_sigterm_and_dies_with_its_reader() -> None:
    """SIGTERM is the reader's to answer (it rolls back); its exit, whichever way, ends the
    decoder even while it waits for input that never comes."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    script = (f"import sys, os, time\nsys.path[:0] = [{src!r}]\n"
              "from graphdriver.archive.compression import open_decoded\n"
              "s = open_decoded(0)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(zstd_begun())
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ready\n"
        (decoder,) = children_of(proc.pid)
        os.kill(decoder, signal.SIGTERM)
        time.sleep(0.2)
        assert not is_gone(decoder)
        proc.kill()  # the input stays open: only its reader's death can end it
        proc.wait(timeout=30)
        wait_until_gone([decoder], "the decoder outlived its reader", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_a_reader_that_stops_reading_ends_a_decoder_that_waits_for_a_slot(tmp_path: Path) -> None:
    big = build(*(member(f"f{i}", os.urandom(1 << 20)) for i in range(12)))  # > the ring
    fd = from_file(tmp_path / "layer", zstandard.ZstdCompressor(level=1).compress(big))
    try:
        stream = open_decoded(fd)
        (decoder,) = kids()
        time.sleep(0.3)  # the decoder fills its ring and waits for a slot
        assert os.path.exists(f"/proc/{decoder}")
        stream.close()
        assert kids() == []
    finally:
        os.close(fd)
