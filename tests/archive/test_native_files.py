"""The native loop for runs of plain files (_fastapply.files, TarReader.apply_files) against the
pure-Python apply: the same tree, the same size and diffID, and the same recorder frames byte for
byte (the confined apply's PipeRecorder stream, from which tar-split metadata is written)."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tarbuild import build, header, member, pad, pax_member  # type: ignore[import-not-found]
from tarbuild import end as tarbuild_end  # type: ignore[import-not-found]
from tests.treeutil import diff_snapshots, snapshot

from graphdriver.archive import tarstream as ts
from graphdriver.archive.apply import ApplyOptions, apply_reader
from graphdriver.archive.recframes import PipeRecorder
from graphdriver.errors import GraphDriverError

native = pytest.importorskip("graphdriver._fastapply", reason="native extension not compiled")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the native file loop is for root"),
    pytest.mark.skipif(ts._fastapply is None, reason="GRAPHDRIVER_NO_NATIVE is set"),
]


NATIVE_FILES: list[int] = []


def _counting_files(*args: Any) -> Any:
    result = native.files(*args)
    NATIVE_FILES.append(result[1])
    return result


def _apply(data: bytes, target: Path, tmp: Path, use_native: bool, record: bool,
           monkeypatch: pytest.MonkeyPatch, **opts: Any) -> tuple[Any, bytes]:
    monkeypatch.setattr(ts, "_native_files", _counting_files if use_native else None)
    target.mkdir()
    frames_path = tmp / f"frames-{use_native}"
    fd = os.open(frames_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    rec = PipeRecorder(fd) if record else None
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        reader = ts.TarReader(io.BytesIO(data), rec)
        try:
            result: Any = apply_reader(reader, root, ApplyOptions(recorder=rec, **opts))
        except GraphDriverError as exc:
            result = ("error", type(exc).__name__, str(exc))
    finally:
        os.close(root)
        if rec is not None:
            rec.close()
        else:
            os.close(fd)
    return result, frames_path.read_bytes()


def _same(data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          record: bool = True, **opts: Any) -> Any:
    py_result, py_frames = _apply(data, tmp_path / "py", tmp_path, False, record, monkeypatch,
                                  **opts)
    nat_result, nat_frames = _apply(data, tmp_path / "nat", tmp_path, True, record, monkeypatch,
                                    **opts)
    assert nat_result == py_result
    assert nat_frames == py_frames
    # whiteouts (0/0 devices) get the time of the apply that made them
    assert diff_snapshots(snapshot(tmp_path / "py", dir_mtimes=True, whiteout_mtimes=False),
                          snapshot(tmp_path / "nat", dir_mtimes=True, whiteout_mtimes=False)) == []
    return nat_result


def _prefixed(name: str, data: bytes = b"", **kw: Any) -> bytes:
    """A member whose name is split into ustar's prefix (155) and name (100) fields."""
    cut = name.rindex("/", 0, 156)
    kw.setdefault("size", len(data))
    fields = {(345, 500): name[:cut].encode()}
    return header(name[cut + 1 :], fields=fields, **kw) + pad(data)


