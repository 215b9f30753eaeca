"""The image store end to end, from the outside: the ``graphdriver image`` command against a
private docker-registry on loopback, with images made by umoci and skopeo, on overlay and vfs."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver import NotSupported, open_driver
from tests.conftest import IS_ROOT
from tests.images.regutil import (
    CuttingProxy,
    PacedProxy,
    Registry,
    TokenServer,
    Tools,
    free_port,
    htpasswd_auth,
    push_layout,
    registry_running,
    umoci_image,
    umoci_tree,
)

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root (umoci trees compared with "
                                "owners, overlay mounts)")


class GD:
    """``python -m graphdriver`` against one store."""

    def __init__(self, root: Path, driver: str) -> None:
        self.root = root
        self.driver = driver
        self.base = [sys.executable, "-m", "graphdriver", "--root", str(root / "root"),
                     "--runroot", str(root / "run"), "--driver", driver]

    def run(self, *args: str, ok: bool = True, env: dict[str, str] | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run([*self.base, *args], capture_output=True, timeout=300, env=env,
                              input=input)
        if ok and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr.decode()}")
        return proc

    def out(self, *args: str, **kw: Any) -> str:
        return self.run(*args, **kw).stdout.decode().strip()

    def fails(self, *args: str, **kw: Any) -> str:
        proc = self.run(*args, ok=False, **kw)
        assert proc.returncode != 0, f"{args} should have failed"
        err = proc.stderr.decode()
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, f"want one line, got {err!r}"
        return lines[0]

    def images(self) -> list[str]:
        return self.out("image", "ls", "-q").split()

    def layers(self) -> list[dict[str, Any]]:
        d = open_driver(self.driver, self.root / "root", runroot=self.root / "run")
        return [{"id": i, "made_by": d.record(i).made_by, "holders": d.record(i).holders}
                for i in d.layers()]


@pytest.fixture(params=["overlay", "vfs"])
def gd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GD]:
    try:
        open_driver(request.param, tmp_path / "probe", runroot=tmp_path / "probe-run")
    except NotSupported as exc:
        pytest.skip(f"{request.param}: {exc}")
    g = GD(tmp_path / "gd", request.param)
    yield g
    g.run("cleanup", ok=False)


def tree(root: Path) -> dict[str, Any]:
    """Path -> (kind, mode, content) of a root filesystem, owners left out (umoci rootless)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", st.st_mode & 0o7777, p.read_bytes())
    return out


@pytest.fixture(scope="session")
def pushed(registry: Registry, tools: Tools, base_layout: Path) -> dict[str, str]:
    return {tag: push_layout(tools, base_layout, tag, registry, f"e2e/{tag}")
            for tag in ("base", "app")}


def test_pull_mount_matches_umoci(gd: GD, pushed: dict[str, str], tools: Tools,
                                  base_layout: Path, tmp_path: Path) -> None:
    image_id = gd.out("image", "pull", pushed["app"])
    assert image_id.startswith("sha256:") and gd.images() == [image_id[7:19]]
    path = Path(gd.out("image", "mount", pushed["app"]))
    assert Path(gd.out("image", "mount", pushed["app"])) == path  # counted, same path
    want = tree(umoci_tree(tools, base_layout, "app", tmp_path / "ref"))
    assert tree(path) == want
    with pytest.raises(OSError) as exc:
        (path / "written").write_text("no")  # the image's view is read-only
    assert exc.value.errno == errno.EROFS
    gd.run("image", "unmount", pushed["app"])
    gd.run("image", "unmount", pushed["app"])
    assert gd.layers()  # nothing mounted any more: the layers can be listed and removed
    assert not [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
                if str(gd.root) in m]
    info = json.loads(gd.out("image", "inspect", pushed["app"]))[0]
    assert info["Id"] == image_id and len(info["RootFS"]["Layers"]) == 3
    assert info["RepoTags"] == [pushed["app"]]
    assert info["RepoDigests"][0].startswith(pushed["app"].rsplit(":", 1)[0] + "@sha256:")
    assert gd.out("image", "inspect", "-f", "{{.Os}}/{{.Architecture}}", image_id[7:19]) == \
        "linux/amd64"


