"""sha256 of a stream's bytes, computed beside the code that consumes them.

The tar reader hashes every byte it reads (the layer's diffID).  sha256 runs at ~1.4 GB/s here,
as long as writing the files of a rootfs layer, so hashing inline makes an apply ~30% slower.
:data:`BackgroundDigest` takes regions of the reader's buffer, in order, and hashes them in a
thread of its own: the hash overlaps with parsing and writing.  The caller promises not to
overwrite a handed-over region until :meth:`wait` has returned; small regions are hashed inline
when nothing is pending, which keeps the order.  :meth:`update` returns a number for the region,
and :meth:`wait_for` of it waits for the regions up to that one only: a reader that reuses the
front of its buffer waits for that part, not for the whole buffer; :meth:`pending` says how
many are still to do (a reader that finds the worker behind does some of its work itself).
:meth:`hexdigest` stops the thread, as :meth:`close` does (without waiting) and as dropping the
digest does; an error of the hash is raised by the next wait.

Two workers keep that contract: ``_fastdigest.Digest`` (optional, compiled), a native thread
that never takes the GIL, hashing with the libcrypto ``_hashlib`` loaded, handed regions through
atomics (no system call while it is busy); and :class:`ThreadDigest`, a Python thread (hashlib
releases the GIL for updates of 2 KiB and more, but the thread takes it back for every region,
and the reader's every release of the GIL -- once per file in the native apply -- can hand it
over: futex wake-ups on the reader's critical path).  :data:`BackgroundDigest` is the native one
where :func:`.native.native_module` allows it.

The native worker also fills in the tar-split frames of the native apply's runs
(``fill_frames``, :data:`NATIVE_CRC`): their header bytes copied and their files' CRC-64s
computed beside the sha256, on bytes it has just hashed, rather than on the reader's thread; with
anycrc's CRC (so :mod:`.crc64` is imported first: it hands _fastdigest anycrc's extension).
On a CPU with the SHA extensions (:data:`FUSED_CRC`) its sha256 is its own, which folds a big
file's CRC-64 into the pass that hashes the same bytes (``GRAPHDRIVER_NO_SHA_NI`` set, non-empty:
libcrypto's sha256 and anycrc's CRC instead, as on other CPUs).

Owns the diffID hashing thread.  Imports only :mod:`.native` and :mod:`.crc64` of graphdriver
(a leaf otherwise); never typing at run time, nor hashlib, threading or weakref where the
native worker is used (the confined child's start-up: _fastdigest loads ``_hashlib`` itself,
and only where it hashes with OpenSSL's sha256, not its own SHA-NI one).
:func:`warm_up` exercises the worker (what it loads is then loaded, before a chroot).
"""

from __future__ import annotations

from . import crc64 as _crc64  # noqa: F401  (anycrc's CRC, handed to _fastdigest)
from .native import native_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    import threading
    import weakref
    from typing import Any

    from .._fastdigest import Digest as _NativeDigest

#: below this, a region is hashed inline (if the thread has nothing pending): a hand-off costs
#: more than hashing a few KiB
INLINE_BELOW = 64 << 10


