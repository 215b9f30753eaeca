"""Pipe sizing: the one "grow this pipe" helper of graphdriver.

Owns nothing but :func:`grow_pipe`.  A leaf module: it imports only the standard library, never
another graphdriver module.
"""

from __future__ import annotations

import contextlib
import fcntl

#: the fallback when the asked size is refused (above ``/proc/sys/fs/pipe-max-size`` unprivileged)
_FALLBACK = 1 << 20


def grow_pipe(fd: int, size: int) -> None:
    """Make the pipe behind *fd* hold *size* bytes, or 1 MiB when that much is refused, so that
    writer and reader hand over less often.  Over the user's pipe quota the default size stays
    (never an error: a small pipe is only slower)."""
    for want in (size, _FALLBACK) if size > _FALLBACK else (size,):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want)
            return
