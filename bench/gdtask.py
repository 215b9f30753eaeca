#!/usr/bin/env python3
"""One graphdriver operation, timed in-process; run by bench/run.py as a child process.

Prints one JSON line: ``{"seconds": <time of the operation alone>, ...}``.  Set-up (opening
the store, creating the layer, imports) is not in ``seconds``; the runner measures peak RSS of
this whole process tree.  Exit status 3 means the library part needed is not built yet.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOT_BUILT = 3
BUF = 1 << 20


def not_built(exc: BaseException) -> int:
    print(f"n/a (not built yet): {type(exc).__name__}: {exc}", file=sys.stderr)
    return NOT_BUILT


def open_store(driver: str, home: str) -> Any:
    from graphdriver import open_driver

    try:  # keep mount counts inside the bench's own work dir when the API allows it
        return open_driver(driver, Path(home), options={}, runroot=Path(home) / "run")
    except TypeError:
        return open_driver(driver, Path(home), options={})


def vm_hwm_kb() -> int:
    """This process's own peak RSS since its exec (unlike ru_maxrss, which also counts the
    memory of the process that forked it, up to the exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def done(t0: float, **extra: Any) -> None:
    t = time.perf_counter() - t0
    # RUSAGE_CHILDREN covers the confined apply child and, if it waited for its own
    # children, theirs too (the kernel folds a reaped child's cmaxrss into its parent's).
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": t, "rss_self_kb": vm_hwm_kb(), "rss_children_kb": children,
                      **extra}), flush=True)


def copy_stream(stream: Any, out_path: str) -> int:
    total = 0
    buf = bytearray(BUF)
    view = memoryview(buf)
    with open(out_path, "wb", buffering=0) as out:
        readinto = getattr(stream, "readinto", None)
        while True:
            if readinto is not None:
                n = readinto(buf)
                if not n:
                    break
                out.write(view[:n])
            else:
                chunk = stream.read(BUF)
                if not chunk:
                    break
                n = len(chunk)
                out.write(chunk)
            total += n
    return total


def op_probe(driver: str, home: str) -> None:
    d = open_store(driver, home)
    print(json.dumps({"seconds": 0.0, "driver": getattr(d, "name", driver)}))


def op_apply(driver: str, home: str, tar: str) -> None:
    d = open_store(driver, home)
    d.create("layer", None)
    with open(tar, "rb") as f:
        t0 = time.perf_counter()
        n = d.apply_diff("layer", None, f)
        done(t0, bytes=n)
    d.cleanup()


