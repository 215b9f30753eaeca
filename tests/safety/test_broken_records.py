"""One broken record or count file never bricks a store (issue 12, third item).

A broken ``meta/<id>/layer.json`` quarantines that one layer: ``ls`` lists it as broken, ``rm``
removes it, its children stay reachable and the rest of the store works.  A count file in the
run root that is a FIFO, a directory or a link is replaced, not followed or blocked on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from graphdriver import StoreCorrupt, open_driver
from tests.safety.safetyutil import cli, cli_ok

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the drivers' stores)")


def _breakers(good: dict[str, object]) -> dict[str, object]:
    nested: str = "[" * 100_000 + "]" * 100_000
    return {
        "truncated": json.dumps(good)[:20],
        "empty": "",
        "wrong-types": json.dumps({**good, "parent": 7, "kind": ["rw"]}),
        "a-directory": None,
        "deeply-nested": nested,
        "another-id": json.dumps({**good, "id": "someone-else"}),
        "own-parent": json.dumps({**good, "parent": good["id"]}),
    }


@pytest.mark.parametrize("how", list(_breakers({"id": "x"})))
def test_broken_record_quarantines_one_layer(driver_name: str, tmp_path: Path, how: str) -> None:
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("base")
    d.create("mid", "base")
    d.create("leaf", "mid")
    d.create("other")
    record = d.home / "meta" / "mid" / "layer.json"
    content = _breakers(json.loads(record.read_text()))[how]
    record.unlink()
    if content is None:
        record.mkdir()
    else:
        record.write_text(str(content))
    again = open_driver(driver_name, root, runroot=run)  # opening does not fail
    assert again.layers() == ["base", "leaf", "other"]
    assert list(again.broken_layers()) == ["mid"]
    with pytest.raises(StoreCorrupt):
        again.record("mid")
    with again.mounted("other"):
        pass
    listing = cli_ok(root, run, driver_name, "ls")
    assert "mid (broken:" in listing and re.search(r"^other\s", listing, re.M)
    again.remove("leaf")  # the child is still reachable
    res = cli(root, run, driver_name, "rm", "mid")
    assert res.returncode == 0, res.stderr
    assert again.broken_layers() == {}
    assert sorted(again.layers()) == ["base", "other"]
    again.cleanup()


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_count_file_that_is_not_a_file_is_replaced(driver_name: str, tmp_path: Path,
                                                   kind: str) -> None:
    root, run = tmp_path / "store", tmp_path / "run"
    d = open_driver(driver_name, root, runroot=run)
    d.create("lay")
    count = d.refs.dir / "lay"
    if kind == "fifo":
        os.mkfifo(count)
    elif kind == "directory":
        count.mkdir()
        (count / "x").write_text("1")
    else:
        (tmp_path / "elsewhere").write_text("5\n")
        count.symlink_to(tmp_path / "elsewhere")
    # A fresh process opens the store (repair reads every count) and mounts the layer: no hang,
    # no failure, and the count starts from zero.
    script = ("import sys; from graphdriver import open_driver; "
              "d = open_driver(sys.argv[1], sys.argv[2], runroot=sys.argv[3]); "
              "d.get('lay'); print(d.mount_count('lay')); d.put('lay'); "
              "print(d.mount_count('lay'))")
    res = subprocess.run([sys.executable, "-c", script, driver_name, str(root), str(run)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "0"]
    assert cli(root, run, driver_name, "ls", timeout=30).returncode == 0
    if kind == "symlink":
        assert (tmp_path / "elsewhere").read_text() == "5\n"
    d.remove("lay")
    d.cleanup()
