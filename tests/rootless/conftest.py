"""A real unprivileged user for the rootless tests (DESIGN.md rule 7): made with ``useradd``
(a subordinate id range included), its commands run separately with ``runuser``, removed
afterwards with its pause processes (killed by the pid each store's run root records).

The user must be able to run this interpreter: where it lives under a directory the user cannot
enter (a root-only home), each command runs in a private mount namespace of its own, made by
root, with the interpreter's prefix bind-mounted at a path the user can reach.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"


class User:
    """One unprivileged user and how to run its commands."""

    def __init__(self, name: str, scratch: Path) -> None:
        import pwd

        entry = pwd.getpwnam(name)
        self.name = name
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.home = Path(entry.pw_dir)
        self.runtime = scratch / "run"  # XDG_RUNTIME_DIR
        self.runtime.mkdir(mode=0o700)
        os.chown(self.runtime, self.uid, self.gid)
        self.bind: tuple[str, str] | None = None
        exe = os.path.realpath(sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
        if not self._can_run(exe) and exe.startswith(prefix + "/"):
            view = scratch / "python"
            view.mkdir()
            view.chmod(0o755)
            self.bind = (prefix, str(view))
        self.python = self._seen(exe)
        paths = [str(SRC), str(REPO)]
        paths += [self._seen(p) for p in sys.path
                  if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
        self.env = {"HOME": str(self.home), "USER": name, "LOGNAME": name, "LANG": "C.UTF-8",
                    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
                    "XDG_RUNTIME_DIR": str(self.runtime), "PYTHONPATH": os.pathsep.join(paths),
                    "PYTHONDONTWRITEBYTECODE": "1", "SHELL": "/bin/sh"}

    def _seen(self, path: str) -> str:
        """*path* as the user's commands see it (through the bind mount, if any)."""
        if self.bind and (path == self.bind[0] or path.startswith(self.bind[0] + "/")):
            return self.bind[1] + path[len(self.bind[0]):]
        return path

    def _can_run(self, exe: str) -> bool:
        return subprocess.run(["runuser", "-u", self.name, "--", "test", "-x", exe],
                              check=False).returncode == 0

    def run(self, *cmd: str, input: bytes | None = None, unset: tuple[str, ...] = (),
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        env = {k: v for k, v in self.env.items() if k not in unset}
        argv = ["runuser", "-u", self.name, "--", "env", "-i",
                *(f"{k}={v}" for k, v in env.items()), *cmd]
        if self.bind:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", *self.bind, *argv]
        return subprocess.run(argv, input=input, capture_output=True, cwd=self.home,
                              timeout=timeout, check=False)

    def gd(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """``graphdriver ARGS`` as the user."""
        return self.run(self.python, "-m", "graphdriver", *args, **kw)

    def gd_ok(self, *args: str, **kw: Any) -> str:
        proc = self.gd(*args, **kw)
        assert proc.returncode == 0, f"{args}: {proc.returncode}: {proc.stderr.decode()}"
        return proc.stdout.decode()

    def give(self, path: Path, data: bytes) -> Path:
        """A file of the user's (e.g. a layer tar) in its home."""
        path.write_bytes(data)
        os.chown(path, self.uid, self.gid)
        return path


def _kill_pauses(user: User) -> None:
    """The user's pause processes, by the pids its run roots record (nothing else is killed)."""
    for pid_file in [*user.runtime.glob("graphdriver/userns/pause.pid"),
                     *Path("/tmp").glob(f"graphdriver-run-{user.uid}/userns/pause.pid")]:
        try:
            pid = int(pid_file.read_text().strip())
            owner = os.stat(f"/proc/{pid}").st_uid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if owner == user.uid and b"graphdriver-pause" in cmdline:
            os.kill(pid, signal.SIGKILL)


def _userns_problem() -> str | None:
    for path, off in (("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                      ("/proc/sys/user/max_user_namespaces", "0")):
        try:
            if Path(path).read_text().strip() == off:
                return f"unprivileged user namespaces are off here ({path} is {off})"
        except OSError:
            continue
    return None


@contextlib.contextmanager
def _made_user(prefix: str, subordinate_ids: bool) -> Iterator[User]:
    """A new user (with or without subordinate ids), removed afterwards with all it left."""
    if os.geteuid() != 0:
        pytest.skip("making a test user needs root")
    for tool in ("useradd", "userdel", "usermod", "runuser", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    problem = _userns_problem()
    if problem:
        pytest.skip(problem)
    name = f"{prefix}{os.getpid()}"
    made = subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="gd-rootless-"))  # pytest's own tmp is root's only
    scratch.chmod(0o755)
    u: User | None = None
    try:
        listed = subprocess.run(["grep", "-q", f"^{name}:", "/etc/subuid"],
                                check=False).returncode == 0
        if subordinate_ids and not listed:
            subprocess.run(["usermod", "--add-subuids", "200000-265535", "--add-subgids",
                            "200000-265535", name], check=True)
        elif not subordinate_ids and listed:
            for file, flag in (("/etc/subuid", "--del-subuids"), ("/etc/subgid", "--del-subgids")):
                for line in Path(file).read_text().splitlines():
                    who, start, count = line.split(":")
                    if who == name:
                        last = int(start) + int(count) - 1
                        subprocess.run(["usermod", flag, f"{start}-{last}", name], check=True)
        u = User(name, scratch)
        probe = u.run("unshare", "--user", "true")
        if probe.returncode != 0:
            pytest.skip("unprivileged user namespaces do not work here: "
                        f"{probe.stderr.decode().strip()}")
        yield u
    finally:
        if u is not None:
            _kill_pauses(u)
        subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
        shutil.rmtree(f"/tmp/graphdriver-run-{u.uid if u else -1}", ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="package")
def user() -> Iterator[User]:
    """A user with subordinate ids (what Debian's useradd gives)."""
    with _made_user("gdrl", subordinate_ids=True) as u:
        yield u


@pytest.fixture
def user_without_subids() -> Iterator[User]:
    with _made_user("gdrn", subordinate_ids=False) as u:
        yield u
