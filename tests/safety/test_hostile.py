"""Hostile and broken archives fed to the real command: ``graphdriver apply LAYER FILE``.

Each case must give one line on stderr and a non-zero exit (or, where that is the right answer,
a correct result checked against GNU tar), leave a canary outside the store untouched, and leave
the whole store — the target layer included — exactly as it was before the apply.  Also: a
200k-entry tar bomb applied with bounded memory (the command's max RSS, children included), the
overlay-reserved content (0/0 character devices, trusted.overlay.* xattrs) refused on overlay,
and Go's archive/tar testdata corpus: each applies or fails with one clear line, never escaping.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from graphdriver import NotSupported, open_driver
from graphdriver.mount import unmount_all_under
from tests.safety.conftest import usable_drivers
from tests.safety.safetyutil import (
    Canary,
    Layout,
    assert_one_line_error,
    cli,
    cli_argv,
    cli_env,
    cli_ok,
    gnu_extract,
    store_tree,
    tree,
)
from tests.treeutil import TarBuilder, diff_snapshots

GO_TESTDATA = Path("/usr/share/go-1.19/src/archive/tar/testdata")
LAYER = "victim"

# --- raw tar crafting (for what tarfile refuses to write) -----------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def raw_header(name: bytes, typeflag: bytes = b"0", size: int = 0, *, linkname: bytes = b"",
               mode: int = 0o644, size_field: bytes | None = None,
               bad_checksum: bool = False) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name[:100]
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = size_field if size_field is not None else _octal(size, 12)
    h[136:148] = _octal(1_700_000_000, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname[:100]
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    chk = sum(h)
    if bad_checksum:
        chk += 1
    h[148:156] = b"%06o\0 " % chk
    return bytes(h)


def raw_file(name: bytes, data: bytes, **kw: Any) -> bytes:
    pad = (-len(data)) % 512
    return raw_header(name, b"0", len(data), **kw) + data + bytes(pad)


def pax_header(records: bytes, size: int | None = None) -> bytes:
    size = len(records) if size is None else size
    pad = (-len(records)) % 512
    return raw_header(b"PaxHeaders/x", b"x", size) + records + bytes(pad)


END = bytes(1024)


def good_tar() -> bytes:
    return (TarBuilder().dir("ok").file("ok/a", b"a" * 3000).file("ok/b", os.urandom(70_000))
            .file("ok/c", b"c").bytes())


class Ctx:
    """Paths a case needs: the canary and the layer's place, so escapes aim at the canary."""

    def __init__(self, canary: Canary, layer_dir: Path, tmp: Path) -> None:
        self.canary = canary.dir
        self.layer_dir = layer_dir
        self.tmp = tmp
        self.rel = os.path.relpath(canary.dir, layer_dir)  # ../../../../canary
        self.deep = "../" * 30 + str(canary.dir).lstrip("/")


Case = Callable[[Ctx], bytes]


def _b() -> TarBuilder:
    return TarBuilder()


