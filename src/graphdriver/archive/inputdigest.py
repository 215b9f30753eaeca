"""The diffID of a plain layer file, hashed in the parent while its confined child starts.

An apply's sha256 (the layer's diffID) is, after the kernel's writes, the largest part of its
work: ~1.8 GB/s with SHA-NI, about as long as GNU tar takes to write a Debian rootfs.  Hashed
in the child, it starts only once the child has started (Python, the engine's imports:
~17 ms) and shares the child's CPUs with the reader and the file writer all along.  When the
layer is an uncompressed regular file, the parent starts hashing it at once instead
(:func:`start`): ``_fastdigest.FileHash``, a native thread, reads the same bytes with ``pread``
(a duplicate of the fd: the file's offset stays the child's; never through a map, whose SIGBUS
on a file cut shorter would kill the parent) from the offset the child starts at.

The two meet on a page of shared memory (a sealed memfd, mapped here and in the child: the
child cannot shrink it under the parent's map).  The parent's thread says there how far it got;
the child's reader, at its first read, asks it to stop, unless it is done: the thread stops,
leaves its sha256 state there and ends, and the child's digest goes on from that state, over
the bytes after it (from its map), in the pass that also does the big files' CRC-64s.  So the
parent hashes only while its child starts (~20 ms: some 30 MB): for the rest of the apply its
copy out of the page cache and its sha256 would take a CPU from the child's writes (on 2 CPUs
the apply is CPU-bound; the rootfs took ~50 ms of CPU more, and ran 1.03 of GNU tar instead of
0.92, when the parent hashed on while it kept ahead of the reads).

The child says what it read (its stream's kind and length) and, if it took the hash over, the
diffID of the whole stream.  Otherwise :meth:`InputDigest.diff_id` takes the parent's sha256 as
the layer's diffID only if the child read a plain stream of exactly the bytes hashed: a file
that was cut, grown or replaced by a compressed one meanwhile fails the apply (it is rolled
back), as it would give a diffID of bytes that were not the ones applied.  (A file rewritten in
place, same size, while it is applied gives a diffID of bytes partly not applied, as it did when
the child hashed its map: the apply and the digest read the file at different moments either
way.)  The parent never parses the input: it hashes bytes.

Not used, so the child hashes as it reads: without the native helper's own SHA-NI sha256 (its
state is what moves over), for a stream that is not a regular file or is compressed (its decoder
runs in the child), and for a file larger than a quarter of the machine's memory (two readers of
a cold file that the page cache cannot hold would each read it from the disk).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat

from ..errors import GraphDriverError
from .compression import HEAD_SIZE, detect
from .native import native_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing

if TYPE_CHECKING:
    from .._fastdigest import FileHash

#: the largest share of the machine's memory a file hashed in the parent may take (see above)
MEMORY_SHARE = 4


class InputDigest:
    """The sha256 of a plain layer file from an offset on, being hashed by a native thread,
    and the hand-off page the child gets (:attr:`page_fd`)."""

    __slots__ = ("_hash", "_page", "_start", "page_fd")

    def __init__(self, file_hash: FileHash, page: mmap.mmap, page_fd: int, start: int) -> None:
        self._hash = file_hash
        self._page = page
        #: the hand-off page's memfd, for the child (closed by :meth:`close`)
        self.page_fd = page_fd
        self._start = start

    def diff_id(self, child_diff_id: str | None, kind: str, read: int) -> str:
        """The layer's diffID, once the child read a stream of *kind* and *read* bytes (from
        the offset hashed from) and answered *child_diff_id* (None: it did not take the hash
        over); GraphDriverError if the parent's hash is not of what the child read."""
        if child_diff_id:  # the whole stream's: it went on from the parent's state (or, without
            return child_diff_id  # the native helper, hashed it all; close() stops the thread)
        hexdigest, hashed, handed = self._hash.result()
        if handed:
            raise GraphDriverError("the apply child took the layer's hash over and did not "
                                   "say its diffID")
        if kind != "none" or read != hashed:
            raise GraphDriverError(
                f"the layer file changed while it was applied: {hashed} bytes from offset "
                f"{self._start} were plain tar when the apply started, the apply read "
                f"{read} bytes" + ("" if kind == "none" else f" of a {kind} stream"))
        return "sha256:" + hexdigest

    def close(self) -> None:
        """Stop hashing if it still runs (the apply failed), and let the page go."""
        self._hash.cancel()
        self._page.close()
        if self.page_fd >= 0:
            os.close(self.page_fd)
            self.page_fd = -1


def start(fd: int) -> InputDigest | None:
    """Start hashing *fd*'s file from its offset to its end, if the parent is to (see the
    module docstring); None: the child hashes what it reads."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        if (st.st_size - offset) * MEMORY_SHARE > _memory():
            return None
        if detect(os.pread(fd, HEAD_SIZE, offset)) != "none":
            return None
        # loaded only now: without SHA-NI its import loads libcrypto (_hashlib), which a
        # parent that applies a stream never needs
        fastdigest = native_module("_fastdigest")
        if fastdigest is None or not fastdigest.FUSED:
            return None
        page_fd = os.memfd_create("graphdriver-input-digest",
                                  os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return None  # the child reads it, and says what went wrong
    page: mmap.mmap | None = None
    try:
        os.ftruncate(page_fd, fastdigest.HANDOFF_BYTES)
        # sealed: the child cannot shrink the page under the parent's map (SIGBUS)
        fcntl.fcntl(page_fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        page = mmap.mmap(page_fd, fastdigest.HANDOFF_BYTES)
        return InputDigest(fastdigest.FileHash(fd, offset, page), page, page_fd, offset)
    except BaseException as exc:
        if page is not None:
            page.close()
        os.close(page_fd)
        if isinstance(exc, OSError):
            return None  # (as above)
        raise


def open_page(fd: int) -> mmap.mmap:
    """The child's map of the hand-off page *fd* (TarReader's *handoff*)."""
    return mmap.mmap(fd, os.fstat(fd).st_size)


def _memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
