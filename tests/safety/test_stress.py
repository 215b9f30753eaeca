"""Many processes, one store (DESIGN.md rule 3): 8 processes of mixed operations for N seconds.

At the end: no error other than the races the protocol allows (InUse, NotFound, AlreadyExists),
mount counts equal the mounts the workers still hold (and real mounts, on overlay), every
layer's parent exists, every layer is complete and its content is right (applied bases equal GNU
tar's extraction of their tar, children equal their parent on vfs), and nothing outside the
store changed.  ``GRAPHDRIVER_STRESS_SECONDS`` (default 15) sets the duration.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.mountutil import mount_points_under
from tests.safety.safetyutil import (
    Canary,
    Layout,
    cli_env,
    cli_ok,
    gnu_extract,
    iterations,
    make_layer_tar,
    tree,
)
from tests.treeutil import diff_snapshots

WORKERS = 8
WORKER = Path(__file__).with_name("stress_worker.py")


@pytest.mark.slow
def test_eight_processes_mixed_operations(driver_name: str, tmp_path: Path,
                                          canary: Canary) -> None:
    seconds = iterations("GRAPHDRIVER_STRESS_SECONDS", 15)
    root, run = tmp_path / "store", tmp_path / "run"
    layout = Layout(root, driver_name)
    tars = [tmp_path / f"t{k}.tar" for k in range(3)]
    refs = []
    for k, tar in enumerate(tars):
        make_layer_tar(tar, seed=100 + k, megabytes=1, files=30, prefix=f"t{k}")
        gnu_extract(tar, tmp_path / f"ref{k}")
        refs.append(tree(tmp_path / f"ref{k}"))
    cli_ok(root, run, driver_name, "cleanup")  # create the store once, before the race
    outs = [tmp_path / f"w{w}.json" for w in range(WORKERS)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), driver_name, str(root), str(run),
                               str(w), str(seconds), "1", str(outs[w]), *map(str, tars)],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for w in range(WORKERS)]
    try:
        logs = [p.communicate(timeout=seconds + 300)[0].decode(errors="replace") for p in procs]
        for w, p in enumerate(procs):
            assert p.returncode == 0, f"worker {w} failed:\n{logs[w]}"
        reports = [json.loads(o.read_text()) for o in outs]
        ops: Counter[str] = Counter()
        races: Counter[str] = Counter()
        unexpected: list[str] = []
        applied: dict[str, int] = {}
        held: Counter[str] = Counter()
        for r in reports:
            ops.update(r["ops"])
            races.update(r["expected"])
            unexpected += r["unexpected"]
            applied.update(r["applied"])
            held.update(r["held"])
        print(f"\nstress [{driver_name}] {WORKERS} processes x {seconds}s: ops {dict(ops)}; "
              f"allowed races {dict(races)}; unexpected {len(unexpected)}")
        assert not unexpected, "unexpected errors:\n" + "\n".join(unexpected[:10])
        assert sum(ops.values()) > WORKERS * 5, f"too few operations ran: {dict(ops)}"
        assert ops["base"] > 0 and ops["mount"] > 0 and ops["remove"] > 0

        listing = {e["id"]: e for e in json.loads(cli_ok(root, run, driver_name, "--json", "ls"))}
        problems = layout.problems(list(listing))
        assert not problems, "; ".join(problems)
        # Counts equal the mounts still held by the (now exited) workers.
        counts = {i: e["mounts"] for i, e in listing.items() if e["mounts"]}
        assert counts == {k: v for k, v in held.items() if v}, (counts, dict(held))
        if driver_name == "overlay":
            mounted = {Path(mp).parent.name for mp in mount_points_under(layout.home)
                       if Path(mp).name == "merged"}
            # A layer without a parent "mounts" as its diff directory (moby's overlay2).
            with_parent = {i for i in counts if listing[i]["parent"]}
            assert with_parent <= mounted <= set(counts), (sorted(mounted), sorted(counts))
        contents: dict[str, dict[str, Any]] = {}
        for lid in sorted(listing, key=lambda i: i.startswith("c-")):
            parent = listing[lid]["parent"]
            got = tree(layout.layer_tree(lid))
            if lid.startswith("b-"):
                assert parent is None
                want = refs[applied[lid]] if lid in applied else {}
            else:
                assert parent in listing, f"{lid}: parent {parent} does not exist"
                want = contents[parent] if driver_name == "vfs" else {}
            assert not diff_snapshots(want, got), f"{lid}: " + "; ".join(
                diff_snapshots(want, got)[:5])
            contents[lid] = got
        canary.check()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run([sys.executable, "-m", "graphdriver", "--root", str(root), "--runroot",
                        str(run), "--driver", driver_name, "cleanup"], env=cli_env(),
                       capture_output=True, check=False)
