"""End to end with a real daemon: Debian's containerd 1.6 (private root, state, socket and
config.toml with graphdriver as a proxy plugin; the CRI and ``opt`` plugins disabled) and runc,
in a private mount namespace with its own tmpfs on ``/run/containerd`` (1.6 always keeps shim
sockets and runc state there).  An image made from busybox-static is imported with ``ctr``, a
container runs on the graphdriver snapshotter, ``ctr snapshots`` lists, measures, prepares and
commits, and everything is removed again.  Every process is stopped by PID; the empty cgroups
runc leaves are removed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_docker import BUSYBOX, _pids_mentioning, _stop_pid, make_rootfs_tar

from .snaputil import SRC, _listening

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
IMAGE = "docker.io/gdtest/busybox:1"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "containerd and runc need root"
    for path in (CONTAINERD, CTR, RUNC, "/usr/bin/containerd-shim-runc-v2"):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install containerd runc)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (util-linux)"
    if BUSYBOX is None:
        return "busybox is missing (apt-get install busybox-static)"
    return None


pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")]


def docker_archive(base: Path, layer: Path, ref: str) -> Path:
    """A `docker save` style archive of one layer (what `ctr images import` reads)."""
    diff_id = hashlib.sha256(layer.read_bytes()).hexdigest()
    config = json.dumps({
        "architecture": ARCH, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
    }).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    manifest = json.dumps([{"Config": f"{config_hex}.json", "RepoTags": [ref],
                            "Layers": [f"{diff_id}/layer.tar"]}]).encode()
    out = base / "image.tar"
    with tarfile.open(out, "w") as t:
        for name, data in ((f"{config_hex}.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, _bytes(data))
        t.add(layer, f"{diff_id}/layer.tar")
    return out


def _bytes(data: bytes) -> object:
    import io

    return io.BytesIO(data)


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

    def ctr(self, *args: str, timeout: float = 180) -> str:
        return self.ns.run([CTR, "--address", str(self.work / "containerd.sock"),
                            "-n", self.namespace, *args], timeout=timeout)

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


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    work = Path(f"/tmp/gdctd-{os.getpid()}")  # short: unix socket paths are at most 107 bytes
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o711)
    try:
        d = Daemons(work, "overlay")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        yield d
    finally:
        d.close()
        shutil.rmtree(work, ignore_errors=True)


def test_containerd_runs_a_container_on_the_graphdriver_snapshotter(
        daemons: Daemons, tmp_path: Path) -> None:
    d = daemons
    image = docker_archive(tmp_path, make_rootfs_tar(tmp_path), IMAGE)
    d.ctr("images", "import", "--snapshotter", "graphdriver", str(image))
    assert IMAGE in d.ctr("images", "ls", "-q").split()
    out = d.ctr("run", "--rm", "--snapshotter", "graphdriver", IMAGE, "gdc1",
                "sh", "-c", "echo hello-from-graphdriver > /written; cat /written; ls /bin/sh")
    assert out.split() == ["hello-from-graphdriver", "/bin/sh"]

    listed = d.ctr("snapshots", "--snapshotter", "graphdriver", "ls").splitlines()
    assert listed[0].split() == ["KEY", "PARENT", "KIND"]
    [base] = [line.split()[0] for line in listed[1:]]  # the image's one layer (its chain ID)
    assert listed[1].split()[1:] == ["Committed"]
    usage = d.ctr("snapshots", "--snapshotter", "graphdriver", "usage", base).splitlines()
    assert usage[0].split() == ["KEY", "SIZE", "INODES"] and usage[1].split()[0] == base
    assert int(usage[1].split()[-1]) > 10

    # commit-like flows: prepare on the image's layer, commit, build on it
    d.ctr("snapshots", "--snapshotter", "graphdriver", "prepare", "work 1", base)
    mounts = d.ctr("snapshots", "--snapshotter", "graphdriver", "mounts", "/mnt", "work 1")
    assert "mount -t overlay overlay" in mounts and "lowerdir=" in mounts
    d.ctr("snapshots", "--snapshotter", "graphdriver", "commit", "layer-1", "work 1")
    d.ctr("snapshots", "--snapshotter", "graphdriver", "view", "look", "layer-1")
    info = json.loads(d.ctr("snapshots", "--snapshotter", "graphdriver", "info", "layer-1"))
    assert (info["Kind"], info["Parent"]) == ("Committed", base)
    layers = d.graphdriver("--driver", "overlay", "ls").stdout.split()
    assert len(layers) == 3
    refused = d.graphdriver("--driver", "overlay", "rm", layers[0])
    assert refused.returncode != 0 and ("held" in refused.stderr or "children" in refused.stderr)

    # then remove everything
    d.ctr("snapshots", "--snapshotter", "graphdriver", "rm", "look")
    d.ctr("snapshots", "--snapshotter", "graphdriver", "rm", "layer-1")
    d.ctr("images", "rm", "--sync", IMAGE)
    deadline = time.monotonic() + 30
    while d.ctr("snapshots", "--snapshotter", "graphdriver", "ls").splitlines()[1:]:
        assert time.monotonic() < deadline, "containerd's GC left snapshots"
        time.sleep(0.2)
    assert d.graphdriver("--driver", "overlay", "ls").stdout.split() == []
