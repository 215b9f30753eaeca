"""Detect a layer's compression by its magic bytes and decompress it as a stream.

``open_decompressed(fd)`` peeks at the first bytes of *fd* (which may be a pipe: nothing is
seeked), then returns a readable binary stream of the uncompressed tar.  With ``mappable=True``
(the confined child) an uncompressed regular file can also be mapped instead of read
(:meth:`_PlainFile.mapping`): the tar reader then copies nothing into a buffer of its own.
Memory stays constant: every decoder works block by block.  gzip goes through isal's threaded
reader (decompression in its own thread, overlapping with whatever the caller does with the bytes),
zstd read from a descriptor through the native ``_fastzstd`` (libzstd in a thread that never takes
the GIL, decoding into a ring the reader copies from) and otherwise through ``zstandard`` (all
frames), xz through ``lzma`` and bzip2 through ``bz2``.  Any decoder failure (corrupt data,
truncated stream) surfaces as :class:`~graphdriver.errors.InvalidArchive`.  Imports from
graphdriver only ``errors`` and ``archive.native``, and only the decoder a stream needs (the
confined child loads it before its chroot); never the tar engine or a driver.
"""

from __future__ import annotations

import io
import mmap
import os
import stat

from ..errors import InvalidArchive

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

# The decoders (isal, zstandard, lzma, bz2) are imported by _wrap for the kind a stream needs, so
# that the confined apply child loads only one of them before its chroot.

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

    def __init__(
        self,
        inner: BinaryIO | io.BufferedIOBase,
        kind: str,
        corrupt: tuple[type[BaseException], ...],
    ) -> None:
        super().__init__()
        self._inner = inner
        self._kind = kind
        self._corrupt = corrupt  # the exceptions that mean corrupt data for this decoder
        self._spent = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._spent:
            return 0
        try:
            n = self._inner.readinto(buf)  # type: ignore[union-attr]
        except InvalidArchive:
            self._release()
            raise
        except self._corrupt as exc:
            self._release()
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a real I/O error on the input, not corrupt data
            raise InvalidArchive(f"corrupt {self._kind} stream: {exc}") from exc
        if not n:
            self._release()
        return n

    def _release(self) -> None:
        """Close the decoder at its end or first error, not in a finalizer: isal's threaded reader
        joins its worker when closed, and a join run by the garbage collector inside another
        thread's start-up deadlocks (seen with a corrupt stream the caller never closed)."""
        self._spent = True
        try:
            self._inner.close()
        except Exception:
            pass

    def close(self) -> None:
        self._release()
        super().close()


