#!/usr/bin/env python3
"""Run the benchmark table of issue 7: graphdriver against GNU tar, bsdtar, zstd|tar and
containers-storage, on the layers built by bench/make_layers.py.

Every row is run ``--runs`` times (interleaved: graphdriver, then each peer, per round), in a
work directory on tmpfs (``--workdir``, default /dev/shm/graphdriver-bench) and, with
``--also-ext4``, again on ext4.  Each run's output is removed, and the removal synced to disk,
before the next run starts (not timed).
graphdriver operations run in a child process (bench/gdtask.py) and report the time of the
operation alone; peers are timed as whole commands.  Peak RSS is measured for every run over the
whole process tree: ``ru_maxrss`` from wait4 (the largest single process in the tree, children
and grandchildren that were waited for included) and a sampled sum of the tree's RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GDTASK = HERE / "gdtask.py"
DEFAULT_CACHE = Path("/var/cache/graphdriver-bench")
DEFAULT_WORKDIR = Path("/dev/shm/graphdriver-bench")
DEFAULT_EXT4 = Path("/var/tmp/graphdriver-bench")
NOT_BUILT = 3
TAR_X = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"]
TAR_C = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cpf"]
BSDTAR_X = ["bsdtar", "--numeric-owner", "--xattrs", "-xpf"]
BSDTAR_C = ["bsdtar", "--numeric-owner", "--xattrs", "-cf"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring one command


class Unavailable(Exception):
    """This side cannot run here (tool missing, library part not built)."""


class Failed(Exception):
    """This side ran and failed."""


@dataclass
class Cmd:
    argv: list[str]
    internal: bool = False  # the command prints {"seconds": ...} for the timed part
    ok: tuple[int, ...] = (0,)
    cwd: Path | None = None


@dataclass
class Sample:
    seconds: float
    wall: float
    rss_kb: int  # the largest peak RSS of one process of the tree
    sum_kb: int  # peak RSS of the tree's processes added up (parent and children together)
    ru_maxrss_kb: int  # raw ru_maxrss from wait4 (includes the forking runner's pre-exec size)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int | str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


RUNNER_CMDLINE = _cmdline("self")


def _hwm_kb(pid: int) -> int:
    # A child that has not exec'd yet still shows the runner's memory: skip it.
    if _cmdline(pid) == RUNNER_CMDLINE:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples VmHWM (a process's own peak RSS since its exec) of a process and all its
    descendants every few ms; keeps the largest value seen per process."""

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.hwm: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        # Sample often while the run is young (short commands), then back off so the sampler's
        # own CPU time does not disturb long runs on a small machine.
        start = time.monotonic()
        while not self._halt.is_set():
            todo = [self.pid]
            while todo:
                p = todo.pop()
                h = _hwm_kb(p)
                if h > self.hwm.get(p, 0):
                    self.hwm[p] = h
                todo += _children(p)
            age = time.monotonic() - start
            self._halt.wait(self.interval if age < 0.2 else 0.02 if age < 2 else 0.05)

    @property
    def max_kb(self) -> int:
        return max(self.hwm.values(), default=0)

    @property
    def sum_kb(self) -> int:
        return sum(self.hwm.values())

    def stop(self) -> None:
        self._halt.set()
        self.join()


def gd_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure(cmd: Cmd) -> Sample:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=gd_env(), cwd=cmd.cwd)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace").strip()
    if proc.returncode == NOT_BUILT and cmd.internal:
        raise Unavailable("n/a (not built yet)")
    if proc.returncode not in cmd.ok:
        last = stderr.splitlines()[-1] if stderr else f"exit {proc.returncode}"
        raise Failed(f"exit {proc.returncode}: {last[:160]}")
    seconds = wall
    rss, total = sampler.max_kb, sampler.sum_kb
    if cmd.internal:
        try:
            info = json.loads(stdout.strip().splitlines()[-1])
            seconds = float(info["seconds"])
        except (ValueError, KeyError, IndexError) as exc:
            raise Failed(f"no timing printed: {stdout[-160:]!r}") from exc
        own, kids = int(info.get("rss_self_kb", 0)), int(info.get("rss_children_kb", 0))
        # exact figures from the process itself; the sampler still sees a fork server or
        # any descendant the process did not wait for
        rss = max(rss, own, kids)
        total = max(total, own + kids)
    return Sample(seconds, wall, rss, total, usage.ru_maxrss)


def _peak(values: list[int]) -> int | None:
    """The largest sampled value; None when every run ended before the first sample."""
    m = max(values, default=0)
    return m or None


# ---------------------------------------------------------------- store helpers


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mnt)
            if (mnt + "/").startswith(prefix):
                found.append(mnt)
    return found


def clean_dir(path: Path) -> None:
    """Unmount whatever is mounted beneath ``path`` (deepest first) and remove it."""
    if not path.exists():
        return
    for _ in range(3):
        mnts = sorted(set(mounts_under(path)), key=len, reverse=True)
        if not mnts:
            break
        for m in mnts:
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL, check=False)
    # rm is several times faster than shutil.rmtree on a 100k-file tree
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def gd_cmd(*args: str) -> list[str]:
    return [sys.executable, str(GDTASK), *args]


def must_run(argv: Sequence[str], what: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, env=gd_env(), check=False)
    if r.returncode == NOT_BUILT and argv[:2] == [sys.executable, str(GDTASK)]:
        raise Unavailable("n/a (not built yet)")
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        raise Failed(f"{what}: {last[:160]}")
    return r.stdout


class CStorage:
    """Debian's containers-storage command with its own graph and run roots."""

    def __init__(self, base: Path, driver: str) -> None:
        self.base = base
        self.driver = driver

    def argv(self, *args: str) -> list[str]:
        return ["containers-storage", "--graph", str(self.base / "graph"),
                "--run", str(self.base / "run"), "--storage-driver", self.driver, *args]

    def shutdown(self) -> None:
        if (self.base / "graph").exists():
            subprocess.run(self.argv("shutdown"), capture_output=True, check=False)
        clean_dir(self.base)


