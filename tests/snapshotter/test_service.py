"""The snapshots service as containerd's proxy client calls it, over gRPC on the unix socket of a
real `graphdriver snapshotter` process: mounts by containerd's overlayfs conventions, error codes,
labels and times, usage, the store shared with the `graphdriver` command, crash repair, the
socket and the clean stop."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from graphdriver import open_driver
from graphdriver.snapshotter.api import snapshots_pb2 as pb
from tests.conftest import IS_ROOT, open_or_skip
from tests.mountutil import detach_mounts_under

from .snaputil import Served, graphdriver, served

NF = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
KEY = "default/12/extract-123456789-abcd sha256:0123456789abcdef"  # as containerd names them


@pytest.fixture(params=["overlay", "vfs"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    if request.param == "overlay" and not IS_ROOT:
        pytest.skip("overlay mounts need root")
    (tmp_path / "run").mkdir()
    open_or_skip(request.param, tmp_path / "store", tmp_path / "run")  # skip where unsupported
    with served(tmp_path, request.param) as s:
        yield s


def prepare(s: Served, key: str, parent: str = "", **labels: str) -> list[Any]:
    return list(s.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                         labels=labels)).mounts)


def view(s: Served, key: str, parent: str = "") -> list[Any]:
    return list(s.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts)


def commit(s: Served, name: str, key: str, **labels: str) -> None:
    s.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels))


def stat_(s: Served, key: str) -> Any:
    return s.stub.Stat(pb.StatSnapshotRequest(key=key)).info


def names(s: Served, *filters: str) -> list[str]:
    return sorted(i.name for r in s.stub.List(pb.ListSnapshotsRequest(filters=list(filters)))
                  for i in r.info)


def layer_of(s: Served, key: str) -> str:
    db = sqlite3.connect(s.root / "store" / "snapshotter" / driver_name(s) / "metadata.db")
    try:
        return str(db.execute("SELECT layer FROM snapshots WHERE key = ?", (key,)).fetchone()[0])
    finally:
        db.close()


def driver_name(s: Served) -> str:
    return "overlay" if (s.root / "store" / "overlay").is_dir() else "vfs"


def open_store(s: Served) -> Any:
    return open_driver(driver_name(s), s.root / "store", runroot=s.root / "run")


def rpc_error(fn: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args)
    return exc.value


def chain_of(s: Served, depth: int) -> str:
    parent = ""
    for i in range(depth):
        prepare(s, f"tmp-{i}", parent)
        commit(s, f"c{i}", f"tmp-{i}")
        parent = f"c{i}"
    return parent


def test_mounts_follow_containerds_overlayfs_conventions(server: Served) -> None:
    s = server
    store = open_store(s)
    home = str(store.home)
    [m] = prepare(s, KEY)
    assert (m.type, m.options) == ("bind", ["rw", "rbind"])
    assert m.source.startswith(home + "/") and os.path.isdir(m.source)
    assert os.stat(m.source).st_mode & 0o7777 == 0o755  # the suite's RootPermission
    commit(s, "base", KEY)
    prepare(s, "tmp", "base")
    commit(s, "top", "tmp")
    [v1] = view(s, "view-1", "base")
    [v2] = view(s, "view-2", "top")
    [a2] = prepare(s, "active-2", "top")
    [v0] = view(s, "view-0")
    assert (v0.type, v0.options) == ("bind", ["ro", "rbind"])
    if store.name == "vfs":
        for mount in (v1, v2):
            assert (mount.type, mount.options) == ("bind", ["ro", "rbind"])
        assert (a2.type, a2.options) == ("bind", ["rw", "rbind"])
        return
    # overlay: a view of one parent binds the parent's diff read-only
    assert (v1.type, v1.options) == ("bind", ["ro", "rbind"])
    assert v1.source == m.source
    # a view of two parents: lowerdir only, absolute short links, the driver's probed options
    assert (v2.type, v2.source) == ("overlay", "overlay")
    assert v2.options[:-1] == store.mount_extra
    lowers = v2.options[-1].removeprefix("lowerdir=").split(":")
    assert len(lowers) == 2 and all(p.startswith(f"{home}/l/") for p in lowers)
    assert os.path.realpath(lowers[1]) == os.path.realpath(m.source)
    # an active snapshot with parents: workdir, upperdir (its own diff), then the lowers
    assert a2.options[:-3] == store.mount_extra
    work, upper, lower = a2.options[-3:]
    layer = layer_of(s, "active-2")
    assert work == f"workdir={home}/{layer}/work"
    assert upper == f"upperdir={home}/{layer}/diff"
    assert lower.removeprefix("lowerdir=").split(":") == lowers
    assert list(s.stub.Mounts(pb.MountsRequest(key="active-2")).mounts) == [a2]


@pytest.mark.skipif(not IS_ROOT, reason="mounting needs root")
def test_128_parents_mount_from_the_returned_options(server: Served, tmp_path: Path) -> None:
    from graphdriver.mount import mount

    s = server
    if driver_name(s) != "overlay":
        pytest.skip("the page limit concerns overlay's lowerdir")
    top = chain_of(s, 128)
    [m] = view(s, "full", top)
    data = ",".join(m.options)
    assert data.count(":") == 127
    target = tmp_path / "mnt"
    target.mkdir()
    # as containerd 1.6 does: strip the common directory of the lowers, mount(2) from there
    lowers = data.split("lowerdir=")[1].split(":")
    common = os.path.dirname(lowers[0])
    short = ",".join([*m.options[:-1], "lowerdir=" + ":".join(p[len(common) + 1:]
                                                              for p in lowers)])
    assert len(short) < os.sysconf("SC_PAGESIZE")
    pid = os.fork()
    if pid == 0:  # chdir only in a child: the test process may have threads
        try:
            os.chdir(common)
            mount("overlay", target, "overlay", 1, short)  # MS_RDONLY
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    try:
        assert os.listdir(target) == []
    finally:
        detach_mounts_under(target)


def test_containerd_error_codes(server: Served) -> None:
    s = server
    assert rpc_error(stat_, s, "missing").code() == NF
    prepare(s, "a")
    assert rpc_error(prepare, s, "a").code() == EXISTS
    assert rpc_error(view, s, "v", "a").code() == INVALID  # parent not committed
    assert rpc_error(prepare, s, "b", "nope").code() == NF
    assert rpc_error(prepare, s, "").code() == INVALID
    assert rpc_error(lambda: prepare(s, "big", "", k="v" * 4096)).code() == INVALID
    commit(s, "c", "a")
    assert rpc_error(stat_, s, "a").code() == NF  # the key is gone
    assert rpc_error(s.stub.Mounts, pb.MountsRequest(key="c")).code() == PRECONDITION
    view(s, "v", "c")
    assert rpc_error(commit, s, "c2", "v").code() == PRECONDITION  # a view is not active
    prepare(s, "a2")
    assert rpc_error(commit, s, "c", "a2").code() == EXISTS
    err = rpc_error(s.stub.Remove, pb.RemoveSnapshotRequest(key="c"))
    assert err.code() == PRECONDITION and "remove" in str(err.details())
    assert rpc_error(s.stub.Remove, pb.RemoveSnapshotRequest(key="nope")).code() == NF
    assert rpc_error(s.stub.Usage, pb.UsageRequest(key="nope")).code() == NF
    assert rpc_error(names, s, "name==").code() == INVALID


def test_times_labels_update_and_list(server: Served) -> None:
    s = server
    before = time.time_ns()
    prepare(s, "p-tmp", "", l="1")
    commit(s, "p", "p-tmp", l="1", keep="x")
    prepare(s, "a", "p", l="2")
    view(s, "v", "p")
    after = time.time_ns()
    info = stat_(s, "a")
    assert (info.name, info.parent, info.kind) == ("a", "p", pb.ACTIVE)
    created = info.created_at.ToNanoseconds()
    assert before <= created <= after and info.updated_at == info.created_at
    assert created % 1000 != 0 or stat_(s, "p").created_at.ToNanoseconds() % 1000 != 0  # ns kept
    assert (stat_(s, "v").kind, stat_(s, "p").kind) == (pb.VIEW, pb.COMMITTED)
    assert dict(stat_(s, "p").labels) == {"l": "1", "keep": "x"}

    def update(labels: dict[str, str], *paths: str, parent: str = "other") -> Any:
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="p", parent=parent, labels=labels))
        req.update_mask.paths.extend(paths)
        return s.stub.Update(req).info

    got = update({"l": "9", "new": "n"})  # no path: every mutable field (the labels)
    assert dict(got.labels) == {"l": "9", "new": "n"} and got.parent == ""
    assert got.created_at == stat_(s, "p").created_at
    assert got.updated_at.ToNanoseconds() > got.created_at.ToNanoseconds()
    got = update({"l": "10", "x": "y"}, "labels.l", "labels.new")  # one label set, one removed
    assert dict(got.labels) == {"l": "10"}
    assert rpc_error(update, {}, "parent").code() == INVALID
    assert rpc_error(update, {}, "kind").code() == INVALID
    assert names(s) == ["a", "p", "v"]
    assert names(s, "kind==active", "kind==view") == ["a", "v"]
    assert names(s, 'parent!=""') == ["a", "v"]
    assert names(s, "labels.l==2,kind==active") == ["a"]
    assert names(s, "labels.l") == ["a", "p"]


def test_list_sends_large_stores_in_batches(server: Served) -> None:
    s = server
    for i in range(150):
        view(s, f"v{i:03d}")
    replies = list(s.stub.List(pb.ListSnapshotsRequest()))
    assert [len(r.info) for r in replies] == [100, 50]
    assert sorted(i.name for r in replies for i in r.info) == [f"v{i:03d}" for i in range(150)]


def test_usage_counts_the_layers_own_bytes_and_inodes(server: Served) -> None:
    s = server
    [m] = prepare(s, "a")
    empty = s.stub.Usage(pb.UsageRequest(key="a"))
    Path(m.source, "file").write_bytes(b"x" * 100_000)
    os.mkdir(Path(m.source, "dir"))
    os.link(Path(m.source, "file"), Path(m.source, "dir", "hardlink"))
    used = s.stub.Usage(pb.UsageRequest(key="a"))
    assert used.inodes == empty.inodes + 2  # the file once, the directory
    assert used.size >= empty.size + 100_000
    commit(s, "c", "a")
    assert s.stub.Usage(pb.UsageRequest(key="c")) == used


def test_the_store_stays_usable_from_the_command(server: Served) -> None:
    s = server
    driver = driver_name(s)
    prepare(s, "a")
    layer = layer_of(s, "a")
    ls = graphdriver(s.root, driver, "ls", "-q")
    assert ls.returncode == 0 and layer in ls.stdout.split()
    rm = graphdriver(s.root, driver, "rm", layer)
    assert rm.returncode != 0 and len(rm.stderr.strip().splitlines()) == 1
    assert "held" in rm.stderr and f"snapshot:{layer}" in rm.stderr
    assert stat_(s, "a").name == "a"
    record = open_store(s).record(layer)
    assert (record.made_by, record.holders, record.kind) == ("snapshotter", [f"snapshot:{layer}"],
                                                            "rw")
    commit(s, "c", "a")
    assert open_store(s).record(layer).kind == "ro"  # frozen in place: the same layer
    s.stub.Remove(pb.RemoveSnapshotRequest(key="c"))
    assert layer not in graphdriver(s.root, driver, "ls", "-q").stdout.split()


def test_kill9_between_layer_and_row_is_repaired(server: Served) -> None:
    """The metadata database is locked by this test, so the server stops inside Prepare with the
    layer made and its row not yet written; SIGKILL there, restart: the layer is gone."""
    s = server
    driver = driver_name(s)
    prepare(s, "kept")
    kept = layer_of(s, "kept")
    db = sqlite3.connect(s.root / "store" / "snapshotter" / driver / "metadata.db",
                         isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    failed: list[Any] = []
    call = threading.Thread(target=lambda: failed.append(rpc_error(prepare, s, "lost")))
    call.start()
    store = open_store(s)
    deadline = time.monotonic() + 30
    while len(store.layers()) < 2:
        assert time.monotonic() < deadline, "the layer of the second Prepare never appeared"
        time.sleep(0.01)
    [lost] = set(store.layers()) - {kept}
    time.sleep(0.2)  # the layer completes, held from its first record; then the row waits
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    call.join()
    db.execute("ROLLBACK")
    db.close()
    assert failed and failed[0].code() == grpc.StatusCode.UNAVAILABLE
    assert open_store(s).record(lost).made_by == "snapshotter"  # left behind, no row
    s2 = Served(s.root, driver)
    try:
        assert open_store(s2).layers() == [kept]
        assert names(s2) == ["kept"]
        prepare(s2, "lost")  # the key is free
    finally:
        s2.stop()


def test_a_row_whose_layer_is_gone_is_dropped_at_start(server: Served) -> None:
    s = server
    driver = driver_name(s)
    prepare(s, "gone")
    prepare(s, "kept")
    layer = layer_of(s, "gone")
    assert s.stop() == 0
    store = open_store(s)
    store.release(layer, f"snapshot:{layer}")
    store.remove(layer)  # as if the layer were lost: the row outlives it
    s2 = Served(s.root, driver)
    try:
        assert names(s2) == ["kept"]
        assert rpc_error(stat_, s2, "gone").code() == NF
    finally:
        s2.stop()


def test_a_layer_whose_removal_failed_goes_at_cleanup(server: Served) -> None:
    """Remove drops the row first; a layer that cannot go then (mounted by someone else) stays,
    still held by its snapshot, and containerd's Cleanup removes it once it can."""
    s = server
    prepare(s, "busy")
    prepare(s, "kept")
    layer = layer_of(s, "busy")
    store = open_store(s)
    store.get(layer)  # mounted from outside the server: the removal is refused
    try:
        s.stub.Remove(pb.RemoveSnapshotRequest(key="busy"))
        assert names(s) == ["kept"]
        assert store.record(layer).holders == [f"snapshot:{layer}"]
        s.stub.Cleanup(pb.CleanupRequest())
        assert store.exists(layer)  # still mounted: it stays
    finally:
        store.put(layer)
    s.stub.Cleanup(pb.CleanupRequest())
    assert not store.exists(layer)
    assert store.layers() == [layer_of(s, "kept")]


