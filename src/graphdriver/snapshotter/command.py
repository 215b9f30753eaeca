"""``graphdriver snapshotter --address SOCKET``: serve containerd's snapshots service until
SIGINT or SIGTERM, then stop cleanly (the calls under way finish, the socket goes).

SIGINT and SIGTERM are blocked before any thread starts (gRPC's threads inherit the mask) and
taken with ``sigwait`` by the main thread: a signal delivered to one of gRPC's threads would
otherwise set Python's flag without waking the main thread from its wait.

It owns the command's life cycle only; cli.py calls ``run`` with the opened driver.  It never
imports cli.py.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from .server import Server

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def run(driver: Any, address: str) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    server = Server(driver, address)
    try:
        server.start()
        sys.stderr.write(f"graphdriver: snapshotter ({driver.name}) serving on {address}\n")
        sys.stderr.flush()
        signal.sigwait(STOP_SIGNALS)
    finally:
        server.stop()
    return 0
