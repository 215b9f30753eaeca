"""``graphdriver snapshotter --address SOCKET``: serve containerd's snapshots service until
SIGINT or SIGTERM, then stop cleanly (the calls under way finish, the socket goes).

It owns the command's life cycle only; cli.py calls ``run`` with the opened driver.  It never
imports cli.py.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from .server import Server


def run(driver: Any, address: str) -> int:
    stop = threading.Event()
    server = Server(driver, address)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _n, _f: stop.set())
    try:
        server.start()
        sys.stderr.write(f"graphdriver: snapshotter ({driver.name}) serving on {address}\n")
        sys.stderr.flush()
        stop.wait()
    finally:
        server.stop()
    return 0
