"""apply_confined: the apply in an exec'd child, results and errors back over a pipe."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tarbuild import build, gnu_tar, make_rich_tree, member, needs_gnu_tar
from tests.childproc import children_of, feed_until_started, is_gone
from tests.treeutil import diff_snapshots, snapshot

from graphdriver.archive.apply import ApplyOptions, apply_tar
from graphdriver.archive.confine import discard_prespawned, prespawn, run_job, start_child
from graphdriver.archive.isolate import apply_confined
from graphdriver.archive.jobs import LINUX_APPLY
from graphdriver.errors import (
    GraphDriverError,
    Interrupted,
    InvalidArchive,
    InvalidArgument,
    NoSpace,
    UnsafeArchive,
)

#: every fact an apply is responsible for (the root and directory mtimes too)
ALL_FACTS = {"dir_mtimes": True, "with_root": True}


def children() -> list[int]:
    """Live (non-zombie) child processes of this process."""
    return children_of(os.getpid())


def confined(data: bytes, target: Path, opts: ApplyOptions | None = None) -> object:
    r, w = os.pipe()
    try:
        # feed through a pipe from a thread: the child reads the fd itself
        import threading

        def feed() -> None:
            try:
                os.write(w, data) if len(data) < 65536 else _write_all(w, data)
            except BrokenPipeError:
                pass
            finally:
                os.close(w)

        t = threading.Thread(target=feed)
        t.start()
        try:
            return apply_confined(r, target, opts or ApplyOptions())
        finally:
            t.join()
    finally:
        os.close(r)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@needs_gnu_tar
@pytest.mark.parametrize("prespawned", [False, True], ids=["spawned", "prespawned"])
def test_result_and_tree_equal_in_process(work: Path, prespawned: bool) -> None:
    """Also through a child started ahead of the job (confine.prespawn), as the command does."""
    make_rich_tree(work / "src", devices=os.geteuid() == 0, xattrs=os.geteuid() == 0)
    tar = work / "t.tar"
    gnu_tar("--numeric-owner", "--format=pax", "--xattrs", "--xattrs-include=*", "-czf", tar,
            "-C", work / "src", ".")
    a, b = work / "a", work / "b"
    a.mkdir()
    b.mkdir()
    with open(tar, "rb") as f:
        ra = apply_tar(f.fileno(), a, ApplyOptions())
    progress: list[int] = []
    pid = prespawn(LINUX_APPLY) if prespawned else None
    with open(tar, "rb") as f:
        rb = apply_confined(f.fileno(), b, ApplyOptions(progress=progress.append))
    assert ra == rb
    assert progress and progress[-1] > 0
    assert not diff_snapshots(snapshot(a, **ALL_FACTS), snapshot(b, **ALL_FACTS))
    assert pid is None or is_gone(pid)
    assert children() == []


def test_error_class_and_message_come_back(work: Path) -> None:
    t = work / "t"
    t.mkdir()
    (t / "keep").write_text("k")
    before = snapshot(t, **ALL_FACTS)
    with pytest.raises(UnsafeArchive, match="absolute name '/etc/x'"):
        confined(build(member("ok", b"1"), member("/etc/x")), t)
    assert snapshot(t, **ALL_FACTS) == before
    with pytest.raises(InvalidArchive, match="checksum"):
        confined(build(member("ok", b"1"), member("bad", checksum=7)), t)
    assert snapshot(t, **ALL_FACTS) == before
    assert children() == []


def test_no_escape_through_symlinks(work: Path) -> None:
    t = work / "t"
    t.mkdir()
    outside = work / "canary"
    outside.write_text("untouched")
    evil = build(
        member("esc", type=b"2", linkname=str(work)),
        member("esc/canary", b"pwned"),
    )
    with pytest.raises(UnsafeArchive, match="crosses symlink"):
        confined(evil, t)
    assert outside.read_text() == "untouched"
    assert os.listdir(t) == []


def test_recorder_across_the_boundary(work: Path) -> None:
    data = build(member("a", b"x" * 1000), member("b", b"y" * 3)) + b"trailing junk"

    class Cap:
        def __init__(self) -> None:
            self.out = bytearray()
            self.pos = 0
            self.names: list[bytes] = []

        def segment(self, raw: bytes) -> None:
            self.out += raw
            self.pos += len(raw)

        def file(self, name: bytes, size: int, crc: int | None) -> None:
            self.names.append(name)
            self.out += data[self.pos : self.pos + size]
            self.pos += size

    cap = Cap()
    t = work / "t"
    t.mkdir()
    confined(data, t, ApplyOptions(recorder=cap))
    assert bytes(cap.out) == data
    assert cap.names == [b"a", b"b"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the chroot needs root")
def test_child_refuses_a_path_through_a_preexisting_symlink(work: Path) -> None:
    """A pre-existing absolute symlink on the way is refused (a layer means the same on every
    driver: issue 15), and nothing is written where it points, inside the layer or out."""
    t = work / "t"
    (t / "real").mkdir(parents=True)
    os.symlink("/real", t / "link")
    (work / "real").mkdir()
    with pytest.raises(UnsafeArchive, match="beneath symlink"):
        confined(build(member("link/file", b"in")), t)
    assert os.listdir(t / "real") == [] and os.listdir(work / "real") == []


SCRIPT = r"""
import os, sys
from pathlib import Path
sys.path[:0] = [{src!r}]
from graphdriver.archive.apply import ApplyOptions
from graphdriver.archive.isolate import apply_confined
from graphdriver.errors import GraphDriverError
try:
    apply_confined(0, Path(sys.argv[1]), ApplyOptions())
