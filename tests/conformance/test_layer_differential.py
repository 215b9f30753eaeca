"""A differential tester of the layer changeset rules (image-spec layer.md, issue 15).

A small reference model of layer.md (``Model``: a dict path -> ``Node``) applies random
multi-layer sequences (2-4 layers, every entry kind, nested paths, both orders of entry and
whiteout, duplicates, directories listed again, symlinks as parents, hard links to lower files,
opaque markers at the root and deep, the layer root's own entry) and says what the merged tree
must be; the same tars go through vfs and overlay, and each mounted tree is compared with the
model and with the other driver's.  Each layer's ``diff`` applied again on its parent must give
the same tree, and both drivers' ``changes`` must agree.  Seeded (``GRAPHDRIVER_DIFF_SEED``) and
bounded (``GRAPHDRIVER_DIFF_CASES`` sequences, at most ~30 s).

Where the model decides what layer.md leaves open, it says so (and the rule it follows):

- A whiteout hides only what lies below (spec); a directory this layer needs beneath a path it
  whited out stays, its metadata then not the model's to say (``loose``): moby and
  containers-storage make it anew or keep the lower one depending on the order of the entries.
- A path beneath a symlink is refused (the brief's rule; GNU tar would follow the symlink on disk
  and moby's overlay2 would shadow it with a directory: both make a layer mean something
  different on each driver).
- A parent that is not a directory is refused (GNU tar: "Not a directory"; apply.py's rule).
- A missing parent is made 0755 root:root (moby's rule); its times are the apply's.
- A hard link to a missing path, to itself or to a directory is refused (moby's link(2) fails).
- A whiteout or opaque marker with nothing to hide leaves no trace: nothing is created for it
  (moby makes the parents of every entry, whiteouts included; rule 4 of the issue says no trace).
"""

from __future__ import annotations

import io
import itertools
import os
import random
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from graphdriver.errors import GraphDriverError
from tests.conftest import IS_ROOT, open_or_skip
from tests.mountutil import detach_mounts_under
from tests.treeutil import TarBuilder

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the conformance suite runs as root")

SEED = int(os.environ.get("GRAPHDRIVER_DIFF_SEED", "1515"))
CASES = int(os.environ.get("GRAPHDRIVER_DIFF_CASES", "24"))
BUDGET_S = float(os.environ.get("GRAPHDRIVER_DIFF_SECONDS", "30"))
T0 = 1_600_000_000

# a small universe of names, so entries of different layers collide often
PATHS = ["a", "b", "c", "a/x", "a/y", "b/x", "a/x/p", "a/x/q", "b/x/p"]
SYMLINK_TARGETS = ["b", "a/x", "nowhere", "/b", "../c"]


class Refused(Exception):
    """The model's verdict: an apply must refuse this layer."""


class Unsettled(Exception):
    """The model does not decide this case (the sequence is not used)."""


@dataclass
class Node:
    kind: str  # "d", "f", "l"
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    data: bytes = b""  # file content or symlink target
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime: int | None = None  # seconds; None: the apply's time (not compared)
    ino: int = 0  # hard-link group of a file
    loose: bool = False  # mode, owner and xattrs not the model's to say


@dataclass
class Entry:
    op: str  # dir file symlink hardlink whiteout opaque root
    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    xattrs: dict[str, str] = field(default_factory=dict)
    mtime: int = T0

    def add_to(self, tb: TarBuilder) -> None:
        kw: dict[str, Any] = {"uid": self.uid, "gid": self.gid, "mtime": self.mtime}
        if self.xattrs:
            kw["pax_headers"] = {f"SCHILY.xattr.{k}": v for k, v in self.xattrs.items()}
        if self.op == "dir":
            tb.dir(self.path, mode=self.mode, **kw)
        elif self.op == "root":
            tb.dir("./", mode=self.mode, **kw)
        elif self.op == "file":
            tb.file(self.path, self.data, mode=self.mode, **kw)
        elif self.op == "symlink":
            tb.symlink(self.path, self.target, uid=self.uid, gid=self.gid, mtime=self.mtime)
        elif self.op == "hardlink":
            tb.hardlink(self.path, self.target)
        elif self.op == "whiteout":
            tb.whiteout(self.path)
        else:
            tb.opaque(self.path)

    def __str__(self) -> str:
        extra = f" -> {self.target}" if self.target else ""
        return f"{self.op} {self.path}{extra}"


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _under(path: str, top: str) -> bool:
    return top == "." or path == top or path.startswith(top + "/")


