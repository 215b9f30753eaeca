"""File locks that work between processes and between threads of one process.

``flock`` locks belong to an open file description, so every ``FileLock`` opens its own: two
threads (or two processes) taking the same lock exclude each other.  Lock files are never
deleted (deleting one while another process waits on it would split the lock in two).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType


class FileLock:
    """An exclusive (or shared) flock on ``path``; a context manager."""

    def __init__(self, path: Path, shared: bool = False) -> None:
        self.path = path
        self._shared = shared
        self._fd: int | None = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if someone holds it."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        fd = self._open()
        op = fcntl.LOCK_SH if self._shared else fcntl.LOCK_EX
        if not blocking:
            op |= fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the description releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class LockSet:
    """Several layer locks taken in one global order (sorted paths), so no two callers deadlock."""

    def __init__(self, paths: list[Path]) -> None:
        self._locks = [FileLock(p) for p in sorted(set(paths))]

    def __enter__(self) -> LockSet:
        taken: list[FileLock] = []
        try:
            for lock in self._locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for lock in reversed(self._locks):
            lock.release()
