"""Detect a layer's compression by its magic bytes and decompress it as a stream.

``open_decompressed(fd)`` peeks at the first bytes of *fd* (which may be a pipe: nothing is
seeked), then returns a readable binary stream of the uncompressed tar.  Memory stays constant:
every decoder works block by block.  gzip goes through isal's threaded reader (decompression in
its own thread, overlapping with whatever the caller does with the bytes), zstd through
``zstandard`` (all frames; a thread of its own decodes ahead), xz through ``lzma`` and bzip2
through ``bz2``.  Any decoder failure (corrupt data, truncated stream) surfaces as
:class:`~graphdriver.errors.InvalidArchive`.

``open_decoded(fd)`` is the confined apply child's way (issue 18): the decoder runs in a process
of its own, a fork of the (still single-threaded) child, as ``zstd -dc | tar -x`` does; it
decodes into a ring of memory shared with the child, which copies each slot out into its tar
reader's buffer (one copy, no pipe pages; two small pipes say which slot is full and which is
free again).  The decoder never takes the reader's GIL or a core the reader wants on a wake-up
(``SCHED_BATCH``), and the child itself imports no decoder library.  The decoder keeps only its
input, its pipes and the target (it chroots there as root), dies with the child
(``PR_SET_PDEATHSIG``), ignores the SIGINT/SIGTERM the child answers by rolling back, and is
reaped at the end of the stream or by ``close()``; its failure reaches the reader as the same
one-line error as in process.

Owns the formats' magic numbers and the decoders.  Imports only :mod:`graphdriver.errors` and
:mod:`.buffers` (and each decoder library, when a stream needs it); never the tar reader, a
driver, the store or the package root.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
from collections.abc import Callable

from .. import errors
from ..errors import GraphDriverError, InvalidArchive
from .buffers import aligned_buffer

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    import signal
    from typing import BinaryIO, NoReturn
else:
    import _signal as signal  # the same calls, without the enum wrappers (start-up time)

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
#: a slot of the decoder process's ring: what it decodes at a time (the reader's own reads are
#: this size: what it copies out is still in the cache)
_SLOT = 256 << 10
#: slots in the ring: how far the decoder runs ahead of the reader (4 MiB, the memory the decode
#: thread's queue of megabyte chunks took), slack for a decoder not scheduled for a while
_SLOTS = 16


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
        with contextlib.suppress(Exception):
            self._inner.close()

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
        self._piece: memoryview | None = None  # read()'s buffer, made at its first call

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> memoryview:  # type: ignore[override]
        """One read of up to *size* bytes, as a view of a buffer the next call reuses: what
        zstandard's stream reader asks for (it is done with a piece before it asks for the
        next), without a fresh megabyte allocated, faulted in and copied at every read."""
        size = size if size > 0 else _READ_SIZE
        if self._piece is None or len(self._piece) < size:
            self._piece = memoryview(aligned_buffer(size))
        return self._piece[:self.readinto(self._piece[:size])]

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buf)
        if n is None:
            return 0
        if n:
            self._walk(memoryview(buf).cast("B")[:n])
        elif self._state != self._NEED_MAGIC or self._pending:
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


def _wrap(raw: _PrefixReader, kind: str, *, ahead: bool = True) -> BinaryIO:
    """The decoder of *kind* over *raw*; *ahead*: decoding in a thread of its own (gzip, zstd),
    reading whole buffers of input.  Else decoding in the caller's thread (the decoder process
    has nothing else to do) what has come so far: each read of the input returns what one
    ``readv`` gives, so a stream that pauses is decoded up to where it paused."""
    if kind == "none":
        return raw  # type: ignore[return-value]
    checked: io.RawIOBase = _ZstdFrameCheck(raw) if kind == "zstd" else raw
    src: BinaryIO = (io.BufferedReader(checked, _READ_SIZE)  # type: ignore[assignment]
                     if ahead else checked)
    inner: BinaryIO | io.BufferedIOBase
    corrupt: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
    if kind == "gzip":
        from isal import igzip, igzip_threaded, isal_zlib

        inner = igzip_threaded.open(  # type: ignore[no-untyped-call]
            src, "rb", threads=1, block_size=_READ_SIZE
        ) if ahead else igzip.open(src, "rb")  # type: ignore[no-untyped-call]
        isal_error: type[BaseException] = isal_zlib.IsalError  # type: ignore[assignment]
        corrupt += (isal_error,)  # corrupt data, e.g. "Invalid lookback distance"
    elif kind == "zstd":
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        inner = dctx.stream_reader(src, read_size=_READ_SIZE, read_across_frames=True)
        if ahead:
            inner = _DecodeAhead(inner, _READ_SIZE)  # type: ignore[assignment]
        corrupt += (zstandard.ZstdError,)
    elif kind == "xz":
        import lzma

        inner = lzma.LZMAFile(src, "rb")  # noqa: SIM115 - the caller closes it
        corrupt += (lzma.LZMAError,)
    else:
        import bz2

        inner = bz2.BZ2File(src, "rb")
    return _Checked(inner, kind, corrupt)  # type: ignore[return-value]


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


def open_decoded(fd: int, *, root_fd: int | None = None) -> BinaryIO:
    """Like :func:`open_decompressed`, the decoder in a process of its own (a fork: call it while
    this process has no thread but its main one).  As root, the decoder chroots into *root_fd*
    (the directory the caller confines itself to) once its library is loaded.  The stream's
    ``close()`` stops and reaps the decoder; at the stream's end it has exited."""
    head = _read_head(fd)
    kind = detect(head)
    if kind == "none":
        return _wrap(_PrefixReader(lambda view: os.readv(fd, [view]), head), kind)
    return _DecoderProcess(fd, head, kind, root_fd)  # type: ignore[return-value]


