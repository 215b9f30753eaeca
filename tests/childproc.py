"""Child processes in tests: find a process's children, feed a subprocess until its job has
started, tell when a process is gone."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) child processes of *pid*."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            fields = _stat_fields(p)
            if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
                out.append(int(p))
    return out


def is_gone(pid: int) -> bool:
    """The process exited (a zombie not reaped yet counts as gone)."""
    fields = _stat_fields(str(pid))
    return fields is None or fields[0] == "Z"


def feed_until_started(proc: subprocess.Popen[bytes], data: bytes, started: Path) -> list[int]:
    """Write *data* to *proc*'s stdin and keep it open, wait until *started* exists (the job in
    *proc*'s child got that far), and return *proc*'s children (the job's child)."""
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while not started.exists():
        assert time.monotonic() < deadline, f"{started} never appeared"
        time.sleep(0.05)
    kids = children_of(proc.pid)
    assert kids, "no job child found"
    return kids
