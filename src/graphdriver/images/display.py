"""Per-layer progress lines of a pull or push on a terminal (``docker pull``'s display):
``<12 hex>: Waiting | Downloading n/N | Extracting | Pull complete | Already exists``.

Silent when stderr is not a terminal or with ``-q``.  Owns only the drawing; imports nothing of
graphdriver but ``units``.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ..units import human_size


class LayerDisplay:
    """Lines that are redrawn in place (cursor up, rewrite) at most 10 times a second."""

    def __init__(self, quiet: bool = False) -> None:
        self.enabled = (not quiet and sys.stderr.isatty()
                        and os.environ.get("TERM") != "dumb")
        self._lines: dict[str, str] = {}
        self._order: list[str] = []
        self._drawn = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def set(self, key: str, status: str, force: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            if key not in self._lines:
                self._order.append(key)
            self._lines[key] = status
            now = time.monotonic()
            if force or now - self._last >= 0.1:
                self._last = now
                self._draw()

    def bytes(self, key: str, verb: str, done: int, total: int) -> None:
        self.set(key, f"{verb} {human_size(done)}/{human_size(total)}")

    def _draw(self) -> None:
        out = "\x1b[A" * self._drawn
        for key in self._order:
            out += f"\r{key[:12]}: {self._lines[key]}\x1b[K\n"
        self._drawn = len(self._order)
        sys.stderr.write(out)
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            with self._lock:
                self._draw()
