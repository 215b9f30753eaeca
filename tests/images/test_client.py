"""The registry client against a real Debian docker-registry on loopback: anonymous, basic
(htpasswd) and bearer-token auth, uploads and mounts, a blob cut mid-body and resumed, and each
bad answer as one clear error."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from graphdriver.errors import InvalidArchive, NotFound, RegistryError, Unauthorized
from graphdriver.images import mediatypes as mt
from graphdriver.images.auth import Credentials
from graphdriver.images.client import RegistryClient
from graphdriver.images.manifest import Descriptor, build_manifest, parse, sha256_digest
from tests.images.regutil import (
    CuttingProxy,
    Registry,
    TokenServer,
    free_port,
    gz_layer,
    htpasswd_auth,
    registry_running,
)

RANDOM = os.urandom(300_000)


def _push_small_image(client: RegistryClient, repo: str, tag: str) -> tuple[bytes, bytes]:
    blob, diff_id = gz_layer({"hello.txt": b"hello\n" * 50000, "random.bin": RANDOM})
    config = (b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["'
              + diff_id.encode() + b'"]}}')
    digest, size = client.upload_blob(repo, io.BytesIO(blob))
    assert (digest, size) == (sha256_digest(blob), len(blob))
    cdigest, csize = client.upload_blob(repo, io.BytesIO(config), sha256_digest(config),
                                        len(config))
    data = build_manifest(mt.DOCKER_MANIFEST, Descriptor(mt.DOCKER_CONFIG, cdigest, csize),
                          [Descriptor(mt.DOCKER_LAYER_GZIP, digest, size)])
    client.put_manifest(repo, tag, data, mt.DOCKER_MANIFEST)
    return blob, data


def test_anonymous_round_trip_and_mount(registry: Registry) -> None:
    with RegistryClient(registry.host) as client:
        blob, data = _push_small_image(client, "client/one", "v1")
        got, ctype, digest = client.get_manifest("client/one", "v1")
        assert got == data and digest == sha256_digest(data)
        m = parse(got, ctype)
        assert client.blob_exists("client/one", m.layers[0].digest)  # type: ignore[union-attr]
        with client.open_blob("client/one", m.layers[0]) as reader:  # type: ignore[union-attr]
            assert reader.read() == blob
        assert client.mount_blob("client/two", m.layers[0].digest, "client/one")  # type: ignore[union-attr]
        assert client.blob_exists("client/two", m.layers[0].digest)  # type: ignore[union-attr]
        with pytest.raises(NotFound, match="404"):
            client.get_manifest("client/one", "nope")


def test_digest_and_size_are_verified(registry: Registry) -> None:
    with RegistryClient(registry.host) as client:
        blob, _ = _push_small_image(client, "client/verify", "v1")
        right = Descriptor(mt.DOCKER_LAYER_GZIP, sha256_digest(blob), len(blob))
        wrong_size = Descriptor(right.media_type, right.digest, len(blob) + 5)
        with pytest.raises(InvalidArchive, match="truncated"), \
                client.open_blob("client/verify", wrong_size) as reader:
            reader.read()
        short = Descriptor(right.media_type, right.digest, len(blob) - 5)
        with pytest.raises(InvalidArchive, match="more than"), \
                client.open_blob("client/verify", short) as reader:
            reader.read()
        missing = Descriptor(right.media_type, "sha256:" + "e" * 64, 10)
        with pytest.raises(NotFound), client.open_blob("client/verify", missing) as reader:
            reader.read()


def test_tampered_blob_is_refused(tmp_path: Path) -> None:
    with registry_running(tmp_path / "reg") as reg, RegistryClient(reg.host) as client:
        blob, _ = _push_small_image(client, "client/tamper", "v1")
        path = reg.blob_path(sha256_digest(blob))
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        desc = Descriptor(mt.DOCKER_LAYER_GZIP, sha256_digest(blob), len(blob))
        with pytest.raises(InvalidArchive, match="digest mismatch"), \
                client.open_blob("client/tamper", desc) as reader:
            reader.read()


def test_cut_download_resumes_with_range(registry: Registry) -> None:
    with RegistryClient(registry.host) as client:
        blob, _ = _push_small_image(client, "client/cut", "v1")
    big = Descriptor(mt.DOCKER_LAYER_GZIP, sha256_digest(blob), len(blob))
    proxy = CuttingProxy(registry.port, cut_after=len(blob) // 2)
    try:
        with RegistryClient(proxy.host) as client, client.open_blob("client/cut", big) as reader:
            assert reader.read() == blob
            assert reader._resumes == 1
        assert proxy.cuts == 1
    finally:
        proxy.stop()


def test_registry_down_is_one_error() -> None:
    with RegistryClient(f"127.0.0.1:{free_port()}", retries=1, backoff=0.01) as client, \
            pytest.raises(RegistryError, match="unreachable"):
        client.get_manifest("x/y", "latest")


def test_basic_auth(tmp_path: Path) -> None:
    auth = htpasswd_auth(tmp_path, "alice", "secret")
    with registry_running(tmp_path / "reg", auth) as reg:
        with RegistryClient(reg.host) as anon, pytest.raises(Unauthorized, match="401"):
            anon.get_manifest("private/app", "v1")
        with RegistryClient(reg.host, creds=Credentials("alice", "wrong")) as bad, \
                pytest.raises(Unauthorized):
            bad.get_manifest("private/app", "v1")
        with RegistryClient(reg.host, creds=Credentials("alice", "secret")) as client:
            _push_small_image(client, "private/app", "v1")
            assert client.get_manifest("private/app", "v1")[0]


def test_bearer_token_flow(tmp_path: Path) -> None:
    tokens = TokenServer(tmp_path, {"bob": "pw"})
    try:
        with registry_running(tmp_path / "reg", tokens.auth_config()) as reg:
            with RegistryClient(reg.host, creds=Credentials("bob", "pw")) as client:
                _push_small_image(client, "team/app", "v1")
                before = len(tokens.requests)
                client.get_manifest("team/app", "v1")
                client.get_manifest("team/app", "v1")
                assert len(tokens.requests) == before + 1  # one token per scope, reused
                scopes = [s for q in tokens.requests for s in q.get("scope", [])]
                assert "repository:team/app:pull,push" in scopes
                assert "repository:team/app:pull" in scopes
            with RegistryClient(reg.host) as anon, pytest.raises(Unauthorized):
                anon.get_manifest("team/app", "v1")
            with RegistryClient(reg.host, creds=Credentials("bob", "no")) as bad, \
                    pytest.raises(Unauthorized, match="token server"):
                bad.get_manifest("team/app", "v1")
    finally:
        tokens.stop()




def test_the_pull_command_skips_what_the_sync_client_never_uses(tmp_path: Path) -> None:
    """httpcore probes for trio and httpx imports its command-line tool (click, rich, pygments)
    when installed; ``image pull`` marks them absent (-X importtime lists every module loaded)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a loopback port nobody listens on: the pull fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "graphdriver", "--root", str(tmp_path / "r"),
         "--runroot", str(tmp_path / "run"), "--driver", "vfs", "image", "pull",
         f"127.0.0.1:{port}/x:1"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": src}, check=False)
    loaded = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
    assert proc.returncode != 0 and "httpx" in loaded, proc.stderr[-2000:]
    # (a module marked absent is still listed, as a failed import of a few µs: its own
    # imports show whether it was loaded)
    assert not loaded & {"trio._core", "click.core", "pygments.lexers"}