class _DecoderProcess(io.RawIOBase):
    """The decoded tar from a decoder process (:func:`open_decoded`), handed over in a ring of
    slots of memory shared by the two processes: the decoder decodes into a free slot and says
    how much it holds (4 bytes on the *ready* pipe); the reader copies it out into its own
    buffer and gives the slot back (a byte on the *free* pipe).  One copy of the decoded bytes,
    as a pipe's write and read would make two, and no page of a pipe allocated and freed."""

    def __init__(self, fd: int, head: bytes, kind: str, root_fd: int | None) -> None:
        super().__init__()
        self._kind = kind
        self._pid: int | None = None
        self._ring = memoryview(aligned_buffer(_SLOT * _SLOTS, shared=True))
        self._next = 0  # the slot the decoder fills next
        self._at = self._left = 0  # where in the ring the slot being read is, what is left of it
        self._ready, ready_w = os.pipe2(os.O_CLOEXEC)
        free_r, self._free = os.pipe2(os.O_CLOEXEC)
        self._reports, report_w = os.pipe2(os.O_CLOEXEC)
        try:
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                _decoder_main(fd, head, kind, self._ring, (ready_w, free_r, report_w),
                              root_fd, parent)
            self._pid = pid
        finally:
            for end in (ready_w, free_r, report_w):
                os.close(end)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._left:
            if self._pid is None:
                return 0
            filled = os.read(self._ready, 4)
            if not filled:
                self._reap()
                return 0
            self._left = int.from_bytes(filled, "little")
            self._at = self._next * _SLOT
            self._next = (self._next + 1) % _SLOTS
        n = min(len(buf), self._left)
        memoryview(buf)[:n] = self._ring[self._at:self._at + n]
        self._at += n
        self._left -= n
        if not self._left:
            with contextlib.suppress(BrokenPipeError):  # the decoder is done: it has ended
                os.write(self._free, b"\0")
        return n

    def _reap(self) -> None:
        """At the end of the ready pipe (the decoder has exited): its status, and what it
        failed with."""
        report = b""
        while chunk := os.read(self._reports, 4096):
            report += chunk
        assert self._pid is not None
        _, status = os.waitpid(self._pid, 0)
        self._pid = None
        if report:
            raise _reported_error(report)
        code = os.waitstatus_to_exitcode(status)
        if code:
            how = f"signal {-code}" if code < 0 else f"status {code}"
            raise GraphDriverError(f"the {self._kind} decoder process exited with {how}")

    def close(self) -> None:
        if self._pid is not None:  # the reader stopped before the end: the decoder goes too
            os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = None
        for fd in (self._ready, self._free, self._reports):
            if fd >= 0:
                os.close(fd)
        self._ready = self._free = self._reports = -1
        self._ring.release()
        super().close()


