"""A `graphdriver snapshotter` process for a test: its own root, run root and socket, stopped by
PID; and a gRPC stub speaking containerd's snapshots service to it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.mountutil import detach_mounts_under

SRC = str(Path(__file__).resolve().parents[2] / "src")


def command(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "graphdriver", "--root", str(root / "store"),
            "--runroot", str(root / "run"), *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC}


class Served:
    """The server process and a stub connected to it."""

    def __init__(self, root: Path, driver: str, extra: tuple[str, ...] = ()) -> None:
        import grpc

        from graphdriver.snapshotter.api import snapshots_pb2_grpc

        self.root = root
        self.sock = root / "snapshotter.sock"
        self.proc = subprocess.Popen(
            command(root, "--driver", driver, *extra, "snapshotter", "--address", str(self.sock)),
            env=env(), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not _listening(self.sock):  # (a killed server's socket may still be there)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.kill()
                raise RuntimeError(f"the snapshotter did not start: {err.strip()}")
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.stderr:
                self.proc.stderr.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


def _listening(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def served(root: Path, driver: str, extra: tuple[str, ...] = ()) -> Iterator[Served]:
    s = Served(root, driver, extra)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()
        detach_mounts_under(root)




def graphdriver(root: Path, driver: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(root, "--driver", driver, *args), env=env(),
                          capture_output=True, text=True, timeout=120)


def code(exc: Any) -> Any:
    return exc.value.code()
