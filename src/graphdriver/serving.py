"""Unix-socket servers that survive their clients: the plugin's today, the snapshotter's next.

What it owns:

- ``bind_unix``: refuse a socket path where a live server answers, replace a stale one, bind,
  and remember *which* socket was bound (``st_dev``/``st_ino``) so that ``unlink_if_ours`` on
  exit never removes the socket of a server started after us;
- ``UnixServer``: the accept loop — a bound on concurrent connections (one thread each, so
  threads are bounded too; the rest wait in the listen backlog), back-off instead of a busy loop
  when ``accept`` fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM),
  resumed as soon as a connection ends, and a stop that closes every connection and returns
  within ``Limits.stop_grace``;
- ``DeadlineReader``: socket reads with a deadline for the whole of a phase (a request's headers:
  a slowloris header that never ends is dropped) or a limit on silence (a body), and a limit on
  how long a write may block (a client that stops reading);
- ``serve_until_signalled``: SIGTERM and SIGINT stop the server within a second or two.

Helpers row: imports only ``errors``; never the store, the drivers, the tar engine or a front end.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InUse, InvalidArgument, from_oserror

log = logging.getLogger("graphdriver.serving")

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0


@dataclass(frozen=True)
class Limits:
    """How much a server gives its clients."""

    max_connections: int = 128  # served at once; each holds one thread
    header_timeout: float = 30.0  # a request line and headers, whole; an idle keep-alive wait
    body_timeout: float = 120.0  # the longest silence inside a body; the longest blocked write
    stop_grace: float = 1.0  # how long a stop waits for the connections' threads
    backlog: int = 256  # the listen queue (dockerd opens many connections at once)


# ----- the socket path ---------------------------------------------------------------------------


def bind_unix(path: Path, backlog: int, mode: int = 0o660) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at *path* and the (st_dev, st_ino) of the socket file it made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidArgument(f"{path} exists and is not a socket: not replacing it")
        if _answers(path):
            raise InUse(f"a server is already listening on {path}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: left by a server that died
    # Made ready under a private name, then linked into place: a client never finds the path
    # before the socket listens, and a server that appeared meanwhile is never replaced.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock.bind(str(tmp))
        try:
            os.chmod(tmp, mode)
            sock.listen(backlog)
            sock.setblocking(False)
            os.link(tmp, path)
        finally:
            tmp.unlink()
        st = os.stat(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EEXIST:
            raise InUse(f"another server took {path} while this one started") from exc
        raise from_oserror(exc, f"listen on {path}") from exc
    return sock, (st.st_dev, st.st_ino)


def _answers(path: Path) -> bool:
    """Whether a server accepts connections on the socket at *path*."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:  # a full backlog (EAGAIN, timeout): alive, only busy
        return True
    finally:
        probe.close()
    return True