except GraphDriverError as exc:
    print(type(exc).__name__, exc, flush=True)
    sys.exit(exc.exit_code)
print("finished", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_parent_stops_the_child_and_rolls_back(work: Path, sig: int) -> None:
    t = work / "t"
    t.mkdir()
    (t / "pre").write_text("existing")
    before = snapshot(t, **ALL_FACTS)
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(src=src), str(t)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        kids = feed_until_started(
            proc, b"".join(member(f"f{i}", os.urandom(100)) for i in range(50)), t / "f49")
        proc.send_signal(sig)
        # keep the input open until it is over (communicate() would close it at once, and the
        # child would finish the apply from the end of its input)
        proc.wait(timeout=120)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Interrupted" in out, (out, err)
    assert proc.returncode == 130
    assert snapshot(t, **ALL_FACTS) == before, err.decode(errors="replace")
    assert all(is_gone(pid) for pid in kids)


def test_killed_child_leaves_an_empty_target_empty(work: Path) -> None:
    import threading

    t = work / "t"
    t.mkdir()
    r, w = os.pipe()
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(apply_confined(r, t, ApplyOptions()))
        except BaseException as exc:
            outcome.append(exc)

    th = threading.Thread(target=run)
    th.start()
    try:
        _write_all(w, b"".join(member(f"f{i}", b"z" * 100) for i in range(20)))
        deadline = time.monotonic() + 30
        while not (t / "f19").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (kid,) = children()
        os.kill(kid, signal.SIGKILL)
        th.join(30)
    finally:
        os.close(w)
        th.join(30)
        os.close(r)
    (exc,) = outcome
    assert isinstance(exc, GraphDriverError) and "emptied" in str(exc)
    assert os.listdir(t) == []
    assert children() == []


def test_streams_accepted_by_apply_tar_too() -> None:
    # sanity of the helper used above: a BytesIO source works in process
    assert isinstance(io.BytesIO(b""), io.BytesIO)


# ---- the runner of confined jobs (archive/confine.py) ------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the chroot and read-only views need root")


def _no_death(why: str) -> GraphDriverError:
    raise AssertionError(f"the job child died: {why}")


def test_a_jobs_error_class_and_message_cross_the_boundary(work: Path) -> None:
    (work / "t").mkdir()
    with pytest.raises(NoSpace) as info:
        run_job("confine_jobs:fail", work / "t", {"class": "NoSpace", "message": "full: 0 left"},
                on_death=_no_death)
    assert str(info.value) == "full: 0 left"
    with pytest.raises(InvalidArgument, match="not a confined job"):
        run_job("confine_jobs", work / "t", {}, on_death=_no_death)
    assert children() == []


@needs_root
def test_read_only_lowers_reach_the_job_and_cannot_be_written_through(work: Path) -> None:
    target = work / "t"
    (target / "inside").mkdir(parents=True)
    lowers = [work / "l1", work / "l2"]
    for i, low in enumerate(lowers):
        (low / "sub").mkdir(parents=True)
        (low / "f").write_text(f"lower {i}")
    before = [snapshot(low, **ALL_FACTS) for low in lowers]
    ok = run_job("confine_jobs:lower_probe", target, {}, on_death=_no_death, lowers=lowers)
    assert ok["chrooted"] is True
    assert ok["root"] == ["inside"]  # the child's "/" is the target
    assert [low["f"] for low in ok["lowers"]] == ["lower 0", "lower 1"]
    for low in ok["lowers"]:
        assert low["names"] == ["f", "sub"]
        assert set(low["refused"].values()) == {"EROFS"}, low["refused"]
    assert [snapshot(low, **ALL_FACTS) for low in lowers] == before
    assert children() == []


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_a_chroot_that_fails_stops_the_job(work: Path) -> None:
    """Root without CAP_SYS_CHROOT: a real chroot failure, and the apply must not go on."""
    t = work / "t"
    t.mkdir()
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_chroot", "--inh-caps", "-sys_chroot", "--",
         sys.executable, "-c", SCRIPT.format(src=src), str(t)],
        input=build(member("should-not-exist", b"x")), capture_output=True, timeout=120)
    out = proc.stdout.decode()
    assert out.startswith("PermissionDenied "), (out, proc.stderr)
    assert "cannot chroot into" in out and "refusing to run unconfined" in out
    assert proc.returncode != 0
    assert os.listdir(t) == []


