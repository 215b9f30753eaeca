"""The recorder frame pipe: a tar-split Recorder's calls carried from a confined child.

The child's tar reader records into a :class:`PipeRecorder`, which writes every call as a frame
on a pipe; a thread in the parent replays the frames into the real recorder
(:func:`replay_recorder_stream`).  A frame is ``b"S"`` + u32 length + raw bytes for
``segment()``, or ``b"F"`` + u32 name length + u64 size + i64 crc64 (-1: none) + name for
``file()``, or ``b"C"`` + u64 crc64 for ``file_done()`` (the CRC-64 of the entry's data, computed
by the child's tar reader as the data goes by; passed on when the recorder has a ``file_done``
method, dropped otherwise).

Owns the frame format, both ends.  Imports only :mod:`graphdriver.errors` and the Recorder
protocol of :mod:`.tarstream`; never the confined-job runner, a driver, the store or the package
root; and of the standard library only C modules beside os and struct (the packer's thread and
its queue are ``_thread``'s and ``_queue``'s: threading and queue are ~3 ms of the confined
child's start-up).
"""

from __future__ import annotations

import _thread
import os
import struct
from _queue import SimpleQueue

from .. import errors

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

    from .tarstream import Recorder

    #: a threaded BufferedRecorder's batch: its parts (frames, start, end), what to wait for
    #: before they are read (None: nothing), the lent buffer to hand back after (None: none)
    Batch = tuple[list[tuple[bytes | bytearray, int, int]], Callable[[], None] | None,
                  bytearray | None]

_SEG = b"S"
_FILE = b"F"
_CRC = b"C"
_CRC_FRAME = struct.Struct("<cQ")
_U64 = struct.Struct("<Q")
_REPLAY_BUFFER = 1 << 20
_REPLAY_MIN = 64 << 10
_QUEUED = 2  # batches a threaded BufferedRecorder lets wait for its thread
#: the frame pipe's capacity: the child's 1 MiB flushes go in without waiting for the parent
PIPE_SIZE = 4 << 20
_SEG_HDR = struct.Struct("<I")
_FILE_HDR = struct.Struct("<IQq")


class _FrameWriter:
    """A Recorder that encodes its calls as frames and hands them to :meth:`_put`."""

    def _put(self, data: bytes | bytearray) -> None:
        raise NotImplementedError

    def segment(self, raw: bytes) -> None:
        self._put(_SEG + _SEG_HDR.pack(len(raw)) + raw)  # one piece: a batch ends between frames

    def file(self, name: bytes, size: int, payload_crc64: int | None) -> None:
        crc = -1 if payload_crc64 is None else payload_crc64
        self._put(_FILE + _FILE_HDR.pack(len(name), size, crc) + name)

    def file_done(self, crc64: int) -> None:
        self._put(_CRC_FRAME.pack(_CRC, crc64))

    def write_frames(self, frames: bytes | bytearray,
                     ready: Callable[[], None] | None = None) -> None:
        """Frames already encoded (by the native apply of a run of entries, _fastapply.files);
        with *ready*, they are complete only once it has returned (the digest thread fills
        them in: TarReader._fill_later)."""
        if ready is not None:
            ready()
        self._put(frames)


class PipeRecorder(_FrameWriter):
    """A Recorder that frames its calls onto a file descriptor (the child's side)."""

    def __init__(self, fd: int) -> None:
        self._out: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self._put = self._out.write  # type: ignore[method-assign, assignment]

    def close(self) -> None:
        self._out.close()


