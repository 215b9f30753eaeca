"""One process of the stress test (test_stress.py): random operations against a shared store.

Usage: stress_worker.py DRIVER ROOT RUNROOT WORKER SECONDS SEED OUT.json TAR...

Runs create / apply / create-child / mount / unmount / remove / reopen at random for SECONDS,
counting the races the protocol allows (InUse, NotFound, AlreadyExists) and recording anything
else as unexpected.  Writes what it did to OUT.json: which base layers it applied with which tar,
and the mounts it still holds (so the parent can check the store's counts against them).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import traceback
from collections import Counter
from typing import Any

from graphdriver import AlreadyExists, GraphDriverError, InUse, NotFound, open_driver

EXPECTED = (InUse, NotFound, AlreadyExists)


def main(argv: list[str]) -> int:
    driver, root, runroot, worker, seconds, seed, out = argv[:7]
    tars = argv[7:]
    logging.basicConfig(level=logging.ERROR)
    rng = random.Random(int(seed) * 1000 + int(worker))
    d: Any = open_driver(driver, root, runroot=runroot)
    deadline = time.monotonic() + float(seconds)
    ops: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    unexpected: list[str] = []
    applied: dict[str, int] = {}
    held: Counter[str] = Counter()
    n = 0
    while time.monotonic() < deadline:
        n += 1
        op = rng.choice(["base", "base", "child", "mount", "mount", "unmount", "unmount",
                         "remove", "reopen"])
        try:
            if op == "base":
                lid = f"b-{worker}-{n}"
                d.create(lid)
                k = n % len(tars)
                with open(tars[k], "rb") as f:
                    d.apply_diff(lid, None, f)
                applied[lid] = k
            elif op == "child":
                bases = [i for i in d.layers() if i.startswith("b-")]
                if bases:
                    d.create(f"c-{worker}-{n}", rng.choice(bases))
            elif op == "mount":
                layers = d.layers()
                if layers:
                    lid = rng.choice(layers)
                    d.get(lid)
                    held[lid] += 1
            elif op == "unmount":
                mine = sorted(k for k, v in held.items() if v > 0)
                if mine:
                    lid = rng.choice(mine)
                    d.put(lid)
                    held[lid] -= 1
            elif op == "remove":
                layers = d.layers()
                if layers:
                    d.remove(rng.choice(layers))
            else:
                d = open_driver(driver, root, runroot=runroot)
            ops[op] += 1
        except EXPECTED as exc:
            ops[op] += 1
            expected[f"{op}:{type(exc).__name__}"] += 1
        except GraphDriverError as exc:
            unexpected.append(f"{op}: {type(exc).__name__}: {exc}")
        except Exception:
            unexpected.append(f"{op}: {traceback.format_exc()}")
    with open(out, "w") as f:
        json.dump({"ops": ops, "expected": expected, "unexpected": unexpected,
                   "applied": applied, "held": {k: v for k, v in held.items() if v > 0}}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
