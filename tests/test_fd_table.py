"""fsutil.reserve_fd_table: the descriptor table grown ahead, only where that costs no wait."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

_PROBE = """
import os, resource, sys, threading
from graphdriver.fsutil import reserve_fd_table

def fd_size():
    for line in open("/proc/self/status"):
        if line.startswith("FDSize:"):
            return int(line.split()[1])

hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
held = os.open(sys.argv[3], os.O_RDONLY) if sys.argv[3] != "-" else None
if held is not None and int(sys.argv[4]) >= 0:
    held = os.dup2(held, int(sys.argv[4]))
stop = threading.Event()
if sys.argv[2] == "threaded":
    threading.Thread(target=stop.wait).start()
before = fd_size()
reserve_fd_table()
after = fd_size()
stop.set()
name = os.readlink(f"/proc/self/fd/{held}") if held is not None else "-"
free = [fd for fd in range(3, 2048) if not os.path.exists(f"/proc/self/fd/{fd}")]
print(before, after, name, free[0])
"""


def _probe(limit: int, mode: str = "single", held: str = "-", at: int = -1) -> list[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(limit), mode, held, str(at)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_a_single_threaded_process_gets_its_table_grown() -> None:
    before, after, _, _ = _probe(4096)
    assert int(before) < 1024 <= int(after)


def test_the_table_stays_within_the_open_files_limit() -> None:
    """(A table is a power of two in size; a process starts with its parent's, so this one's
    may be bigger than the limit already: then there is nothing to see.)"""
    before, after, _, _ = _probe(300)
    if int(before) >= 512:
        pytest.skip(f"the process started with a table of {before} descriptors")
    assert int(after) == 512


def test_a_process_with_threads_is_left_to_the_kernel() -> None:
    """There the growth would wait for a grace period as well: nothing is done."""
    before, after, _, _ = _probe(4096, "threaded")
    assert int(after) == int(before) < 1024


def test_no_descriptor_in_use_is_touched(tmp_path: Path) -> None:
    """An fd at the very number the table is grown to stays what it was, and the probe's own
    descriptors are all closed again."""
    f = tmp_path / "kept"
    f.write_text("x")
    _, after, name, first_free = _probe(4096, held=str(f), at=1023)
    assert name == str(f)
    assert int(after) >= 1024
    assert int(first_free) == 4  # 3: the held file's first fd; nothing else stays open
