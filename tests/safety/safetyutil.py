"""Helpers of the safety suite: run the real command, look at a store's disk, canaries, tars.

Everything here works on real files and real processes: the command is run as a subprocess
(``python -m graphdriver``) with its own ``--root``/``--runroot``; a store's invariants are read
straight from its on-disk layout (DESIGN.md "On-disk layout"), not through the library.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.treeutil import diff_snapshots, snapshot

SRC = Path(__file__).resolve().parents[2] / "src"
REMOVING = "-removing"


def iterations(var: str, default: int) -> int:
    """A loop count that CI keeps small and a human can raise (env var)."""
    try:
        return max(1, int(os.environ.get(var, default)))
    except ValueError:
        return default


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
    env.pop("GRAPHDRIVER_ROOT", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def cli_argv(root: Path, runroot: Path, driver: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "graphdriver", "--root", str(root), "--runroot", str(runroot),
            "--driver", driver, *args]


def cli(root: Path, runroot: Path, driver: str, *args: str, stdin: Any = subprocess.DEVNULL,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the command to completion; text output."""
    return subprocess.run(cli_argv(root, runroot, driver, *args), stdin=stdin,
                          capture_output=True, text=True, env=cli_env(), timeout=timeout,
                          check=False)


def cli_ok(root: Path, runroot: Path, driver: str, *args: str) -> str:
    res = cli(root, runroot, driver, *args)
    assert res.returncode == 0, f"graphdriver {' '.join(args)}: rc={res.returncode} {res.stderr}"
    return res.stdout


