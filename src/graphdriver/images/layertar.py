"""A stored layer's tar as a stream: re-assembled exactly (tar-split), its diffID checked, and
compressed on the way out.  Push and save both read layers through this one class.

Owns that pipeline; imports ``exactdiff`` (tar-split re-assembly) and the compressors; never a
driver module.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from typing import Any

from ..errors import GraphDriverError, InvalidArchive
from .store import ImageStore


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class LayerTarReader(io.RawIOBase):
    """The exact tar of a layer (re-assembled from tar-split by a writer thread), hashed as it
    streams (its diffID is checked at the end) and handed out compressed ("gzip", "zstd") or
    plain ("none")."""

    def __init__(self, store: ImageStore, layer_id: str, diff_id: str, compression: str) -> None:
        super().__init__()
        from ..exactdiff import write_exact_diff

        self.diff_id = diff_id
        self.hash = hashlib.sha256()
        self.rfd, wfd = os.pipe2(os.O_CLOEXEC)
        self.error: list[BaseException] = []

        def produce() -> None:
            try:
                write_exact_diff(store.driver, layer_id, wfd)
            except BaseException as exc:  # reported at EOF
                self.error.append(exc)
            finally:
                os.close(wfd)

        self.thread = threading.Thread(target=produce, name="graphdriver-push-tar", daemon=True)
        self.thread.start()
        self.compressor: Any
        if compression == "none":
            self.compressor = _Identity()
        elif compression == "zstd":
            import zstandard

            self.compressor = zstandard.ZstdCompressor(level=3).compressobj()
        else:
            from isal import isal_zlib

            self.compressor = isal_zlib.compressobj(3, isal_zlib.DEFLATED, 16 + 15)
        self.pending = b""
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        while not self.pending and not self.eof:
            raw = os.read(self.rfd, 1 << 20)
            if raw:
                self.hash.update(raw)
                self.pending = self.compressor.compress(raw)
                continue
            self.eof = True
            self.thread.join()
            if self.error:
                exc = self.error[0]
                raise exc if isinstance(exc, GraphDriverError) else GraphDriverError(str(exc))
            got = "sha256:" + self.hash.hexdigest()
            if got != self.diff_id:
                raise InvalidArchive(f"the layer re-assembled to diffID {got}, not {self.diff_id}")
            self.pending = self.compressor.flush()
        n = min(len(view), len(self.pending))
        view[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1
            self.thread.join()
        super().close()
