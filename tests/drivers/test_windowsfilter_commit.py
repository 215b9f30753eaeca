"""``image commit`` of a Windows container layer (issues 13 and 17): a Windows image made from
Go-written layer tars is loaded from an OCI layout, a sandbox on it is changed and committed;
the new layer is the sandbox's Windows diff, the config stays ``os: windows``, and the image
is saved and loaded again (docker-archive and OCI layout) into a fresh store with the same view.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.drivers.test_windowsfilter_sandbox import (
    base_layer,
    check_windows_layer,
    delta_layer,
    records_of,
)
from tests.treeutil import snapshot

from graphdriver.archive.windows.defaults import FILE_SD

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="copy-on-write sandboxes need root "
                                "(overlay mounts, whiteout devices)")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Store:
    """``python -m graphdriver`` on one windowsfilter store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = [sys.executable, "-m", "graphdriver", "--root", str(root / "root"),
                     "--runroot", str(root / "run"), "--driver", "windowsfilter"]

    def out(self, *args: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([*self.base, *args], capture_output=True, timeout=300, env=env,
                              check=False)
        assert proc.returncode == 0, f"{args}: {proc.stderr.decode()}"
        return proc.stdout.decode().strip()

    def bytes(self, *args: str) -> bytes:
        proc = subprocess.run([*self.base, *args], capture_output=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, f"{args}: {proc.stderr.decode()}"
        return proc.stdout

    def inspect(self, ref: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.out("image", "inspect", ref))[0]
        return info


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def windows_layout(path: Path, layers: list[bytes], ref: str) -> None:
    """An OCI image layout holding one ``windows/amd64`` image of *layers* (uncompressed)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, Any]:
        digest = sha256(data)
        (blobs / digest[7:]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    config = {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.1",
              "config": {"Cmd": ["cmd.exe"]},
              "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]},
              "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **blob(json.dumps(config).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(t)}
                           for t in layers]}
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, **blob(json.dumps(manifest).encode()),
        "platform": {"os": "windows", "architecture": "amd64"},
        "annotations": {"org.opencontainers.image.ref.name": ref}}]}
    (path / "index.json").write_text(json.dumps(index))
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def mounted_view(store: Store, ref: str) -> dict[str, Any]:
    view = snapshot(store.out("image", "mount", ref), metadata=False, mtimes=False)
    store.out("image", "unmount", ref)
    return view


def test_commit_of_a_windows_container_layer(tmp_path: Path, gowintar: Path) -> None:
    gd = Store(tmp_path / "gd")
    windows_layout(tmp_path / "layout", [base_layer().tar(gowintar), delta_layer().tar(gowintar)],
                   "win:1")
    assert gd.out("image", "load", "-i", str(tmp_path / "layout")) == "Loaded image: win:1"
    gd.out("create", "ctr", "--rw", "--image", "win:1")
    root = Path(gd.out("mount", "ctr"))
    with open(root / "Program Files/App/app.exe", "ab") as f:  # modified, has streams
        f.write(b"-patched")
    (root / "Program Files/App/new.txt").write_bytes(b"new\r\n")
    os.symlink("new.txt", root / "Program Files/App/link")
    (root / "Windows/win.ini").unlink()
    os.mkdir(root / "Tools")
    (root / "Tools/tool.exe").write_bytes(b"MZtool")
    gd.out("unmount", "ctr")
    sandbox_view = snapshot(gd.out("mount", "ctr"), metadata=False, mtimes=False)
    gd.out("unmount", "ctr")

    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    image_id = gd.out("image", "commit", "ctr", "win:2", "-m", "on Linux", env=env)
    # the container layer's diff, taken after the commit read it, is the committed layer
    data = gd.bytes("diff", "ctr")
    check_windows_layer(data)
    base = gd.inspect("win:1")
    info = gd.inspect("win:2")
    assert info["Id"] == image_id and info["Os"] == "windows"
    assert info["OsVersion"] == "10.0.17763.1" and info["Config"]["Cmd"] == ["cmd.exe"]
    assert info["RootFS"]["Layers"] == [*base["RootFS"]["Layers"], sha256(data)]
    top = info["GraphDriver"]["Data"]["Layers"][-1]
    assert gd.bytes("diff", "--exact", top) == data
    assert gd.bytes("diff", top) == data  # the plain diff of the imported layer too

    # a new symbolic link: REPARSE_POINT, as hcsshim's exporter writes a file symlink
    info_link, pax = records_of(data)["Files/Program Files/App/link"]
    assert info_link.issym() and info_link.linkname == "new.txt"
    assert pax["MSWINDOWS.fileattr"] == "1024" and "MSWINDOWS.mountpoint" not in pax
    assert base64.b64decode(pax["MSWINDOWS.rawsd"]) == FILE_SD
    assert pax["atime"] == pax.get("mtime", pax["atime"])  # reading a link moves no time

    committed_view = mounted_view(gd, "win:2")
    assert committed_view == sandbox_view

    # saved and loaded again, as docker-archive and as an OCI layout, into fresh stores
    gd.out("image", "save", "-o", str(tmp_path / "win2.tar"), "win:2")
    gd.out("image", "save", "--format", "oci-dir", "-o", str(tmp_path / "win2-oci"), "win:2")
    for n, source in enumerate((["image", "load", str(tmp_path / "win2.tar")],
                                ["image", "load", "-i", str(tmp_path / "win2-oci")])):
        fresh = Store(tmp_path / f"fresh{n}")
        assert "win:2" in fresh.out(*source) or n == 1
        again = fresh.inspect(image_id)
        assert again["Os"] == "windows"
        assert again["RootFS"]["Layers"] == info["RootFS"]["Layers"]
        assert mounted_view(fresh, image_id) == committed_view
        new_top = again["GraphDriver"]["Data"]["Layers"][-1]
        assert fresh.bytes("diff", "--exact", new_top) == data
        fresh.out("cleanup")
    gd.out("cleanup")