def test_socket_mode_one_server_per_store_and_clean_stop(server: Served) -> None:
    s = server
    st = os.stat(s.sock)
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o660
    if IS_ROOT:
        assert st.st_gid == 0
    driver = driver_name(s)
    second = graphdriver(s.root, driver, "snapshotter", "--address", str(s.root / "other.sock"))
    assert second.returncode != 0 and "another snapshotter serves" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    prepare(s, "a")
    assert s.stop(signal.SIGINT) == 0
    assert not s.sock.exists()
    s2 = Served(s.root, driver)  # the store reopens with its snapshots
    try:
        assert names(s2) == ["a"]
    finally:
        assert s2.stop() == 0


@pytest.mark.skipif(not IS_ROOT, reason="size quotas need root (loop devices)")
def test_active_snapshots_get_the_stores_size_limit(tmp_path: Path) -> None:
    from graphdriver.quota import image_supported

    if image_supported() or not os.path.exists("/dev/loop-control"):
        pytest.skip(f"no loop-image quotas here: {image_supported()}")
    (tmp_path / "run").mkdir()
    open_or_skip("overlay", tmp_path / "store", tmp_path / "run")
    with served(tmp_path, "overlay", ("--storage-opt", "size=32M")) as s:
        [m] = prepare(s, "a")
        view(s, "v")
        store = open_store(s)
        assert store.record(layer_of(s, "a")).size_limit == 32 << 20
        assert store.record(layer_of(s, "v")).size_limit is None
        # the upper directory is on the layer's loop image, mounted at Prepare
        assert os.path.ismount(Path(m.source).parent)
        with pytest.raises(OSError), open(Path(m.source, "big"), "wb") as f:
            for _ in range(64):
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        commit(s, "c", "a")
        [a2] = prepare(s, "a2", "c")
        assert a2.type == "overlay"
        s.stub.Remove(pb.RemoveSnapshotRequest(key="a2"))
        s.stub.Remove(pb.RemoveSnapshotRequest(key="c"))
        s.stub.Remove(pb.RemoveSnapshotRequest(key="v"))
        assert open_store(s).layers() == []