CASES: dict[str, Case] = {
    # path traversal
    "dotdot-to-canary": lambda c: _b().file(f"{c.rel}/victim", b"pwned").bytes(),
    "dotdot-deep": lambda c: _b().file(f"{c.deep}/victim", b"pwned").bytes(),
    "dotdot-new-file": lambda c: _b().file("ok").file("../escaped", b"x").bytes(),
    "dotdot-dir": lambda c: _b().dir(f"{c.rel}/newdir").bytes(),
    "dotdot-middle": lambda c: _b().file(f"a/../../{c.rel}/victim", b"pwned").bytes(),
    "absolute-canary": lambda c: _b().file(f"{c.canary}/victim", b"pwned").bytes(),
    "absolute-new": lambda c: _b().file(f"{c.tmp}/escaped-abs", b"x").bytes(),
    "gnu-longname-dotdot": lambda c: _gnu_long(f"{c.deep}/{'x' * 120}"),
    "pax-path-dotdot": lambda c: pax_header(_pax_rec("path", f"{c.rel}/victim"))
    + raw_file(b"harmless", b"pwned") + END,
    # symlink escapes
    "symlink-then-file": lambda c: _b().symlink("evil", str(c.canary))
    .file("evil/victim", b"pwned").bytes(),
    "symlink-rel-then-file": lambda c: _b().symlink("evil", c.rel)
    .file("evil/victim", b"pwned").bytes(),
    "symlink-root-then-write": lambda c: _b().symlink("root", "/")
    .file(f"root{c.canary}/victim", b"pwned").bytes(),
    "symlink-then-dir": lambda c: _b().symlink("evil", str(c.canary)).dir("evil/newdir").bytes(),
    "symlink-chain": lambda c: _b().symlink("b", str(c.canary)).symlink("a", "b")
    .file("a/victim", b"pwned").bytes(),
    "symlink-dir-replaced": lambda c: _b().dir("d").symlink("d", str(c.canary))
    .file("d/victim", b"pwned").bytes(),
    "symlink-then-hardlink-through": lambda c: _b().symlink("evil", str(c.canary))
    .hardlink("stolen", "evil/victim").bytes(),
    "symlink-then-whiteout-through": lambda c: _b().symlink("evil", str(c.canary))
    .whiteout("evil/victim").bytes(),
    "symlink-then-opaque-through": lambda c: _b().symlink("evil", str(c.canary))
    .opaque("evil").bytes(),
    # hard links
    "hardlink-absolute-canary": lambda c: _b().hardlink("x", f"{c.canary}/victim").bytes(),
    "hardlink-dotdot": lambda c: _b().hardlink("x", "../../x").bytes(),
    "hardlink-dotdot-canary": lambda c: _b().hardlink("x", f"{c.rel}/victim").bytes(),
    # whiteouts that point outside
    "whiteout-dotdot": lambda c: _b().file("../.wh.x").bytes(),
    "whiteout-dotdot-canary": lambda c: _b().file(f"{c.rel}/.wh.victim").bytes(),
    "whiteout-of-dotdot": lambda c: _b().file(".wh...").bytes(),
    "whiteout-of-dotdot-sub": lambda c: _b().dir("sub").file("sub/.wh...").bytes(),
    "opaque-dotdot": lambda c: _b().file(f"{c.rel}/.wh..wh..opq").bytes(),
    # broken archives
    "truncated-data": lambda c: good_tar()[:512 + 1500],
    "truncated-header": lambda c: (raw_file(b"a", b"x") + raw_file(b"b", b"y"))[:1024 + 100],
    "corrupt-gzip": lambda c: _flip(gzip.compress(good_tar()), 0.5),
    "truncated-gzip": lambda c: gzip.compress(good_tar())[:-200],
    "corrupt-zstd": lambda c: _flip(zstandard.ZstdCompressor(write_checksum=True)
                                    .compress(good_tar()), 0.5),
    "truncated-zstd": lambda c: zstandard.ZstdCompressor().compress(good_tar())[:-100],
    "bad-checksum": lambda c: raw_file(b"a", b"x", bad_checksum=True) + END,
    "bad-checksum-later": lambda c: raw_file(b"a", b"x") + raw_file(b"b", b"y", bad_checksum=True)
    + END,
    "negative-size": lambda c: raw_header(b"a", b"0", size_field=b"\xff" * 12) + END,
    "absurd-octal-size": lambda c: raw_header(b"a", b"0", size_field=b"77777777777\0") + END,
    "absurd-base256-size": lambda c: raw_header(b"a", b"0", size_field=b"\x80" + b"\xff" * 11)
    + END,
    "garbage-size": lambda c: raw_header(b"a", b"0", size_field=b"12x4\0\0\0\0\0\0\0\0") + END,
    "pax-huge-record-length": lambda c: pax_header(b"99999999999999999999 path=x\n")
    + raw_file(b"a", b"x") + END,
    "pax-huge-header-size": lambda c: raw_header(b"PaxHeaders/x", b"x", 1 << 40) + END,
    "pax-negative-length": lambda c: pax_header(b"-5 path=x\n") + raw_file(b"a", b"x") + END,
    "pax-bad-size-record": lambda c: pax_header(_pax_rec("size", "-1")) + raw_file(b"a", b"x")
    + END,
    "pax-nonnumeric-size": lambda c: pax_header(_pax_rec("size", "1e99"))
    + raw_file(b"a", b"x") + END,
    "gnu-longname-absurd": lambda c: raw_header(b"././@LongLink", b"L", 1 << 36) + END,
    "parent-is-file": lambda c: _b().file("a", b"file").file("a/b", b"x").bytes(),
    "parent-is-symlink-to-file": lambda c: _b().file("f").symlink("s", "f")
    .file("s/b", b"x").bytes(),
    "not-a-tar": lambda c: b"this is not a tar archive at all\n" * 40,
}