class Model:
    """layer.md applied to a dict: path -> Node (``"."`` is the root)."""

    def __init__(self) -> None:
        self.tree: dict[str, Node] = {".": Node("d", mtime=None, loose=True)}
        self._inos = itertools.count(1)

    def copy(self) -> Model:
        m = Model()
        m.tree = {k: replace(v) for k, v in self.tree.items()}
        m._inos = self._inos
        return m

    def apply(self, entries: list[Entry]) -> None:
        own: set[str] = set()  # paths this layer wrote or needs

        def needed(p: str) -> bool:
            return any(o == p or o.startswith(p + "/") for o in own)

        def drop(p: str) -> None:
            for q in [q for q in self.tree if q == p or q.startswith(p + "/")]:
                del self.tree[q]

        def hide_lower(top: str, strict_below: bool) -> None:
            for q in sorted(self.tree, reverse=True):
                if q == "." or not _under(q, top) or (strict_below and q == top):
                    continue
                if q in own:
                    continue
                if needed(q):
                    self.tree[q].loose = True
                    self.tree[q].mtime = None
                    continue
                del self.tree[q]

        def check_parents(path: str, create: bool) -> bool:
            """Whether every parent is a directory (missing ones made when ``create``; a
            whiteout, ``create=False``, beneath a missing path or a file hides nothing)."""
            for p in _parents(path):
                n = self.tree.get(p)
                if n is not None and n.kind == "l":
                    raise Refused(f"{path}: parent {p} is a symlink")
                if not create and (n is None or n.kind != "d"):
                    return False
                if n is None:
                    self.tree[p] = Node("d", 0o755, 0, 0, mtime=None)
                    own.add(p)
                elif n.kind != "d":
                    raise Refused(f"{path}: parent {p} is not a directory")
            return True

        for e in entries:
            xattrs = tuple(sorted((f"{k}", v.encode()) for k, v in e.xattrs.items()))
            if e.op == "root":
                self.tree["."] = replace(self.tree["."], mode=e.mode, uid=e.uid, gid=e.gid,
                                         xattrs=xattrs, mtime=e.mtime, loose=False)
                continue
            if e.op == "whiteout":
                if not check_parents(e.path, create=False):
                    continue
                if e.path in self.tree:
                    hide_lower(e.path, strict_below=False)
                continue
            if e.op == "opaque":
                if e.path != "." and not check_parents(e.path, create=False):
                    continue
                n = self.tree.get(e.path)
                if n is not None and n.kind == "l":
                    raise Refused(f"opaque marker under symlink {e.path}")
                if n is None or n.kind != "d":
                    continue
                hide_lower(e.path, strict_below=True)
                continue
            check_parents(e.path, create=True)
            old = self.tree.get(e.path)
            if e.op == "hardlink":
                if e.target == e.path:
                    raise Refused(f"hard link {e.path} names itself")
                for p in _parents(e.target):
                    n = self.tree.get(p)
                    if n is not None and n.kind == "l":
                        raise Refused(f"hard link target {e.target} beneath a symlink")
                t = self.tree.get(e.target)
                if t is None or t.kind == "d":
                    raise Refused(f"hard link {e.path} -> {e.target}: no file there")
                if t.kind != "f":
                    raise Unsettled("a hard link to a symlink")
                if _under(e.target, e.path):
                    raise Unsettled("a hard link over its own target's parent")
                new = replace(t)
            elif e.op == "dir":
                new = Node("d", e.mode, e.uid, e.gid, xattrs=xattrs, mtime=e.mtime)
            elif e.op == "file":
                new = Node("f", e.mode, e.uid, e.gid, e.data, xattrs, e.mtime, next(self._inos))
            else:
                new = Node("l", 0o777, e.uid, e.gid, e.target.encode(), (), e.mtime)
            if old is not None and not (old.kind == "d" and new.kind == "d"):
                drop(e.path)
            self.tree[e.path] = new
            own.add(e.path)


