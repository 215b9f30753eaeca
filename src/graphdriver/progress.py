"""A one-line progress bar on a terminal (stderr), for long applies and diffs.

Owns the drawing only; never imports the store, drivers or the archive engine.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from . import TYPE_CHECKING
from .units import human_bytes

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType


class ProgressBar:
    """Redraws at most 10 times a second from a background thread; silent unless stderr is a tty.

    ``poll`` returns the bytes done so far (e.g. the shared file offset of an input fd handed to
    a child process), so the work itself needs no callbacks.
    """

    def __init__(self, label: str, total: int | None, poll: Callable[[], int]) -> None:
        self.label = label
        self.total = total if total and total > 0 else None
        self.poll = poll
        self.enabled = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()

    def _draw(self, final: bool = False) -> None:
        try:
            done = self.poll()
        except OSError:
            return
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = human_bytes(done / elapsed) + "/s"
        if self.total:
            frac = min(1.0, done / self.total)
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            line = f"{self.label} [{bar}] {frac * 100:5.1f}% {human_bytes(done)} {rate}"
        else:
            line = f"{self.label} {human_bytes(done)} {rate}"
        sys.stderr.write("\r" + line[:200] + ("\n" if final else "\x1b[K"))
        sys.stderr.flush()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._draw()

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True, name="progress")
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if exc_type is None:
                self._draw(final=True)
            else:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