def _gnu_long(name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.size = 5
        t.addfile(ti, io.BytesIO(b"pwned"))
    return buf.getvalue()


def _pax_rec(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _flip(data: bytes, at: float) -> bytes:
    b = bytearray(data)
    i = int(len(b) * at)
    for k in range(i, min(i + 16, len(b))):
        b[k] ^= 0x5A
    return bytes(b)


# Cases where a correct result (equal to GNU tar's extraction) is the right answer.
GOOD_CASES: dict[str, Callable[[], bytes]] = {
    "duplicate-file": lambda: _b().file("x", b"first").file("x", b"second, longer").bytes(),
    "duplicate-dir-modes": lambda: _b().dir("d", 0o700).file("d/f", b"f").dir("d", 0o755)
    .bytes(),
    "duplicate-symlink-then-file": lambda: _b().symlink("s", "/nonexistent/x").file("s", b"plain")
    .bytes(),
    "file-replaced-by-dir": lambda: _b().file("p", b"f").dir("p").file("p/q", b"q").bytes(),
    "dotdot-inside": lambda: _b().dir("a").file("a/../b", b"b").bytes(),
}


# --- the store every case runs against ------------------------------------------------------


class Store:
    """One store per driver shared by the cases of this module (a rejected apply changes
    nothing, which each case checks); the target layer is recreated when a case changed it."""

    def __init__(self, tmp: Path, driver: str) -> None:
        self.tmp = tmp
        self.root, self.run = tmp / "store", tmp / "run"
        self.driver = driver
        self.layout = Layout(self.root, driver)
        base = tmp / "base.tar"
        (TarBuilder().dir("etc").file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
         .dir("keep").file("keep/data", os.urandom(10_000)).symlink("keep/link", "/etc/passwd")
         .file("x", b"x at the top").write(base))
        cli_ok(self.root, self.run, driver, "create", "base")
        cli_ok(self.root, self.run, driver, "apply", "base", str(base))
        self.pristine: dict[str, Any] = {}
        self.fresh_layer()

    def fresh_layer(self) -> None:
        d = open_driver(self.driver, self.root, runroot=self.run)
        if d.exists(LAYER):
            d.remove(LAYER)
        d.create(LAYER, "base")
        self.pristine = store_tree(self.root)

    def reset(self) -> None:
        """Before a case: the target layer exactly as created, nothing mounted."""
        d = open_driver(self.driver, self.root, runroot=self.run)
        while d.mount_count(LAYER):
            d.put(LAYER)
        if diff_snapshots(self.pristine, store_tree(self.root)):
            self.fresh_layer()

    def listing(self) -> list[str]:
        return list(open_driver(self.driver, self.root, runroot=self.run).layers())

    def apply(self, path: Path) -> subprocess.CompletedProcess[str]:
        return cli(self.root, self.run, self.driver, "apply", LAYER, str(path), timeout=600)


@pytest.fixture(scope="module", params=usable_drivers())
def shared(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Canary]]:
    name: str = request.param
    tmp = tmp_path_factory.mktemp(f"hostile-{name}")
    try:
        open_driver(name, tmp / "probe", runroot=tmp / "probe-run").cleanup()
    except NotSupported as exc:
        pytest.skip(f"{name} is not supported here: {exc}")
    canary = Canary(tmp)
    st = Store(tmp, name)
    try:
        yield st, canary
    finally:
        cli(st.root, st.run, name, "cleanup")
        unmount_all_under(tmp)


@pytest.fixture
def store(shared: tuple[Store, Canary]) -> Store:
    shared[0].reset()
    return shared[0]


@pytest.fixture
def canary(shared: tuple[Store, Canary]) -> Canary:
    return shared[1]


def _check_rejected(store: Store, canary: Canary, data: bytes, tmp: Path, what: str) -> str:
    path = tmp / f"{what}.tar"
    path.write_bytes(data)
    before = store_tree(store.root)
    res = store.apply(path)
    line = assert_one_line_error(res.stderr, what)
    assert res.returncode != 0, f"{what}: accepted (stdout {res.stdout!r})"
    canary.check()
    after = store_tree(store.root)
    assert not diff_snapshots(before, after), f"{what}: store changed: " + "; ".join(
        diff_snapshots(before, after)[:6])
    assert not list(store.tmp.glob("escaped*")), f"{what}: wrote outside the store"
    listing = store.listing()
    assert LAYER in listing, f"{what}: the layer is gone"
    assert not store.layout.problems(listing), store.layout.problems(listing)
    return line


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archive_refused(case: str, store: Store, canary: Canary,
                                 tmp_path: Path) -> None:
    ctx = Ctx(canary, store.layout.layer_tree(LAYER), store.tmp)
    line = _check_rejected(store, canary, CASES[case](ctx), tmp_path, case)
    assert any(k in line for k in ("UnsafeArchive", "InvalidArchive", "NotFound")), line


@pytest.mark.parametrize("case", sorted(GOOD_CASES))
def test_hostile_looking_archive_gives_gnu_tar_result(case: str, store: Store, canary: Canary,
                                                      tmp_path: Path) -> None:
    """Duplicates and replacements are legal: the result equals GNU tar's, layer over base."""
    path = tmp_path / f"{case}.tar"
    path.write_bytes(GOOD_CASES[case]())
    ref = tmp_path / "ref"
    base_copy = tmp_path / "base-copy.tar"
    # The reference: GNU tar extracting the base layer, then this tar, over one directory.
    cli_ok(store.root, store.run, store.driver, "diff", "base", "-o", str(base_copy))
    gnu_extract(base_copy, ref)
    # -P: GNU tar would otherwise skip names with ".." and delay symlinks to the end (its own
    # defence), which is not moby's order-of-entries semantics.
    subprocess.run(["tar", "-xf", str(path), "-C", str(ref), "--same-owner", "-p", "-P"],
                   check=True, capture_output=True)
    res = store.apply(path)
    assert res.returncode == 0, f"{case}: {res.stderr}"
    with_mount = cli_ok(store.root, store.run, store.driver, "mount", LAYER).strip()
    try:
        got = tree(Path(with_mount))
    finally:
        cli_ok(store.root, store.run, store.driver, "unmount", LAYER)
    want = tree(ref)
    assert not diff_snapshots(want, got), f"{case}: " + "; ".join(diff_snapshots(want, got)[:6])
    canary.check()


@pytest.mark.parametrize("data", [b"", bytes(1024), bytes(10240)], ids=["empty", "eof", "record"])
def test_empty_archive_is_an_empty_layer_or_one_clear_error(store: Store, canary: Canary,
                                                            tmp_path: Path, data: bytes) -> None:
    """moby applies an empty stream as an empty layer; a clean refusal is also acceptable."""
    path = tmp_path / "empty.tar"
    path.write_bytes(data)
    before = store_tree(store.root)
    res = store.apply(path)
    assert "Traceback" not in res.stderr, res.stderr
    changed = diff_snapshots(before, store_tree(store.root))
    if res.returncode != 0:
        assert_one_line_error(res.stderr, "empty archive")
        assert not changed
    else:
        assert res.stdout.strip() == "0"
        assert all(f"meta/{LAYER}/" in d for d in changed), changed  # the layer: unchanged
    canary.check()


def test_hardlink_to_etc_passwd_stays_in_the_layer(store: Store, canary: Canary,
                                                   tmp_path: Path) -> None:
    """A hard link to /etc/passwd names the layer's own etc/passwd (moby), never the host's."""
    host = os.stat("/etc/passwd")
    path = tmp_path / "pw.tar"
    TarBuilder().hardlink("pw", "/etc/passwd").write(path)
    before = store_tree(store.root)
    res = store.apply(path)
    assert os.stat("/etc/passwd").st_nlink == host.st_nlink
    canary.check()
    if res.returncode != 0:
        assert_one_line_error(res.stderr, "hardlink /etc/passwd")
        assert not diff_snapshots(before, store_tree(store.root))
        return
    mp = Path(cli_ok(store.root, store.run, store.driver, "mount", LAYER).strip())
    try:
        pw, own = os.lstat(mp / "pw"), os.lstat(mp / "etc/passwd")
        assert (pw.st_dev, pw.st_ino) == (own.st_dev, own.st_ino)
        assert (pw.st_dev, pw.st_ino) != (host.st_dev, host.st_ino)
    finally:
        cli_ok(store.root, store.run, store.driver, "unmount", LAYER)


# --- a 200k-entry tar bomb: bounded memory ---------------------------------------------------


def _bomb(path: Path, entries: int) -> None:
    """*entries* empty files in 100 directories, written as raw ustar blocks (fast)."""
    with open(path, "wb") as f:
        per_dir = max(1, entries // 100)
        written = 0
        d = 0
        while written < entries:
            f.write(raw_header(b"d%03d/" % d, b"5", mode=0o755))
            for k in range(min(per_dir, entries - written)):
                f.write(raw_header(b"d%03d/f%07d" % (d, k)))
            written += per_dir
            d += 1
        f.write(END)


def _max_rss_kib(argv: list[str]) -> tuple[int, int, str]:
    """Run; return (exit code, max RSS of the process tree in KiB, stderr)."""
    proc = subprocess.Popen(argv, env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    return proc.returncode, usage.ru_maxrss, err


@pytest.mark.slow
def test_tar_bomb_200k_entries_bounded_memory(driver_name: str, tmp_path: Path) -> None:
    """200k entries (~100 MiB of headers): applied with memory that barely grows.

    The engine is the same for every driver, so CI runs it on vfs only (it takes a minute or
    two); GRAPHDRIVER_SAFETY_FULL=1 runs it on every driver.
    """
    if driver_name != "vfs" and not os.environ.get("GRAPHDRIVER_SAFETY_FULL"):
        pytest.skip("the tar bomb runs on vfs only (GRAPHDRIVER_SAFETY_FULL=1 for all drivers)")
    canary = Canary(tmp_path)
    root, run = tmp_path / "store", tmp_path / "run"
    small, big = tmp_path / "small.tar", tmp_path / "bomb.tar"
    _bomb(small, 2_000)
    _bomb(big, 200_000)
    cli_ok(root, run, driver_name, "create", "small")
    cli_ok(root, run, driver_name, "create", "bomb")
    rc1, rss_small, err1 = _max_rss_kib(cli_argv(root, run, driver_name, "apply", "small",
                                                 str(small)))
    assert rc1 == 0, err1
    rc2, rss_big, err2 = _max_rss_kib(cli_argv(root, run, driver_name, "apply", "bomb",
                                               str(big)))
    print(f"\ntar bomb [{driver_name}]: max RSS 2k entries {rss_small} KiB, "
          f"200k entries {rss_big} KiB ({big.stat().st_size >> 20} MiB tar)")
    if rc2 == 0:
        layer = Layout(root, driver_name).layer_tree("bomb")
        assert sum(len(files) for _, _, files in os.walk(layer)) == 200_000
    else:
        assert_one_line_error(err2, "tar bomb")
    # Bounded: 100x the entries may not cost more than 64 MiB more memory.
    assert rss_big - rss_small < 64 * 1024, (rss_small, rss_big)
    canary.check()


# --- overlay: reserved content from a tar is refused, never stored ---------------------------


def _overlay_cases() -> dict[str, bytes]:
    chardev = raw_header(b"wh", b"3", mode=0o000) + END  # devmajor/minor fields 0 = 0/0
    def xattr_tar(key: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            ti = tarfile.TarInfo("dir")
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            ti.pax_headers = {f"SCHILY.xattr.{key}": "y"}
            t.addfile(ti)
        return buf.getvalue()
    return {"chardev-0-0": chardev,
            "xattr-overlay-opaque": xattr_tar("trusted.overlay.opaque"),
            "xattr-overlay-redirect": xattr_tar("trusted.overlay.redirect"),
            "xattr-overlay-metacopy": xattr_tar("trusted.overlay.metacopy")}


@pytest.mark.parametrize("case", sorted(_overlay_cases()))
def test_overlay_reserved_content_refused(case: str, store: Store, canary: Canary,
                                          tmp_path: Path) -> None:
    if store.driver != "overlay":
        pytest.skip("overlay-reserved content matters to the overlay driver only")
    line = _check_rejected(store, canary, _overlay_cases()[case], tmp_path, case)
    assert "UnsafeArchive" in line, line


# --- Go's archive/tar testdata corpus ---------------------------------------------------------


def _go_corpus() -> list[str]:
    if not GO_TESTDATA.is_dir():
        return []
    return sorted(p.name for p in GO_TESTDATA.iterdir() if ".tar" in p.name)


@pytest.mark.skipif(not GO_TESTDATA.is_dir(),
                    reason=f"{GO_TESTDATA} missing (Debian package golang-src)")
@pytest.mark.parametrize("name", _go_corpus() or ["none"])
def test_go_testdata_corpus(name: str, store: Store, canary: Canary) -> None:
    before = store_tree(store.root)
    res = store.apply(GO_TESTDATA / name)
    canary.check()
    layer_rel = str(store.layout.layer_tree(LAYER).relative_to(store.root))
    after = store_tree(store.root)
    outside = [d for d in diff_snapshots(before, after)
               if layer_rel not in d and f"meta/{LAYER}/layer.json" not in d
               and f"meta/{LAYER}/tar-split." not in d]  # issue 6: the layer's tar-split
    assert not outside, f"{name}: changed outside the layer: {outside[:5]}"
    listing = cli_ok(store.root, store.run, store.driver, "ls", "-q").split()
    assert LAYER in listing
    assert not store.layout.problems(listing), store.layout.problems(listing)
    if res.returncode != 0:
        assert_one_line_error(res.stderr, name)
        assert not diff_snapshots(before, after), f"{name}: rejected but the layer changed"
    else:
        assert "Traceback" not in res.stderr
