"""The unix-socket gRPC server of the snapshots service (containerd's proxy plugin end).

``Server`` opens the snapshotter's records in ``ROOT/snapshotter/<driver>/`` (one server per
store: a second one is refused), repairs them against the driver, and serves on a unix socket
of mode 0660, owned by root's group, with a bounded thread pool.  ``stop`` lets the calls under
way finish (a grace period), then removes the socket and closes the records.

It owns the socket and the server's life; it never imports the command (cli.py).
"""

from __future__ import annotations

import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from ..errors import AlreadyExists, InUse
from ..locking import FileLock
from .api import snapshots_pb2_grpc
from .metadata import Metadata
from .service import Servicer, Snapshots

log = logging.getLogger("graphdriver")

WORKERS = 8  # calls served at once; more wait in gRPC's queue
MAX_QUEUED = 256  # calls accepted at once (served + waiting); more get RESOURCE_EXHAUSTED
SOCKET_MODE = 0o660
SOCKET_GROUP = 0  # root's group


def records_dir(driver: Any) -> Path:
    """``ROOT/snapshotter/<driver>/``, beside the driver's home ``ROOT/<driver>``."""
    return Path(driver.home).parent / "snapshotter" / str(driver.name)


class Server:
    def __init__(self, driver: Any, address: str) -> None:
        self.address = Path(address)
        directory = records_dir(driver)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = FileLock(directory / "server.lock")
        if not self._lock.acquire(blocking=False):
            raise InUse(f"another snapshotter serves {directory}")
        self._grpc: grpc.Server | None = None
        try:
            self.meta = Metadata(directory)
            self.snapshots = Snapshots(driver, self.meta)
            self.snapshots.repair()
        except BaseException:
            self._lock.release()
            raise

    def start(self) -> None:
        _clear_stale_socket(self.address)
        self.address.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS,
                                                thread_name_prefix="snapshotter"),
                             maximum_concurrent_rpcs=MAX_QUEUED)
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(Servicer(self.snapshots), server)
        # The socket is created with the process umask: close it down before anyone connects.
        old_umask = os.umask(0o117)
        try:
            server.add_insecure_port(f"unix:{self.address}")
            server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.address, SOCKET_MODE)
        if os.geteuid() == 0:
            os.chown(self.address, 0, SOCKET_GROUP)
        self._grpc = server
        log.info("snapshotter: serving on %s", self.address)

    def stop(self, grace: float = 5.0) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
            self.address.unlink(missing_ok=True)
        self.meta.close()
        self._lock.release()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a killed server; refuse a live one or anything else."""
    import socket

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AlreadyExists(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens
            return
    raise InUse(f"{path} is the socket of a running server")
