"""Kill harness: SIGKILL the real command at random instants, reopen, check DESIGN.md rule 1.

Every iteration runs one command (create, apply of a multi-MB tar, mount, unmount, rm) against
a store of its own, kills it after a random (seeded) delay, waits until every process it started
is gone, reopens the store (every few iterations with the command's ``ls``, else with
``open_driver``, the same repair) and checks:

- every listed layer is complete: its directories exist, its parent is listed, no incomplete
  marker, no ``-removing`` leftovers, no directories without a record;
- the operated layer is in one of the states the operation allows (absent / before / after), and
  every other layer's content and mount count is what the model says;
- mount counts match real mounts (overlay), and nothing outside the store changed.

``GRAPHDRIVER_KILL_ITERATIONS`` (default 40 per driver) sets the count;
``GRAPHDRIVER_KILL_SEED`` the seed.  SIGINT and SIGTERM mid-apply are tested separately: the
command rolls back and exits 130.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from graphdriver import open_driver
from tests.mountutil import mount_points_under
from tests.safety.safetyutil import (
    Canary,
    FedApply,
    Layout,
    assert_one_line_error,
    cli,
    cli_ok,
    file_digest,
    gnu_extract,
    group_members,
    iterations,
    kill_group,
    make_layer_tar,
    popen,
    tree,
    wait_group_gone,
)
from tests.treeutil import TarBuilder, diff_snapshots

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, overlay)")]

EMPTY: dict[str, Any] = {}
MAX_LAYERS = 9


def _listing(root: Path, run: Path, driver: str, via_cli: bool) -> dict[str, tuple[Any, int]]:
    """Reopen the store (repair runs) and list it: id -> (parent, mount count)."""
    if via_cli:
        out = cli_ok(root, run, driver, "--json", "ls")
        return {e["id"]: (e["parent"], e["mounts"]) for e in json.loads(out)}
    d = open_driver(driver, root, runroot=run)
    return {i: (d.parent(i), d.mount_count(i)) for i in d.layers()}


class Harness:
    def __init__(self, tmp: Path, driver: str, canary: Canary) -> None:
        self.tmp = tmp
        self.driver = driver
        self.root = tmp / "store"
        self.run = tmp / "run"
        self.root.mkdir()
        self.run.mkdir()
        self.canary = canary
        self.layout = Layout(self.root, driver)
        self.expect: dict[str, dict[str, Any]] = {}
        self.parents: dict[str, str | None] = {}
        self.counts: dict[str, int] = {}
        self.outcomes: Counter[str] = Counter()
        self.scale: dict[str, float] = {}
        self.tar1 = tmp / "layer1.tar"
        self.tar2 = tmp / "layer2.tar"

    # -- reference data ---------------------------------------------------------------------

    def prepare(self) -> None:
        make_layer_tar(self.tar1, seed=1, megabytes=12, files=400)
        # tar2 goes on top of tar1: deletes, an opaque directory, changes, new files.
        b = TarBuilder()
        b.whiteout("d2")
        b.whiteout("d1/s0")
        b.opaque("d3")
        b.file("d3/new-in-opaque", b"opaque\n")
        b.file("d4/s1/changed.bin", os.urandom(1 << 20))
        for i in range(40):
            b.file(f"n{i % 4}/g{i}.bin", random.Random(i).randbytes(50_000 * (i % 5)))
        b.write(self.tar2)
        self.digests = {p: file_digest(p) for p in (self.tar1, self.tar2)}
        ref = self.tmp / "gnu-ref"
        gnu_extract(self.tar1, ref)
        gnu_ref = tree(ref)
        # Calibration: uninterrupted runs give the timings and the expected trees.
        t0 = time.monotonic()
        cli_ok(self.root, self.run, self.driver, "cleanup")
        self.t_start = time.monotonic() - t0
        t0 = time.monotonic()
        cli_ok(self.root, self.run, self.driver, "create", "cal1")
        self.t_create = time.monotonic() - t0
        t0 = time.monotonic()
        cli_ok(self.root, self.run, self.driver, "apply", "cal1", str(self.tar1))
        self.t_apply = time.monotonic() - t0
        self.ref1 = tree(self.layout.layer_tree("cal1"))
        assert not diff_snapshots(gnu_ref, self.ref1), "apply differs from GNU tar: " + "; ".join(
            diff_snapshots(gnu_ref, self.ref1)[:5])
        cli_ok(self.root, self.run, self.driver, "create", "cal2", "--parent", "cal1")
        t0 = time.monotonic()
        cli_ok(self.root, self.run, self.driver, "create", "cal3", "--parent", "cal2")
        self.t_create_child = time.monotonic() - t0
        cli_ok(self.root, self.run, self.driver, "rm", "cal3")
        self.child_of_ref1 = tree(self.layout.layer_tree("cal2"))
        cli_ok(self.root, self.run, self.driver, "apply", "cal2", str(self.tar2))
        self.ref12 = tree(self.layout.layer_tree("cal2"))
        t0 = time.monotonic()
        cli_ok(self.root, self.run, self.driver, "mount", "cal2")
        self.t_mount = time.monotonic() - t0
        t0 = time.monotonic()
        cli_ok(self.root, self.run, self.driver, "unmount", "cal2")
        self.t_unmount = time.monotonic() - t0
        for layer_id, parent, exp in (("cal1", None, self.ref1), ("cal2", "cal1", self.ref12)):
            self.expect[layer_id] = exp
            self.parents[layer_id] = parent
            self.counts[layer_id] = 0

    def created_content(self, parent: str | None) -> dict[str, Any]:
        if parent is None or self.driver != "vfs":
            return EMPTY
        return self.expect[parent]

    # -- one killed command -----------------------------------------------------------------

    def kill_during(self, rng: random.Random, args: list[str], duration: float) -> str:
        """Run the command, SIGKILL it after a random delay; return how it ended.

        The delay is drawn over the command's calibrated duration, scaled by a factor that
        adapts (shrinks when commands finish first, grows when kills land before any work),
        so kills keep landing inside the operation however loaded the machine is.
        """
        key = args[0] + ("-child" if "--parent" in args else "")
        scale = self.scale.get(key, 1.0)
        duration *= scale
        if rng.random() < 0.1:
            delay = rng.uniform(0, duration)
        else:
            delay = rng.uniform(self.t_start * 0.7, duration * 1.1)
        proc = popen(self.root, self.run, self.driver, *args)
        try:
            try:
                proc.wait(timeout=delay)
                ended = "finished"
            except Exception:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                ended = "killed"
            survivors = wait_group_gone(proc.pid)
            assert not survivors, f"processes of the killed command live on: {survivors}"
        finally:
            kill_group(proc.pid)
            assert proc.stdout is not None and proc.stderr is not None
            err = proc.stderr.read().decode(errors="replace")
            proc.stdout.close()
            proc.stderr.close()
        self.scale[key] = scale * (0.85 if ended == "finished" else 1.03)
        if ended == "finished" and proc.returncode != 0:
            raise AssertionError(f"{args}: failed without being killed: {err}")
        if ended == "finished":
            assert "Traceback" not in err, err
        elif "Traceback" in err:
            # The confined apply child outliving a SIGKILLed parent complained on the shared
            # stderr once (see test_killed_apply_child_is_quiet); counted, not fatal here.
            self.outcomes["stderr-traceback-after-kill"] += 1
        return ended

    # -- the loop ---------------------------------------------------------------------------

    def leaves(self) -> list[str]:
        parents = set(self.parents.values())
        return [i for i in self.expect if i not in parents]

    def step(self, i: int, rng: random.Random) -> None:
        ops = ["create", "apply", "apply", "mount", "unmount", "rm"]
        if len(self.expect) >= MAX_LAYERS:
            ops = ["rm", "rm", "apply", "mount", "unmount"]
        op = rng.choice(ops)
        mounted = [k for k, v in self.counts.items() if v > 0]
        if op == "unmount" and not mounted:
            op = "mount"
        if op == "mount" and not self.expect:  # every layer was removed: nothing to mount
            op = "create"
        checks: dict[str, dict[str, tuple[dict[str, Any], int] | None]] = {}
        if op == "create":
            layer_id = f"c{i}"
            parent = rng.choice([None, *sorted(self.expect)])
            args = ["create", layer_id] + (["--parent", parent] if parent else [])
            how = self.kill_during(rng, args, self.t_create_child if parent else self.t_create)
            checks[layer_id] = {"absent": None, "after": (self.created_content(parent), 0)}
            self.parents[layer_id] = parent
        elif op == "apply":
            layer_id = f"a{i}"
            on_ref1 = [k for k, v in self.expect.items() if v is self.ref1]
            parent = rng.choice(on_ref1) if on_ref1 and rng.random() < 0.4 else None
            d = open_driver(self.driver, self.root, runroot=self.run)
            d.create(layer_id, parent)
            before = tree(self.layout.layer_tree(layer_id))
            assert not diff_snapshots(before, self.created_content(parent))
            after = self.ref12 if parent else self.ref1
            tar = self.tar2 if parent else self.tar1
            how = self.kill_during(rng, ["apply", layer_id, str(tar)], self.t_apply)
            # The layer was committed (created) before: an interrupted apply rolls it back to
            # how it was, it never deletes it.
            checks[layer_id] = {"before": (before, 0), "after": (after, 0)}
            self.parents[layer_id] = parent
        elif op == "mount":
            layer_id = rng.choice(sorted(self.expect))
            old = self.counts[layer_id]
            how = self.kill_during(rng, ["mount", layer_id], self.t_mount)
            checks[layer_id] = {"before": (self.expect[layer_id], old),
                               "after": (self.expect[layer_id], old + 1)}
        elif op == "unmount":
            layer_id = rng.choice(sorted(mounted))
            old = self.counts[layer_id]
            how = self.kill_during(rng, ["unmount", layer_id], self.t_unmount)
            checks[layer_id] = {"before": (self.expect[layer_id], old),
                               "after": (self.expect[layer_id], old - 1)}
        else:
            leaves = [k for k in self.leaves() if self.counts[k] == 0]
            if not leaves:
                return
            layer_id = rng.choice(sorted(leaves))
            how = self.kill_during(rng, ["rm", layer_id], self.t_create)
            checks[layer_id] = {"after": None, "before": (self.expect[layer_id], 0)}
        self.verify(i, rng, op, layer_id, how, checks[layer_id])

    def verify(self, i: int, rng: random.Random, op: str, layer_id: str, how: str,
               allowed: dict[str, tuple[dict[str, Any], int] | None]) -> None:
        listing = _listing(self.root, self.run, self.driver, via_cli=i % 4 == 0)
        where = f"iteration {i} ({op} {layer_id}, {how})"
        problems = self.layout.problems(list(listing))
        assert not problems, f"{where}: " + "; ".join(problems)
        for lid, (parent, _count) in listing.items():
            assert parent is None or parent in listing, f"{where}: {lid}'s parent {parent} gone"
            assert lid == layer_id or lid in self.expect, f"{where}: unknown layer {lid}"
            assert parent == self.parents.get(lid), f"{where}: {lid} has parent {parent}"
        # The operated layer: one of the allowed states.
        if layer_id in listing:
            got = (tree(self.layout.layer_tree(layer_id)), listing[layer_id][1])
            label = next((name for name, a in allowed.items() if a is not None
                          and a[1] == got[1] and not diff_snapshots(a[0], got[0])), None)
            if label is None:
                why = [f"vs {name} (count {a[1]}): " + "; ".join(diff_snapshots(a[0], got[0])[:3])
                       for name, a in allowed.items() if a is not None]
                raise AssertionError(f"{where}: state not allowed (count {got[1]}): "
                                     + " | ".join(why))
            self.outcomes[f"{op}:{label}"] += 1
            state = allowed[label]
            assert state is not None
            self.expect[layer_id], self.counts[layer_id] = state
        else:
            gone = next((name for name, a in allowed.items() if a is None), None)
            assert gone is not None, f"{where}: layer {layer_id} vanished"
            self.outcomes[f"{op}:{gone}"] += 1
            self.expect.pop(layer_id, None)
            self.parents.pop(layer_id, None)
            self.counts.pop(layer_id, None)
        # Everything else unchanged (contents checked every few iterations: they are big).
        assert set(listing) == set(self.expect), f"{where}: {sorted(listing)} != model"
        for lid, (_parent, count) in listing.items():
            assert count == self.counts[lid], f"{where}: {lid} count {count} != {self.counts[lid]}"
        if i % 5 == 0:
            self.check_all(where)
        if self.driver == "overlay":
            self.check_overlay_mounts(where)

    def check_all(self, where: str) -> None:
        for lid, exp in self.expect.items():
            got = tree(self.layout.layer_tree(lid))
            assert not diff_snapshots(exp, got), f"{where}: layer {lid} content: " + "; ".join(
                diff_snapshots(exp, got)[:4])
        self.canary.check()
        for path, digest in self.digests.items():
            assert file_digest(path) == digest, f"{where}: input {path} changed"

    def check_overlay_mounts(self, where: str) -> None:
        mounted = {Path(mp).parent.name for mp in mount_points_under(self.layout.home)
                   if Path(mp).name == "merged"}
        counted = {k for k, v in self.counts.items() if v > 0}
        # A layer without a parent "mounts" as its diff directory (moby's overlay2).
        must = {k for k in counted if self.parents.get(k)}
        assert must <= mounted <= counted, f"{where}: mounted {sorted(mounted)}, counted {counted}"


def test_sigkill_at_random_points(driver_name: str, tmp_path: Path, canary: Canary,
                                  caplog: pytest.LogCaptureFixture) -> None:
    n = iterations("GRAPHDRIVER_KILL_ITERATIONS", 40)
    seed = iterations("GRAPHDRIVER_KILL_SEED", 4)
    rng = random.Random(seed)
    # repairs are expected here (the level is put back after the test, for the tests after it)
    caplog.set_level(logging.ERROR, logger="graphdriver")
    h = Harness(tmp_path, driver_name, canary)
    h.prepare()
    try:
        for i in range(n):
            h.step(i, rng)
        h.check_all("at the end")
        # A final unkilled command sees the same store.
        final = _listing(h.root, h.run, driver_name, via_cli=True)
        assert set(final) == set(h.expect)
    finally:
        cli(h.root, h.run, driver_name, "cleanup")
    print(f"\nkill harness [{driver_name}] seed={seed} iterations={n}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(h.outcomes.items())))
    interrupted = h.outcomes["apply:before"]
    applies = sum(v for k, v in h.outcomes.items() if k.startswith("apply:"))
    if applies >= 10:
        assert interrupted > 0, f"no kill landed before an apply's end in {applies}: {h.outcomes}"


def _store_with_base(tmp_path: Path, driver_name: str) -> tuple[Path, Path, Layout, Path]:
    """A store (root, run root, layout) holding layer "base" applied, and a 24 MB layer tar for
    applies that get interrupted."""
    root, run = tmp_path / "store", tmp_path / "run"
    base_tar, big_tar = tmp_path / "base.tar", tmp_path / "big.tar"
    make_layer_tar(base_tar, seed=7, megabytes=2, files=50)
    make_layer_tar(big_tar, seed=8, megabytes=24, files=300)
    cli_ok(root, run, driver_name, "create", "base")
    cli_ok(root, run, driver_name, "apply", "base", str(base_tar))
    return root, run, Layout(root, driver_name), big_tar


# --- SIGINT / SIGTERM: roll back and exit 130 -------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_apply_rolls_back(driver_name: str, tmp_path: Path, canary: Canary,
                                     sig: signal.Signals) -> None:
    root, run, layout, big_tar = _store_with_base(tmp_path, driver_name)
    rolled_back = 0
    rng = random.Random(sig)
    runs = iterations("GRAPHDRIVER_SIGNAL_ITERATIONS", 5)
    for k in range(runs):
        lid = f"top{k}"
        cli_ok(root, run, driver_name, "create", lid, "--parent", "base")
        before = tree(layout.layer_tree(lid))
        marker = layout.meta / lid / "incomplete"
        proc = FedApply(root, run, driver_name, lid, big_tar, seconds=2.0)
        try:
            deadline = time.monotonic() + 60
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=60)
        finally:
            kill_group(proc.pid)
        assert not wait_group_gone(proc.pid), "the apply's processes outlived it"
        text = err.decode(errors="replace")
        assert "Traceback" not in text, text
        listing = _listing(root, run, driver_name, via_cli=False)
        assert lid in listing, (f"{sig.name}: layer {lid} is gone after an interrupted apply "
                                f"(exit {proc.returncode}: {text.strip()})")
        assert not marker.exists()
        assert not layout.problems(list(listing)), layout.problems(list(listing))
        after = tree(layout.layer_tree(lid))
        if proc.returncode == 0:
            continue  # the signal came after the commit
        assert proc.returncode == 130, f"{sig.name}: exit {proc.returncode}: {text}"
        assert len(text.strip().splitlines()) == 1, text
        left = diff_snapshots(before, after)
        assert not left, f"{sig.name}: not rolled back: " + "; ".join(left[:3])
        rolled_back += 1
        cli_ok(root, run, driver_name, "rm", lid)
    canary.check()
    print(f"\n{sig.name} [{driver_name}]: {rolled_back} of {runs} applies interrupted and "
          f"rolled back, the rest had finished")
    assert rolled_back >= (runs + 1) // 2, f"{sig.name}: only {rolled_back} of {runs} landed"



def test_killed_apply_child_is_quiet(tmp_path: Path) -> None:
    root, run = tmp_path / "store", tmp_path / "run"
    big = tmp_path / "big.tar"
    make_layer_tar(big, seed=9, megabytes=24, files=200)
    cli_ok(root, run, "vfs", "create", "x")
    marker = Layout(root, "vfs").meta / "x" / "incomplete"
    proc = popen(root, run, "vfs", "apply", "x", str(big))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
        assert not wait_group_gone(proc.pid), "the apply child outlived its killed parent"
    finally:
        kill_group(proc.pid)
    assert "Traceback" not in err.decode(errors="replace"), err.decode(errors="replace")


def _count(path: Path) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(path))


def _apply_child(pgid: int, parent: int) -> int | None:
    """The confined apply child of the command (its job, ``graphdriver.archive.isolate:...``, is
    on its command line)."""
    for pid in group_members(pgid):
        if pid == parent:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"graphdriver.archive.isolate" in cmdline:
            return pid
    return None


def test_apply_child_killed_leaves_no_half_layer(driver_name: str, tmp_path: Path,
                                                 canary: Canary) -> None:
    """The OOM killer (or anyone) SIGKILLs the confined child mid-apply: the command fails with
    one line, and the layer is absent or as before — never half applied and called complete."""
    root, run, layout, big_tar = _store_with_base(tmp_path, driver_name)
    killed = 0
    rng = random.Random(11)
    for k in range(3):
        lid = f"top{k}"
        cli_ok(root, run, driver_name, "create", lid, "--parent", "base")
        before = tree(layout.layer_tree(lid))
        marker = layout.meta / lid / "incomplete"
        proc = FedApply(root, run, driver_name, lid, big_tar, seconds=2.0)
        try:
            child = None
            deadline = time.monotonic() + 60
            while child is None and proc.poll() is None and time.monotonic() < deadline:
                child = _apply_child(proc.pid, proc.pid) if marker.exists() else None
                time.sleep(0.002)
            # Kill it once it has written something (the tree has grown), a little later.
            while (proc.poll() is None and time.monotonic() < deadline
                   and _count(layout.layer_tree(lid)) <= len(before)):
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.2))
            if child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            _out, err = proc.communicate(timeout=60)
        finally:
            kill_group(proc.pid)
        text = err.decode(errors="replace")
        listing = _listing(root, run, driver_name, via_cli=True)
        assert not layout.problems(list(listing)), layout.problems(list(listing))
        if proc.returncode == 0:
            continue  # the child had finished
        killed += 1
        line = assert_one_line_error(text, "apply child killed")
        state = "kept" if lid in listing else "absent"
        print(f"\nchild killed [{driver_name}]: {line}; layer {state}")
        if lid in listing:
            after = tree(layout.layer_tree(lid))
            assert not diff_snapshots(before, after), (
                f"layer {lid} is listed as complete but half applied: "
                + "; ".join(diff_snapshots(before, after)[:4]))
            cli_ok(root, run, driver_name, "rm", lid)
    canary.check()
    assert killed > 0, "the child was never killed mid-apply"