class BufferedRecorder(_FrameWriter):
    """A Recorder whose frames are kept in memory and replayed into *recorder* (a packer) a
    batch at a time: the confined child packs its tar-split lines so, beside its reader and
    without a pipe -- the many small calls cost a frame each, and the packer turns a batch of
    them into lines in one native call (TarSplitPacker.take_frames).

    With *threaded*, the batches are replayed by a thread of their own, in order (the native
    packing and the compressor release the GIL), off the reader's critical path; at most
    _QUEUED batches wait (a batch takes one of _QUEUED slots, which the thread gives back as it
    takes the batch).  The frames then go into buffers of a fixed size that the thread hands
    back once it has replayed them (no buffer is made, grown or faulted in per batch): the
    reader's native runs write theirs straight into the current one (:meth:`lend_frames`,
    :meth:`frames_lent`), and their *ready* -- the digest thread fills in their header bytes and
    CRCs meanwhile (``defers_frames``) -- is called by that thread; a batch is one contiguous
    region of a buffer, packed in one native call.  Frames made elsewhere (:meth:`write_frames`)
    are kept as they are, not copied.  Call :meth:`close` before using *recorder*: it replays
    what is left, waits for the thread, and raises what the replay raised."""

    def __init__(self, recorder: Recorder, batch: int = _REPLAY_BUFFER,
                 threaded: bool = False) -> None:
        self._rec = recorder
        self._buf = bytearray()  # the frames kept (unthreaded), or the current lent buffer
        self._batch = batch
        self._queue: SimpleQueue[Batch | None] | None = None
        self._slots: SimpleQueue[None] = SimpleQueue()
        self._running: _thread.LockType | None = None  # held while the thread runs
        self._error: BaseException | None = None
        self.defers_frames = threaded
        if threaded:
            # a buffer's room: a batch and half of one more, so that a run seldom stops for it
            self._size = batch + batch // 2
            self._free: list[bytearray] = []  # buffers the thread is done with
            self._buf = bytearray(self._size)
            self._at = 0  # where the frames end in _buf
            self._mark = 0  # where those not in _parts yet start
            self._parts: list[tuple[bytes | bytearray, int, int]] = []  # (frames, start, end)
            self._ready: Callable[[], None] | None = None  # covers every earlier one (in order)
            self._queue = SimpleQueue()
            for _ in range(_QUEUED):
                self._slots.put(None)
            self._running = _thread.allocate_lock()
            self._running.acquire()
            _thread.start_new_thread(self._work, ())

    def _put(self, data: bytes | bytearray) -> None:
        if self._queue is None:
            buf = self._buf
            buf += data
            if len(buf) >= self._batch:
                self.flush()
            return
        n = len(data)
        if self._at + n > self._size:
            self.flush()
            if n > self._size:  # a big segment: a part of its own
                self._parts.append((data, 0, n))
                self.flush()
                return
        at = self._at
        self._buf[at : at + n] = data  # the same length: never resized
        self._at = at + n
        if self._at >= self._batch:
            self.flush()

    def lend_frames(self) -> tuple[bytearray, int]:
        """(buffer, offset): where the next frames go (threaded only); the reader writes them
        there (never resizing it) and says where they end with :meth:`frames_lent`, or asks
        for room with :meth:`flush`."""
        return self._buf, self._at

    def frames_lent(self, end: int, ready: Callable[[], None] | None = None) -> None:
        """The frames lent out by :meth:`lend_frames` now end at *end*; with *ready*, they are
        complete only once it has returned (it waits for every earlier one too)."""
        self._at = end
        if ready is not None:
            self._ready = ready
        if end >= self._batch:
            self.flush()

    def write_frames(self, frames: bytes | bytearray,
                     ready: Callable[[], None] | None = None) -> None:
        if self._queue is None:
            super().write_frames(frames, ready)
            return
        self._cut()
        self._parts.append((frames, 0, len(frames)))
        if ready is not None:
            self._ready = ready

    def _cut(self) -> None:
        """The current buffer's frames so far become a part (threaded)."""
        if self._at > self._mark:
            self._parts.append((self._buf, self._mark, self._at))
            self._mark = self._at

    def flush(self) -> None:
        """Replay every frame kept so far (hand them to the thread, with the current buffer:
        the next frames go into another)."""
        if self._queue is not None:
            self._cut()
            if not self._parts:
                return
            lent = self._buf if self._at else None
            self._slots.get()
            self._queue.put((self._parts, self._ready, lent))
            self._parts = []
            self._ready = None
            if lent is not None:
                self._buf = self._free.pop() if self._free else bytearray(self._size)
                self._at = self._mark = 0
            return
        buf = self._buf
        if not buf:
            return
        self._replay(buf, 0, len(buf))
        buf.clear()

    def _replay(self, frames: bytes | bytearray, start: int, end: int) -> None:
        if replay_frames(frames, start, end, self._rec) != end - start:
            raise _corrupt("truncated")

    def _work(self) -> None:
        assert self._queue is not None and self._running is not None
        try:
            self._replay_batches(self._queue)
        finally:
            self._running.release()

    def _replay_batches(self, batches: SimpleQueue[Batch | None]) -> None:
        while True:
            item = batches.get()
            if item is None:
                return
            self._slots.put(None)
            parts, ready, lent = item
            if self._error is None:
                try:
                    if ready is not None:
                        ready()
                    for frames, start, end in parts:
                        self._replay(frames, start, end)
                except BaseException as exc:  # raised by close(), in the caller's thread
                    self._error = exc
            if lent is not None:
                self._free.append(lent)  # (list.append and pop are atomic)

    def close(self) -> None:
        self.flush()
        if self._queue is not None and self._running is not None:
            self._queue.put(None)
            self._running.acquire()  # the thread has ended
            self._queue = None
        if self._error is not None:
            raise self._error


