"""End to end with a real daemon: Debian's containerd 1.6 and runc with graphdriver as the proxy
snapshotter, in a private mount namespace (ctdutil.py).  An image made from busybox-static is
imported with ``ctr``, a container runs on the graphdriver snapshotter, ``ctr snapshots`` lists,
measures, prepares, commits and views, and everything is removed again."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_docker import BUSYBOX, make_rootfs_tar

from .ctdutil import Daemons, image_archive, why_not

IMAGE = "docker.io/gdtest/busybox:1"


def _why_not() -> str | None:
    if BUSYBOX is None:
        return "busybox is missing (apt-get install busybox-static)"
    return why_not()


pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")]


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
    image = image_archive(make_rootfs_tar(tmp_path), tmp_path / "image.tar", IMAGE)
    d.ctr("images", "import", "--snapshotter", "graphdriver", str(image))
    assert IMAGE in d.ctr("images", "ls", "-q").split()
    out = d.ctr("run", "--rm", "--snapshotter", "graphdriver", IMAGE, "gdc1",
                "sh", "-c", "echo hello-from-graphdriver > /written; cat /written; ls /bin/sh")
    assert out.split() == ["hello-from-graphdriver", "/bin/sh"]
    # `--rm` deleted the container: containerd's GC removes its snapshot's layer when it next
    # runs, at a time of its scheduler's choosing.  Wait for it, so that no GC is pending below.
    deadline = time.monotonic() + 30
    while len(d.graphdriver("--driver", "overlay", "ls", "-q").stdout.split()) != 1:
        assert time.monotonic() < deadline, "containerd's GC left the container's snapshot"
        time.sleep(0.2)

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
    # `ctr snapshots view` (unlike prepare and commit) sets no gc.root label: containerd's GC
    # would collect the view at its next run.  Root it, as a client that keeps a view does.
    d.ctr("snapshots", "--snapshotter", "graphdriver", "label", "look",
          "containerd.io/gc.root=test")
    info = json.loads(d.ctr("snapshots", "--snapshotter", "graphdriver", "info", "layer-1"))
    assert (info["Kind"], info["Parent"]) == ("Committed", base)
    layers = d.graphdriver("--driver", "overlay", "ls", "-q").stdout.split()
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
    assert d.graphdriver("--driver", "overlay", "ls", "-q").stdout.split() == []