def _decoder_main(fd: int, head: bytes, kind: str, ring: memoryview, pipes: tuple[int, int, int],
                  root_fd: int | None, parent: int) -> NoReturn:
    """The decoder process: *fd*'s stream (its first bytes already read: *head*) decoded into the
    *ring*'s slots, each announced on the ready pipe once filled and reused once the free pipe
    gives it back; a failure written to the report pipe as ``class\nmessage``.  Never returns."""
    ready, free, report = pipes
    status = 1
    try:
        gc.disable()  # no finalizer of an object inherited from the reader runs here
        # the reader's process answers these by rolling back; the decoder goes when it exits
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _die_with_parent(parent)
        # the reader's process is the critical path: a decoder woken up (a slot given back) must
        # not preempt it, only take what CPU is left (SCHED_BATCH: the same share, no wake-up
        # preemption); a hint: where it is refused (a seccomp filter), the decoder runs all the same
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        _close_all_but({fd, *pipes} | (set() if root_fd is None else {root_fd}))
        stream = _wrap(_PrefixReader(lambda view: os.readv(fd, [view]), head), kind,
                       ahead=False)
        if root_fd is not None and os.geteuid() == 0:
            os.fchdir(root_fd)
            os.chroot(".")
        if root_fd is not None:
            os.close(root_fd)
        slot, free_slots = 0, _SLOTS
        while True:
            if not free_slots:
                given_back = os.read(free, _SLOTS)
                if not given_back:
                    break  # the reader is gone (it failed or was interrupted): nothing to say
                free_slots += len(given_back)
            n = stream.readinto(ring[slot * _SLOT:(slot + 1) * _SLOT])  # type: ignore[attr-defined]
            if not n:
                break
            os.write(ready, n.to_bytes(4, "little"))
            slot = (slot + 1) % _SLOTS
            free_slots -= 1
        status = 0
    except BrokenPipeError:
        status = 0  # the reader is gone: nothing to say
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(report, _report(exc, kind))
    finally:
        os._exit(status)


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the reader's process exits, whichever way (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # it exited before the signal was set
        os._exit(1)


def _close_all_but(keep: set[int]) -> None:
    """Close every descriptor above stdio but *keep*'s (the result pipe, the target, the
    parent chain's: the decoder holds none of the reader's)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _report(exc: BaseException, kind: str) -> bytes:
    """How the decoder process tells its failure: ``class\nmessage``, the class one of
    :mod:`graphdriver.errors`' or ``errno N`` for an I/O error on the input."""
    if isinstance(exc, GraphDriverError):
        return f"{type(exc).__name__}\n{exc}".encode()
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"errno {exc.errno}\n{exc.strerror}".encode()
    return f"GraphDriverError\nthe {kind} decoder failed: {exc!r}".encode()


def _reported_error(report: bytes) -> Exception:
    """The exception a decoder process's report (:func:`_report`) stands for."""
    name, _, message = report.decode(errors="replace").partition("\n")
    if name.startswith("errno "):
        return OSError(int(name[6:]), message)
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, GraphDriverError)):
        cls = GraphDriverError
    return cls(message)
