"""Writing to a path the user named (``diff -o``, ``image save -o``): one rule for every command.

- ``-`` is standard output;
- an existing character or block device, FIFO or socket is written into, never replaced (``-o
  /dev/null`` must leave ``/dev/null`` a device);
- a symbolic link is followed: the output goes where it points, and the link stays (as GNU tools
  do);
- only a regular file or a new path gets the atomic write: a temporary file beside the target,
  renamed over it when the writer finished, removed when it failed — so a failed command never
  leaves a half-written file under the name.

Helpers row: imports only ``errors``; never the store, the drivers, the tar engine or a front end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
from collections.abc import Iterator

from .errors import InvalidArgument, from_oserror

STDOUT = "-"


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str]) -> Iterator[int]:
    """A file descriptor to write the output into; committed (renamed) when the block ends
    without an exception."""
    text = os.fspath(path)
    if text == STDOUT:
        sys.stdout.flush()
        yield sys.stdout.fileno()
        return
    target = os.path.realpath(text)  # a symlink writes where it points
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise from_oserror(exc, f"output {text}") from exc
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"output {text} is a directory")
    if st is None or stat.S_ISREG(st.st_mode):
        with _replace_atomically(text, target, st) as fd:
            yield fd
        return
    with _write_into(text, target, st) as fd:
        yield fd


@contextlib.contextmanager
def _write_into(text: str, target: str, st: os.stat_result) -> Iterator[int]:
    """A device, FIFO or socket: open (or connect to) it and write into it as it is."""
    try:
        if stat.S_ISSOCK(st.st_mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(target)
            except BaseException:
                sock.close()
                raise
            fd = sock.detach()
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise from_oserror(exc, f"output {text}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replace_atomically(text: str, target: str, st: os.stat_result | None) -> Iterator[int]:
    """A regular file or a new path: write a temporary file beside it, rename it over at the end."""
    head, name = os.path.split(target)
    tmp = os.path.join(head, f".{name}.partial-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise from_oserror(exc, f"output {text}") from exc
    try:
        try:
            if st is not None:  # keep the mode of the file it replaces
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            yield fd
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise from_oserror(exc, f"output {text}") from exc
        raise