def _files_tar(seed: int, count: int = 300) -> bytes:
    """Directories, then runs of files among them (sizes around block edges, odd modes,
    set-id bits, other owners), a symlink and a hard link now and then, ustar prefix names."""
    rng = random.Random(seed)
    parts = [member("a/", type=b"5", mode=0o755), member("a/b/", type=b"5", mode=0o2775, gid=7),
             member("c/", type=b"5", mode=0o700, uid=5)]
    deep = "p" * 90 + "/" + "q" * 60
    parts += [member("c/" + "p" * 90 + "/", type=b"5"),
              _prefixed("c/" + deep + "/", type=b"5", size=0)]
    dirs = ["a", "a/b", "c", "c/" + "p" * 90, "c/" + deep, ""]
    for i in range(count):
        d = rng.choice(dirs)
        name = (d + "/" if d else "") + f"f{i}-" + "x" * rng.choice((1, 20, 80))
        size = rng.choice((0, 1, 511, 512, 513, 4096, 70_000, 300_000))
        mode = rng.choice((0o644, 0o755, 0o4755, 0o2711, 0o600, 0o777))
        make = _prefixed if len(name) > 100 else member
        parts.append(make(name, rng.randbytes(size), mode=mode, uid=rng.choice((0, 0, 1000)),
                          gid=rng.choice((0, 0, 50)), mtime=1_600_000_000 + i))
        roll = rng.random()
        if roll > 0.85:  # GNU tar's posix format: a PAX header with times before every entry
            frac = rng.choice(("", ".5", ".123456789", ".000000001"))
            records = [("atime", f"{1_700_000_000 + i}{frac}"), ("ctime", "1700000001.25"),
                       ("mtime", f"{1_600_000_000 + i}{frac}")]
            if roll > 0.95:
                records.append(("uid", "4242"))
                records.append(("gname", "staff"))
            if roll > 0.97:
                records.append(("SCHILY.xattr.user.note", "kept"))  # the Python way
            parts.insert(len(parts) - 1, pax_member(records))
        if len(name) > 90:
            continue
        if roll < 0.05:
            parts.append(member(f"{name}.lnk", type=b"2", linkname=name.rsplit("/", 1)[-1]))
        elif roll < 0.08:
            parts.append(member(f"{name}.hard", type=b"1", linkname=name))
        elif roll < 0.10:
            parts.append(pax_member([("path", name + ".pax"), ("mtime", "1600000000.5")]))
            parts.append(member("ignored", b"pax data"))
    return build(*parts)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_runs_of_files_match_the_python_apply(seed: int, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = _files_tar(seed)
    NATIVE_FILES.clear()
    result = _same(data, tmp_path, monkeypatch)
    assert sum(NATIVE_FILES) > 200  # most files went through the native loop
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()


def test_without_a_recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _same(_files_tar(9, 100), tmp_path, monkeypatch, record=False)


def test_a_file_in_the_way_and_duplicates_go_the_python_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = build(
        member("d/", type=b"5"),
        member("d/f", b"one"),
        member("d/g", b"two"),
        member("d/f", b"one again, longer"),  # the same name: EEXIST, Python replaces it
        member("d/sub", b"a file"),
        member("d/sub/", type=b"5"),  # a directory over the file
        member("d/sub/x", b"inside"),
        member("d/.wh.g"),  # a whiteout in the middle of a run
        member("d/h", b"after"),
        member("./d/i", b"dot-slash name"),
        member("d//j", b"double slash: normalized by Python"),
    )
    _same(data, tmp_path, monkeypatch)
    assert (tmp_path / "nat/d/f").read_bytes() == b"one again, longer"
    assert (tmp_path / "nat/d/sub/x").read_bytes() == b"inside"


def test_truncated_data_and_bad_checksum_fail_the_same_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = build(member("d/", type=b"5"), *(member(f"d/f{i}", b"z" * 700) for i in range(5)))
    (tmp_path / "t").mkdir()
    result = _same(good[: 512 * 8 + 100], tmp_path / "t", monkeypatch)
    assert result[0] == "error"
    broken = bytearray(build(member("d/", type=b"5"), member("d/a", b"1"), member("d/b", b"2")))
    broken[3 * 512 + 100] ^= 0x01  # the third header's mode field: its checksum no longer holds
    (tmp_path / "b").mkdir()
    result = _same(bytes(broken), tmp_path / "b", monkeypatch)
    assert result[0] == "error"


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_gnu_tar_of_a_real_tree(fmt: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    rng = random.Random(5)
    for d in range(8):
        sub = src / f"dir{d}" / "inner"
        sub.mkdir(parents=True)
        (sub / ".hidden").mkdir()
        for i in range(40):
            p = (sub if i % 2 else sub.parent) / f"file{i}"
            p.write_bytes(rng.randbytes(rng.choice((0, 100, 10_000))))
            os.chmod(p, rng.choice((0o644, 0o755, 0o600)))
            if i % 7 == 0:
                (sub / ".hidden" / f"ln{i}").symlink_to(f"../file{i}")
            if i % 9 == 0:
                os.link(p, sub / ".hidden" / f"hard{i}")
        os.chmod(sub, 0o2750)
        os.utime(sub, ns=(1_000_000_123, 2_000_000_456))
    out = tmp_path / "layer.tar"
    xattrs = ["--xattrs"] if fmt == "posix" else []  # GNU tar writes them in PAX only
    subprocess.run(["tar", "--numeric-owner", *xattrs, f"--format={fmt}", "-C", src, "-cf",
                    out, "."], check=True)
    (tmp_path / "w").mkdir()
    NATIVE_FILES.clear()
    result = _same(out.read_bytes(), tmp_path / "w", monkeypatch)
    assert sum(NATIVE_FILES) > 8 * 45  # files, directories, symlinks and links
    assert result.size == sum(p.stat().st_size for p in src.rglob("*")
                              if p.is_file() and not p.is_symlink() and "hard" not in p.name)


def _kinds_tar(seed: int) -> bytes:
    """Directories (more than the applier caches, nested, set-id and sticky bits, other owners,
    old-style and PAX-timed ones), symlinks (long PAX targets among them), hard links (to files
    of this layer, to themselves, to nothing, to a name in a directory long evicted), dot names
    inside directories, and entries the native loop leaves to Python: a directory that exists, a
    symlink over a file, whiteouts, AUFS metadata."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    dirs = [""]
    files: list[str] = []
    for i in range(700):
        roll = rng.random()
        parent = rng.choice(dirs[-40:] if rng.random() < 0.9 else dirs)
        pre = parent + "/" if parent else ""
        mtime = 1_500_000_000 + i
        if roll < 0.35:
            name = pre + (f".d{i}" if parent and rng.random() < 0.1 else f"d{i}")
            mode = rng.choice((0o755, 0o700, 0o2775, 0o1777, 0o750, 0o4711))
            owner = {"uid": rng.choice((0, 33)), "gid": rng.choice((0, 7))}
            if rng.random() < 0.1:
                parts.append(pax_member([("mtime", f"{mtime}.25"), ("atime", f"{mtime + 9}.5")]))
            kind = b"\0" if rng.random() < 0.05 else b"5"
            parts.append(member(name + "/", type=kind, mode=mode, mtime=mtime, **owner))
            dirs.append(name)
        elif roll < 0.65:
            name = pre + (f".f{i}" if parent and rng.random() < 0.2 else f"f{i}")
            parts.append(member(name, rng.randbytes(rng.choice((0, 10, 600))), mtime=mtime,
                                mode=rng.choice((0o644, 0o4755)), gid=rng.choice((0, 5))))
            files.append(name)
        elif roll < 0.8:
            name = pre + f"s{i}"
            if rng.random() < 0.2:
                parts.append(pax_member([("linkpath", "t/" * 80 + "x"), ("atime", "1.0")]))
            parts.append(member(name, type=b"2", linkname=rng.choice(("../x", "f1", "/etc")),
                                mtime=mtime, uid=rng.choice((0, 1000))))
        elif roll < 0.9 and files:
            target = rng.choice(files if rng.random() < 0.9 else files[:3])
            parts.append(member(pre + f"h{i}", type=b"1", linkname="./" + target))
            files.append(pre + f"h{i}")
        elif roll < 0.93 and files:
            parts.append(member(rng.choice(files), type=b"2", linkname="over a file"))
        elif roll < 0.95 and len(dirs) > 1:
            parts.append(member(rng.choice(dirs[1:]) + "/", type=b"5", mode=0o711, mtime=7))
        elif roll < 0.97:
            parts.append(member(pre + f".wh.nothing{i}"))
        else:
            parts.append(member(f".wh..wh.plnk/{i}", b"aufs"))
    return build(*parts)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_directories_symlinks_and_links_match_the_python_apply(
        seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _kinds_tar(seed)
    NATIVE_FILES.clear()
    result = _same(data, tmp_path, monkeypatch)
    assert sum(NATIVE_FILES) > 500  # directories, symlinks and links went native too
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()


def test_an_overlay_layer_over_lower_layers(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Over known lower layers (overlay's apply): a hard link to a lower file is copied up, a
    directory the layer does not list is copied up, whiteouts hide lower names -- the Python
    way -- between runs of new directories, symlinks and links, which go native."""
    from graphdriver.archive.whiteout import OVERLAY

    lower = tmp_path / "lower"
    (lower / "ldir" / "deep").mkdir(parents=True)
    os.chmod(lower / "ldir", 0o750)
    (lower / "ldir" / "x").write_bytes(b"lower x")
    (lower / "lfile").write_bytes(b"lower file")
    (lower / "lsym").symlink_to("ldir")
    parts = [member("d/", type=b"5", mode=0o2755, gid=3), member("d/f", b"upper"),
             member("d/l", type=b"1", linkname="lfile"),  # a lower file: copied up first
             member("d/s", type=b"2", linkname="../ldir"),
             member("ldir/new/", type=b"5"),  # beneath a directory only the lower has
             member("ldir/new/f", b"1"), member("ldir/.wh.x"), member("ldir/deep/", type=b"5"),
             member("e/", type=b"5"), member("e/g", type=b"1", linkname="d/f"),
             member(".wh.lsym"), member("lfile2", type=b"1", linkname="ldir/x")]
    parts += [member(f"e/n{i}/", type=b"5", mtime=2_000 + i) for i in range(30)]
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    try:
        NATIVE_FILES.clear()
        result = _same(build(*parts), tmp_path, monkeypatch, whiteout_format=OVERLAY,
                       lower_fds=[fd])
    finally:
        os.close(fd)
    assert result.size > 0
    assert sum(NATIVE_FILES) > 30
    assert (tmp_path / "nat/d/l").read_bytes() == b"lower file"
    assert os.stat(tmp_path / "nat/d/l").st_nlink == 2


def test_more_directories_than_the_cache_holds(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    parts = []
    for i in range(40):
        parts.append(member(f"top{i}/", type=b"5", mode=0o2755, gid=9))
        for j in range(20):
            parts.append(member(f"top{i}/sub{j}/", type=b"5", mtime=1_000 + j))
            parts.append(member(f"top{i}/sub{j}/f", b"x" * j))
        parts.append(member(f"top{i}/sub0/late", b"after 20 others"))
    parts.append(member("top0/sub0/g", type=b"1", linkname="top0/sub0/f"))
    NATIVE_FILES.clear()
    result = _same(build(*parts), tmp_path, monkeypatch)
    assert result.size == 40 * (sum(range(20)) + 15)
    assert sum(NATIVE_FILES) > 1500


def test_a_bad_hard_link_fails_the_same_way(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for what, link in (("self", "d/l"), ("missing", "d/none"), ("a directory", "d"),
                       ("outside", "../x")):
        data = build(member("d/", type=b"5"), member("d/f", b"1"),
                     member("d/l", type=b"1", linkname=link))
        (tmp_path / what).mkdir()
        result = _same(data, tmp_path / what, monkeypatch)
        assert result[0] == "error", what


def test_set_dir_times_leaves_what_it_cannot_do_to_python(tmp_path: Path) -> None:
    root = tmp_path / "layer"
    (root / "a" / "b").mkdir(parents=True)
    (root / "file").write_bytes(b"")
    (root / "link").symlink_to("a")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rest = native.set_dir_times(fd, [("a/b", 5, 6_000_000_001), ("gone", 1, 2),
                                         ("link/b", 3, 4), ("file", 3, 4), ("a", -1, 7)])
    finally:
        os.close(fd)
    assert rest == [2, 3]
    assert (root / "a" / "b").stat().st_mtime_ns == 6_000_000_001
    assert (root / "a" / "b").stat().st_atime_ns == 5
    assert (root / "a").stat().st_mtime_ns == 7
    assert (root / "file").stat().st_mtime_ns != 4


def test_verify_files_agrees_with_the_python_check(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from graphdriver.archive import tarsplit

    root = tmp_path / "layer"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "a").write_bytes(b"12345")
    (root / "d" / "e" / "b").write_bytes(b"")
    (root / "top").write_bytes(b"xy")
    os.link(root / "top", root / "d" / "hard")
    (root / "link").symlink_to("d")
    os.mkfifo(root / "fifo")
    good = [(b"d/a", 5), (b"d/e/b", 0), (b"/top", 2)]
    cases = {
        "good": (good, -1),
        "wrong size": ([*good, (b"d/e/b", 3)], 3),
        "missing": ([(b"d/nope", 1), *good], 0),
        "symlink on the way": ([*good[:1], (b"link/a", 5)], 1),
        "a fifo": ([(b"fifo", 0)], 0),
        "the same inode twice": ([(b"top", 2), (b"d/hard", 2)], 1),
        "a dot name": ([(b"d/.", 0)], 0),
    }
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for what, (files, index) in cases.items():
            records = b"".join(struct.pack("<QI", size, len(name)) + name for name, size in files)
            assert native.verify_files(fd, records, set()) == index, what
            monkeypatch.setenv("GRAPHDRIVER_NO_NATIVE", "1")
            slow = tarsplit._verify_files(fd, files)
            monkeypatch.delenv("GRAPHDRIVER_NO_NATIVE")
            assert tarsplit._verify_files(fd, files) == slow, what
            assert (slow is None) == (index == -1), what
    finally:
        os.close(fd)


def test_verify_files_in_threads_answers_as_one_pass(tmp_path: Path) -> None:
    """Records enough for the check to cut them into runs that its threads take in turn: the
    first record that is not right is the answer wherever it falls, and two records at one
    inode are found when they sit in different runs (the second one's index)."""
    root = tmp_path / "layer"
    names = [f"d{i // 100:02d}/f{i:04d}".encode() for i in range(4000)]
    for i in range(40):
        (root / f"d{i:02d}").mkdir(parents=True)
    for n in names:
        (root / n.decode()).write_bytes(b"abc")

    def records(files: list[tuple[bytes, int]]) -> bytes:
        return b"".join(struct.pack("<QI", size, len(name)) + name for name, size in files)

    good = [(n, 3) for n in names]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert native.verify_files(fd, records(good), set()) == -1
        for bad in sorted({0, 3999, *range(1, 4000, 197), *range(799, 4000, 800),
                           *range(800, 4000, 800), *range(801, 4000, 800)}):
            for why, wrong in (("size", (names[bad], 4)), ("missing", (b"d00/nope", 3)),
                               ("dir", (b"d01", 3))):
                files = [*good[:bad], wrong, *good[bad + 1:]]
                assert native.verify_files(fd, records(files), set()) == bad, (bad, why)
        # the last name becomes a hard link to the first: two runs, one inode
        os.unlink(root / names[-1].decode())
        os.link(root / names[0].decode(), root / names[-1].decode())
        linked: set[int] = set()
        assert native.verify_files(fd, records(good), linked) == len(names) - 1
        # a wrong size before the second name of the inode is found first
        files = [*good[:10], (names[10], 9), *good[11:]]
        assert native.verify_files(fd, records(files), set()) == 10
        # an inode met in an earlier call (chunk) counts too
        linked = set()
        assert native.verify_files(fd, records(good[:1]), linked) == -1
        assert native.verify_files(fd, records(good[1:]), linked) == len(names) - 2
    finally:
        os.close(fd)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 5000, 131072])
def test_first_duplicate_sorts_and_finds_one(n: int) -> None:
    """The duplicate rule's sort (a radix sort from 256 values on, through a scratch copy):
    the hashes come out in order, and a value there twice is found wherever it is."""
    import array

    rng = random.Random(n)
    for spread in (64, 10, 0):  # random; small values (high bytes alike); one high byte only
        values = [rng.getrandbits(spread) << (56 if spread == 0 else 0) | rng.getrandbits(8)
                  << (56 if spread == 0 else 0) for _ in range(n)]
        once = len(set(values)) == len(values)
        buf = bytearray(array.array("Q", values).tobytes())
        found = native.first_duplicate(buf)
        assert list(array.array("Q", bytes(buf))) == sorted(values)
        assert (found is None) == once and (found is None or values.count(found) > 1)
        if n and once:
            twice = [*values, values[rng.randrange(n)]]
            buf = bytearray(array.array("Q", twice).tobytes())
            assert native.first_duplicate(buf) == twice[-1]


def test_first_duplicate_runs_merges_spilled_runs(tmp_path: Path) -> None:
    """The duplicate rule over sorted runs spilled to a file and the hashes still in memory:
    a value twice is found in one run, across runs, in memory, between a run and memory; a
    file shorter than the runs' sizes is EOFError."""
    import array

    rng = random.Random(7)
    values = [rng.getrandbits(64) for _ in range(50_000)]
    cuts = [0, 9000, 30_000, 41_000]  # three runs of different sizes, the rest in memory
    runs = [sorted(values[a:b]) for a, b in itertools.pairwise(cuts)]

    def spilled(runs: list[list[int]]) -> tuple[int, list[int]]:
        path = tmp_path / "spill"
        data = [array.array("Q", r).tobytes() for r in runs]
        path.write_bytes(b"".join(data))
        return os.open(path, os.O_RDONLY), [len(d) for d in data]

    def rest(extra: list[int]) -> bytearray:
        return bytearray(array.array("Q", values[cuts[-1]:] + extra).tobytes())

    fd, sizes = spilled(runs)
    try:
        assert native.first_duplicate_runs(fd, sizes, rest([])) is None
        assert native.first_duplicate_runs(fd, [], rest([])) is None
        for twice in (values[0], values[20_000], values[-1]):  # a run's, a run's, memory's
            assert native.first_duplicate_runs(fd, sizes, rest([twice])) == twice
        with pytest.raises(EOFError):
            native.first_duplicate_runs(fd, [*sizes, 8], rest([]))
    finally:
        os.close(fd)
    for a, b in ((0, 0), (0, 2)):  # twice in one run; in two runs
        twice = runs[a][5]
        fd, sizes = spilled([sorted([*r, twice]) if i == b else r for i, r in enumerate(runs)])
        try:
            assert native.first_duplicate_runs(fd, sizes, rest([])) == twice
        finally:
            os.close(fd)


PACKED: list[int] = []


def _replay(frames: Path, use_native: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    import gzip

    from graphdriver import exactdiff
    from graphdriver.archive import tarsplit
    from graphdriver.archive.recframes import replay_recorder_stream

    def counting_pack(*args: Any) -> Any:
        result = native.pack_frames(*args)
        PACKED.append(result[0])
        return result

    monkeypatch.setattr(tarsplit, "_native_pack", counting_pack if use_native else None)
    out = frames.with_suffix(f".{use_native}.gz")
    out_fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        packer = exactdiff.new_layer_packer(out_fd)
        replay_recorder_stream(os.open(frames, os.O_RDONLY), packer)
        packer.close()
    finally:
        os.close(out_fd)
    return (gzip.decompress(out.read_bytes()), packer.files, sorted(packer._seen),
            packer.problem, packer.missing, packer.bytes_described)


@pytest.mark.parametrize("case", ["files", "odd names", "duplicates"])
def test_tar_split_lines_from_frames_match_the_python_packer(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case == "files":
        data = _files_tar(4)
    elif case == "odd names":
        data = build(*(member(n, b"data" * i) for i, n in enumerate([
            "./a/", "./a/x", "a/./y", "a//z", "a/../b", "./.hidden", "a/.bin/", "a/.bin/t",
            "n<o>&", 'q"uote', "back\\slash", "caf\xe9", b"raw\xff\xfe", "sp ace", "./", "tab\tx",
        ], start=1)))
    else:
        data = build(member("d/", type=b"5"), member("d/f", b"1"), member("d/f", b"22"),
                     member("./d/g", b""), member("d/g/", type=b"5"), member("e", b"3"))
    (tmp_path / "w").mkdir()
    _apply(data, tmp_path / "w" / "t", tmp_path / "w", True, True, monkeypatch)
    frames = tmp_path / "w" / "frames-True"
    assert frames.stat().st_size > 0
    PACKED.clear()
    assert _replay(frames, True, monkeypatch) == _replay(frames, False, monkeypatch)
    assert sum(PACKED) > 0  # the native packer took part


def _recorded_apply(data: bytes, target: Path, packer: Any, rec: Any) -> None:
    """Apply *data* onto *target* (made here) recording into *rec*, then close it (when it is
    not the *packer* itself) and the packer; the diffID is the data's, the recording whole."""
    target.mkdir()
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = apply_reader(ts.TarReader(io.BytesIO(data), rec), root,
                              ApplyOptions(recorder=rec))
        if rec is not packer:
            rec.close()
        packer.close()
    finally:
        os.close(root)
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert packer.problem is None and packer.missing == 0


# the kinds of _fastdigest's fill_frames jobs, as the first job's length bits 63-60 give them
_ADD, _END, _JOIN = 0b0100, 0b0010, 0b0001


@pytest.mark.parametrize(("seed", "later_from", "behind"),
                         [(5, 1 << 20, 1 << 30), (6, 1 << 20, 1 << 30), (7, 600, 1 << 30),
                          (8, 1 << 20, -1), (9, 600, -1)])
def test_crcs_from_the_digest_thread_give_the_same_lines(seed: int, later_from: int,
                                                         behind: int, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The confined child's recording (a threaded BufferedRecorder into the packer): the native
    runs' frames filled in by the digest thread (fill_frames: header bytes and CRCs, in frames
    the packer thread reads later; the buffer not reused before), and the CRCs of the entries
    the Python code reads from CRC_LATER_FROM bytes on (a file bigger than the buffer; with a
    small limit, every such entry) -- added up by the digest thread, or (the digest thread
    behind: _DIGEST_BEHIND -1) computed piece by piece by the reader and joined to the digest
    thread's -- give the lines of the reader's own CRCs and of the pure-Python apply, while the
    reader's buffer laps many times."""
    from graphdriver.archive.recframes import BufferedRecorder
    from graphdriver.archive.tarsplit import TarSplitPacker

    if not ts.NATIVE_CRC:
        pytest.skip("_fastdigest without anycrc's CRC: the reader computes the CRCs")
    monkeypatch.setattr(ts, "CRC_LATER_FROM", later_from)
    monkeypatch.setattr(ts, "_DIGEST_BEHIND", behind)
    monkeypatch.setattr(ts, "BUFFER_SIZE", 1 << 20)  # the readers made here: many laps
    tail = member("big", random.Random(seed).randbytes(3 * ts.BUFFER_SIZE + 5), mode=0o644)
    data = _files_tar(seed, 400)
    end = len(tarbuild_end())
    data = data[:-end] + tail + data[-end:]  # before the end-of-archive blocks
    assert len(data) > 8 * ts.BUFFER_SIZE
    deferred: list[int] = []  # the kind bits of each job list's first job
    fill_later = ts.TarReader._fill_later

    def counting(self: ts.TarReader, start: int, frames: bytearray, jobs: bytes,
                 source: Any = None) -> Any:
        deferred.append(struct.unpack_from("<QQQ", jobs)[1] >> 60)
        return fill_later(self, start, frames, jobs, source)

    monkeypatch.setattr(ts.TarReader, "_fill_later", counting)
    outputs = []
    for how in ("digest thread", "reader", "python"):
        deferred.clear()
        monkeypatch.setattr(ts, "NATIVE_CRC", how == "digest thread")
        monkeypatch.setattr(ts, "_native_files", None if how == "python" else native.files)
        out = io.BytesIO()
        packer = TarSplitPacker(out)  # type: ignore[arg-type]
        _recorded_apply(data, tmp_path / how.replace(" ", "-"), packer,
                        BufferedRecorder(packer, batch=64 << 10, threaded=True))
        assert (len(deferred) > 10) == (how == "digest thread"), how
        if deferred:  # pieces of the big file added up (or joined), and their CRC written
            assert (_ADD in deferred) == (behind > 0) and (_JOIN in deferred) == (behind < 0)
            assert _END in deferred
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("batch", [1024, 4096, 64 << 10])
def test_lent_frame_buffers_give_the_same_lines(batch: int, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The native runs write their frames into the threaded BufferedRecorder's buffers, reused
    and never resized: a run whose next entry's frames do not fit stops, the buffer is handed
    on and the run goes on in the next one (an entry that fits in no buffer -- 1.5 KiB here for
    a batch of 1 KiB -- goes the Python way); the lines are those of the packer alone, and the
    buffers made stay few."""
    from graphdriver.archive.recframes import BufferedRecorder
    from graphdriver.archive.tarsplit import TarSplitPacker

    data = _files_tar(11, 300)
    stops: list[int] = []

    def files(*args: Any) -> Any:
        r = native.files(*args)
        stops.append(r[-1])
        return r

    monkeypatch.setattr(ts, "_native_files", files)
    outputs = []
    for lent in (True, False):
        out = io.BytesIO()
        packer = TarSplitPacker(out)  # type: ignore[arg-type]
        rec: Any = BufferedRecorder(packer, batch=batch, threaded=True) if lent else packer
        _recorded_apply(data, tmp_path / str(lent), packer, rec)
        outputs.append(out.getvalue())
        if lent:
            if batch <= 4096:
                assert stops.count(-1) > 10  # runs stopped for room
            assert len(rec._free) <= 4  # buffers reused, not one per batch
    assert outputs[0] == outputs[1]