KILLED_PARENT = r"""
import sys
from pathlib import Path
sys.path[:0] = [{src!r}]
from graphdriver.archive.apply import ApplyOptions
from graphdriver.archive.isolate import apply_confined
apply_confined(0, Path(sys.argv[1]), ApplyOptions())
"""


def test_the_child_of_a_killed_parent_dies_and_rolls_back(work: Path) -> None:
    t = work / "t"
    t.mkdir()
    (t / "pre").write_text("existing")
    before = snapshot(t, **ALL_FACTS)
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PARENT.format(src=src), str(t)],
                            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        kids = feed_until_started(
            proc, b"".join(member(f"f{i}", os.urandom(100)) for i in range(50)), t / "f49")
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while not all(is_gone(pid) for pid in kids):  # reaped by init once it exits
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
    assert snapshot(t, **ALL_FACTS) == before  # PDEATHSIG is a SIGTERM: the child rolled back


# ---- a child started ahead of its job (prespawn), handed the job over a unix socket ----------


def _whoami(target: Path, **kw: object) -> dict[str, object]:
    r, w = os.pipe()
    try:
        os.write(w, b"through the handed-over fd")
        os.close(w)
        w = -1
        return run_job("confine_jobs:whoami", target, {}, on_death=_no_death, input_fd=r,
                       **kw)  # type: ignore[arg-type]
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_prespawned_child_takes_the_job_with_its_fds(work: Path) -> None:
    target = work / "t"
    (target / "inside").mkdir(parents=True)
    pid = prespawn("confine_jobs:whoami")
    assert prespawn("confine_jobs:whoami") == pid  # one waiting child per job
    ok = _whoami(target)
    assert ok["pid"] == pid  # the waiting child did it, not a new one
    assert ok["input"] == "through the handed-over fd"
    if os.geteuid() == 0:
        assert ok["chrooted"] is True
        assert ok["root"] == ["inside"]  # the target fd came across: it is the child's "/"
    # taken: the next run spawns its own child
    assert _whoami(target)["pid"] != pid
    assert children() == []