def _corrupt(what: str) -> errors.InvalidArchive:
    return errors.InvalidArchive(f"recorder stream from the apply child is {what}")


def replay_frames(buf: bytearray | bytes, start: int, end: int, recorder: Recorder) -> int:
    """Replay the whole frames in ``buf[start:end]`` into *recorder*; returns how many bytes
    they took (an unfinished frame at the end is left for the caller to complete)."""
    file_done = getattr(recorder, "file_done", None)
    # a packer that turns the common frames into its lines natively (TarSplitPacker.take_frames)
    take = getattr(recorder, "take_frames", None)
    seg_size, file_size, crc_size = _SEG_HDR.size, _FILE_HDR.size, _U64.size
    pos = start
    while pos < end:
        avail = end - pos
        if take is not None:
            took = take(buf, pos, end)
            if took:
                pos += took
                continue
        kind = buf[pos]
        if kind == 0x53:  # "S"
            if avail < 1 + seg_size:
                break
            (n,) = _SEG_HDR.unpack_from(buf, pos + 1)
            total = 1 + seg_size + n
            if total > avail:
                break
            recorder.segment(bytes(buf[pos + 1 + seg_size : pos + total]))
        elif kind == 0x46:  # "F"
            if avail < 1 + file_size:
                break
            n, size, crc = _FILE_HDR.unpack_from(buf, pos + 1)
            total = 1 + file_size + n
            if total > avail:
                break
            name = bytes(buf[pos + 1 + file_size : pos + total])
            recorder.file(name, size, None if crc < 0 else crc)
        elif kind == 0x43:  # "C"
            total = 1 + crc_size
            if total > avail:
                break
            if file_done is not None:
                file_done(_U64.unpack_from(buf, pos + 1)[0])
        else:
            raise _corrupt("corrupt")
        pos += total
    return pos - start


def _frame_size(buf: bytearray, start: int, end: int) -> int:
    """The size of the (unfinished) frame at ``buf[start:end]``, 0 while its header is not all
    there."""
    kind = buf[start]
    if kind == 0x53 and end - start >= 1 + _SEG_HDR.size:
        return 1 + _SEG_HDR.size + int(_SEG_HDR.unpack_from(buf, start + 1)[0])
    if kind == 0x46 and end - start >= 1 + _FILE_HDR.size:
        return 1 + _FILE_HDR.size + int(_FILE_HDR.unpack_from(buf, start + 1)[0])
    return 0


def replay_recorder_stream(fd: int, recorder: Recorder) -> None:
    """Replay the frames of a :class:`PipeRecorder` read from *fd* (then closed) into *recorder*.

    Frames are parsed in place from one large buffer (they are many and small)."""
    buf = bytearray(_REPLAY_BUFFER)
    start = end = 0
    with open(fd, "rb", buffering=0) as f:
        while True:
            avail = end - start
            # make room for at least one more read; keep an unfinished frame at the front
            if start and (avail < _REPLAY_MIN or end == len(buf)):
                buf[:avail] = buf[start:end]
                start, end = 0, avail
            if avail:
                need = _frame_size(buf, start, end)
                if need > len(buf) - start:
                    buf.extend(bytes(need - (len(buf) - start)))
            n = f.readinto(memoryview(buf)[end:])
            if not n:
                if end > start and replay_frames(buf, start, end, recorder) != end - start:
                    raise _corrupt("truncated")
                return
            end += n
            start += replay_frames(buf, start, end, recorder)