def op_engine_apply(tar: str, target: str) -> None:
    from graphdriver.archive.apply import (  # type: ignore[import-not-found,unused-ignore]
        ApplyOptions,
        apply_tar,
    )

    fd = os.open(tar, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        apply_tar(fd, Path(target), ApplyOptions())
        done(t0)
    finally:
        os.close(fd)


def op_prepare(driver: str, home: str, *specs: str) -> None:
    """Each spec is ``id:parent:tarfile`` (parent and tarfile may be ``-``)."""
    d = open_store(driver, home)
    t0 = time.perf_counter()
    for spec in specs:
        lid, parent, tar = spec.split(":", 2)
        d.create(lid, None if parent == "-" else parent)
        if tar != "-":
            with open(tar, "rb") as f:
                d.apply_diff(lid, None, f)
    done(t0, layers=len(specs))
    d.cleanup()


def op_diff(driver: str, home: str, lid: str, out: str) -> None:
    d = open_store(driver, home)
    t0 = time.perf_counter()
    stream = d.diff(lid)
    try:
        n = copy_stream(stream, out)
    finally:
        stream.close()
    done(t0, bytes=n)
    d.cleanup()


def op_changes(driver: str, home: str, lid: str) -> None:
    d = open_store(driver, home)
    t0 = time.perf_counter()
    changes = d.changes(lid)
    done(t0, changes=len(changes))
    d.cleanup()


def op_engine_export(root: str, out: str) -> None:
    from graphdriver.archive.export import write_tree

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        write_tree(fd, Path(root))
        done(t0)
    finally:
        os.close(fd)


def op_mount(driver: str, home: str, lid: str) -> None:
    d = open_store(driver, home)
    t0 = time.perf_counter()
    d.get(lid)
    d.put(lid)
    done(t0)
    d.cleanup()


def op_win_sandbox(home: str, parent: str) -> None:
    """Create a windowsfilter sandbox on ``parent`` and mount it (the timed part)."""
    d = open_store("windowsfilter", home)
    lid = f"sandbox{os.getpid()}"
    t0 = time.perf_counter()
    d.create_rw(lid, parent)
    root = d.get(lid)
    done(t0, entries=len(os.listdir(root)))
    d.put(lid)
    d.remove(lid)
    d.cleanup()


def _containerd_snapshots(address: str) -> Any:
    import grpc

    from graphdriver.snapshotter.api import snapshots_pb2_grpc

    return snapshots_pb2_grpc.SnapshotsStub(grpc.insecure_channel(f"unix:{address}"))


def _mount_all(mounts: Any, target: Path) -> None:
    """What containerd's mount.All does with a snapshot's mounts (one mount each here)."""
    from graphdriver.mount import mount

    for m in mounts:
        if m.type == "bind":
            mount(m.source, target, "", 0x1000 | 0x4000)  # MS_BIND | MS_REC
        else:
            mount(m.source, target, m.type, 0, ",".join(m.options))


GC_ROOT = {"containerd.io/gc.root": "bench"}  # containerd's GC keeps these


def op_ctd_chain(address: str, namespace: str, snapshotter: str, depth: str, work: str) -> None:
    """Commit a chain of snapshots through containerd's snapshots service, one file each."""
    from graphdriver.mount import unmount
    from graphdriver.snapshotter.api import snapshots_pb2 as pb

    stub, md = _containerd_snapshots(address), (("containerd-namespace", namespace),)
    target = Path(work) / "m"
    target.mkdir(exist_ok=True)
    parent = ""
    t0 = time.perf_counter()
    for i in range(int(depth)):
        r = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=f"tmp-{i}",
                                                   parent=parent, labels=GC_ROOT), metadata=md)
        _mount_all(r.mounts, target)
        (target / f"layer{i}.txt").write_text(f"{i}\n")
        unmount(target, detach=False)
        stub.Commit(pb.CommitSnapshotRequest(snapshotter=snapshotter, name=f"chain-{i}",
                                             key=f"tmp-{i}", labels=GC_ROOT), metadata=md)
        parent = f"chain-{i}"
    done(t0, top=parent)


def op_ctd_cycle(address: str, namespace: str, snapshotter: str, parent: str, count: str,
                 work: str) -> None:
    """Prepare + mount + unmount + remove active snapshots on *parent*, one after another."""
    from graphdriver.mount import unmount
    from graphdriver.snapshotter.api import snapshots_pb2 as pb

    stub, md = _containerd_snapshots(address), (("containerd-namespace", namespace),)
    target = Path(work) / "m"
    target.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for i in range(int(count)):
        r = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=f"cycle-{i}",
                                                   parent=parent, labels=GC_ROOT), metadata=md)
        _mount_all(r.mounts, target)
        unmount(target, detach=False)
        stub.Remove(pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=f"cycle-{i}"),
                    metadata=md)
    done(t0)


OPS: dict[str, Callable[..., None]] = {
    "probe": op_probe,
    "apply": op_apply,
    "engine-apply": op_engine_apply,
    "prepare": op_prepare,
    "diff": op_diff,
    "changes": op_changes,
    "engine-export": op_engine_export,
    "mount": op_mount,
    "win-sandbox": op_win_sandbox,
    "ctd-chain": op_ctd_chain,
    "ctd-cycle": op_ctd_cycle,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in OPS:
        print(f"usage: gdtask.py {{{','.join(OPS)}}} ARGS...", file=sys.stderr)
        return 2
    try:
        OPS[argv[0]](*argv[1:])
    except (ImportError, NotImplementedError) as exc:
        return not_built(exc)
    except AttributeError as exc:
        if "graphdriver" in repr(exc) or "module" in str(exc):
            return not_built(exc)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
