"""A private containerd for tests and the bench: Debian's containerd 1.6 with its own root, state,
socket and config.toml (graphdriver as the proxy snapshotter ``graphdriver``; the CRI and ``opt``
plugins disabled), with a `graphdriver snapshotter` beside it, both in a private mount namespace
whose ``/run/containerd`` is a tmpfs (1.6 always keeps shim sockets and runc state there).
Everything is stopped by PID; the empty cgroups runc leaves are removed.  No pytest here: the
bench (bench/run.py) uses it too."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.test_docker import _pids_mentioning, _stop_pid

from .snaputil import SRC, _listening

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"


def why_not() -> str | None:
    """None when a private containerd can run here, else the reason."""
    import shutil

    if os.geteuid() != 0:
        return "containerd and runc need root"
    for path in (CONTAINERD, CTR, RUNC, "/usr/bin/containerd-shim-runc-v2"):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install containerd runc)"
    for tool in ("unshare", "nsenter", "skopeo"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (util-linux, skopeo)"
    return None


def image_archive(layer: Path, out: Path, ref: str) -> Path:
    """A `docker save` archive of one layer tar (skopeo's tarball transport), for ctr import."""
    subprocess.run(["skopeo", "copy", "-q", f"tarball:{layer}", f"docker-archive:{out}:{ref}"],
                   check=True, capture_output=True)
    return out


class Namespace:
    """A private mount namespace held by a `sleep` process; commands enter it with nsenter."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                        "sleep", "infinity"])
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make a mount namespace"
            time.sleep(0.01)
        # containerd 1.6 keeps shim sockets and runc state in /run/containerd: a private tmpfs
        over = "/run/containerd" if os.path.isdir("/run/containerd") else "/run"
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", over])
        self.run(["mkdir", "-p", "/run/containerd"])

    def argv(self, args: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *args]

    def run(self, args: list[str], timeout: float = 120) -> str:
        proc = subprocess.run(self.argv(args), capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as f:
            return subprocess.Popen(self.argv(args), stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": SRC})

    def close(self) -> None:
        _stop_pid(self.holder.pid)  # the namespace, and every mount in it, go with it
        self.holder.wait()


def config_toml(work: Path) -> str:
    return f"""version = 2
root = "{work}/containerd/root"
state = "{work}/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]

[grpc]
  address = "{work}/containerd.sock"

[ttrpc]
  address = "{work}/containerd.sock.ttrpc"

[proxy_plugins.graphdriver]
  type = "snapshot"
  address = "{work}/graphdriver.sock"
"""


def wait_listening(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not _listening(sock):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def remove_empty_cgroups(namespace: str) -> None:
    """runc removes a container's cgroups, not the ones named after the containerd namespace."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / namespace
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


class Daemons:
    def __init__(self, work: Path, driver: str) -> None:
        self.work = work
        self.namespace = f"gdtest-{os.getpid()}"
        self.ns = Namespace()
        self.procs: list[subprocess.Popen[bytes]] = []
        (work / "config.toml").write_text(config_toml(work))
        gd_log = work / "graphdriver.log"
        self.procs.append(self.ns.start(
            [sys.executable, "-m", "graphdriver", "--root", str(work / "gd"), "--runroot",
             str(work / "gdrun"), "--driver", driver, "snapshotter", "--address",
             str(work / "graphdriver.sock")], gd_log))
        wait_listening(work / "graphdriver.sock", self.procs[-1], gd_log)
        ctd_log = work / "containerd.log"
        self.procs.append(self.ns.start([CONTAINERD, "--config", str(work / "config.toml")],
                                        ctd_log))
        wait_listening(work / "containerd.sock", self.procs[-1], ctd_log)

    def ctr_args(self, *args: str) -> list[str]:
        return [CTR, "--address", str(self.work / "containerd.sock"), "-n", self.namespace, *args]

    def ctr(self, *args: str, timeout: float = 180) -> str:
        return self.ns.run(self.ctr_args(*args), timeout=timeout)

    def graphdriver(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "graphdriver", "--root", str(self.work / "gd"),
                               "--runroot", str(self.work / "gdrun"), *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})

    def close(self) -> None:
        for proc in reversed(self.procs):  # containerd first, then the snapshotter
            _stop_pid(proc.pid)
            proc.wait()
        for pid in _pids_mentioning(str(self.work)):  # shims, if any outlived containerd
            _stop_pid(pid)
        self.ns.close()
        remove_empty_cgroups(self.namespace)