def popen(root: Path, runroot: Path, driver: str, *args: str) -> subprocess.Popen[bytes]:
    """Start the command in its own process group (so its children can be found)."""
    return subprocess.Popen(cli_argv(root, runroot, driver, *args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                            start_new_session=True)


def group_members(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def wait_group_gone(pgid: int, timeout: float = 10.0) -> list[int]:
    """Wait until no live process is left in the group; return the survivors (empty = good)."""
    deadline = time.monotonic() + timeout
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def assert_one_line_error(stderr: str | bytes, what: str) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text, f"{what}: traceback on stderr:\n{text}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{what}: expected one line on stderr, got {len(lines)}:\n{text}"
    assert lines[0].startswith("graphdriver: "), f"{what}: unexpected stderr: {lines[0]}"
    return lines[0]


# --- what a store looks like on disk --------------------------------------------------------


class Layout:
    """Reads a driver home's on-disk state (vfs and overlay layouts of DESIGN.md)."""

    def __init__(self, root: Path, driver: str) -> None:
        self.driver = driver
        self.home = root / driver
        self.meta = self.home / "meta"

    def layer_tree(self, layer_id: str) -> Path:
        """The directory holding the layer's own files."""
        if self.driver == "vfs":
            return self.home / "dir" / layer_id
        if self.driver == "overlay":
            return self.home / layer_id / "diff"
        raise AssertionError(f"no layout for {self.driver}")

    def _data_dir(self) -> Path:
        return self.home / "dir" if self.driver == "vfs" else self.home

    def disk_ids(self) -> set[str]:
        d = self._data_dir()
        if not d.exists():
            return set()
        skip = {"meta", "locks", "l"} if self.driver == "overlay" else set()
        return {n for n in os.listdir(d) if not n.startswith(".") and n not in skip
                and (d / n).is_dir()}

    def meta_ids(self) -> set[str]:
        if not self.meta.exists():
            return set()
        return {n for n in os.listdir(self.meta) if not n.startswith(".")}

    def problems(self, listed: Sequence[str]) -> list[str]:
        """Every violation of DESIGN.md rule 1 visible on disk after a repair."""
        out = []
        listed_set = set(listed)
        meta_ids = self.meta_ids()
        disk_ids = self.disk_ids()
        for where in (self.meta, self._data_dir()):
            if where.exists():
                out += [f"left over: {where / n}" for n in os.listdir(where) if REMOVING in n]
        for n in sorted(meta_ids):
            if (self.meta / n / "incomplete").exists():
                out.append(f"incomplete marker: {n}")
            if not (self.meta / n / "layer.json").is_file():
                out.append(f"meta dir without record: {n}")
        if meta_ids != listed_set:
            out.append(f"meta ids {sorted(meta_ids)} != listed {sorted(listed_set)}")
        if disk_ids != listed_set:
            out.append(f"layer dirs {sorted(disk_ids)} != listed {sorted(listed_set)}")
        for n in sorted(listed_set):
            if not self.layer_tree(n).is_dir():
                out.append(f"layer {n}: {self.layer_tree(n)} missing")
        if self.driver == "overlay":
            links = self.home / "l"
            if links.exists():
                for name in os.listdir(links):
                    target = links / name
                    if not target.exists():
                        out.append(f"dangling short link l/{name} -> {os.readlink(target)}")
        # Nothing stray in the home (only the layout's own names).
        allowed = {"meta", "locks", ".lock"} | ({"dir"} if self.driver == "vfs" else
                                                 {"l"} | listed_set)
        for name in os.listdir(self.home):
            if name not in allowed and not name.startswith("."):
                out.append(f"stray entry in home: {name}")
        return out


def manifest(root: Path, *, dir_mtimes: bool = False) -> dict[str, Any]:
    """tests/treeutil.snapshot, sparse-aware (Go's sparse test tars declare 60 GiB holes) and
    without the times of overlay whiteouts (0/0 character devices, made at apply time)."""
    return snapshot(root, dir_mtimes=dir_mtimes, sparse=True, whiteout_mtimes=False)


def tree(path: Path) -> dict[str, Any]:
    """A manifest of a layer's tree: every fact a layer keeps."""
    return manifest(path)


def store_tree(root: Path) -> dict[str, Any]:
    """A manifest of a whole store root, lock files aside (they appear on first use, harmlessly)."""
    return {k: v for k, v in manifest(root).items()
            if "/locks/" not in f"/{k}" and not k.endswith("/.lock") and k != ".lock"}


def same_tree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return not diff_snapshots(a, b)


# --- canaries: things outside the store that must never change ------------------------------


class Canary:
    """A directory outside the store with a file, a hard-linked pair, a symlink and a subdir."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "canary"
        self.dir.mkdir()
        (self.dir / "victim").write_bytes(b"do not touch\n")
        (self.dir / "linked").write_bytes(b"two names\n")
        os.link(self.dir / "linked", self.dir / "linked2")
        (self.dir / "sub").mkdir()
        (self.dir / "sub" / "x").write_bytes(b"x\n")
        os.symlink("victim", self.dir / "sym")
        self.before = self._facts()

    def _facts(self) -> tuple[Any, ...]:
        st = os.lstat(self.dir)
        nlinks = tuple(sorted((n, os.lstat(self.dir / n).st_nlink, os.lstat(self.dir / n).st_ino)
                              for n in os.listdir(self.dir)))
        return (manifest(self.dir, dir_mtimes=True), stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                nlinks)

    def check(self) -> None:
        now = self._facts()
        assert now == self.before, "canary outside the store changed: " + "; ".join(
            diff_snapshots(self.before[0], now[0]) or [repr(now[1:]), repr(self.before[1:])])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- test archives ---------------------------------------------------------------------------


def _info(name: str, kind: bytes, mode: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = mtime
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def make_layer_tar(path: Path, seed: int, megabytes: int, files: int = 300,
                   prefix: str = "") -> None:
    """A real multi-MB layer: nested dirs, files of mixed sizes, symlinks, hard links.

    Written with tarfile (test data only), streamed to disk.
    """
    rng = random.Random(seed)
    total = megabytes << 20
    mtime = 1_700_000_000 + seed
    dirs = [f"{prefix}d{i}" for i in range(8)] + [f"{prefix}d{i}/s{j}" for i in range(8)
                                                   for j in range(3)]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            tar.addfile(_info(d, tarfile.DIRTYPE, 0o755, mtime))
        weights = [rng.random() ** 3 for _ in range(files)]
        scale = total / sum(weights)
        names = []
        for i, w in enumerate(weights):
            name = f"{rng.choice(dirs)}/f{i}.bin"
            size = int(w * scale)
            ti = _info(name, tarfile.REGTYPE, rng.choice((0o644, 0o600, 0o755)), mtime)
            ti.size = size
            tar.addfile(ti, _RandomReader(rng.randrange(1 << 30), size))
            names.append(name)
        for i in range(20):
            ti = _info(f"{prefix}d0/link{i}", tarfile.SYMTYPE, 0o777, mtime)
            ti.linkname = rng.choice(("../" + names[i], "/etc/passwd", "missing", names[i]))
            tar.addfile(ti)
        for i in range(10):
            ti = _info(f"{prefix}d1/hard{i}", tarfile.LNKTYPE, 0o644, mtime)
            ti.linkname = names[-1 - i]
            tar.addfile(ti)


class _RandomReader(io.RawIOBase):
    """Deterministic pseudo-random bytes without holding them all in memory."""

    def __init__(self, seed: int, size: int) -> None:
        self._rng = random.Random(seed)
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        n = min(n, 1 << 20)
        self._left -= n
        return self._rng.randbytes(n)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def gnu_extract(tar: Path, dest: Path) -> None:
    """Extract with GNU tar as the reference (owners, modes, times, hard links kept)."""
    gnu = shutil.which("tar")
    assert gnu is not None
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([gnu, "-xf", str(tar), "-C", str(dest), "--same-owner", "-p",
                    "--no-overwrite-dir"], check=True, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at *path* (root only); always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


class FedApply:
    """``graphdriver apply ID -`` fed from a file through a pipe at a steady pace.

    A file on fast tmpfs applies in a blink on an idle machine; fed over ``seconds`` the apply is
    certainly still running when a test kills or signals it, however fast the machine is.
    """

    def __init__(self, root: Path, runroot: Path, driver: str, layer_id: str, path: Path,
                 seconds: float = 2.0) -> None:
        import threading

        self.proc = subprocess.Popen(
            cli_argv(root, runroot, driver, "apply", layer_id, "-"), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), start_new_session=True)
        self.pid = self.proc.pid
        self._thread = threading.Thread(target=self._feed, args=(path, seconds), daemon=True)
        self._thread.start()

    def _feed(self, path: Path, seconds: float) -> None:
        import time

        chunk = 256 << 10
        stdin = self.proc.stdin
        assert stdin is not None
        pause = seconds / max(1, path.stat().st_size // chunk)
        try:
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    stdin.write(block)
                    stdin.flush()
                    time.sleep(pause)
        except (BrokenPipeError, OSError, ValueError):
            pass  # the command stopped reading (killed, or refused the input)
        finally:
            with contextlib.suppress(OSError, ValueError):
                stdin.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def communicate(self, timeout: float) -> tuple[bytes, bytes]:
        self.proc.wait(timeout)
        self._thread.join(timeout)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        return self.proc.stdout.read(), self.proc.stderr.read()