def probe_cstorage(workdir: Path) -> str | None:
    if shutil.which("containers-storage") is None:
        return None
    for driver in ("overlay", "vfs"):
        cs = CStorage(workdir / f"cs-probe-{driver}", driver)
        try:
            r = subprocess.run(cs.argv("create-layer", "--id", "probe"), capture_output=True,
                               check=False)
            if r.returncode == 0:
                return driver
        finally:
            cs.shutdown()
    return None


def probe_gd(workdir: Path) -> tuple[str, str | None]:
    """(driver to use, None) or (driver, reason it is unavailable)."""
    reason = "n/a (not built yet)"
    for driver in ("overlay", "vfs"):
        home = workdir / f"gd-probe-{driver}"
        try:
            must_run(gd_cmd("probe", driver, str(home)), "probe")
            return driver, None
        except Unavailable as exc:
            return "overlay", str(exc)
        except Failed as exc:
            reason = f"n/a ({exc})"
        finally:
            clean_dir(home)
    return "overlay", reason


# ---------------------------------------------------------------- the rows


@dataclass
class Side:
    label: str
    per_run: Callable[[Path], Cmd]  # untimed set-up in a fresh run dir, returns the timed command
    once: Callable[[Path], None] | None = None  # untimed set-up in the side's base dir
    needs: str | None = None  # a program that must exist
    unavailable: str | None = None
    after: Callable[[Path], None] | None = None  # tear-down of the base dir


@dataclass
class Workload:
    name: str
    gd: list[Side]
    peers: list[Side]
    targets: dict[str, str] = field(default_factory=dict)  # peer label -> target ratio
    best_of: bool = False  # the target is against the fastest peer
    #: peer label -> the only filesystem its target is set for (issue 7's are tmpfs's, issue
    #: 18's whole command ext4's); elsewhere the row is shown with its ratio and the target
    #: marked "(<fs> only)"
    target_fs: dict[str, str] = field(default_factory=dict)


@dataclass
class Ctx:
    cache: Path
    layers: dict[str, Path]
    gd_driver: str
    gd_reason: str | None
    cs_driver: str | None
    chain_depth: int = 20


def make_tiny_tar(path: Path, name: str) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        data = f"{name}\n".encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 1_700_000_000
        import io

        tf.addfile(info, io.BytesIO(data))