class _ZstdFrameCheck(io.RawIOBase):
    """Passes compressed bytes through while walking zstd's frame structure (headers and block
    sizes only, no decoding), so that a stream cut short is noticed: python-zstandard's reader
    reports a truncated frame as a clean end of data."""

    _NEED_MAGIC, _NEED_FHD, _NEED_HEADER_REST, _NEED_BLOCK, _IN_DATA, _NEED_SKIP_SIZE = range(6)

    def __init__(self, raw: io.RawIOBase) -> None:
        super().__init__()
        self._raw = raw
        self._pending = bytearray()  # header bytes gathered across reads
        self._state = self._NEED_MAGIC
        self._skip = 0  # bytes of block data / checksum / skippable payload still to pass
        self._last = False
        self._checksum = False
        self._header_rest = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buf)
        if n is None:
            return 0
        if n:
            self._walk(memoryview(buf).cast("B")[:n])
        elif self._state != self._NEED_MAGIC or self._pending or self._skip:
            raise InvalidArchive("corrupt zstd stream: truncated frame")
        return n

    def _walk(self, data: memoryview) -> None:
        i = 0
        n = len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                if self._skip == 0 and self._state == self._IN_DATA:
                    self._state = self._NEED_BLOCK if not self._last else self._NEED_MAGIC
                    if self._last and self._checksum:
                        self._checksum = False
                        self._skip = 4
                continue
            st = self._state
            want = {self._NEED_MAGIC: 4, self._NEED_FHD: 1, self._NEED_BLOCK: 3,
                    self._NEED_SKIP_SIZE: 4, self._NEED_HEADER_REST: self._header_rest}.get(st, 0)
            take = min(want - len(self._pending), n - i)
            self._pending += data[i : i + take]
            i += take
            if len(self._pending) < want:
                return
            hdr = bytes(self._pending)
            self._pending.clear()
            if st == self._NEED_MAGIC:
                magic = int.from_bytes(hdr, "little")
                if magic == 0xFD2FB528:
                    self._state = self._NEED_FHD
                elif magic & 0xFFFFFFF0 == 0x184D2A50:
                    self._state = self._NEED_SKIP_SIZE
                else:
                    raise InvalidArchive("corrupt zstd stream: bad frame magic")
            elif st == self._NEED_SKIP_SIZE:
                self._skip = int.from_bytes(hdr, "little")
                self._state = self._NEED_MAGIC
            elif st == self._NEED_FHD:
                fhd = hdr[0]
                single = bool(fhd & 0x20)
                self._checksum = bool(fhd & 0x04)
                fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
                did = (0, 1, 2, 4)[fhd & 0x03]
                self._header_rest = (0 if single else 1) + did + fcs
                self._last = False
                self._state = self._NEED_HEADER_REST if self._header_rest else self._NEED_BLOCK
            elif st == self._NEED_HEADER_REST:
                self._state = self._NEED_BLOCK
            elif st == self._NEED_BLOCK:
                h = int.from_bytes(hdr, "little")
                self._last = bool(h & 1)
                btype = (h >> 1) & 3
                size = h >> 3
                if btype == 3:
                    raise InvalidArchive("corrupt zstd stream: reserved block type")
                self._skip = 1 if btype == 1 else size
                self._state = self._IN_DATA
                if self._skip == 0:
                    self._state = self._NEED_BLOCK if not self._last else self._NEED_MAGIC
                    if self._last and self._checksum:
                        self._checksum = False
                        self._skip = 4


