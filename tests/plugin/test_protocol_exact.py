"""Exact protocol answers (issue 12): a Diff that cannot be written is a JSON error, not a 200 and
a cut stream; a field of the wrong JSON type is an InvalidArgument that names it; a chunked
ApplyDiff body cut at an entry boundary is an error and the layer stays as it was."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.plugin import test_plugin as base

plugin = base.plugin  # the fixture: a `graphdriver serve` process per driver


def _layer(client: base.Client, tmp_path: Path, layer_id: str, parent: str = "") -> None:
    client.call("GraphDriver.Create", ID=layer_id, Parent=parent)
    tar = base.make_layer_tar(tmp_path, layer_id, {"etc/hello": b"hello\n", "bin/x": b"x" * 5000})
    status, data = client.raw("GraphDriver.ApplyDiff", base.pieces(tar), chunked=True,
                              query=f"?id={layer_id}&parent={parent}")
    assert status == 200, data


def _json_error(status: int, data: bytes) -> str:
    assert status != 200, f"want a JSON error, got 200 and {len(data)} bytes"
    err = json.loads(data)["Err"]
    assert isinstance(err, str) and err and "\n" not in err
    assert "internal error" not in err, err
    return err


def test_diff_with_missing_or_invalid_parent_is_a_json_error(
        plugin: tuple[base.Client, Path], tmp_path: Path) -> None:
    client, _home = plugin
    _layer(client, tmp_path, "a")
    for parent in ("missing", "../../etc", "a" * 300):
        status, data = client.raw("GraphDriver.Diff", json.dumps({"ID": "a", "Parent": parent})
                                  .encode())
        _json_error(status, data)
    status, data = client.raw("GraphDriver.Diff", json.dumps({"ID": "absent"}).encode())
    assert "absent" in _json_error(status, data)
    status, data = client.raw("GraphDriver.Diff", json.dumps({"ID": "a"}).encode())
    assert status == 200 and len(data) > 1024, "the ordinary Diff still works"


def test_diff_of_a_layer_that_cannot_be_opened_fails_before_the_status(
        plugin: tuple[base.Client, Path], tmp_path: Path) -> None:
    client, home = plugin
    if not (home / "dir").is_dir():
        pytest.skip("breaks a vfs layer's directory")
    client.call("GraphDriver.Create", ID="made")  # no tar-split: a new tar is written
    _layer(client, tmp_path, "applied")  # tar-split: the applied tar is re-assembled
    for layer_id in ("made", "applied"):
        shutil.rmtree(home / "dir" / layer_id)
        status, data = client.raw("GraphDriver.Diff", json.dumps({"ID": layer_id}).encode())
        _json_error(status, data)


@pytest.mark.parametrize(("method", "body", "field", "expected"), [
    ("GraphDriver.Create", {"ID": "x", "Parent": 5}, "Parent", "a string"),
    ("GraphDriver.Create", {"ID": 7}, "ID", "a string"),
    ("GraphDriver.Create", {"ID": "x", "StorageOpt": ["size=1G"]}, "StorageOpt", "an object"),
    ("GraphDriver.Create", {"ID": "x", "StorageOpt": {"size": 1}}, "StorageOpt", "an object"),
    ("GraphDriver.CreateReadWrite", {"ID": "x", "MountLabel": {}}, "MountLabel", "a string"),
    ("GraphDriver.Get", {"ID": "x", "MountLabel": 1}, "MountLabel", "a string"),
    ("GraphDriver.Exists", {"ID": ["x"]}, "ID", "a string"),
    ("GraphDriver.Changes", {"ID": "x", "Parent": True}, "Parent", "a string"),
    ("GraphDriver.DiffSize", {"ID": "x", "Parent": 1.5}, "Parent", "a string"),
    ("GraphDriver.Diff", {"ID": "x", "Parent": []}, "Parent", "a string"),
    ("GraphDriver.Init", {"Home": 3}, "Home", "a string"),
    ("GraphDriver.Init", {"Home": "/x", "Opts": "size=1G"}, "Opts", "an array"),
    ("GraphDriver.Init", {"Home": "/x", "UIDMaps": [{"ContainerID": "0", "HostID": 1, "Size": 1}]},
     "UIDMaps", "an array"),
])
def test_wrong_json_types_name_the_field(plugin: tuple[base.Client, Path], method: str,
                                         body: dict[str, object], field: str,
                                         expected: str) -> None:
    client, _home = plugin
    status, data = client.raw(method, json.dumps(body).encode())
    err = _json_error(status, data)
    assert field in err and expected in err, err


def _tar_without_end(path: Path) -> bytes:
    """The tar's entries, whole, without the end-of-archive blocks: a cut at an entry boundary."""
    import tarfile

    with tarfile.open(path) as tf:
        members = tf.getmembers()
        end = tf.offset
    assert members
    return path.read_bytes()[:end]


def test_apply_body_cut_at_an_entry_boundary_rolls_back(
        plugin: tuple[base.Client, Path], tmp_path: Path) -> None:
    client, _home = plugin
    client.call("GraphDriver.Create", ID="c")
    tar = base.make_layer_tar(tmp_path, "c", {f"f{i}": b"z" * 3000 for i in range(20)})
    cut = _tar_without_end(tar)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(client.sock)
    sock.sendall(b"POST /GraphDriver.ApplyDiff?id=c&parent= HTTP/1.1\r\nHost: \r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(cut), 65536):
        piece = cut[i:i + 65536]
        sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
    sock.shutdown(socket.SHUT_WR)  # the connection ends where the next chunk size would be
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert client.call("GraphDriver.Changes", ID="c")["Changes"] in ([], None), \
        "the layer is as it was before the apply"
    # and an honest apply of the same tar still works afterwards
    status, data = client.raw("GraphDriver.ApplyDiff", base.pieces(tar), chunked=True,
                              query="?id=c&parent=")
    assert status == 200, data