def unlink_if_ours(path: Path, ident: tuple[int, int]) -> None:
    """Remove the socket file at *path* only if it is still the one we bound."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == ident:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        log.warning("not removing %s: another server's socket replaced ours", path)


# ----- reads with deadlines ----------------------------------------------------------------------


class DeadlineReader(io.RawIOBase):
    """A connected socket's reading side, with the current phase's time limit."""

    def __init__(self, sock: socket.socket, write_timeout: float) -> None:
        self._sock = sock
        self._write_timeout = write_timeout
        self._deadline: float | None = None
        self._idle: float | None = None
        sock.settimeout(write_timeout)

    def readable(self) -> bool:
        return True

    def expect_headers(self, timeout: float) -> None:
        """The next reads must finish within *timeout* seconds from now, all together."""
        self._deadline, self._idle = time.monotonic() + timeout, None

    def expect_body(self, idle: float) -> None:
        """Each next read may wait at most *idle* seconds for data."""
        self._deadline, self._idle = None, idle

    def readinto(self, b: Any) -> int:
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError("the request's headers took too long")
        else:
            timeout = self._idle if self._idle is not None else self._write_timeout
        self._sock.settimeout(timeout)
        try:
            return self._sock.recv_into(b)
        finally:
            self._sock.settimeout(self._write_timeout)


# ----- the accept loop ---------------------------------------------------------------------------


class UnixServer:
    """Accepts connections on a unix socket and runs ``handle(conn)`` for each in its own thread,
    at most ``limits.max_connections`` at once; ``stop()`` (from any thread or a signal handler)
    ends ``serve_forever``."""

    def __init__(self, path: str | os.PathLike[str], handle: Callable[[socket.socket], None],
                 limits: Limits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits or Limits()
        self._handle = handle
        self._sock, self._ident = bind_unix(self.path, self.limits.backlog)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._lock = threading.RLock()  # stop() may run in a signal handler on this thread
        self._active: dict[socket.socket, threading.Thread] = {}
        self._closed = False
        self._previous_wakeup_fd: int | None = None  # set while signals wake this server

    def wake_on_signals(self) -> None:
        """Make any signal with a Python handler wake ``serve_forever`` (main thread only).

        The kernel may deliver a process's signal to any thread that does not block it, one of
        the connections' among them; the handler then runs only when the main thread next runs
        Python code, and a main thread asleep in poll() with no client to wake it would never
        stop.  With the wake pipe as the wake-up descriptor, the signal's byte wakes the poll.
        Undone when the server closes, before the pipe does."""
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def stop(self) -> None:
        self._stopping.set()
        self._wake()

    def _wake(self) -> None:
        with self._lock:  # never after _close: the number may name another file by then
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def _wait(self, timeout: float | None, listen: bool) -> bool:
        """Wait for a wake-up, or (if *listen*) a connection; True when one can be accepted."""
        fds = [self._wake_r, self._sock.fileno()] if listen else [self._wake_r]
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(None if timeout is None else int(timeout * 1000))}
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
        return self._sock.fileno() in ready

    def serve_forever(self) -> None:
        backoff = 0.0  # grows while accept keeps failing for want of resources
        paused = False
        try:
            while not self._stopping.is_set():
                with self._lock:
                    full = len(self._active) >= self.limits.max_connections
                if full or paused:
                    # A connection that ends wakes us early: its descriptor is free again.
                    self._wait(None if full else backoff, listen=False)
                    paused = paused and full
                    continue
                if not self._wait(None, listen=True) or self._stopping.is_set():
                    continue
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    backoff, paused = min(max(backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX), True
                    log.warning("accept on %s: %s; retrying in %.2fs", self.path, exc.strerror,
                                backoff)
                    continue
                conn.setblocking(True)
                if self._start(conn):
                    backoff = 0.0
                else:
                    backoff, paused = min(max(backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX), True
        finally:
            self._close()

    def _start(self, conn: socket.socket) -> bool:
        thread = threading.Thread(target=self._run, args=(conn,), daemon=True,
                                  name="graphdriver-conn")
        with self._lock:
            self._active[conn] = thread
        try:
            thread.start()
        except RuntimeError as exc:  # no more threads
            log.warning("cannot serve a connection on %s: %s", self.path, exc)
            with self._lock:
                del self._active[conn]
            conn.close()
            return False
        return True

    def _run(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except OSError as exc:  # the client went away or timed out
            log.debug("connection on %s: %s", self.path, exc)
        except Exception:
            log.exception("connection on %s failed", self.path)
        finally:
            with self._lock:
                self._active.pop(conn, None)
            conn.close()
            self._wake()

    def _close(self) -> None:
        self._sock.close()
        unlink_if_ours(self.path, self._ident)
        with self._lock:
            active = dict(self._active)
        for conn in active:  # wakes every thread blocked on its client
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + self.limits.stop_grace
        for thread in active.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:  # threads still serving (past the grace) no longer wake anyone
            self._closed = True
            if self._previous_wakeup_fd is not None:
                signal.set_wakeup_fd(self._previous_wakeup_fd)
                self._previous_wakeup_fd = None
            os.close(self._wake_r)
            os.close(self._wake_w)


def serve_until_signalled(server: UnixServer) -> None:
    """Run *server* until SIGTERM or SIGINT (handled only when called in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        server.serve_forever()
        return

    def stop(signum: int, frame: object) -> None:
        log.warning("signal %d: stopping the server on %s", signum, server.path)
        server.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    server.wake_on_signals()
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