class _DecodeAhead(io.RawIOBase):
    """Runs a decoder in its own thread, a few chunks ahead of the reader (zstandard releases the
    GIL while it decodes), so that decompression overlaps with what the caller does with the
    bytes -- what isal's threaded reader does for gzip.  Memory: at most ``depth`` chunks.
    A decoder error is raised by the ``readinto`` that reaches it."""

    def __init__(self, inner: BinaryIO | io.BufferedIOBase, chunk: int, depth: int = 3) -> None:
        import queue
        import threading

        super().__init__()
        self._inner = inner
        self._chunk = chunk
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._full = queue.Full
        self._stop = threading.Event()
        self._cur = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._produce, name="decode-ahead", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except self._full:
                continue

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._inner.read(self._chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._cur:
            if self._eof:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return 0
            self._cur = memoryview(item)
        view = memoryview(buf).cast("B")
        n = min(len(view), len(self._cur))
        view[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n

    def close(self) -> None:
        """Stops the thread without waiting on it for long: it may be blocked reading a pipe
        that gives nothing more (it is a daemon, and the descriptor is the caller's)."""
        if self.closed:
            return
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._thread.join(1.0)
        if not self._thread.is_alive():
            try:
                self._inner.close()
            except Exception:
                pass
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
    src = io.BufferedReader(_ZstdFrameCheck(raw) if kind == "zstd" else raw, _READ_SIZE)
    inner: BinaryIO | io.BufferedIOBase
    corrupt: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
    if kind == "gzip":
        from isal import igzip_threaded, isal_zlib

        inner = igzip_threaded.open(  # type: ignore[no-untyped-call]
            src, "rb", threads=1, block_size=_READ_SIZE
        )
        isal_error: type[BaseException] = isal_zlib.IsalError  # type: ignore[assignment]
        corrupt += (isal_error,)  # corrupt data, e.g. "Invalid lookback distance"
    elif kind == "zstd":
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        inner = _DecodeAhead(  # type: ignore[assignment]
            dctx.stream_reader(src, read_size=_READ_SIZE, read_across_frames=True), _READ_SIZE
        )
        corrupt += (zstandard.ZstdError,)
    elif kind == "xz":
        import lzma

        inner = lzma.LZMAFile(src, "rb")  # noqa: SIM115 - the caller closes it
        corrupt += (lzma.LZMAError,)
    else:
        import bz2

        inner = bz2.BZ2File(src, "rb")
    return _Checked(inner, kind, corrupt)  # type: ignore[return-value]


def stream_kind(stream: BinaryIO) -> str:
    """The compression a stream from :func:`open_decompressed` decodes (``"none"`` if plain)."""
    return stream._kind if isinstance(stream, _Checked) else "none"


def warm_kind(stream: BinaryIO) -> str:
    """The decoder a confined child must still import and exercise before its chroot to read
    *stream*: its :func:`stream_kind`, or ``"none"`` when its decoder was loaded when the stream
    was opened (the native zstd decoder: libzstd is opened at import)."""
    if isinstance(stream, _Checked) and type(stream._inner).__module__ == "graphdriver._fastzstd":
        return "none"
    return stream_kind(stream)


class _PlainFile(_PrefixReader):
    """An uncompressed regular file: read like any stream, or mapped (:meth:`mapping`)."""

    def __init__(self, fd: int, head: bytes, start: int, size: int) -> None:
        super().__init__(lambda view: os.readv(fd, [view]), head)
        self._fd = fd
        self._start = start  # the file offset where the stream began (before its head)
        self._size = size  # the file's size when it was opened: what is mapped
        self._head_len = len(head)
        # where the map starts in the file (an offset mmap accepts)
        self._first = start - start % mmap.ALLOCATIONGRANULARITY

    def mapping(self) -> tuple[mmap.mmap, int] | None:
        """The file from the stream's start on, mapped read-only (to its size when it was
        opened), and where in the map the stream starts; None when the stream was read already,
        or when the file cannot be mapped (the stream is then read).  The map's pages are the
        file's page cache: a file cut shorter while it is mapped kills the reader with SIGBUS
        (only the confined child maps: its death is the parent's error)."""
        if len(self._prefix) != self._head_len or self._size - self._start <= self._head_len:
            return None
        try:
            m = mmap.mmap(self._fd, self._size - self._first, mmap.MAP_SHARED, mmap.PROT_READ,
                          offset=self._first)
        except (OSError, ValueError, OverflowError):
            return None
        return m, self._start - self._first

    def pread_into(self, view: memoryview, offset: int) -> int:
        """Read into *view* from *offset* in the map (the file's offset does not move)."""
        return os.preadv(self._fd, [view], self._first + offset)

    def mapped_to(self, offset: int) -> None:
        """The map was read up to *offset* (in the map): the file's offset goes there, as the
        reads would have left it."""
        os.lseek(self._fd, self._first + offset, os.SEEK_SET)


def open_decompressed(fd: int, *, mappable: bool = False) -> BinaryIO:
    """A readable raw stream of the uncompressed tar read from *fd* (which stays the caller's).
    *mappable*: an uncompressed regular file may be mapped by the tar reader instead of read
    (its stream has ``mapping()``); only where a SIGBUS (the file cut shorter meanwhile) may
    kill the process: the confined child."""
    start = size = -1
    if mappable:
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                start, size = os.lseek(fd, 0, os.SEEK_CUR), st.st_size
        except OSError:
            start = -1
    head = _read_head(fd)
    if start >= 0 and detect(head) == "none":
        return _PlainFile(fd, head, start, size)  # type: ignore[return-value]
    if detect(head) == "zstd":
        from .native import native_module

        fastzstd = native_module("_fastzstd")
        if fastzstd is not None:
            decoder = fastzstd.Decoder(fd, head)
            return _Checked(decoder, "zstd", (OSError, fastzstd.Corrupt))  # type: ignore[arg-type,return-value]

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