@needs_root
def test_a_prespawned_child_gets_the_read_only_lowers(work: Path) -> None:
    target = work / "t"
    target.mkdir()
    low = work / "l1"
    low.mkdir()
    (low / "f").write_text("lower 0")
    prespawn("confine_jobs:lower_probe")
    ok = run_job("confine_jobs:lower_probe", target, {}, on_death=_no_death, lowers=[low])
    assert [lw["f"] for lw in ok["lowers"]] == ["lower 0"]
    assert set(ok["lowers"][0]["refused"].values()) == {"EROFS"}
    assert children() == []


def test_errors_come_back_from_a_prespawned_child(work: Path) -> None:
    (work / "t").mkdir()
    prespawn("confine_jobs:fail")
    with pytest.raises(NoSpace, match="full: 0 left"):
        run_job("confine_jobs:fail", work / "t", {"class": "NoSpace", "message": "full: 0 left"},
                on_death=_no_death)
    prespawn("confine_jobs")  # a module without the function: refused after the hand-over
    with pytest.raises(InvalidArgument, match="not a confined job"):
        run_job("confine_jobs", work / "t", {}, on_death=_no_death)
    prespawn("no_such_module_here:job")  # its import fails while it waits: answered later
    with pytest.raises(GraphDriverError, match="No module named 'no_such_module_here'"):
        run_job("no_such_module_here:job", work / "t", {}, on_death=_no_death)
    assert children() == []


def test_an_unused_prespawned_child_is_stopped_and_reaped(work: Path) -> None:
    (work / "t").mkdir()
    pid = prespawn("confine_jobs:whoami")
    assert children() == [pid]
    discard_prespawned()
    assert is_gone(pid) and children() == []
    assert os.listdir(work / "t") == []
    discard_prespawned()  # nothing waiting: nothing to do


