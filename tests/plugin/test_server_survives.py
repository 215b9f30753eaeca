"""The plugin's server survives its clients (issue 12): thousands of idle connections against a
server with few descriptors cost no busy loop and are dropped after the header timeout, a header
that never ends is dropped, a new client is served within seconds once the crowd leaves, SIGTERM
ends it within 2 s with clients connected, a live server's socket is never taken over, and a
socket that is no longer ours is never removed.

Real sockets, a real ``serve`` process (short time limits, RLIMIT_NOFILE 256), bounded loops.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugin.test_plugin import SRC

HEADER_TIMEOUT = 2.0
SERVER_FDS = 256

_SERVE = f"""
import logging, sys
from graphdriver.plugin import serve
from graphdriver.serving import Limits
logging.basicConfig(level=logging.ERROR)
serve(sys.argv[1], "gdtest", "vfs", None, sys.argv[2],
      limits=Limits(max_connections=1024, header_timeout={HEADER_TIMEOUT!r}, body_timeout=5.0))
"""


def _start(tmp_path: Path, sock: Path, fds: int = SERVER_FDS) -> subprocess.Popen[bytes]:
    before = _inode(sock)

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    with open(tmp_path / f"server-{time.monotonic_ns()}.err", "w+b") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(sock), str(tmp_path / "run")],
                                env=dict(os.environ, PYTHONPATH=SRC), stderr=err,
                                preexec_fn=low_fd_limit)
    proc.err_path = err.name  # type: ignore[attr-defined]
    for _ in range(200):  # until a new socket file is in place, or the process ended
        if _inode(sock) not in (None, before) or proc.poll() is not None:
            break
        time.sleep(0.05)
    return proc


def _must_exit(proc: subprocess.Popen[bytes], seconds: float, why: str) -> None:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(why)


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "gd.sock"
    proc = _start(tmp_path, sock)
    if proc.poll() is not None:
        err = Path(proc.err_path).read_text()  # type: ignore[attr-defined]
        pytest.fail(f"the server did not start: {err[-500:]}")
    try:
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _activate(sock: Path, timeout: float) -> dict[str, object]:
    """One Plugin.Activate on a fresh connection, answered within *timeout* seconds.  A full
    listen queue (EAGAIN: closed clients not yet accepted and dropped) is retried until then, as
    a client that dials again would."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        while True:
            try:
                s.connect(str(sock))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        s.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nHost: \r\nContent-Length: 0\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    answer: dict[str, object] = json.loads(body)
    return answer


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _crowd(sock: Path, n: int) -> list[socket.socket]:
    """Up to *n* idle connections (as many as the listen backlog and the server take)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n + 256:
        pytest.skip(f"this test process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(sock))
        except OSError as exc:
            s.close()
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):  # the backlog is full
                time.sleep(0.002)
                continue
            raise
        conns.append(s)
    return conns


def _dropped(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_crowd_no_busy_loop_dropped_and_recovery(
        server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = server
    conns = _crowd(sock, 3000)
    assert len(conns) > SERVER_FDS, "enough idle connections to run the server out of descriptors"
    cpu = _cpu_seconds(proc.pid)
    time.sleep(1.5)
    spent = _cpu_seconds(proc.pid) - cpu
    assert spent < 0.3, f"the server spun {spent:.2f}s of CPU in 1.5s on idle connections"
    # Idle connections are dropped after the header timeout (the first ones accepted first).
    first = conns[:100]
    deadline = time.monotonic() + HEADER_TIMEOUT + 5
    while time.monotonic() < deadline and not all(_dropped(s) for s in first):
        time.sleep(0.2)
    assert all(_dropped(s) for s in first), "idle connections outlived the header timeout"
    for s in conns:
        s.close()
    start = time.monotonic()
    assert _activate(sock, timeout=5) == {"Implements": ["GraphDriver"]}
    assert time.monotonic() - start < 5
    assert proc.poll() is None


def test_slowloris_header_is_dropped(server: tuple[subprocess.Popen[bytes], Path]) -> None:
    _proc, sock = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(str(sock))
        s.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nX-Slow: ")
        start = time.monotonic()
        dropped = False
        while time.monotonic() - start < HEADER_TIMEOUT + 5:
            try:
                s.sendall(b"a")
                if s.recv(1) == b"":
                    dropped = True
                    break
            except TimeoutError:
                continue
            except OSError:
                dropped = True
                break
        assert dropped, "a header that never ends kept its connection"
        assert time.monotonic() - start < HEADER_TIMEOUT + 3
    assert _activate(sock, timeout=5)


def test_sigterm_with_clients_connected_exits_within_2s(
        server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = server
    conns = _crowd(sock, 200)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(str(sock))
    slow.sendall(b"POST /GraphDriver.ApplyDiff?id=x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n")
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _must_exit(proc, 2.0, "the server did not stop within 2 s of SIGTERM")
    finally:
        slow.close()
        for s in conns:
            s.close()
    assert time.monotonic() - start < 2.0
    assert not sock.exists(), "its own socket is removed on exit"


_CAUGHT_BY_A_THREAD = """
import signal, sys, threading, time
from graphdriver.serving import UnixServer, serve_until_signalled

def handle(conn):
    # The signal is this connection's thread's, once the main thread is back asleep in poll().
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    conn.recv(1)  # until the server shuts the connection

serve_until_signalled(UnixServer(sys.argv[1], handle))
"""


def test_a_signal_caught_by_a_connections_thread_stops_the_server(tmp_path: Path) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads: the server still stops
    while that thread's client stays connected, and removes its socket."""
    sock = tmp_path / "gd.sock"
    proc = subprocess.Popen([sys.executable, "-c", _CAUGHT_BY_A_THREAD, str(sock)],
                            env=dict(os.environ, PYTHONPATH=SRC), stderr=subprocess.PIPE)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        client.connect(str(sock))  # its thread signals itself, then waits on this client
        _must_exit(proc, 5.0, "a signal taken by a connection's thread left the server running")
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not sock.exists(), "its own socket is removed on exit"


def test_refuses_a_live_socket_and_never_removes_another_servers(
        server: tuple[subprocess.Popen[bytes], Path], tmp_path: Path) -> None:
    proc, sock = server
    second = _start(tmp_path, sock)
    try:
        assert second.wait(20) != 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    err = Path(second.err_path).read_text()  # type: ignore[attr-defined]
    assert "already listening" in err, err[-500:]
    assert _activate(sock, timeout=5), "the first server still answers on its socket"
    # Someone replaces the socket file (a newer server): stopping the old one leaves it alone.
    sock.unlink()
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(str(sock))
    ident = os.stat(sock).st_ino
    proc.send_signal(signal.SIGTERM)
    proc.wait(5)
    assert sock.exists() and os.stat(sock).st_ino == ident, "another server's socket was removed"
    newer.close()
    # A stale socket (nobody listening) is replaced at start.
    third = _start(tmp_path, sock)
    try:
        assert third.poll() is None
        assert _activate(sock, timeout=5)
    finally:
        third.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            third.wait(5)
        if third.poll() is None:
            third.kill()
            third.wait()
