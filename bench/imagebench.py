"""The servers of the ``image pull`` row (bench/run.py): a private Debian docker-registry on a free
loopback port holding one image made of the bench's gzip layers (Debian rootfs + npm tree), and a
private containerd (own root, state, socket, config) for ``ctr image pull``.  Both are started
once, lazily, and stopped by PID when the run ends."""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_NAME = "bench/image"
TAG = "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _diff_id(path: Path) -> str:
    """The sha256 of a gzip'd layer's uncompressed tar."""
    import gzip

    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class BenchRegistry:
    """docker-registry with the bench image pushed once; ``ref`` names it."""

    _instance: BenchRegistry | None = None

    @classmethod
    def get(cls, workdir: Path, layers: list[Path]) -> BenchRegistry:
        if cls._instance is None:
            cls._instance = cls(workdir / "registry", layers)
            atexit.register(cls._instance.stop)
        return cls._instance

    def __init__(self, base: Path, layers: list[Path]) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = base / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {base / 'storage'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: bench\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        _wait_port(self.port, self.proc, "docker-registry")
        self.ref = f"{self.host}/{REPO_NAME}:{TAG}"
        self._push(layers)

    def _push(self, layers: list[Path]) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        from graphdriver.images import mediatypes as mt
        from graphdriver.images.client import RegistryClient
        from graphdriver.images.manifest import Descriptor, build_manifest

        descs, diff_ids = [], []
        with RegistryClient(self.host) as client:
            for layer in layers:
                diff_ids.append(_diff_id(layer))
                with open(layer, "rb") as f:
                    digest, size = client.upload_blob(REPO_NAME, f)
                descs.append(Descriptor(mt.DOCKER_LAYER_GZIP, digest, size))
            config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                                 "rootfs": {"type": "layers", "diff_ids": diff_ids},
                                 "history": [{"created_by": "bench"}] * len(layers)}).encode()
            cdigest, csize = client.upload_blob(
                REPO_NAME, io.BytesIO(config), "sha256:" + hashlib.sha256(config).hexdigest(),
                len(config))
            data = build_manifest(mt.DOCKER_MANIFEST, Descriptor(mt.DOCKER_CONFIG, cdigest,
                                                                 csize), descs)
            client.put_manifest(REPO_NAME, TAG, data, mt.DOCKER_MANIFEST)

    def stop(self) -> None:
        _stop(self.proc)


class BenchContainerd:
    """A private containerd: ``argv(...)`` runs ``ctr`` against it."""

    _instance: BenchContainerd | None = None

    @classmethod
    def get(cls, base: Path) -> BenchContainerd:
        if cls._instance is None:
            cls._instance = cls(base)
            atexit.register(cls._instance.stop)
        return cls._instance

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        # a unix socket path must fit 108 bytes: a short directory of its own
        self.socket_dir = Path(tempfile.mkdtemp(prefix="gdc-"))
        self.socket = self.socket_dir / "sock"
        config = base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{base / "root"}"\nstate = "{base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            "[debug]\n  level = \"error\"\n")
        self.proc = subprocess.Popen(["containerd", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("containerd did not start")
            time.sleep(0.05)

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", "bench", *args]

    def reset(self, ref: str) -> None:
        """Remove the image and let containerd collect its content and snapshots (untimed)."""
        subprocess.run(self.argv("images", "rm", "--sync", ref), capture_output=True,
                       check=False)

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