class ThreadDigest:
    """sha256 of the regions passed to :meth:`update`, hashed in order by a Python thread."""

    def __init__(self) -> None:
        # imported here, not with the module: only this worker needs them (all three, so that a
        # confined child has them once it made one, before its chroot: see warm_up)
        import hashlib
        import threading
        import weakref  # noqa: F401  (for _start)

        self._hash = hashlib.sha256()
        self._cond = threading.Condition(threading.Lock())
        self._items: list[memoryview | None] = []
        self._pending = 0
        self._handed = 0  # regions handed over so far (the last one's sequence number)
        self._done = 0  # regions hashed so far (they are hashed in order)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def update(self, region: memoryview) -> int:
        """Hash *region* (later, in order); it must stay unchanged until :meth:`wait` returns,
        or :meth:`wait_for` of the number returned (its sequence number)."""
        self._handed += 1
        if self._pending == 0 and len(region) < INLINE_BELOW:
            self._hash.update(region)
            self._done += 1
            return self._handed
        if self._thread is None:
            self._start()
        with self._cond:
            self._items.append(region)
            self._pending += 1
            self._cond.notify_all()
        return self._handed

    def wait_for(self, seq: int) -> None:
        """Return once the regions up to sequence number *seq* have been hashed."""
        if self._done < seq:
            with self._cond:
                while self._done < seq and self._error is None:
                    self._cond.wait()
        if self._error is not None:
            raise self._error

    def is_done(self, seq: int) -> bool:
        """Whether the region of sequence number *seq* has been hashed (no wait)."""
        return self._done >= seq

    def pending(self) -> int:
        """The regions handed over and not hashed yet (the worker is behind when they are
        many)."""
        return self._pending

    def wait(self) -> None:
        """Return once every region handed over so far has been hashed (they may be reused)."""
        if self._pending:
            with self._cond:
                while self._pending and self._error is None:
                    self._cond.wait()
        if self._error is not None:
            raise self._error

    def hexdigest(self) -> str:
        """The digest of everything handed over; stops the worker thread."""
        self.wait()
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop the worker (without waiting for regions still pending)."""
        if self._thread is not None and not self._stopped:
            self._stopped = True
            with self._cond:
                self._items.append(None)
                self._cond.notify_all()

    def _start(self) -> None:
        import threading
        import weakref

        thread = threading.Thread(
            target=_work, args=(self._hash, self._cond, self._items, weakref.ref(self)),
            name="layer-digest", daemon=True)
        self._thread = thread
        thread.start()
        # a digest dropped before its end (an apply that failed) still stops its thread
        weakref.finalize(self, _stop, self._cond, self._items)

    def _done_one(self) -> None:
        self._pending -= 1
        self._done += 1


def _stop(cond: threading.Condition, items: list[memoryview | None]) -> None:
    with cond:
        items.append(None)
        cond.notify_all()


def _work(h: Any, cond: threading.Condition, items: list[memoryview | None],
          ref: weakref.ref[ThreadDigest]) -> None:
    # the digest is only reached through a weak reference, so that dropping it stops the thread
    # (its finalizer posts the None that ends this loop)
    while True:
        with cond:
            while not items:
                cond.wait()
            region = items.pop(0)
        if region is None:
            return
        try:
            h.update(region)
        except BaseException as exc:  # pragma: no cover - hashlib does not fail on bytes
            digest = ref()
            if digest is not None:
                digest._error = exc
        finally:
            region.release()
            del region
        with cond:
            digest = ref()
            if digest is not None:
                digest._done_one()
                del digest
            cond.notify_all()


_fastdigest = native_module("_fastdigest")

#: the diffID worker: the native thread when it is built and allowed, else the Python one
BackgroundDigest: type[ThreadDigest] | type[_NativeDigest] = (
    ThreadDigest if _fastdigest is None else _fastdigest.Digest)
#: whether BackgroundDigest also fills in the native apply's tar-split frames (``fill_frames``:
#: header bytes and payload CRC-64s, anycrc's, loaded before this module)
NATIVE_CRC = _fastdigest is not None and bool(_fastdigest.CRC)
#: whether it folds a big file's CRC-64 in the pass that hashes its bytes (SHA-NI): that CRC
#: then costs nothing where it is computed, and the reader leaves it there
FUSED_CRC = NATIVE_CRC and bool(_fastdigest.FUSED)  # type: ignore[union-attr]


def frames_worker() -> _NativeDigest:
    """A native worker that takes regions and frames as BackgroundDigest does but hashes none
    of the regions until it is told to go on from a hash of the bytes before them (``resume``,
    with :func:`take_hash_over`'s state): the diffID is hashed in the parent meanwhile
    (:mod:`.inputdigest`).  Needs :data:`FUSED_CRC`."""
    assert _fastdigest is not None
    worker: _NativeDigest = _fastdigest.Digest(sha256=False)
    return worker


def hash_progress(page: Any) -> tuple[int, bool]:
    """The parent's hash of the input (:mod:`.inputdigest`), from its hand-off *page*: the
    bytes it hashed so far, and whether it is done (to the end, or failed)."""
    assert _fastdigest is not None
    progress: tuple[int, bool] = _fastdigest.handoff_hashed(page)
    return progress


def take_hash_over(page: Any) -> tuple[bytes, int]:
    """Stop the parent's hash (:mod:`.inputdigest`) and wait for its state: what the worker's
    ``resume`` takes, and how many bytes it covers; OSError if the parent could not read."""
    assert _fastdigest is not None
    state: tuple[bytes, int] = _fastdigest.handoff_take(page)
    return state


def warm_up() -> None:
    """Hash nothing with :data:`BackgroundDigest`: what the worker imports, and what libcrypto
    loads for sha256, are then loaded (the confined child calls it before its chroot)."""
    BackgroundDigest().hexdigest()