# ---- random layers ----------------------------------------------------------------------------


def _random_entry(rng: random.Random, depth_ok: bool) -> Entry:
    path = rng.choice(PATHS if depth_ok else PATHS[:3])
    op = rng.choices(["dir", "file", "symlink", "hardlink", "whiteout", "opaque", "root"],
                     weights=[6, 7, 1, 2, 4, 2, 1])[0]
    xattrs = {"user.k": rng.choice(["1", "2"])} if rng.random() < 0.3 else {}
    if op == "dir":
        return Entry("dir", path, rng.choice([0o755, 0o750, 0o700]), rng.choice([0, 3]),
                     rng.choice([0, 4]), xattrs=xattrs, mtime=T0 + rng.randrange(100))
    if op == "file":
        return Entry("file", path, rng.choice([0o644, 0o600, 0o755]), rng.choice([0, 3]),
                     rng.choice([0, 4]), data=rng.choice([b"", b"one", b"two", b"x" * 600]),
                     xattrs=xattrs, mtime=T0 + rng.randrange(100))
    if op == "symlink":
        return Entry("symlink", path, target=rng.choice(SYMLINK_TARGETS),
                     mtime=T0 + rng.randrange(100))
    if op == "hardlink":
        return Entry("hardlink", path, target=rng.choice(PATHS))
    if op == "opaque":
        return Entry("opaque", rng.choice([".", "a", "b", "a/x"]))
    if op == "root":
        return Entry("root", ".", rng.choice([0o755, 0o711]), rng.choice([0, 5]),
                     rng.choice([0, 6]), xattrs=xattrs, mtime=T0 + rng.randrange(100))
    return Entry("whiteout", path)


def _random_sequence(rng: random.Random) -> list[list[Entry]]:
    layers = []
    for i in range(rng.randint(2, 4)):
        n = rng.randint(1, 7)
        layers.append([_random_entry(rng, depth_ok=True) for _ in range(n)])
        if i == 0 and rng.random() < 0.7:  # a base with some depth to hide and link to
            layers[0][:0] = [Entry("dir", "a", 0o750, 1, 2, mtime=T0),
                             Entry("dir", "a/x", 0o700, 0, 0, xattrs={"user.b": "0"},
                                   mtime=T0 + 1),
                             Entry("file", "a/x/p", data=b"base p", mtime=T0 + 2),
                             Entry("file", "b", data=b"base b", mtime=T0 + 3)]
    return layers


def _tar(entries: list[Entry]) -> bytes:
    tb = TarBuilder()
    for e in entries:
        e.add_to(tb)
    return tb.bytes()


# ---- what a driver shows ----------------------------------------------------------------------


