"""References, manifests, platforms and credentials: the pure parts of the image store."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from graphdriver.errors import InvalidArchive, InvalidArgument, NotFound, NotSupported
from graphdriver.images import auth, manifest, platform, reference
from graphdriver.images import mediatypes as mt


@pytest.mark.parametrize("text, want", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("user/app:1", "docker.io/user/app:1"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("127.0.0.1:5000/a/b:v2", "127.0.0.1:5000/a/b:v2"),
    ("Host.Example:443/x", "Host.Example:443/x:latest"),
    ("busybox@sha256:" + "a" * 64, "docker.io/library/busybox@sha256:" + "a" * 64),
    ("busybox:1@sha256:" + "b" * 64, "docker.io/library/busybox:1@sha256:" + "b" * 64),
])
def test_reference_normalisation(text: str, want: str) -> None:
    assert str(reference.parse(text)) == want


@pytest.mark.parametrize("text", ["", "upper/Case", "a:b:c", "busybox@sha256:abc", "a//b",
                                  "-x", "x:" + "t" * 129, " busybox"])
def test_reference_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        reference.parse(text)


def test_familiar_names() -> None:
    assert reference.parse("busybox").familiar() == "busybox:latest"
    assert reference.parse("user/app:1").familiar() == "user/app:1"
    assert reference.parse("127.0.0.1:5000/a").familiar() == "127.0.0.1:5000/a:latest"
    assert reference.parse("busybox").registry_host == "registry-1.docker.io"


def test_chain_ids_follow_the_oci_spec() -> None:
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    chain = manifest.chain_ids([a, b])
    assert chain[0] == a
    assert chain[1] == manifest.sha256_digest(f"{a} {b}".encode())


def _manifest(media_type: str | None = mt.DOCKER_MANIFEST, **over: object) -> bytes:
    obj: dict[str, object] = {
        "schemaVersion": 2,
        "config": {"mediaType": mt.DOCKER_CONFIG, "digest": "sha256:" + "c" * 64, "size": 10},
        "layers": [{"mediaType": mt.DOCKER_LAYER_GZIP, "digest": "sha256:" + "d" * 64,
                    "size": 5}],
    }
    if media_type:
        obj["mediaType"] = media_type
    obj.update(over)
    return json.dumps(obj).encode()


def test_manifest_kinds() -> None:
    m = manifest.parse(_manifest())
    assert isinstance(m, manifest.ImageManifest) and len(m.layers) == 1
    m = manifest.parse(_manifest(None), mt.OCI_MANIFEST)
    assert isinstance(m, manifest.ImageManifest) and m.media_type == mt.OCI_MANIFEST
    idx = manifest.parse(json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                                     "manifests": []}).encode())
    assert isinstance(idx, manifest.Index)


@pytest.mark.parametrize("data, err, words", [
    (b"<html>", InvalidArchive, "not JSON"),
    (json.dumps({"schemaVersion": 1, "name": "x"}).encode(), NotSupported, "schema 1"),
    (_manifest("application/x-unknown"), NotSupported, "unknown manifest media type"),
    (_manifest(layers=[{"mediaType": "x/y", "digest": "sha256:" + "d" * 64, "size": 1}]),
     NotSupported, "unknown layer media type"),
    (_manifest(layers=[{"mediaType": mt.OCI_LAYER, "digest": "md5:zz", "size": 1}]),
     InvalidArchive, "invalid digest"),
])
def test_manifest_refusals(data: bytes, err: type[Exception], words: str) -> None:
    with pytest.raises(err, match=words):
        manifest.parse(data)


def test_platform_selection() -> None:
    entries = [
        {"digest": "a", "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "b", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "c", "platform": {"os": "windows", "architecture": "amd64",
                                     "os.version": "10.0.17763.1"}},
        {"digest": "d", "platform": {"os": "windows", "architecture": "amd64",
                                     "os.version": "10.0.20348.2"}},
    ]
    assert platform.select(entries, platform.parse("linux/amd64"))["digest"] == "a"
    assert platform.select(entries, platform.parse("linux/aarch64"))["digest"] == "b"
    assert platform.select(entries, platform.Platform("windows", "amd64"))["digest"] == "d"
    want = platform.Platform("windows", "amd64", os_version="10.0.17763.1")
    assert platform.select(entries, want)["digest"] == "c"
    with pytest.raises(NotFound, match="linux/s390x"):
        platform.select(entries, platform.parse("linux/s390x"))
    assert platform.driver_platform("windowsfilter") == platform.Platform("windows", "amd64")
    with pytest.raises(NotSupported, match="windows image"):
        platform.check_os("windows", "overlay")


def test_credentials_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def auth_entry(user: str, pw: str) -> dict[str, str]:
        return {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}

    containers = tmp_path / "auth.json"
    containers.write_text(json.dumps({"auths": {"reg.example/team": auth_entry("c", "1")}}))
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {
        "reg.example": auth_entry("d", "2"),
        auth.DOCKER_HUB_AUTH_KEY: auth_entry("hub", "3")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(containers))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    given = auth.parse_creds("g:0")
    assert auth.lookup("reg.example", "team/app", given) == given
    assert auth.lookup("reg.example", "team/app") == auth.Credentials("c", "1")
    assert auth.lookup("reg.example", "other/app") == auth.Credentials("d", "2")
    assert auth.lookup("docker.io", "library/busybox") == auth.Credentials("hub", "3")
    assert auth.lookup("nowhere.example", "x") is None
    assert "hidden" in repr(given)


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread server\n'
                      'echo "{\\"ServerURL\\":\\"$server\\",\\"Username\\":\\"h\\",'
                      '\\"Secret\\":\\"s-$server\\"}"\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps({"credsStore": "fake"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    assert auth.lookup("docker.io", "library/x") == auth.Credentials(
        "h", "s-" + auth.DOCKER_HUB_AUTH_KEY)
    assert auth.lookup("reg.example", "x") == auth.Credentials("h", "s-reg.example")