def build_workloads(ctx: Ctx) -> list[Workload]:
    L = ctx.layers
    gdd = ctx.gd_driver
    cs_drv = ctx.cs_driver
    gd_label = f"graphdriver {gdd}"
    cs_label = f"containers-storage {cs_drv or '?'}"
    wl: list[Workload] = []

    def gd_side(label: str, per_run: Callable[[Path], Cmd],
                once: Callable[[Path], None] | None = None) -> Side:
        return Side(label, per_run, once, unavailable=ctx.gd_reason)

    def gd_apply(tar: Path) -> Side:
        return gd_side(gd_label, lambda d: Cmd(gd_cmd("apply", gdd, str(d / "root"), str(tar)),
                                                internal=True))

    def engine_apply(tar: Path) -> Side:
        def per_run(d: Path) -> Cmd:
            (d / "out").mkdir()
            return Cmd(gd_cmd("engine-apply", str(tar), str(d / "out")), internal=True)

        return gd_side("graphdriver engine (apply_tar)", per_run)

    def gnutar_x(tar: Path, flags: Sequence[str] = ()) -> Side:
        def per_run(d: Path) -> Cmd:
            (d / "out").mkdir()
            return Cmd([*TAR_X[:-1], *flags, TAR_X[-1], str(tar), "-C", str(d / "out")])

        return Side("GNU tar -x" + (" " + " ".join(flags) if flags else ""), per_run,
                    needs="tar")

    def zstd_tar_x(tar: Path) -> Side:
        def per_run(d: Path) -> Cmd:
            (d / "out").mkdir()
            x = " ".join(shlex.quote(a) for a in [*TAR_X, "-", "-C", str(d / "out")])
            return Cmd(["bash", "-c", f"set -o pipefail; zstd -dcq {shlex.quote(str(tar))} | {x}"])

        return Side("zstd -dc | GNU tar -x", per_run, needs="zstd")

    def bsdtar_x(tar: Path) -> Side:
        def per_run(d: Path) -> Cmd:
            (d / "out").mkdir()
            return Cmd([*BSDTAR_X, str(tar), "-C", str(d / "out")])

        return Side("bsdtar -x", per_run, needs="bsdtar")

    def cs_apply(tar: Path) -> Side:
        def per_run(d: Path) -> Cmd:
            cs = CStorage(d, cs_drv or "vfs")
            must_run(cs.argv("create-layer", "--id", "layer"), "create-layer")
            return Cmd(cs.argv("applydiff", "--file", str(tar), "layer"))

        return Side(f"{cs_label} applydiff", per_run, needs="containers-storage",
                    unavailable=None if cs_drv else "n/a (containers-storage has no driver here)",
                    after=lambda d: CStorage(d, cs_drv or "vfs").shutdown())

    # apply rows, uncompressed
    for key, title in (("rootfs", "apply rootfs (debootstrap minbase)"),
                       ("npm", "apply many small files (npm tree)")):
        tar = L[key]
        wl.append(Workload(title, [gd_apply(tar)],
                           [cs_apply(tar), gnutar_x(tar), bsdtar_x(tar)],
                           {cs_apply(tar).label: "<= 0.3", "GNU tar -x": "<= 1.0"},
                           target_fs={cs_apply(tar).label: "tmpfs"}))
        wl.append(Workload(title + " [engine only]", [engine_apply(tar)], [gnutar_x(tar)],
                           {"GNU tar -x": "<= 1.0"}))
    big = L["big"]
    wl.append(Workload("apply 1 GB in 4 big files", [gd_apply(big), engine_apply(big)],
                       [gnutar_x(big), bsdtar_x(big)], {"GNU tar -x": "<= 1.0"}))
    wl += whole_command_workloads(ctx)
    wl.append(many_entries_workload(ctx, gd_apply, gnutar_x))

    # compressed apply rows: the target is against the fastest peer
    for key, title in (("rootfs", "rootfs"), ("npm", "npm tree")):
        gz, zst = L[f"{key}.gz"], L[f"{key}.zst"]
        wl.append(Workload(f"apply {title} gzip", [gd_apply(gz)],
                           [gnutar_x(gz, ["-z"]), bsdtar_x(gz), cs_apply(gz)],
                           {"fastest": "<= 0.8"}, best_of=True))
        wl.append(Workload(f"apply {title} zstd", [gd_apply(zst)],
                           [zstd_tar_x(zst), bsdtar_x(zst), cs_apply(zst)],
                           {"fastest": "<= 1.0"}, best_of=True))

    # diff and changes of 10 changes on a 10k-file base
    base_tar, change_tar = L["small10k-base"], L["small10k-change"]
    pair = [f"base:-:{base_tar}", f"child:base:{change_tar}"]

    def gd_prepared(driver: str, label: str, op: str, walk: bool = False) -> Side:
        def once(d: Path) -> None:
            must_run(gd_cmd("prepare", driver, str(d / "root"), *pair), "prepare")
            if walk:  # no record to answer from: the tree comparison its label names
                put_record_aside(driver, d / "root", "child")

        def per_run(d: Path) -> Cmd:
            args = [op, driver, str(d.parent / "root"), "child"]
            if op == "diff":
                args.append(str(d / "out.tar"))
            return Cmd(gd_cmd(*args), internal=True)

        return gd_side(label, per_run, once)

    def cs_prepared(op: str) -> Side:
        def once(d: Path) -> None:
            cs = CStorage(d / "cs", cs_drv or "vfs")
            must_run(cs.argv("create-layer", "--id", "base"), "create-layer")
            must_run(cs.argv("applydiff", "--file", str(base_tar), "base"), "applydiff")
            must_run(cs.argv("create-layer", "--id", "child", "base"), "create-layer")
            must_run(cs.argv("applydiff", "--file", str(change_tar), "child"), "applydiff")

        def per_run(d: Path) -> Cmd:
            cs = CStorage(d.parent / "cs", cs_drv or "vfs")
            if op == "diff":
                return Cmd(cs.argv("diff", "--uncompressed", "--file", str(d / "out.tar"),
                                   "child"))
            return Cmd(cs.argv("changes", "child"))

        return Side(f"{cs_label} {op}", per_run, once, needs="containers-storage",
                    unavailable=None if cs_drv else "n/a (containers-storage has no driver here)",
                    after=lambda d: CStorage(d / "cs", cs_drv or "vfs").shutdown())

    for op in ("changes", "diff"):
        naive = gd_prepared("vfs", "naive (vfs NaiveDiff)", op, walk=True)
        wl.append(Workload(f"{op}: 10 changed files on a 10k-file base",
                           [gd_prepared(gdd, gd_label, op)], [naive, cs_prepared(op)],
                           {naive.label: "<= 0.1", f"{cs_label} {op}": "<= 1.0"}))

    # export a whole rootfs layer
    rootfs = L["rootfs"]

    def export_src_once(d: Path) -> None:
        (d / "src").mkdir()
        must_run([*TAR_X, str(rootfs), "-C", str(d / "src")], "extract rootfs")

    def gd_export_once(d: Path) -> None:
        must_run(gd_cmd("prepare", gdd, str(d / "root"), f"rootfs:-:{rootfs}"), "prepare")

    gd_export = gd_side(gd_label + " diff",
                        lambda d: Cmd(gd_cmd("diff", gdd, str(d.parent / "root"), "rootfs",
                                             str(d / "out.tar")), internal=True),
                        gd_export_once)
    engine_export = gd_side("graphdriver engine (write_tree)",
                            lambda d: Cmd(gd_cmd("engine-export", str(d.parent / "src"),
                                                 str(d / "out.tar")), internal=True),
                            export_src_once)
    tar_c = Side("GNU tar -c", lambda d: Cmd([*TAR_C, str(d / "out.tar"), "-C",
                                              str(d.parent / "src"), "."]),
                 export_src_once, needs="tar")
    bsd_c = Side("bsdtar -c", lambda d: Cmd([*BSDTAR_C, str(d / "out.tar"), "-C",
                                             str(d.parent / "src"), "."]),
                 export_src_once, needs="bsdtar")
    wl.append(Workload("export a whole rootfs layer", [gd_export, engine_export],
                       [tar_c, bsd_c], {"GNU tar -c": "<= 1.0"}))

    # mount + unmount a 20-layer chain (5 in quick mode)
    depth = ctx.chain_depth
    top = f"l{depth - 1}"

    def chain_tars(d: Path) -> list[Path]:
        tars = []
        for i in range(depth):
            t = d / f"l{i}.tar"
            make_tiny_tar(t, f"layer{i}.txt")
            tars.append(t)
        return tars

    def gd_chain_once(d: Path) -> None:
        tars = chain_tars(d)
        specs = [f"l{i}:{'-' if i == 0 else f'l{i - 1}'}:{t}" for i, t in enumerate(tars)]
        must_run(gd_cmd("prepare", gdd, str(d / "root"), *specs), "prepare")

    def cs_chain_once(d: Path) -> None:
        tars = chain_tars(d)
        cs = CStorage(d / "cs", cs_drv or "vfs")
        for i, t in enumerate(tars):
            parent = [] if i == 0 else [f"l{i - 1}"]
            must_run(cs.argv("import-layer", "--id", f"l{i}", "--file", str(t), *parent),
                     "import-layer")

    def cs_mount(d: Path) -> Cmd:
        cs = CStorage(d.parent / "cs", cs_drv or "vfs")
        script = (" ".join(shlex.quote(a) for a in cs.argv("mount", top)) + " >/dev/null && "
                  + " ".join(shlex.quote(a) for a in cs.argv("unmount", top)) + " >/dev/null")
        return Cmd(["bash", "-c", script])

    wl.append(Workload(
        f"mount + unmount a {depth}-layer chain",
        [gd_side(gd_label + " get+put (in-process)",
                 lambda d: Cmd(gd_cmd("mount", gdd, str(d.parent / "root"), top),
                               internal=True), gd_chain_once)],
        [Side(f"{cs_label} mount+unmount", cs_mount, cs_chain_once, needs="containers-storage",
              unavailable=None if cs_drv else "n/a (containers-storage has no driver here)",
              after=lambda d: CStorage(d / "cs", cs_drv or "vfs").shutdown())],
        {f"{cs_label} mount+unmount": "<= 1.0"}))

    # start-up of the command, on an existing store (made once: a fresh root would time the
    # store's creation and overlay's probe mounts, not start-up).  Two graphdriver sides: the
    # command as a user runs it (site processing included: this interpreter's .pth files run
    # first), and with -S (no site; the package found through PYTHONPATH), which is the part
    # graphdriver itself costs.  `python -c pass` shows what site costs on this interpreter.
    def startup_argv(d: Path, *flags: str) -> list[str]:
        base = d.parent
        return [sys.executable, *flags, "-m", "graphdriver", "--root", str(base / "root"),
                "--runroot", str(base / "run"), "exists", "nosuch"]

    def startup_once(d: Path) -> None:
        r = subprocess.run([sys.executable, "-m", "graphdriver", "--root", str(d / "root"),
                            "--runroot", str(d / "run"), "create", "base"],
                           capture_output=True, text=True, env=gd_env(), check=False)
        if r.returncode != 0:
            last = r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            raise Unavailable(f"n/a ({last[0][:120]})")

    wl.append(windows_sandbox_workload(ctx))
    wl.append(recorded_changes_workload(ctx))

    wl.append(Workload(
        "start-up of `graphdriver exists`",
        [Side("python -m graphdriver exists",
              lambda d: Cmd(startup_argv(d), ok=(0, 1)), startup_once),
         Side("python -S -m graphdriver exists (no site)",
              lambda d: Cmd(startup_argv(d, "-S"), ok=(0, 1)), startup_once)],
        [Side("python -S -c pass", lambda d: Cmd([sys.executable, "-S", "-c", "pass"])),
         Side("python -c pass", lambda d: Cmd([sys.executable, "-c", "pass"]))],
        {"python -S -c pass": "<= 2.0"}))
    wl.append(image_pull_workload(ctx))
    return wl + containerd_workloads(ctx)