def observe(root: Path) -> dict[str, tuple[Any, ...]]:
    """path -> (kind, data, mode, uid, gid, xattrs, mtime seconds, inode) of a mounted tree."""
    out: dict[str, tuple[Any, ...]] = {}

    def one(full: str, rel: str) -> None:
        try:
            st = os.lstat(full)
        except FileNotFoundError:  # readdir lists it, lstat cannot find it: an overlay phantom
            out[rel] = ("phantom", b"", 0, 0, 0, (), 0, (0, 0))
            return
        if stat.S_ISDIR(st.st_mode):
            kind, data = "d", b""
        elif stat.S_ISREG(st.st_mode):
            kind = "f"
            with open(full, "rb") as f:
                data = f.read()
        elif stat.S_ISLNK(st.st_mode):
            kind, data = "l", os.readlink(full).encode()
        else:
            kind, data = f"?{st.st_mode:o}:{st.st_rdev}", b""
        names = sorted(n for n in os.listxattr(full, follow_symlinks=False)
                       if not n.startswith("security."))
        xattrs = tuple((n, os.getxattr(full, n, follow_symlinks=False)) for n in names)
        out[rel] = (kind, data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs,
                    st.st_mtime_ns // 10**9, (st.st_dev, st.st_ino))

    one(str(root), ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            one(full, os.path.relpath(full, root))
    return out


def _groups(seen: dict[str, tuple[Any, ...]]) -> set[frozenset[str]]:
    by_ino: dict[Any, set[str]] = {}
    for p, v in seen.items():
        if v[0] == "f":
            by_ino.setdefault(v[7], set()).add(p)
    return {frozenset(g) for g in by_ino.values() if len(g) > 1}


def compare_with_model(model: Model, seen: dict[str, tuple[Any, ...]]) -> list[str]:
    out = []
    for p in sorted(set(model.tree) | set(seen)):
        n, s = model.tree.get(p), seen.get(p)
        if n is None or s is None:
            out.append(f"{p}: model {n and n.kind} driver {s and s[0]}")
            continue
        if n.kind != s[0] or (n.kind != "d" and n.data != s[1]):
            out.append(f"{p}: model {n.kind} {n.data[:20]!r} driver {s[0]} {s[1][:20]!r}")
            continue
        if n.loose:
            continue
        want = (n.mode, n.uid, n.gid, n.xattrs)
        if want != s[2:6]:
            out.append(f"{p}: model mode/uid/gid/xattrs {want} driver {s[2:6]}")
        if n.mtime is not None and n.mtime != s[6]:
            out.append(f"{p}: model mtime {n.mtime} driver {s[6]}")
    groups: dict[int, set[str]] = {}
    for p, n in model.tree.items():
        if n.kind == "f":
            groups.setdefault(n.ino, set()).add(p)
    want_groups = {frozenset(g) for g in groups.values() if len(g) > 1}
    if want_groups != _groups(seen):
        out.append(f"hard-link groups: model {sorted(map(sorted, want_groups))} driver "
                   f"{sorted(map(sorted, _groups(seen)))}")
    return out


def compare_drivers(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]],
                    model: Model) -> list[str]:
    """vfs against overlay: everything but times the model leaves to the apply."""
    out = []
    for p in sorted(set(a) | set(b)):
        if p not in a or p not in b:
            out.append(f"{p}: only on {'vfs' if p in a else 'overlay'}")
            continue
        n = model.tree.get(p)
        cut = 6 if n is None or n.mtime is None else 7
        if a[p][:cut] != b[p][:cut]:
            out.append(f"{p}: vfs {a[p][:cut]} overlay {b[p][:cut]}")
    return out


# ---- the test ---------------------------------------------------------------------------------


@pytest.fixture
def two_drivers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    opened: dict[str, Any] = {}
    try:
        for name in ("vfs", "overlay"):
            root = tmp_path / name
            (root / "run").mkdir(parents=True)
            opened[name] = open_or_skip(name, root / "store", root / "run")
        yield opened
    finally:
        for name, d in opened.items():
            d.cleanup()
            detach_mounts_under(tmp_path / name)


