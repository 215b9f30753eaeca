"""Issue 15 rule 8: a read-only layer applied from a tar gives its changes and diff size from its
tar-split record (archive/recorded.py), and they are what the tree walk gives.

Many random layer tars (every entry kind, whiteouts, opaque directories, implicit parents, hard
links, directories listed twice, directories deleted and re-created, entries over existing
paths with the same size and mtime) are applied over real parents; each answer from the record
is compared with the walk's answer for the same layer once its record is moved aside.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IS_ROOT
from tests.treeutil import TarBuilder

from graphdriver import open_driver
from graphdriver.errors import GraphDriverError, NotSupported

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="records are replayed for real root only")

T0 = 1_700_000_000
NAMES = ("a", "b", "c")
RECORD = "tar-split.json.gz"


def _base_tar(rng: random.Random) -> tuple[bytes, dict[str, str]]:
    """A parent tree: directories with files, symlinks, a hard link, a fifo."""
    tb = TarBuilder()
    kinds: dict[str, str] = {}
    for top in NAMES:
        tb.dir(top, mtime=T0)
        kinds[top] = "dir"
        for sub in NAMES:
            path = f"{top}/{sub}"
            roll = rng.random()
            if roll < 0.35:
                tb.dir(path, mode=rng.choice((0o755, 0o700)), mtime=T0)
                kinds[path] = "dir"
                for leaf in NAMES[: rng.randint(0, 3)]:
                    tb.file(f"{path}/{leaf}", b"lower " + leaf.encode(), mtime=T0)
                    kinds[f"{path}/{leaf}"] = "file"
            elif roll < 0.8:
                tb.file(path, b"same", mtime=T0)
                kinds[path] = "file"
            elif roll < 0.9:
                tb.symlink(path, "../elsewhere", mtime=T0)
                kinds[path] = "symlink"
            else:
                tb.tar.addfile(tb._info(path, tarfile.FIFOTYPE, 0o644, mtime=T0))
                kinds[path] = "fifo"
    files = [p for p, k in kinds.items() if k == "file"]
    if files:
        tb.hardlink("linked", rng.choice(files), mtime=T0)
    return tb.bytes(), kinds


def _top_tar(rng: random.Random, kinds: dict[str, str]) -> bytes:
    """A layer over the parent: a random sequence of every kind of entry, mostly at paths
    under the parent's directories (new names, or the parent's own)."""
    tb = TarBuilder()
    mine: list[str] = []
    used: set[str] = set()
    lower_files = [p for p, k in kinds.items() if k == "file"]
    lower_dirs = [p for p, k in kinds.items() if k == "dir"]

    def fresh(names: tuple[str, ...] = (*NAMES, "x", "y")) -> str:
        for _ in range(20):
            where = rng.choice(["", *lower_dirs])
            path = f"{where}/{rng.choice(names)}".lstrip("/")
            if path not in used and kinds.get(where, "dir") == "dir":
                used.add(path)
                return path
        return f"z{len(used)}"

    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.25:  # a file: new, or over the parent's, often alike by size and mtime
            path = fresh()
            data = rng.choice((b"same", b"diff", b"", b"longer data"))
            tb.file(path, data, mode=rng.choice((0o644, 0o644, 0o755)),
                    uid=rng.choice((0, 0, 7)), mtime=rng.choice((T0, T0, T0 + 5)))
            mine.append(path)
        elif roll < 0.37:  # a directory: the parent's (re-moded or not) or a new one
            path = fresh()
            tb.dir(path, mode=rng.choice((0o755, 0o755, 0o700)), mtime=rng.choice((T0, T0 + 9)))
            if rng.random() < 0.1:
                tb.dir(path, mode=0o711)  # listed twice
        elif roll < 0.47:
            tb.whiteout(fresh())
        elif roll < 0.55 and lower_dirs:
            d = rng.choice(lower_dirs)
            if d not in used:
                used.add(d)
                tb.dir(d, mtime=T0).opaque(d)
        elif roll < 0.61 and lower_dirs:  # deleted and re-created in the same layer
            d = rng.choice(lower_dirs)
            if d not in used:
                used.add(d)
                tb.whiteout(d).dir(d, mtime=T0).file(f"{d}/{rng.choice(NAMES)}", b"new")
        elif roll < 0.71:  # a hard link to this layer's file or the parent's
            pool = mine + lower_files
            if pool:
                tb.hardlink(fresh(("h", "k")), rng.choice(pool), mtime=T0)
        elif roll < 0.77:
            tb.symlink(fresh(), rng.choice(("../elsewhere", "t")), mtime=rng.choice((T0, T0 + 1)))
        elif roll < 0.82:  # a device or a fifo
            kind = rng.choice((tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE))
            tb.tar.addfile(tb._info(fresh(), kind, 0o600, devmajor=1, devminor=3, mtime=T0))
        elif roll < 0.88:  # a file under a directory the layer does not list
            d = rng.choice(lower_dirs) if lower_dirs and rng.random() < 0.6 else fresh(("q",))
            leaf = f"{d}/{rng.choice(NAMES)}n"
            if leaf not in used:
                used.add(leaf)
                tb.file(leaf, b"implicit", mtime=T0)
                mine.append(leaf)
        elif roll < 0.95 and lower_files:  # a parent's file rewritten: same size, same mtime
            f = rng.choice(lower_files)
            if f not in used:
                used.add(f)
                tb.file(f, b"SAME", mtime=T0)
        elif "" not in used:
            used.add("")
            tb.file(".wh..wh..opq")  # the layer root made opaque
    return tb.bytes()


def _open(name: str, root: Path) -> Any:
    try:
        return open_driver(name, root / "store", runroot=root / "run")
    except NotSupported as exc:
        pytest.skip(f"{name}: {exc}")


def _apply(d: Any, layer_id: str, parent: str | None, data: bytes) -> bool:
    d.create(layer_id, parent)
    try:
        d.apply_diff(layer_id, None, io.BytesIO(data))
    except GraphDriverError:
        d.remove(layer_id)
        return False  # an archive the apply refuses (a link to a directory, ...)
    return True


def _walked(d: Any, layer_id: str) -> tuple[list[Any], int]:
    """The walk's answers: the record moved aside, then put back."""
    meta = Path(d.meta.dir(layer_id))
    os.rename(meta / RECORD, meta / (RECORD + ".aside"))
    try:
        return d.changes(layer_id), d.diff_size(layer_id)
    finally:
        os.rename(meta / (RECORD + ".aside"), meta / RECORD)