def containerd_workloads(ctx: Ctx) -> list[Workload]:
    """containerd 1.6 with graphdriver's snapshotter (overlay driver, a proxy plugin: one gRPC
    hop away) beside its built-in ``overlayfs`` snapshotter (in-process), each side with a
    private containerd of its own (tests/snapshotter/ctdutil.py: a private mount namespace,
    stopped by PID).  Rows: ``ctr images import`` + unpack of the Debian rootfs image (made from
    rootfs.tar by skopeo; the image is removed, with containerd's GC, between runs), and 100 ×
    prepare + mount + unmount + remove of an active snapshot on a 20-layer chain (5 in quick
    mode), called through containerd's snapshots service as ctr would (bench/gdtask.py)."""
    sys.path.insert(0, str(REPO))
    from tests.snapshotter.ctdutil import Daemons, image_archive, why_not

    image_ref = "docker.io/gdbench/debian:1"
    running: dict[Path, Daemons] = {}
    cycles = 100

    def start(d: Path) -> Daemons:
        try:
            running[d] = Daemons(d / "c", "overlay")
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            raise Failed(f"containerd: {exc}") from None
        return running[d]

    def stop(d: Path) -> None:
        if d in running:
            running.pop(d).close()

    def side(label: str, per_run: Callable[[Path], Cmd], once: Callable[[Path], None]) -> Side:
        return Side(label, per_run, once, unavailable=why_not() and f"n/a ({why_not()})",
                    after=stop)

    def import_side(snapshotter: str, label: str) -> Side:
        def once(d: Path) -> None:
            (d / "c").mkdir()
            image_archive(ctx.layers["rootfs"], d / "image.tar", image_ref)
            start(d)

        def per_run(run: Path) -> Cmd:
            daemons = running[run.parent]
            with contextlib.suppress(AssertionError):  # the previous run's image, and its GC
                daemons.ctr("images", "rm", "--sync", image_ref)
            return Cmd(daemons.ns.argv(daemons.ctr_args(
                "images", "import", "--snapshotter", snapshotter, str(run.parent / "image.tar"))))

        return side(label, per_run, once)

    depth = ctx.chain_depth

    def cycle_side(snapshotter: str, label: str) -> Side:
        def once(d: Path) -> None:
            (d / "c").mkdir()
            daemons = start(d)
            must_run(daemons.ns.argv(gd_cmd("ctd-chain", str(daemons.work / "containerd.sock"),
                                            daemons.namespace, snapshotter, str(depth),
                                            str(d))), "chain")

        def per_run(run: Path) -> Cmd:
            daemons = running[run.parent]
            return Cmd(daemons.ns.argv(gd_cmd(
                "ctd-cycle", str(daemons.work / "containerd.sock"), daemons.namespace,
                snapshotter, f"chain-{depth - 1}", str(cycles), str(run))), internal=True)

        return side(label, per_run, once)

    return [
        Workload("containerd: ctr images import + unpack of the Debian rootfs image",
                 [import_side("graphdriver", "containerd + graphdriver snapshotter (overlay)")],
                 [import_side("overlayfs", "containerd + built-in overlayfs")],
                 {"containerd + built-in overlayfs": "<= 1.5"}),
        Workload(f"containerd: {cycles} x prepare + mount + remove on a {depth}-layer chain",
                 [cycle_side("graphdriver", "containerd + graphdriver snapshotter (overlay)")],
                 [cycle_side("overlayfs", "containerd + built-in overlayfs")],
                 {"containerd + built-in overlayfs": "<= 1.5"}),
    ]