def test_second_image_shares_base_layers(gd: GD, pushed: dict[str, str]) -> None:
    base = gd.out("image", "pull", "-q", pushed["base"])
    app = gd.out("image", "pull", "-q", pushed["app"])
    layers = gd.layers()
    assert len(layers) == 3  # two base layers stored once, one app layer
    assert all(layer["made_by"] == "image" for layer in layers)
    shared = [layer for layer in layers if len(layer["holders"]) == 2]
    assert len(shared) == 2 and {f"image:{base}", f"image:{app}"} == set(shared[0]["holders"])
    # rm of the base keeps the layers the app holds; prune takes only unheld ones
    assert "Deleted: " + base in gd.out("image", "rm", pushed["base"])
    assert gd.out("image", "prune") == ""
    gd.run("image", "rm", pushed["app"])
    assert len(gd.out("image", "prune").splitlines()) == 3
    assert gd.layers() == []


def test_push_to_second_repository_mounts_blobs(gd: GD, pushed: dict[str, str],
                                                registry: Registry, tools: Tools) -> None:
    gd.run("image", "pull", "-q", pushed["app"])
    dest = f"{registry.host}/e2e/copy-{gd.driver}:v1"
    gd.run("image", "push", "-q", pushed["app"], dest)
    src = json.loads(tools.skopeo("inspect", "--raw", "--tls-verify=false",
                                  f"docker://{pushed['app']}"))
    got = json.loads(tools.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}"))
    # the pulled compressed blobs were reused (mounted), not re-compressed
    assert [layer["digest"] for layer in got["layers"]] == \
        [layer["digest"] for layer in src["layers"]]
    assert got["config"]["digest"] == src["config"]["digest"]