@pytest.mark.parametrize("name", ["vfs", "overlay"])
def test_record_answers_as_the_walk(name: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = _open(name, tmp_path)
    walks: list[str] = []
    for method in ("_walk_changes", "_walk_size"):
        walk = getattr(type(d), method)

        def counted(self: Any, layer_id: str, parent: str | None, walk: Any = walk) -> Any:
            walks.append(layer_id)
            return walk(self, layer_id, parent)

        monkeypatch.setattr(type(d), method, counted)
    compared = 0
    try:
        for seed in range(60):
            rng = random.Random(seed)
            base, kinds = _base_tar(rng)
            ids = [f"b{seed}", f"m{seed}", f"t{seed}"]
            assert _apply(d, ids[0], None, base)
            parent = ids[0]
            # a middle layer, sometimes: the parent is a chain on overlay
            if rng.random() < 0.4 and _apply(d, ids[1], ids[0], _top_tar(rng, kinds)):
                parent = ids[1]
            if not _apply(d, ids[2], parent, _top_tar(rng, kinds)):
                continue
            for layer_id in {ids[0], parent, ids[2]}:
                if not (Path(d.meta.dir(layer_id)) / RECORD).exists():
                    continue
                walks.clear()
                got = (d.changes(layer_id), d.diff_size(layer_id))
                from_record = not walks
                assert got == _walked(d, layer_id), f"seed {seed}, layer {layer_id}"
                compared += from_record
    finally:
        d.cleanup()
    assert compared > 40  # answered from the record, not walked


def test_record_is_what_answers(store: Any) -> None:
    """The record answers (not a walk): a file put into the layer's directory behind the
    store's back is not seen, while the walk sees it."""
    base = TarBuilder().dir("etc").file("etc/os", b"debian", mtime=T0).bytes()
    top = (TarBuilder().file("etc/os", b"ubuntu", mtime=T0).file("etc/new", b"n")
           .bytes())
    assert _apply(store, "base", None, base)
    assert _apply(store, "top", "base", top)
    expected = ["C /etc", "A /etc/new", "C /etc/os"]
    assert [str(c) for c in store.changes("top")] == expected
    meta = store.metadata("top")
    own_dir = Path(meta.get("UpperDir") or meta["Dir"])
    (own_dir / "etc" / "stray").write_bytes(b"behind the record")
    assert [str(c) for c in store.changes("top")] == expected
    walked, _ = _walked(store, "top")
    assert "A /etc/stray" in [str(c) for c in walked]


def test_writable_and_other_parents_walk(store: Any) -> None:
    """A writable layer and a diff against another parent are walked (the record says only
    what was applied onto the layer's own parent)."""
    base = TarBuilder().dir("etc").file("etc/os", b"debian", mtime=T0).bytes()
    assert _apply(store, "base", None, base)
    assert _apply(store, "top", "base", TarBuilder().file("etc/x", b"x").bytes())
    store.create_rw("rw", "top")
    with store.mounted("rw") as root:
        (root / "etc" / "y").write_bytes(b"y")
    assert [str(c) for c in store.changes("rw")] == ["C /etc", "A /etc/y"]
    assert sorted(str(c) for c in store.changes("top", "")) == [
        "A /etc", "A /etc/os", "A /etc/x"]
    assert store.diff_size("top", "") == len(b"debian") + len(b"x")  # against no parent


def test_record_sees_a_capability_and_a_same_stat_rewrite(store: Any) -> None:
    """Alike by size, mtime, mode and owner: a capability added is a change, bytes rewritten
    are a change (compared by content), the same bytes are none; the record says so as the walk
    does."""
    cap = (b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12))
    base = (TarBuilder().dir("bin", mtime=T0).file("bin/ping", b"ping", mtime=T0)
            .file("bin/ls", b"lsls", mtime=T0).file("bin/cat", b"catt", mtime=T0).bytes())
    top = (TarBuilder().dir("bin", mtime=T0)
           .file("bin/ping", b"ping", mtime=T0, pax_headers={
               "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")})
           .file("bin/ls", b"LSLS", mtime=T0).file("bin/cat", b"catt", mtime=T0).bytes())
    assert _apply(store, "base", None, base)
    assert _apply(store, "top", "base", top)
    got = [str(c) for c in store.changes("top")]
    assert got == ["C /bin", "C /bin/ls", "C /bin/ping"]
    assert [str(c) for c in _walked(store, "top")[0]] == got