def image_pull_workload(ctx: Ctx) -> Workload:
    """``image pull`` of a two-layer gzip image (Debian rootfs + npm tree) from a private
    docker-registry on loopback: graphdriver (the command, start-up included) against podman
    (private --root/--runroot, overlay) and ctr (a private containerd, overlayfs snapshotter);
    skopeo copy to a directory is the download alone (the network floor)."""
    from imagebench import BenchContainerd, BenchRegistry

    layers = [ctx.layers["rootfs.gz"], ctx.layers["npm.gz"]]
    server: dict[str, Any] = {}

    def registry(d: Path) -> None:
        if shutil.which("docker-registry") is None:
            raise Unavailable("n/a (docker-registry not installed)")
        try:
            server["reg"] = BenchRegistry.get(d.parent.parent, layers)
        except (RuntimeError, OSError) as exc:
            raise Failed(f"the bench registry: {exc}") from exc

    def ref() -> str:
        return str(server["reg"].ref)

    def gd_pull(d: Path) -> Cmd:
        return Cmd([sys.executable, "-m", "graphdriver", "--root", str(d / "root"), "--runroot",
                    str(d / "run"), "--driver", ctx.gd_driver, "image", "pull", "-q", ref()])

    def podman_pull(d: Path) -> Cmd:
        # podman refuses a run root longer than 50 characters: a short one beside the work dir
        runroot = Path(tempfile.mkdtemp(prefix="gdpr-", dir="/dev/shm" if Path("/dev/shm")
                                        .is_dir() else None))
        (d / "runroot").symlink_to(runroot)  # removed with the run dir; the target by atexit
        import atexit

        atexit.register(shutil.rmtree, runroot, True)
        return Cmd(["podman", "--root", str(d / "root"), "--runroot", str(runroot),
                    "--storage-driver", "overlay", "--tmpdir", str(d / "tmp"),
                    "pull", "-q", "--tls-verify=false", ref()])

    def ctr_once(d: Path) -> None:
        registry(d)
        try:
            server["ctr"] = BenchContainerd.get(d / "containerd")
        except (RuntimeError, OSError) as exc:
            raise Failed(f"the bench containerd: {exc}") from exc

    def ctr_pull(d: Path) -> Cmd:
        server["ctr"].reset(ref())  # the previous run's image, content and snapshots
        return Cmd(server["ctr"].argv("images", "pull", "--plain-http", ref()))

    def skopeo_copy(d: Path) -> Cmd:
        policy = d / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        (d / "tmp").mkdir()
        return Cmd(["skopeo", "--policy", str(policy), "--tmpdir", str(d / "tmp"), "copy", "-q",
                    "--src-tls-verify=false", f"docker://{ref()}", f"dir:{d / 'out'}"])

    return Workload(
        "image pull (rootfs + npm tree, gzip, local registry)",
        [Side(f"graphdriver {ctx.gd_driver} image pull", gd_pull, registry,
              unavailable=ctx.gd_reason)],
        [Side("podman pull (overlay)", podman_pull, registry, needs="podman"),
         Side("ctr image pull (overlayfs)", ctr_pull, ctr_once, needs="ctr"),
         Side("skopeo copy to dir (download only)", skopeo_copy, registry, needs="skopeo")],
        {"podman pull (overlay)": "<= 0.7", "ctr image pull (overlayfs)": "<= 0.7"})