def test_a_prespawned_child_that_died_is_replaced(work: Path) -> None:
    target = work / "t"
    target.mkdir()
    pid = prespawn("confine_jobs:whoami")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not is_gone(pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ok = _whoami(target)
    assert ok["pid"] != pid and ok["input"] == "through the handed-over fd"
    assert children() == []


def _signal_mask(pid: int, field: str, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(line for line in f if line.startswith(f"{field}:")).split()[1]
    return bool(int(mask, 16) & (1 << (sig - 1)))


def _wait_until_waiting(pid: int) -> None:
    """Until the child has its waiting handlers: SIGTERM caught (held), SIGINT ignored."""
    deadline = time.monotonic() + 60
    while not (_signal_mask(pid, "SigCgt", signal.SIGTERM)
               and _signal_mask(pid, "SigIgn", signal.SIGINT)):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_sigterm_to_a_waiting_child_stops_the_job_before_it_starts(work: Path) -> None:
    target = work / "t"
    target.mkdir()
    pid = prespawn("confine_jobs:whoami")
    _wait_until_waiting(pid)
    os.kill(pid, signal.SIGTERM)
    with pytest.raises(Interrupted, match="before the confine_jobs:whoami job started"):
        _whoami(target)
    assert os.listdir(target) == []
    assert children() == []


def test_a_sigint_to_a_waiting_child_is_the_parents_to_act_on(work: Path) -> None:
    """The terminal's SIGINT reaches the whole process group: while the child waits, what it
    means is the parent's business (it forwards a SIGTERM once the job runs)."""
    target = work / "t"
    target.mkdir()
    pid = prespawn("confine_jobs:whoami")
    _wait_until_waiting(pid)
    os.kill(pid, signal.SIGINT)
    ok = _whoami(target)
    assert ok["pid"] == pid and ok["input"] == "through the handed-over fd"
    assert children() == []


def test_more_fds_than_one_message_holds_go_to_a_new_child(work: Path) -> None:
    target = work / "t"
    target.mkdir()
    lowers = [work / f"l{i}" for i in range(260)]
    for low in lowers:
        low.mkdir()
    pid = prespawn("confine_jobs:whoami")
    ok = _whoami(target, lowers=lowers)
    assert ok["pid"] != pid and ok["input"] == "through the handed-over fd"
    assert is_gone(pid) and children() == []


# ---- what the child inherits; a child started first thing in an operation (start_child) ------


@pytest.mark.parametrize("ahead", [False, True], ids=["spawned", "started-ahead"])
def test_the_child_holds_only_the_fds_it_was_handed(work: Path, ahead: bool) -> None:
    """An fd this process left inheritable does not reach the child (it would be a way out of
    its chroot): the child closes what it inherited beyond its own, as close_fds would."""
    target = work / "t"
    target.mkdir()
    low = os.open(work, os.O_RDONLY | os.O_DIRECTORY)  # below the handed fds' numbers
    os.set_inheritable(low, True)
    high = os.dup2(low, 1000)  # above them; dup2 makes it inheritable
    try:
        child = start_child("confine_jobs:open_fds") if ahead else None
        ok = run_job("confine_jobs:open_fds", target, {}, on_death=_no_death, child=child)
        if child is not None:
            child.discard()  # it answered: reaped by its owner
    finally:
        os.close(low)
        os.close(high)
    names = ok["names"]
    assert str(work) not in names.values()  # the stray directory did not come across
    assert names[str(ok["handed"][0])] == str(target)  # the handed target did
    assert children() == []


@pytest.mark.parametrize("ahead", [False, True], ids=["spawned", "started-ahead"])
def test_the_child_grows_its_descriptor_table_before_its_threads(work: Path, ahead: bool) -> None:
    """Linux grows a descriptor table on demand, and in a process with threads each growth waits
    for an RCU grace period (10-20 ms here) while the apply's threads wait for the one that
    opened the 65th or 129th file: the child grows its table before it has any thread."""
    import resource

    target = work / "t"
    target.mkdir()
    child = start_child("confine_jobs:fd_table") if ahead else None
    ok = run_job("confine_jobs:fd_table", target, {}, on_death=_no_death, child=child)
    if child is not None:
        child.discard()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert ok["fd_size"] >= min(1024, soft)
    assert children() == []


def test_a_child_started_ahead_and_not_taken_is_stopped_and_reaped(work: Path) -> None:
    child = start_child("confine_jobs:whoami")
    assert children() == [child.pid]
    child.discard()
    assert is_gone(child.pid) and children() == []
    child.discard()  # once is enough


def test_start_child_takes_the_commands_waiting_child(work: Path) -> None:
    target = work / "t"
    target.mkdir()
    pid = prespawn("confine_jobs:whoami")
    child = start_child("confine_jobs:whoami")
    assert child.pid == pid
    assert _whoami(target, child=child)["pid"] == pid
    child.discard()  # it answered and exits by itself: its owner reaps it
    assert children() == []


def test_children_started_ahead_from_threads_each_run_their_own_job(work: Path) -> None:
    """Several threads, each with its own child (the store's applies from a library user's
    threads): every job is done by the child its thread started, and every child is reaped."""
    import threading

    results: dict[int, tuple[int, dict[str, object]]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            target = work / f"t{i}"
            target.mkdir()
            child = start_child("confine_jobs:whoami")
            results[i] = (child.pid, _whoami(target, child=child))
            child.discard()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(ok["pid"] == pid and ok["input"] == "through the handed-over fd"
               for pid, ok in results.values())
    assert len({pid for pid, _ in results.values()}) == 4
    assert children() == []


def test_a_child_that_answered_is_left_for_its_owner_to_reap(work: Path) -> None:
    """Given its child, run_job returns once the child answered: the child's exit overlaps the
    caller's commit, and the caller reaps it (Prespawned.discard) before it returns."""
    target = work / "t"
    target.mkdir()
    child = start_child("confine_jobs:whoami")
    assert _whoami(target, child=child)["pid"] == child.pid
    assert child.exiting and child.proc.returncode is None  # not reaped by run_job
    child.discard()
    assert child.proc.returncode == 0 and not child.exiting
    assert children() == []
    with pytest.raises(NoSpace):  # a failed job: run_job waits for the child itself
        child = start_child("confine_jobs:fail")
        run_job("confine_jobs:fail", target, {"class": "NoSpace", "message": "full"},
                on_death=_no_death, child=child)
    assert not child.exiting and child.proc.returncode is not None
    assert children() == []
