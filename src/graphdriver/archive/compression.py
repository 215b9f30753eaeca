"""Detect a layer's compression by its magic bytes and decompress it as a stream.

``open_decompressed(fd)`` peeks at the first bytes of *fd* (which may be a pipe: nothing is
seeked), then returns a readable binary stream of the uncompressed tar.  Memory stays constant:
every decoder works block by block.  gzip goes through isal's threaded reader (decompression in
its own thread, overlapping with whatever the caller does with the bytes), zstd through
``zstandard`` (all frames), xz through ``lzma`` and bzip2 through ``bz2``.  Any decoder failure
(corrupt data, truncated stream) surfaces as :class:`~graphdriver.errors.InvalidArchive`.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import lzma
import os
from collections.abc import Callable
from typing import BinaryIO

import zstandard
from isal import igzip_threaded

from ..errors import InvalidArchive

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)

HEAD_SIZE = 6
_READ_SIZE = 1 << 20


def detect(head: bytes) -> str:
    """``"gzip" | "zstd" | "xz" | "bzip2" | "none"`` from the first bytes of a stream."""
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return "none"


class _PrefixReader(io.RawIOBase):
    """A raw reader that first replays bytes already read from its source, then reads on."""

    def __init__(self, readinto: Callable[[memoryview], int], prefix: bytes) -> None:
        super().__init__()
        self._readinto = readinto
        self._prefix = memoryview(prefix)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._readinto(view)

    def close(self) -> None:
        # The underlying descriptor or stream belongs to the caller; never close it here.
        super().close()


class _Checked(io.RawIOBase):
    """Wraps a decoder stream so every decoder failure becomes InvalidArchive."""

    def __init__(self, inner: BinaryIO | io.BufferedIOBase, kind: str) -> None:
        super().__init__()
        self._inner = inner
        self._kind = kind

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return self._inner.readinto(buf)  # type: ignore[union-attr]
        except InvalidArchive:
            raise
        except (OSError, EOFError, ValueError, lzma.LZMAError, zstandard.ZstdError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a real I/O error on the input, not corrupt data
            raise InvalidArchive(f"corrupt {self._kind} stream: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._inner.close()
        super().close()


def _read_head(fd: int) -> bytes:
    head = b""
    while len(head) < HEAD_SIZE:
        chunk = os.read(fd, HEAD_SIZE - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _wrap(raw: _PrefixReader, kind: str) -> BinaryIO:
    if kind == "none":
        return raw  # type: ignore[return-value]
    src = io.BufferedReader(raw, _READ_SIZE)
    inner: BinaryIO | io.BufferedIOBase
    if kind == "gzip":
        inner = igzip_threaded.open(  # type: ignore[no-untyped-call]
            src, "rb", threads=1, block_size=_READ_SIZE
        )
    elif kind == "zstd":
        dctx = zstandard.ZstdDecompressor()
        inner = dctx.stream_reader(src, read_size=_READ_SIZE, read_across_frames=True)
    elif kind == "xz":
        inner = lzma.LZMAFile(src, "rb")  # noqa: SIM115 - the caller closes it
    else:
        inner = bz2.BZ2File(src, "rb")
    return _Checked(inner, kind)  # type: ignore[return-value]


def open_decompressed(fd: int) -> BinaryIO:
    """A readable raw stream of the uncompressed tar read from *fd* (which stays the caller's)."""
    head = _read_head(fd)

    def readinto(view: memoryview) -> int:
        return os.readv(fd, [view])

    return _wrap(_PrefixReader(readinto, head), detect(head))


def decompress_stream(stream: BinaryIO) -> BinaryIO:
    """Like :func:`open_decompressed`, for a binary stream (which stays the caller's)."""
    head = b""
    while len(head) < HEAD_SIZE:
        chunk = stream.read(HEAD_SIZE - len(head))
        if not chunk:
            break
        head += chunk
    readinto = getattr(stream, "readinto", None)
    if readinto is None:

        def readinto(view: memoryview) -> int:
            data = stream.read(len(view))
            view[: len(data)] = data
            return len(data)

    return _wrap(_PrefixReader(readinto, head), detect(head))