def make_windows_layer(path: Path, files: int, total: int) -> None:
    """A Windows layer tar (go-winio's records) of ``files`` files holding ``total`` bytes, in
    directories of 100."""
    per_file = total // files
    chunk = os.urandom(1 << 16)
    tmp = path.with_suffix(".tmp")

    def info(name: str, typ: bytes, attrs: int, size: int = 0) -> tarfile.TarInfo:
        i = tarfile.TarInfo(name)
        i.type, i.size, i.mtime = typ, size, 1_700_000_000
        i.mode = 0o40000 if typ == tarfile.DIRTYPE else 0o100000
        i.pax_headers = {"MSWINDOWS.fileattr": str(attrs), "LIBARCHIVE.creationtime": "1700000000",
                         "MSWINDOWS.rawsd": "AQAEgBQAAAAkAAAAAAAAADAAAAA="}
        return i

    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info("Files", tarfile.DIRTYPE, 16))
        for n in range(files):
            if n % 100 == 0:
                tf.addfile(info(f"Files/d{n // 100:04d}", tarfile.DIRTYPE, 16))
            data = (chunk * (per_file // len(chunk) + 1))[n % 4096:n % 4096 + per_file]
            tf.addfile(info(f"Files/d{n // 100:04d}/f{n:05d}.dll", tarfile.REGTYPE, 32,
                            len(data)), io.BytesIO(data))
    tmp.rename(path)


def _ustar(name: bytes, typ: bytes, mode: int, size: int) -> bytes:
    """One ustar header block (uid/gid 0, a fixed mtime)."""
    head = (name.ljust(100, b"\0") + b"%07o\0" % mode + b"0000000\0" * 2 + b"%011o\0" % size
            + b"%011o\0" % 1_700_000_000 + b" " * 8 + typ + b"\0" * 100 + b"ustar\x0000"
            + b"\0" * 247)
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


def make_many_entries_tar(path: Path, entries: int) -> None:
    """A tar of *entries* entries: directories of 1000 files of 16 bytes each (what a layer of
    a million small files looks like to the apply's per-entry bookkeeping)."""
    tmp = path.with_suffix(".tmp")
    data = b"0123456789abcdef".ljust(512, b"\0")
    with open(tmp, "wb", buffering=1 << 20) as f:
        n = 0
        d = 0
        while n < entries:
            dname = b"d%04d/" % d
            f.write(_ustar(dname, b"5", 0o755, 0))
            n += 1
            for i in range(min(999, entries - n)):
                f.write(_ustar(dname + b"file-%04d.txt" % i, b"0", 0o644, 16))
                f.write(data)
                n += 1
            d += 1
        f.write(b"\0" * 1024)
    tmp.rename(path)


def many_entries_workload(ctx: Ctx, gd_apply: Callable[[Path], Side],
                          gnutar_x: Callable[[Path], Side]) -> Workload:
    """Issue 18's memory row: a layer of a million entries (20k in quick mode) applied through
    the driver within the 60 MB budget (parent + child, the RSS columns), against GNU tar."""
    entries = 20_000 if ctx.cache.name == "quick" else 1_000_000
    tar = ctx.cache / f"many-{entries}.tar"

    def once(d: Path) -> None:
        if not tar.exists():
            log(f"generating {tar}")
            make_many_entries_tar(tar, entries)
            warm([tar])

    gd, peer = gd_apply(tar), gnutar_x(tar)
    gd.once = peer.once = once
    return Workload(f"apply {entries:,} entries (memory: <= 60 MB parent + child)",
                    [gd], [peer], {"GNU tar -x": "<= 1.0"})


def whole_command_workloads(ctx: Ctx) -> list[Workload]:
    """Issue 18's whole-command rows: exactly ``graphdriver create L`` + ``graphdriver apply L
    FILE`` as a user runs them (the installed console script, default options and driver, a
    fresh process each, on a store made beforehand, untimed), against ``tar -xf FILE -C DIR`` on
    the same filesystem.  Both run under ``bash -c``.  The issue sets their target on ext4 (a
    user's disk), where the apply's seconds dwarf two interpreters' start-up; on tmpfs the row
    is measured and its target cell says "(ext4 only)"."""
    script = Path(sys.executable).parent / "graphdriver"
    rows: list[Workload] = []

    def gd_per_run(tar: Path) -> Callable[[Path], Cmd]:
        def per_run(d: Path) -> Cmd:
            env = f"GRAPHDRIVER_ROOT={shlex.quote(str(d / 'root'))}"
            must_run(["bash", "-c", f"{env} {shlex.quote(str(script))} create seed"],
                     "store set-up")
            gd = f"{env} {shlex.quote(str(script))}"
            return Cmd(["bash", "-c", f"{gd} create L && {gd} apply L {shlex.quote(str(tar))}"
                       " >/dev/null"])

        return per_run

    def tar_per_run(tar: Path) -> Callable[[Path], Cmd]:
        def per_run(d: Path) -> Cmd:
            (d / "out").mkdir()
            return Cmd(["bash", "-c", f"tar -xf {shlex.quote(str(tar))} -C "
                        f"{shlex.quote(str(d / 'out'))}"])

        return per_run

    for key, title in (("rootfs", "rootfs"), ("npm", "npm tree")):
        tar = ctx.layers[key]
        rows.append(Workload(
            f"the whole command: create + apply, {title}",
            [Side("graphdriver create L && graphdriver apply L FILE", gd_per_run(tar),
                  unavailable=ctx.gd_reason if script.exists() else
                  f"n/a ({script} is not installed)")],
            [Side("tar -xf FILE -C DIR", tar_per_run(tar), needs="tar")],
            {"tar -xf FILE -C DIR": "<= 1.0"}, target_fs={"tar -xf FILE -C DIR": "ext4"}))
    return rows


def windows_sandbox_workload(ctx: Ctx) -> Workload:
    """A windowsfilter sandbox on an 11k-file, 500 MB Windows layer, created and mounted (a
    copy-on-write overlay), against ``cp -a`` of the layer's merged view (what a copy costs).
    The layer's view is built once per layer, by the untimed set-up's first sandbox."""
    quick = ctx.cache.name == "quick"
    files, total = (500, 5 << 20) if quick else (11_000, 500 << 20)
    tar = ctx.cache / f"windows-{files}.tar"

    def once(d: Path) -> None:
        if not tar.exists():
            make_windows_layer(tar, files, total)
        must_run(gd_cmd("prepare", "windowsfilter", str(d / "root"), f"base:-:{tar}"), "prepare")

    def gd_once(d: Path) -> None:
        once(d)
        must_run(gd_cmd("win-sandbox", str(d / "root"), "base"), "first sandbox")

    def cp_once(d: Path) -> None:
        once(d)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        from graphdriver import open_driver

        store = open_driver("windowsfilter", d / "root", runroot=d / "root" / "run")
        (d / "merged").symlink_to(store.get("base"))

    def cp_after(d: Path) -> None:
        from graphdriver import open_driver

        open_driver("windowsfilter", d / "root", runroot=d / "root" / "run").cleanup()

    return Workload(
        f"windowsfilter sandbox on a {files}-file, {total >> 20} MB Windows layer",
        [Side("graphdriver windowsfilter create --rw + get",
              lambda d: Cmd(gd_cmd("win-sandbox", str(d.parent / "root"), "base"),
                            internal=True), gd_once, unavailable=ctx.gd_reason)],
        [Side("cp -a of its merged view", lambda d: Cmd(
            ["cp", "-a", str(d.parent / "merged") + "/.", str(d / "out")]), cp_once,
            after=cp_after)],
        {"cp -a of its merged view": "<= 0.1"})


def put_record_aside(driver: str, root: Path, layer: str) -> None:
    """Move *layer*'s tar-split record aside (in a store ``gdtask.py prepare`` made): its
    ``changes`` and ``diff`` then walk the trees (issue 15 rule 8 answers from the record)."""
    sys.path.insert(0, str(REPO / "src"))
    from graphdriver import open_driver

    store = open_driver(driver, root, runroot=root / "run")
    record = store.meta.dir(layer) / "tar-split.json.gz"
    record.rename(record.with_name("aside"))


def recorded_changes_workload(ctx: Ctx) -> Workload:
    """vfs ``changes`` of a 10-file layer on a 10k-file parent: from the layer's tar-split
    record (issue 15 rule 8: the listed paths only) against the walk of both trees (the same
    layer with its record moved aside)."""
    quick = ctx.cache.name == "quick"
    files = 1_000 if quick else 10_000
    parent_tar, top_tar = ctx.cache / f"parent-{files}.tar", ctx.cache / "top-10.tar"

    def make_tars() -> None:
        import io

        for path, names in ((parent_tar, [f"d{i // 100}/f{i}" for i in range(files)]),
                            (top_tar, [f"d{i}/new{i}" for i in range(10)])):
            if path.exists():
                continue
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
                for name in names:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = 6, 1_700_000_000
                    tf.addfile(info, io.BytesIO(b"data\n\n"))

    def once(d: Path, walk: bool) -> None:
        make_tars()
        must_run(gd_cmd("prepare", "vfs", str(d / "root"), f"parent:-:{parent_tar}",
                        f"top:parent:{top_tar}"), "prepare")
        if walk:
            put_record_aside("vfs", d / "root", "top")

    def side(label: str, walk: bool) -> Side:
        return Side(label, lambda d: Cmd(gd_cmd("changes", "vfs", str(d.parent / "root"), "top"),
                                         internal=True),
                    lambda d: once(d, walk), unavailable=ctx.gd_reason)

    return Workload(f"vfs changes of a 10-file layer on a {files}-file parent",
                    [side("graphdriver vfs changes (from the record)", False)],
                    [side("graphdriver vfs changes (tree walk)", True)],
                    {"graphdriver vfs changes (tree walk)": "<= 0.2"})


# ---------------------------------------------------------------- running and reporting


@dataclass
class SideResult:
    label: str
    samples: list[Sample] = field(default_factory=list)
    note: str | None = None

    def median(self) -> float | None:
        return statistics.median(s.seconds for s in self.samples) if self.samples else None

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "note": self.note,
            "median_s": self.median(),
            "runs_s": [round(s.seconds, 6) for s in self.samples],
            "wall_s": [round(s.wall, 6) for s in self.samples],
            "peak_rss_kb": _peak([s.rss_kb for s in self.samples]),
            "peak_tree_rss_kb": _peak([s.sum_kb for s in self.samples]),
            "ru_maxrss_kb": max((s.ru_maxrss_kb for s in self.samples), default=None),
        }


def named(path: Path, arg: str) -> bool:
    """Whether a command-line argument (or a shell script) names *path* (rootfs.tar is not
    named by rootfs.tar.gz)."""
    return re.search(re.escape(str(path)) + r"(?![\w.-])", arg) is not None


def run_workload(w: Workload, workdir: Path, runs: int,
                 cache: Path | None = None, warmup: int = 0) -> dict[str, SideResult]:
    """The files in *cache* (the layers, and those a side's set-up made there: the 1M-entry
    layer) are read through just before every run whose command line names one, untimed, so
    that every run starts with its input in the page cache: this machine's DAMON pages out
    what it sees idle for a minute (the npm layer was found a third out of the cache after an
    hour of bench runs), and a run that reads part of its layer from the disk is timed for it,
    whichever side it is.

    The sides run in turn, in the reverse order every other round, so that no side is always
    the one right after a given other.  The first *warmup* rounds run every side as the others
    do, and are not counted: on a filesystem whose cost per new file depends on what was
    removed in the last minutes (ext4 without a journal: see :func:`default_warmup`), the first
    side of a row's first round would otherwise be timed in other conditions than every run
    after it."""
    sides = [*w.gd, *w.peers]
    results = {id(s): SideResult(s.label) for s in sides}
    bases: dict[int, Path] = {}
    slug = re.sub(r"[^a-z0-9]+", "-", w.name.lower()).strip("-")[:40]
    for i, s in enumerate(sides):
        r = results[id(s)]
        if s.unavailable:
            r.note = s.unavailable
            continue
        if s.needs and shutil.which(s.needs) is None:
            r.note = f"n/a ({s.needs} not installed)"
            continue
        base = workdir / slug / f"side{i}"
        clean_dir(base)
        base.mkdir(parents=True)
        bases[id(s)] = base
        if s.once:
            try:
                s.once(base)
            except (Unavailable, Failed) as exc:
                r.note = str(exc) if isinstance(exc, Unavailable) else f"error: {exc}"
    inputs = [] if cache is None else sorted(
        p for p in cache.iterdir() if p.is_file() and p.stat().st_size < (2 << 30))
    try:
        for round_ in range(warmup + runs):
            for s in (sides if round_ % 2 == 0 else sides[::-1]):
                r = results[id(s)]
                if r.note:
                    continue
                run_dir = bases[id(s)] / "run"
                clean_dir(run_dir)
                run_dir.mkdir()
                # the previous run's dirty pages and its removal go to disk now, not during
                # this run: on ext4 the side timed after a 75k-entry tree pays its writeback
                os.sync()
                try:
                    cmd = s.per_run(run_dir)
                    warm([p for p in inputs if any(named(p, a) for a in cmd.argv)])
                    sample = measure(cmd)
                    if round_ >= warmup:
                        r.samples.append(sample)
                except Unavailable as exc:
                    r.note = str(exc)
                except Failed as exc:
                    r.note = f"error: {exc}"
                finally:
                    clean_dir(run_dir)
    finally:
        for s in sides:
            kept = bases.get(id(s))
            if kept is None:
                continue
            if s.after:
                s.after(kept)
            clean_dir(kept)
        clean_dir(workdir / slug)
    return {s.label: results[id(s)] for s in sides}


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


def table_rows(w: Workload, res: dict[str, SideResult], fs: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    peers = [res[p.label] for p in w.peers]
    timed = [p for p in peers if p.median() is not None]
    fastest = min(timed, key=lambda p: p.median() or 0.0) if timed else None
    for g in (res[s.label] for s in w.gd):
        for p in peers:
            gm, pm = g.median(), p.median()
            ratio = gm / pm if gm is not None and pm else None
            target = w.targets.get(p.label, "")
            if w.best_of and p is fastest:
                target = w.targets.get("fastest", "") + " (fastest)"
            only = w.target_fs.get(p.label)
            if target and only is not None and fs != only:
                target = f"({only} only)"
            rows.append({
                "workload": w.name, "graphdriver": g.label, "peer": p.label,
                "graphdriver_median_s": gm, "peer_median_s": pm, "ratio": ratio,
                "target": target, "graphdriver_note": g.note, "peer_note": p.note,
                "graphdriver_peak_rss_kb": g.as_json()["peak_rss_kb"],
                "graphdriver_peak_tree_rss_kb": g.as_json()["peak_tree_rss_kb"],
                "peer_peak_rss_kb": p.as_json()["peak_rss_kb"],
            })
    return rows


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    head = ["workload", "graphdriver", "gd median", "peer", "peer median", "ratio", "target",
            "gd RSS MB (max/sum)", "peer RSS MB"]
    lines = [head]
    for r in rows:
        gm = r["graphdriver_note"] or fmt_s(r["graphdriver_median_s"])
        pm = r["peer_note"] or fmt_s(r["peer_median_s"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        rss = ("-" if r["graphdriver_peak_rss_kb"] is None else
               f"{fmt_mb(r['graphdriver_peak_rss_kb'])}/{fmt_mb(r['graphdriver_peak_tree_rss_kb'])}")
        lines.append([r["workload"], r["graphdriver"], gm, r["peer"], pm, ratio, r["target"], rss,
                      fmt_mb(r["peer_peak_rss_kb"])])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    print(f"\n## {title}\n")
    for n, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(line)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()


def tool_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else None


def default_warmup(fs: str) -> int:
    """Untimed rounds before a row's timed ones: one where the work dir is not tmpfs.  On ext4
    without a journal, every new inode is searched for past the free inodes whose deletion
    is under a minute old (five while their inode table block is dirty: the kernel's
    ``recently_deleted``), and each run removes the tree it made: a row's first run, after a
    pause, made its files in 0.3 s where the runs after it took 3.6-4.7 s (the rootfs layer),
    and it is always the graphdriver side's.  tmpfs has no such state."""
    return 0 if fs == "tmpfs" else 1


def fs_type(path: Path) -> str:
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True,
                       text=True, check=False)
    return (r.stdout.strip().splitlines() or ["?"])[0]


def load_layers(cache: Path) -> dict[str, Path]:
    manifest = cache / "manifest.json"
    if not manifest.exists():
        raise SystemExit(f"{manifest} is missing: run bench/make_layers.py"
                         f"{' --quick' if cache.name == 'quick' else ''} first")
    data = json.loads(manifest.read_text())
    return {k: cache / v["file"] for k, v in data["layers"].items()}


def warm(paths: list[Path]) -> None:
    buf = bytearray(1 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def compile_package() -> None:
    """Byte-compile the graphdriver package the children import, as ``pip install`` does.  An
    editable checkout run under PYTHONDONTWRITEBYTECODE=1 (this machine's environment) would
    otherwise compile every module from source in every command and every apply child."""
    found = subprocess.run(
        [sys.executable, "-c",
         "import graphdriver, os; print(os.path.dirname(graphdriver.__file__))"],
        capture_output=True, text=True, check=False)
    pkg = found.stdout.strip()
    if found.returncode == 0 and pkg:
        subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], check=False,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})


def render(path: Path) -> int:
    report = json.loads(path.read_text())
    by_fs: dict[str, list[dict[str, Any]]] = {}
    for row in report.get("table", []):
        by_fs.setdefault(row.get("fs", "?"), []).append(row)
    print(f"{report.get('date', '?')}, {report.get('runs', '?')} run(s) per row, "
          f"kernel {report.get('machine', {}).get('kernel', '?')}")
    for fs, rows in by_fs.items():
        print_table(f"{fs}, medians of {report.get('runs', '?')} run(s)", rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--quick", action="store_true", help="quick layers (CACHE/quick), 1 run")
    ap.add_argument("--runs", type=int, default=None, help="runs per row (default 5; quick: 1)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="work dir (tmpfs)")
    ap.add_argument("--also-ext4", action="store_true", help="run again on an ext4 work dir")
    ap.add_argument("--ext4-workdir", type=Path, default=DEFAULT_EXT4)
    ap.add_argument("--only", default=None, help="regex: run only workloads whose name matches")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed rounds before each row's runs (default: 0 on tmpfs, else 1)")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="print the tables of an earlier --json file and exit")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.render)

    cache = args.cache / "quick" if args.quick else args.cache
    runs = args.runs or (1 if args.quick else 5)
    layers = load_layers(cache)
    warm([p for p in layers.values() if p.stat().st_size < (2 << 30)])
    compile_package()

    workdirs = [args.workdir] + ([args.ext4_workdir] if args.also_ext4 else [])
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick, "runs": runs, "cache": str(cache),
        "machine": {"kernel": platform.release(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "tools": {name: tool_version(v) for name, v in {
            "tar": ["tar", "--version"], "bsdtar": ["bsdtar", "--version"],
            "zstd": ["zstd", "--version"], "gzip": ["gzip", "--version"],
            "containers-storage": ["containers-storage", "version"]}.items()},
        "results": [],
    }
    pattern = re.compile(args.only) if args.only else None
    for workdir in workdirs:
        made = not workdir.exists()
        workdir.mkdir(parents=True, exist_ok=True)
        fs = fs_type(workdir)
        warmup = default_warmup(fs) if args.warmup is None else args.warmup
        after = f" after {warmup} untimed round(s)" if warmup else ""
        try:
            gd_driver, gd_reason = probe_gd(workdir)
            cs_driver = probe_cstorage(workdir)
            ctx = Ctx(cache, layers, gd_driver, gd_reason, cs_driver,
                      chain_depth=5 if args.quick else 20)
            log(f"work dir {workdir} ({fs}); graphdriver driver: {gd_driver}"
                f"{' ' + gd_reason if gd_reason else ''}; containers-storage driver: "
                f"{cs_driver or 'none'}; {runs} run(s) per row{after}")
            rows: list[dict[str, Any]] = []
            for w in build_workloads(ctx):
                if pattern and not pattern.search(w.name):
                    continue
                log(f"running: {w.name}")
                res = run_workload(w, workdir, runs, cache, warmup)
                rows += table_rows(w, res, fs)
                report["results"].append({
                    "workdir": str(workdir), "fs": fs, "workload": w.name, "warmup": warmup,
                    "graphdriver_driver": gd_driver, "containers_storage_driver": cs_driver,
                    "sides": [r.as_json() for r in res.values()],
                })
                for r in rows[-len(w.gd) * len(w.peers):]:
                    r["fs"] = fs
                    report.setdefault("table", []).append(r)
                    gm = r["graphdriver_note"] or fmt_s(r["graphdriver_median_s"])
                    pm = r["peer_note"] or fmt_s(r["peer_median_s"])
                    log(f"  {r['graphdriver']}: {gm} | {r['peer']}: {pm}")
                if args.json:  # written after every row, so a long run that is cut short
                    args.json.write_text(json.dumps(report, indent=1) + "\n")  # still has its rows
            print_table(f"{fs} ({workdir}), medians of {runs} run(s){after}", rows)
        finally:
            if made:
                clean_dir(workdir)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