def _run_sequence(drivers: dict[str, Any], tag: str, layers: list[list[Entry]]) -> list[str]:
    """Apply one sequence on both drivers; the disagreements found (empty when none)."""
    states: list[Model] = []  # the model after each layer, up to the first one it refuses
    refused_at: int | None = None
    model = Model()
    for i, entries in enumerate(layers):
        nxt = model.copy()
        try:
            nxt.apply(entries)
        except Refused:
            refused_at = i
            break
        states.append(nxt)
        model = nxt
    problems: list[str] = []
    parent: str | None = None
    for i, entries in enumerate(layers[:len(states) + (refused_at is not None)]):
        lid = f"{tag}-{i}"
        refused = i == refused_at
        want = model if refused else states[i]
        data = _tar(entries)
        seen: dict[str, dict[str, tuple[Any, ...]]] = {}
        for name, d in drivers.items():
            d.create(lid, parent)
            try:
                d.apply_diff(lid, None, io.BytesIO(data))
                accepted = True
            except GraphDriverError as exc:
                accepted = False
                why = str(exc)
            if accepted == refused:
                problems.append(f"layer {i} on {name}: "
                                + ("accepted what the model refuses" if accepted
                                   else f"refused ({why})"))
            with d.mounted(lid) as root:
                seen[name] = observe(root)
            problems += [f"layer {i} on {name}: {p}"
                         for p in compare_with_model(want, seen[name])]
            if accepted and not refused:
                problems += [f"layer {i} on {name}: {p}"
                             for p in _diff_round_trip(d, lid, parent, seen[name], want)]
        problems += [f"layer {i}: {p}" for p in compare_drivers(seen["vfs"], seen["overlay"],
                                                                 want)]
        if not refused:
            try:
                cv, co = (sorted((c.path, int(c.kind)) for c in drivers[n].changes(lid))
                          for n in ("vfs", "overlay"))
            except GraphDriverError as exc:
                problems.append(f"layer {i}: changes fail: {exc}")
                cv = co = []
            if cv != co:
                problems.append(f"layer {i}: changes vfs {cv} overlay {co}")
        if refused:
            break
        parent = lid
    return problems


def _diff_round_trip(d: Any, lid: str, parent: str | None,
                     seen: dict[str, tuple[Any, ...]], want: Model) -> list[str]:
    copy = f"{lid}-copy"
    try:
        with d.diff(lid) as s:
            data = s.read()
    except GraphDriverError as exc:
        return [f"diff fails: {exc}"]
    d.create(copy, parent)
    try:
        d.apply_diff(copy, None, io.BytesIO(data))
    except GraphDriverError as exc:
        return [f"its diff does not apply again: {exc}"]
    with d.mounted(copy) as root:
        again = observe(root)
    out = []
    for p in sorted(set(seen) | set(again)):
        a, b = seen.get(p), again.get(p)
        n = want.tree.get(p)
        cut = 6 if n is None or n.mtime is None else 7
        if a is None or b is None or a[:cut] != b[:cut]:
            out.append(f"diff -> apply: {p}: {a and a[:cut]} then {b and b[:cut]}")
    if _groups(seen) != _groups(again):
        out.append(f"diff -> apply: hard-link groups {_groups(seen)} then {_groups(again)}")
    return out


def test_random_layer_sequences_match_the_model(two_drivers: dict[str, Any]) -> None:
    rng = random.Random(SEED)
    deadline = time.monotonic() + BUDGET_S
    failures: list[str] = []
    ran = 0
    for case in range(CASES * 4):
        if ran >= CASES or time.monotonic() > deadline:
            break
        layers = _random_sequence(rng)
        try:
            m = Model()
            for entries in layers:
                m.apply(entries)
        except Refused:
            pass
        except Unsettled:
            continue
        ran += 1
        problems = _run_sequence(two_drivers, f"s{case}", layers)
        if problems:
            listing = "\n".join(f"  layer {i}: " + "; ".join(map(str, es))
                                for i, es in enumerate(layers))
            failures.append(f"case {case} (seed {SEED}):\n{listing}\n    "
                            + "\n    ".join(problems[:8]))
    assert ran > 0
    assert not failures, f"{len(failures)} of {ran} sequences disagree:\n" + "\n".join(
        failures[:int(os.environ.get("GRAPHDRIVER_DIFF_SHOW", "6"))])