def test_concurrent_pulls_of_one_image(gd: GD, pushed: dict[str, str]) -> None:
    procs = [subprocess.Popen([*gd.base, "image", "pull", "-q", pushed["app"]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    assert len({o[0] for o in outs}) == 1
    assert len(gd.images()) == 1 and len(gd.layers()) == 3


def test_zstd_push_is_an_oci_manifest_skopeo_reads(gd: GD, pushed: dict[str, str],
                                                   registry: Registry, tools: Tools,
                                                   base_layout: Path, tmp_path: Path) -> None:
    from graphdriver.images import mediatypes as mt

    gd.run("image", "pull", "-q", pushed["app"])
    dest = f"{registry.host}/e2e/zstd-{gd.driver}:1"
    gd.run("image", "push", "-q", "--compression", "zstd", pushed["app"], dest)
    got = json.loads(tools.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{dest}"))
    assert got["mediaType"] == mt.OCI_MANIFEST
    assert {layer["mediaType"] for layer in got["layers"]} == {mt.OCI_LAYER_ZSTD}
    fresh = GD(tmp_path / "fresh", gd.driver)
    fresh.run("image", "pull", "-q", dest)
    want = tree(umoci_tree(tools, base_layout, "app", tmp_path / "ref"))
    assert tree(Path(fresh.out("image", "mount", dest))) == want
    fresh.run("image", "unmount", dest)


def test_commit_push_pull_on_a_fresh_store(gd: GD, pushed: dict[str, str], registry: Registry,
                                           tmp_path: Path) -> None:
    gd.run("image", "pull", "-q", pushed["base"])
    gd.run("create", "ctr", "--rw", "--image", pushed["base"])
    gd.fails("image", "rm", pushed["base"])  # a container layer uses it
    root = Path(gd.out("mount", "ctr"))
    (root / "etc" / "new.txt").write_text("committed\n")
    (root / "etc" / "os-release").unlink()
    gd.run("unmount", "ctr")
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    new_id = gd.out("image", "commit", "ctr", f"{registry.host}/e2e/committed:{gd.driver}",
                    "-m", "a test commit", "-c", "ENV A=1", "-c", 'CMD ["/bin/true"]', env=env)
    info = json.loads(gd.out("image", "inspect", new_id))[0]
    assert info["Created"] == "2023-11-14T22:13:20Z" and info["Config"]["Env"][-1] == "A=1"
    assert info["Config"]["Cmd"] == ["/bin/true"] and info["Comment"] == "a test commit"
    gd.run("image", "push", "-q", f"{registry.host}/e2e/committed:{gd.driver}")
    with_tree = tree(Path(gd.out("image", "mount", new_id)))
    gd.run("image", "unmount", new_id)
    fresh = GD(tmp_path / "fresh", gd.driver)
    assert fresh.out("image", "pull", f"{registry.host}/e2e/committed:{gd.driver}") == new_id
    assert tree(Path(fresh.out("image", "mount", new_id))) == with_tree
    assert "etc/new.txt" in with_tree and "etc/os-release" not in with_tree
    fresh.run("image", "unmount", new_id)
    fresh.run("cleanup")
    hist = gd.out("image", "history", new_id)
    assert "a test commit" in hist


def test_save_load_round_trips_with_skopeo_and_umoci(gd: GD, pushed: dict[str, str],
                                                     tools: Tools, base_layout: Path,
                                                     tmp_path: Path) -> None:
    image_id = gd.out("image", "pull", "-q", pushed["app"])
    want = tree(umoci_tree(tools, base_layout, "app", tmp_path / "ref"))
    # ours -> skopeo (docker-archive) -> OCI -> umoci unpack
    archive = tmp_path / "app.tar"
    gd.run("image", "save", "-o", str(archive), pushed["app"])
    tools.copy(f"docker-archive:{archive}", f"oci:{tmp_path / 'via-skopeo'}:app")
    assert tree(umoci_tree(tools, tmp_path / "via-skopeo", "app", tmp_path / "u1")) == want
    # ours (oci-dir) -> umoci unpack directly
    gd.run("image", "save", "--format", "oci-dir", "-o", str(tmp_path / "ours-oci"),
           pushed["app"])
    idx = json.loads((tmp_path / "ours-oci" / "index.json").read_text())
    tag = idx["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    assert tree(umoci_tree(tools, tmp_path / "ours-oci", tag, tmp_path / "u2")) == want
    # theirs -> ours: skopeo docker-archive, umoci's OCI layout (dir), oci-archive (tar)
    theirs = tmp_path / "theirs.tar"
    tools.copy(f"oci:{base_layout}:app", f"docker-archive:{theirs}:example.com/their/app:v1")
    fresh = GD(tmp_path / "fresh", gd.driver)
    assert fresh.out("image", "load", str(theirs)) == "Loaded image: example.com/their/app:v1"
    assert fresh.out("image", "ls", "-q") == image_id[7:19]
    assert fresh.out("image", "load", "-i", str(base_layout)).startswith("Loaded image ID: ")
    oci_tar = tmp_path / "theirs-oci.tar"
    tools.copy(f"oci:{base_layout}:base", f"oci-archive:{oci_tar}:reg.example/b:2")
    out = fresh.out("image", "load", str(oci_tar))
    assert out.startswith("Loaded image"), out
    # ours -> ours, compressed and from stdin, several images in one archive
    both = tmp_path / "both.tar"
    gd.run("image", "pull", "-q", pushed["base"])
    gd.run("image", "save", "--format", "oci-archive", "-o", str(both), pushed["app"],
           pushed["base"])
    subprocess.run(["gzip", "-k", str(both)], check=True)
    third = GD(tmp_path / "third", gd.driver)
    lines = third.out("image", "load", input=(tmp_path / "both.tar.gz").read_bytes()).split("\n")
    assert sorted(lines) == sorted(f"Loaded image: {r}" for r in (pushed["app"], pushed["base"]))
    path = Path(third.out("image", "mount", pushed["app"]))
    assert tree(path) == want
    third.run("image", "unmount", pushed["app"])


def test_bad_inputs_are_one_line_and_leave_nothing(gd: GD, tools: Tools, base_layout: Path,
                                                   tmp_path: Path) -> None:
    with registry_running(tmp_path / "reg") as reg:
        ref = push_layout(tools, base_layout, "app", reg, "bad/app")
        manifest = json.loads(tools.skopeo("inspect", "--raw", "--tls-verify=false",
                                           f"docker://{ref}"))
        last = reg.blob_path(manifest["layers"][-1]["digest"])
        good = last.read_bytes()
        # a tampered blob whose tar is intact (gzip's MTIME field changed): only the blob
        # digest check can refuse it, before the commit point
        last.write_bytes(good[:4] + b"\x01\x02\x03\x04" + good[8:])
        assert "digest mismatch" in gd.fails("image", "pull", ref)
        assert gd.images() == []
        # a corrupt gzip stream
        last.write_bytes(good[:-10] + bytes(10))
        assert "corrupt gzip" in gd.fails("image", "pull", ref)
        assert gd.images() == []
        assert all(not layer["holders"] for layer in gd.layers())
        assert len(gd.layers()) == 2  # the complete base layers stay as cache, held by none
        # truncated, then missing
        last.write_bytes(good[: len(good) // 2])
        err = gd.fails("image", "pull", ref)
        assert "truncated" in err or "ended before" in err, err
        last.unlink()
        gd.fails("image", "pull", ref)
        last.write_bytes(good)
        assert gd.out("image", "pull", "-q", ref).startswith("sha256:")
        assert "404" in gd.fails("image", "pull", f"{reg.host}/bad/none:v1")
    assert "unreachable" in gd.fails("image", "pull", f"127.0.0.1:{free_port()}/x/y:z")
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"not a tar at all" * 100)
    gd.fails("image", "load", str(corrupt))
    notjson = tmp_path / "nj"
    notjson.mkdir()
    (notjson / "manifest.json").write_text("{oops")
    assert "not JSON" in gd.fails("image", "load", str(notjson))
    gd.fails("image", "inspect", "nothing:here")
    gd.fails("create", "c1", "--rw", "--image", "nothing:here")


def test_basic_auth_and_bearer_token_pulls(gd: GD, tools: Tools, base_layout: Path,
                                           tmp_path: Path) -> None:
    auth = htpasswd_auth(tmp_path, "alice", "pw1")
    with registry_running(tmp_path / "basic", auth) as reg:
        tools.auth_file.write_text(json.dumps({"auths": {reg.host: {
            "auth": base64.b64encode(b"alice:pw1").decode()}}}))
        try:
            ref = push_layout(tools, base_layout, "base", reg, "priv/base")
        finally:
            tools.auth_file.write_text('{"auths": {}}')
        assert "401" in gd.fails("image", "pull", ref)
        gd.run("image", "pull", "-q", "--creds", "alice:pw1", ref)
        # credentials from $REGISTRY_AUTH_FILE
        auth_file = tmp_path / "auth.json"
        auth_file.write_text(json.dumps({"auths": {reg.host: {"username": "alice",
                                                               "password": "pw1"}}}))
        env = dict(os.environ, REGISTRY_AUTH_FILE=str(auth_file))
        gd.run("image", "push", "-q", ref, f"{reg.host}/priv/copy:1", env=env)
    tokens = TokenServer(tmp_path, {"bob": "pw2"})
    try:
        with registry_running(tmp_path / "token", tokens.auth_config()) as reg:
            gd.run("image", "tag", ref, f"{reg.host}/team/base:1")
            gd.run("image", "push", "-q", "--creds", "bob:pw2", f"{reg.host}/team/base:1")
            fresh = GD(tmp_path / "fresh", gd.driver)
            assert "Unauthorized" in fresh.fails("image", "pull", f"{reg.host}/team/base:1")
            fresh.run("image", "pull", "-q", "--creds", "bob:pw2", f"{reg.host}/team/base:1")
    finally:
        tokens.stop()


def test_pull_cut_mid_blob_resumes(gd: GD, registry: Registry, pushed: dict[str, str],
                                   tools: Tools) -> None:
    manifest = json.loads(tools.skopeo("inspect", "--raw", "--tls-verify=false",
                                       f"docker://{pushed['base']}"))
    biggest = max(layer["size"] for layer in manifest["layers"])
    proxy = CuttingProxy(registry.port, cut_after=biggest // 2)
    try:
        ref = pushed["base"].replace(registry.host, proxy.host)
        gd.run("image", "pull", "-q", ref)
        assert proxy.cuts == 1
    finally:
        proxy.stop()


def test_multi_platform_index(gd: GD, registry: Registry, tools: Tools,
                              tmp_path: Path) -> None:
    from graphdriver.images import mediatypes as mt
    from graphdriver.images.client import RegistryClient
    from graphdriver.images.manifest import sha256_digest

    layout = tmp_path / "multi"
    plats = {"linux/amd64": ("linux", "amd64"), "linux/arm64": ("linux", "arm64"),
             "windows/amd64": ("windows", "amd64")}
    entries = []
    with RegistryClient(registry.host) as client:
        for i, (name, (os_, arch)) in enumerate(plats.items()):
            tag = name.replace("/", "-")
            umoci_image(tools, layout, tag, [{"etc/platform": name.encode(),
                                              f"etc/n{i}": b"x"}])
            tools.umoci("config", "--image", f"{layout}:{tag}", "--os", os_,
                        "--architecture", arch)
            ref = push_layout(tools, layout, tag, registry, "e2e/multi")
            data, _, digest = client.get_manifest("e2e/multi", ref.rsplit(":", 1)[1])
            entries.append({"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(data),
                            "platform": {"os": os_, "architecture": arch}})
        index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                            "manifests": entries}).encode()
        client.put_manifest("e2e/multi", "all", index, mt.OCI_INDEX)
    ref = f"{registry.host}/e2e/multi:all"
    if os.uname().machine == "x86_64":
        gd.run("image", "pull", "-q", ref)
        root = Path(gd.out("image", "mount", ref))
        assert (root / "etc" / "platform").read_text() == "linux/amd64"
        gd.run("image", "unmount", ref)
        digests = json.loads(gd.out("image", "inspect", ref))[0]["RepoDigests"]
        assert digests == [f"{registry.host}/e2e/multi@{sha256_digest(index)}"]
    gd.run("image", "pull", "-q", "--platform", "linux/arm64", ref)
    info = json.loads(gd.out("image", "inspect", ref))[0]
    assert info["Architecture"] == "arm64"
    err = gd.fails("image", "pull", "--platform", "windows/amd64", ref)
    assert "windows image" in err
    assert "linux/s390x" in gd.fails("image", "pull", "--platform", "linux/s390x", ref)


@pytest.fixture(scope="session")
def big_pushed(registry: Registry, tools: Tools) -> str:
    """Three layers of 16 MiB random data: a pull, commit or push that takes a while."""
    layout = tools.dir / "big-layout"
    umoci_image(tools, layout, "big", [{f"data/{i}.bin": os.urandom(16 << 20)}
                                       for i in range(3)])
    return push_layout(tools, layout, "big", registry, "e2e/big")


@pytest.mark.parametrize("when", [0.4, 0.9, 1.6])
def test_kill_9_during_pull_commit_push(gd: GD, big_pushed: str, registry: Registry,
                                        when: float) -> None:
    def killed(*args: str) -> None:
        proc = subprocess.Popen([*gd.base, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(when)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def consistent() -> None:
        for short in gd.images():
            info = json.loads(gd.out("image", "inspect", short))[0]
            for layer in info["GraphDriver"]["Data"]["Layers"]:
                assert gd.run("exists", layer, ok=False).returncode == 0
            gd.out("image", "mount", short)
            gd.run("image", "unmount", short)

    killed("image", "pull", big_pushed)
    consistent()
    gd.run("image", "pull", "-q", big_pushed)  # the retry completes what was cut
    consistent()
    gd.run("create", "ctr", "--rw", "--image", big_pushed)
    root = Path(gd.out("mount", "ctr"))
    (root / "big.bin").write_bytes(os.urandom(8 << 20))
    gd.run("unmount", "ctr")
    killed("image", "commit", "ctr", "local/committed:1")
    consistent()
    killed("image", "push", big_pushed, f"{registry.host}/e2e/killed:{gd.driver}")
    consistent()
    gd.run("image", "prune")
    consistent()


def test_foreign_layers_are_followed_on_pull_and_never_pushed(gd: GD, tmp_path: Path) -> None:
    import functools
    import http.server
    import threading

    from graphdriver.images import mediatypes as mt
    from graphdriver.images.client import RegistryClient
    from graphdriver.images.manifest import Descriptor, build_manifest, sha256_digest
    from tests.images.regutil import gz_layer

    served = tmp_path / "served"
    served.mkdir()
    foreign_blob, foreign_diff = gz_layer({"base/foreign.txt": b"from a URL\n"})
    (served / "layer.tar.gz").write_bytes(foreign_blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    # distribution accepts layer URLs only from an allow list
    urls_ok = "validation:\n  manifests:\n    urls:\n      allow:\n        - '^http://127\\.0\\.0\\.1:'\n"
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/layer.tar.gz"
        own_blob, own_diff = gz_layer({"app/own.txt": b"pushed\n"})
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers",
                                        "diff_ids": [foreign_diff, own_diff]}}).encode()
        foreign = Descriptor(mt.DOCKER_FOREIGN_LAYER, sha256_digest(foreign_blob),
                             len(foreign_blob), (url,))
        with registry_running(tmp_path / "reg", extra_yaml=urls_ok) as registry, \
                RegistryClient(registry.host) as client:
            own = Descriptor(mt.DOCKER_LAYER_GZIP, *client.upload_blob("e2e/foreign",
                                                                       io.BytesIO(own_blob)))
            cdigest, csize = client.upload_blob("e2e/foreign", io.BytesIO(config))
            data = build_manifest(mt.DOCKER_MANIFEST, Descriptor(mt.DOCKER_CONFIG, cdigest,
                                                                 csize), [foreign, own])
            client.put_manifest("e2e/foreign", "1", data, mt.DOCKER_MANIFEST)
            ref = f"{registry.host}/e2e/foreign:1"
            gd.run("image", "pull", "-q", ref)
            root = Path(gd.out("image", "mount", ref))
            assert (root / "base" / "foreign.txt").read_text() == "from a URL\n"
            gd.run("image", "unmount", ref)
            gd.run("image", "push", "-q", ref, f"{registry.host}/e2e/foreign-copy:1")
            pushed, _, _ = client.get_manifest("e2e/foreign-copy", "1")
            layers = json.loads(pushed)["layers"]
            assert layers[0]["urls"] == [url] and layers[0]["digest"] == foreign.digest
            assert not client.blob_exists("e2e/foreign-copy", foreign.digest)
            assert client.blob_exists("e2e/foreign-copy", layers[1]["digest"])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_tag_and_rm_follow_docker(gd: GD, pushed: dict[str, str]) -> None:
    image_id = gd.out("image", "pull", "-q", pushed["base"])
    gd.run("image", "tag", pushed["base"], "example.com/other:2")
    gd.run("image", "tag", image_id[7:19], "plain")  # an ID prefix names a local image
    tags = json.loads(gd.out("image", "inspect", "plain"))[0]["RepoTags"]
    assert sorted(tags) == sorted([pushed["base"], "example.com/other:2", "plain:latest"])
    assert gd.out("image", "rm", "example.com/other:2") == "Untagged: example.com/other:2"
    assert "--force" in gd.fails("image", "rm", image_id)  # an ID with several tags
    assert "ambiguous" not in gd.fails("image", "rm", "sha256:" + "0" * 64)
    err = gd.run("create", "c", "--rw", "--image", "plain", "--parent", "x", ok=False)
    assert err.returncode == 2 and b"--image" in err.stderr
    out = gd.out("image", "rm", "--force", image_id).splitlines()
    assert out[-1] == f"Deleted: {image_id}" and len(out) == 3
    assert gd.images() == [] and all(not layer["holders"] for layer in gd.layers())
    assert gd.out("image", "ls") .splitlines()[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID",
                                                              "CREATED", "SIZE"]


def test_sigint_during_pull_is_one_line_and_no_image(gd: GD, big_pushed: str,
                                                      registry: Registry) -> None:
    # through a proxy that paces the registry at 8 MiB/s: the 48 MiB pull takes ~6 s, and the
    # signal comes once its first MiB has gone by (a fixed sleep let a fast pull finish first)
    proxy = PacedProxy(registry.port, 8 << 20)
    try:
        ref = big_pushed.replace(registry.host, proxy.host, 1)
        proc = subprocess.Popen([*gd.base, "image", "pull", ref], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proxy.forwarded < 1 << 20:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the pull did not start downloading in 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proxy.stop()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1, err
    assert gd.images() == []
    assert all(not layer["holders"] for layer in gd.layers())
    assert gd.out("image", "pull", "-q", big_pushed).startswith("sha256:")
