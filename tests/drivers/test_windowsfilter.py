"""windowsfilter: Windows layer tars (go-winio format) stored, merged and diffed on Linux."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from tests.drivers.wintar_build import (
    BASE_SIZE,
    DIFF_SIZE,
    SD_DEFAULT,
    SD_OTHER,
    WinTarBuilder,
    apply,
    base_layer,
    diff_bytes,
    diff_layer,
    entries,
)
from tests.treeutil import snapshot

from graphdriver import (
    ChangeKind,
    CreateOpts,
    InUse,
    InvalidArchive,
    InvalidArgument,
    NotFound,
    NotSupported,
    UnsafeArchive,
    open_driver,
)

IS_ROOT = os.geteuid() == 0
BCD = "UtilityVM/Files/EFI/Microsoft/Boot/BCD"


def layer_dir(d: Any, layer_id: str) -> Path:
    return Path(d.metadata(layer_id)["dir"])


def make_base(d: Any) -> None:
    d.create("base")
    assert apply(d, "base", base_layer()) == BASE_SIZE


def make_up(d: Any) -> None:
    make_base(d)
    d.create("up", "base")
    assert apply(d, "up", diff_layer()) == DIFF_SIZE


# ---- import and export ----------------------------------------------------------------------


def test_base_layer_round_trip(store: Any) -> None:
    make_base(store)
    data = base_layer()
    # entries, their order, PAX records and contents come back as they went in
    assert entries(diff_bytes(store, "base")) == entries(data)
    rec = store.record("base")
    assert rec.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    d = layer_dir(store, "base")
    win = d / "Files/Windows"
    assert os.getxattr(win, "user.mswindows.fileattr") == b"20"
    assert os.getxattr(win, "user.mswindows.rawsd") == SD_DEFAULT
    dll = d / "Files/Windows/System32/kernel32.dll"
    assert os.getxattr(dll, "user.mswindows.xattr.$KERNEL.PURGE.ESBCACHE") == b"\x01\x02\x03"
    assert os.getxattr(dll, "user.mswindows.mtime").startswith(b"17000")
    ini = d / "Files/Users/Public/desktop.ini"
    assert os.getxattr(ini, "user.mswindows.rawsd") == SD_OTHER
    assert (d / "Files/Users/Public/desktop.ini:Zone.Identifier").read_bytes() == (
        b"[ZoneTransfer]\r\nZoneId=3\r\n")
    assert os.readlink(d / "Files/Documents and Settings") == "C:\\Users"
    linkmeta = json.loads((d / "linkmeta.json").read_text())
    assert "Files/Documents and Settings" in linkmeta
    assert os.stat(d / "Files/Windows/notepad.exe").st_ino == os.stat(
        d / "Files/Windows/System32/notepad.exe").st_ino
    assert (d / "Hives/Sam_Delta").stat().st_size == 2048
    assert json.loads((d / "layerchain.json").read_text()) == []
    assert store.diff_size("base") == BASE_SIZE


def test_compressed_input_and_gnu_tar_reads_the_diff(store: Any, tmp_path: Path) -> None:
    import lzma

    import zstandard

    for i, data in enumerate((zstandard.compress(base_layer()), lzma.compress(base_layer()))):
        store.create(f"c{i}")
        assert apply(store, f"c{i}", data) == BASE_SIZE
        assert entries(diff_bytes(store, f"c{i}")) == entries(base_layer())
    store.create("base")
    assert apply(store, "base", gzip.compress(base_layer())) == BASE_SIZE
    out = tmp_path / "out.tar"
    out.write_bytes(diff_bytes(store, "base"))
    want = [e[0] for e in entries(base_layer())]
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    listed = subprocess.run([tar, "-tf", str(out)], check=True, capture_output=True,
                            text=True).stdout.splitlines()
    assert [n.rstrip("/") for n in listed] == want
    bsdtar = shutil.which("bsdtar")
    if bsdtar is not None:
        listed = subprocess.run([bsdtar, "-tf", str(out)], check=True, capture_output=True,
                                text=True).stdout.splitlines()
        assert [n.rstrip("/") for n in listed] == want
    # GNU tar extracts the Windows metadata records it does not know without complaint
    x = tmp_path / "x"
    x.mkdir()
    subprocess.run([tar, "-xf", str(out), "-C", str(x)], check=True, capture_output=True)
    assert (x / "Files/Windows/System32/notepad.exe").read_bytes() == b"MZnotepad" * 1000


def test_bcd_backups_and_diff_getter(store: Any) -> None:
    make_base(store)
    d = layer_dir(store, "base")
    assert (d / "bcd.bak").read_bytes() == b"BCD-store" * 512
    assert (d / "bcd.log.bak").read_bytes() == b"BCD-log" * 10
    assert not (d / "bcd.log1.bak").exists()
    # On Windows the import process rewrites the BCD store; the getter serves the original.
    (d / BCD).unlink()
    (d / BCD).write_bytes(b"mutated by the import")
    getter = store.diff_getter("base")
    try:
        with getter.open(BCD) as f:
            assert f.read() == b"BCD-store" * 512
        with getter.open("Files/Windows/win.ini") as f:
            assert f.read() == b"; for 16-bit app support\r\n"
        with getter.open("Files/Users/Public/desktop.ini:Zone.Identifier") as f:
            assert f.read().startswith(b"[ZoneTransfer]")
        with pytest.raises(OSError):
            getter.open("../../etc/passwd")
    finally:
        getter.close()


def test_diff_layer_whiteouts_links_streams(store: Any) -> None:
    make_up(store)
    assert entries(diff_bytes(store, "up")) == entries(diff_layer())
    up = layer_dir(store, "up")
    base = layer_dir(store, "base")
    # hcsshim's tombstones format, spellings as the tar gave them
    assert (up / "tombstones.txt").read_bytes() == (
        b"\xef\xbb\xbfVersion 1.0\n\\users\n\\Windows\\WIN.INI\n")
    assert json.loads((up / "layerchain.json").read_text()) == [str(base)]
    # a link into the parent layer is the parent's file
    assert os.stat(up / "Files/app/kernel.dll").st_ino == os.stat(
        base / "Files/Windows/System32/kernel32.dll").st_ino
    assert (up / "Files/app/app2.exe:meta").read_bytes() == b"m" * 10
    changes = [(c.path, c.kind) for c in store.changes("up")]
    assert changes == [
        ("Files", ChangeKind.MODIFY),
        ("Files/Windows", ChangeKind.MODIFY),
        ("Files/Windows/System32", ChangeKind.MODIFY),
        ("Files/Windows/System32/notepad.exe", ChangeKind.MODIFY),
        ("Files/Windows/WIN.INI", ChangeKind.DELETE),
        ("Files/app", ChangeKind.MODIFY),
        ("Files/app/app.exe", ChangeKind.MODIFY),
        ("Files/app/app2.exe", ChangeKind.MODIFY),
        ("Files/app/kernel.dll", ChangeKind.MODIFY),
        ("Files/users", ChangeKind.DELETE),
    ]
    assert store.diff_size("up") == DIFF_SIZE
    # the base's own diff is unchanged by the child's links into it
    assert entries(diff_bytes(store, "base")) == entries(base_layer())


def test_merged_view(store: Any) -> None:
    make_up(store)
    with store.mounted("up") as root:
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        assert names == [
            "Documents and Settings",
            "Windows",
            "Windows/System32",
            "Windows/System32/kernel32.dll",
            "Windows/System32/notepad.exe",
            "Windows/notepad.exe",
            "app",
            "app/app.exe",
            "app/app2.exe",
            "app/kernel.dll",
            "empty.txt",
        ]  # Users and win.ini deleted (other case), streams not part of the view
        assert (root / "Windows/System32/notepad.exe").read_bytes() == b"MZnotepad-v2" * 800
        assert (root / "Windows/notepad.exe").read_bytes() == b"MZnotepad" * 1000
        assert os.getxattr(root / "Windows", "user.mswindows.fileattr") == b"20"
        assert os.getxattr(root / "app/app.exe", "user.mswindows.fileattr") == b"32"
    assert not (layer_dir(store, "up") / "merged").exists()
    with store.mounted("base") as root:
        assert (root / "Users/Public/desktop.ini").is_file()
        assert (root / "Windows/win.ini").is_file()


def test_case_insensitive_names(store: Any) -> None:
    make_base(store)
    store.create("ci", "base")
    link = tarfile.TarInfo("Files/k32.dll")
    link.type = tarfile.LNKTYPE
    link.linkname = "Files/WINDOWS/SYSTEM32/KERNEL32.DLL"
    tar = (
        WinTarBuilder(base_time_ns=1_720_000_000_000_000_000)
        .dir("Files")
        .dir("Files/WINDOWS")
        .dir("Files/WINDOWS/system32")
        .file("Files/WINDOWS/system32/new.dll", b"new")
        .file("Files/windows/SYSTEM32/other.dll", b"other")  # same directories, other case
        .link("Files/WINDOWS/k.dll", "Files/windows/system32/new.dll")
        .raw(link)  # a hard link to a parent's file, matched regardless of case
        .bytes()
    )
    apply(store, "ci", tar)
    d = layer_dir(store, "ci")
    assert sorted(os.listdir(d / "Files/WINDOWS/system32")) == ["new.dll", "other.dll"]
    assert os.stat(d / "Files/k32.dll").st_ino == os.stat(
        layer_dir(store, "base") / "Files/Windows/System32/kernel32.dll").st_ino
    with store.mounted("ci") as root:
        assert sorted(os.listdir(root)) == ["Documents and Settings", "Users", "WINDOWS",
                                            "empty.txt", "k32.dll"]
        merged = sorted(os.listdir(root / "WINDOWS/system32"))
        assert merged == ["kernel32.dll", "new.dll", "notepad.exe", "other.dll"]
        assert (root / "WINDOWS/win.ini").is_file()


def _raw_entries(*infos: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info in infos:
            tf.addfile(info)
    return buf.getvalue()


def test_reapply_keeps_what_the_layer_held(store: Any) -> None:
    make_base(store)
    apply(store, "base", WinTarBuilder(base_time_ns=1_730_000_000_000_000_000)
          .dir("Files").file("Files/added.txt", b"added").bytes())
    d = layer_dir(store, "base")
    assert (d / "Files/added.txt").read_bytes() == b"added"
    assert (d / "Files/Windows/System32/kernel32.dll").is_file()
    assert (d / "bcd.bak").is_file()
    # a diff layer re-applied: its own file deleted, the tombstone keeps the stored spelling
    # (a base layer cannot have deletions: hcsshim's baseLayerWriter refuses them)
    store.create("up", "base")
    apply(store, "up", diff_layer())
    more = (
        WinTarBuilder(base_time_ns=1_730_000_000_000_000_000)
        .dir("Files")
        .dir("Files/app")
        .whiteout("Files/app/APP.EXE")
        .file("Files/app/added.txt", b"added")
        .bytes()
    )
    assert apply(store, "up", more) == 5
    u = layer_dir(store, "up")
    assert not (u / "Files/app/app.exe").exists()
    assert not (u / "Files/app/app.exe:meta").exists()
    assert (u / "Files/app/app2.exe").is_file()
    assert (u / "tombstones.txt").read_bytes().endswith(b"\\app\\app.exe\n")


# ---- failures ---------------------------------------------------------------------------


def test_failed_import_leaves_layer_as_it_was(store: Any) -> None:
    make_up(store)
    before = snapshot(layer_dir(store, "up"))
    good = WinTarBuilder().dir("Files").file("Files/big.bin", os.urandom(300_000)).bytes()
    bad_tars = [
        good[: len(good) // 2],  # truncated
        WinTarBuilder().dir("Files").file("etc/passwd", b"x").bytes(),  # not a Windows layer
        WinTarBuilder().dir("Files").file("Files/a/b.txt", b"x").bytes(),  # missing parent
        WinTarBuilder().dir("Files").whiteout("Hives/x").bytes(),  # invalid tombstone
        WinTarBuilder().dir("Files").file("Files/x:s", b"orphan stream").bytes(),
    ]
    for bad in bad_tars:
        with pytest.raises(InvalidArchive):
            apply(store, "up", bad)
        assert store.exists("up")
        assert snapshot(layer_dir(store, "up")) == before
    info = tarfile.TarInfo("Files/y")
    info.pax_headers = {"MSWINDOWS.rawsd": "not base64!"}
    with pytest.raises(InvalidArchive, match="base64"):
        apply(store, "up", WinTarBuilder().dir("Files").raw(info).bytes())
    assert snapshot(layer_dir(store, "up")) == before


def test_unsafe_archives(store: Any, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store.create("u")
    climb = tarfile.TarInfo("../escape")
    with pytest.raises(UnsafeArchive):
        apply(store, "u", _raw_entries(climb))
    via_link = (
        WinTarBuilder().dir("Files").symlink("Files/lnk", str(outside), directory=True)
        .file("Files/lnk/evil", b"x").bytes()
    )
    with pytest.raises(UnsafeArchive):
        apply(store, "u", via_link)
    assert os.listdir(outside) == []
    hard = tarfile.TarInfo("Files/h")
    hard.type = tarfile.LNKTYPE
    hard.linkname = "Files/../../../etc/passwd"
    with pytest.raises(UnsafeArchive):
        apply(store, "u", _raw_entries(hard))
    dev = tarfile.TarInfo("Files/dev")
    dev.type = tarfile.CHRTYPE
    with pytest.raises(InvalidArchive):
        apply(store, "u", _raw_entries(dev))
    assert os.listdir(layer_dir(store, "u") / "Files") == []


# ---- options, chain, ids --------------------------------------------------------------------


def test_options(tmp_path: Path) -> None:
    d = open_driver("windowsfilter", tmp_path / "r1", runroot=tmp_path / "run")
    assert ("Default Sandbox Size", str(127 << 30)) in d.status()
    d.create_rw("sb")
    assert d.record("sb").size_limit == 127 << 30  # nominal: recorded, not enforced
    with pytest.raises(InvalidArgument):
        d.create("ro", None, CreateOpts(storage_opt={"size": "1G"}))
    d2 = open_driver("windowsfilter", tmp_path / "r2", {"SiZe": "20GB"}, runroot=tmp_path / "run")
    assert d2.sandbox_size == 20 << 30
    with pytest.raises(InvalidArgument):
        open_driver("windowsfilter", tmp_path / "r3", {"size": "lots"}, runroot=tmp_path / "run")
    with pytest.raises(InvalidArgument):
        open_driver("windowsfilter", tmp_path / "r4", {"bogus": "1"}, runroot=tmp_path / "run")


def test_layer_chain_skips_sandboxes(store: Any) -> None:
    make_up(store)
    store.create_rw("up-init", "up")
    store.create_rw("ctr", "up-init")
    store.create("img", "up-init")
    base, up = layer_dir(store, "base"), layer_dir(store, "up")
    assert json.loads((layer_dir(store, "ctr") / "layerchain.json").read_text()) == [
        str(up), str(base)]
    assert json.loads((layer_dir(store, "img") / "layerchain.json").read_text()) == [
        str(up), str(base)]
    with pytest.raises(NotFound):
        store.create("orphan", "missing")
    assert not (store.home / "orphan").exists()


def test_layer_id_indirection(store: Any) -> None:
    make_base(store)
    store.create("alias")
    (store.home / "alias" / "layerId").write_text("base")  # moby's spelling
    assert store.resolve_id("alias") == "base"
    assert layer_dir(store, "alias") == layer_dir(store, "base")
    assert entries(diff_bytes(store, "alias")) == entries(base_layer())
    (store.home / "alias" / "layerId").unlink()
    store.set_id("alias", "base")
    assert (store.home / "alias" / "layerID").read_text() == "base"
    assert store.resolve_id("alias") == "base"


# ---- sandboxes, mounts ------------------------------------------------------------------------


def test_sandbox(store: Any) -> None:
    """A sandbox is a writable view of its image; its diff is a Windows layer (issue 17)."""
    if not IS_ROOT:
        pytest.skip("copy-on-write sandboxes need root (overlay mounts, whiteout devices)")
    make_up(store)
    store.create_rw("ctr", "up")
    with store.mounted("ctr") as root:
        assert (root / "app/app.exe").read_bytes() == b"MZapp" * 300
        assert not (root / "app/app.exe:meta").exists()  # streams are not part of the view
        (root / "app/app.exe").write_bytes(b"patched")
        (root / "new.txt").write_text("new")
        (root / "empty.txt").unlink()
    changes = [(c.path, c.kind) for c in store.changes("ctr")]
    # sorted, as every driver's changes are (the diff below keeps hcsshim's entry order)
    assert changes == [("Files", ChangeKind.MODIFY), ("Files/app", ChangeKind.MODIFY),
                       ("Files/app/app.exe", ChangeKind.MODIFY),
                       ("Files/empty.txt", ChangeKind.DELETE), ("Files/new.txt", ChangeKind.ADD)]
    names = [e[0] for e in entries(diff_bytes(store, "ctr"))]
    assert names == ["Files", "Files/.wh.empty.txt", "Files/app", "Files/app/app.exe",
                     "Files/app/app.exe:Zone.Identifier", "Files/app/app.exe:meta",
                     "Files/new.txt"]
    assert store.diff_size("ctr") == len(b"patched") + len(b"new")
    assert (layer_dir(store, "up") / "Files/app/app.exe").read_bytes() == b"MZapp" * 300
    with pytest.raises(NotSupported):
        apply(store, "ctr", diff_layer())


def test_mount_reference_counts(store: Any) -> None:
    make_base(store)
    p1 = store.get("base")
    p2 = store.get("base")
    assert p1 == p2 and (p1 / "Windows").is_dir()
    assert store.mount_count("base") == 2
    with pytest.raises(InUse):
        store.remove("base")
    with pytest.raises(InUse):
        apply(store, "base", diff_layer())
    if IS_ROOT:  # the view shares inodes with the layer: it is mounted read-only
        with pytest.raises(OSError) as info:
            (p1 / "Windows/win.ini").write_bytes(b"changed")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError):
            (p1 / "new.txt").write_bytes(b"x")
        assert (layer_dir(store, "base") / "Files/Windows/win.ini").read_bytes().startswith(b";")
    store.put("base")
    assert p1.is_dir()
    store.put("base")
    assert not p1.exists()
    assert not any(str(layer_dir(store, "base")) in line
                   for line in Path("/proc/self/mountinfo").read_text().splitlines())
    store.remove("base")
    assert not (store.home / "base").exists()


@pytest.mark.skipif(not IS_ROOT, reason="mounting a ramfs needs root")
def test_refuses_a_home_without_user_xattrs(tmp_path: Path) -> None:
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a ramfs here")
    try:
        with pytest.raises(NotSupported, match=r"user\.\* extended attributes"):
            open_driver("windowsfilter", mnt, runroot=tmp_path / "run")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


# ---- the command ------------------------------------------------------------------------------


def test_command_line(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH",
                                                                                   "")])}
    cmd = [sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root"), "--runroot",
           str(tmp_path / "run"), "--driver", "windowsfilter"]

    def run(*args: str, **kw: Any) -> str:
        out = subprocess.run([*cmd, *args], check=True, capture_output=True, env=env, **kw)
        return str(out.stdout.decode())

    (tmp_path / "base.tar.gz").write_bytes(gzip.compress(base_layer()))
    (tmp_path / "up.tar").write_bytes(diff_layer())
    run("create", "base")
    assert run("apply", "base", str(tmp_path / "base.tar.gz")).strip() == str(BASE_SIZE)
    run("create", "up", "--parent", "base")
    assert run("apply", "up", str(tmp_path / "up.tar")).strip() == str(DIFF_SIZE)
    path = Path(run("mount", "up").strip())
    assert (path / "app/app.exe").is_file() and not (path / "Users").exists()
    run("unmount", "up")
    assert not path.exists()
    assert run("changes", "up").splitlines()[:2] == ["C Files", "C Files/Windows"]
    assert "D Files/users" in run("changes", "up").splitlines()
    run("diff", "up", "-o", str(tmp_path / "out.tar"))
    assert entries((tmp_path / "out.tar").read_bytes()) == entries(diff_layer())
    assert run("diff-size", "up").strip() == str(DIFF_SIZE)
    assert run("ls", "-q").split() == ["base", "up"]
    assert "Windows" in run("status")
    bad = subprocess.run([*cmd, "rm", "base"], capture_output=True, env=env, text=True)
    assert bad.returncode != 0 and "InUse" in bad.stderr and len(bad.stderr.splitlines()) == 1
    run("rm", "up")
    run("rm", "base")
    assert run("ls", "-q") == ""


def test_exact_diff_from_tar_split(store: Any) -> None:
    """tar-split recorded at import + the diff getter give back the applied tar byte for byte,
    even after the import process (on Windows) rewrote the BCD store: it comes from bcd.bak."""
    from graphdriver.exactdiff import exact_available, write_exact_diff

    make_up(store)
    (layer_dir(store, "base") / BCD).unlink()
    (layer_dir(store, "base") / BCD).write_bytes(b"rewritten")
    for layer_id, data in (("base", base_layer()), ("up", diff_layer())):
        assert exact_available(store, layer_id) == (True, "")
        out = io.BytesIO()
        write_exact_diff(store, layer_id, out)
        assert out.getvalue() == data
    # a second archive applied to a layer: no exact diff any more (the new tar is written)
    apply(store, "up", WinTarBuilder().dir("Files").file("Files/z.txt", b"z").bytes())
    assert exact_available(store, "up")[0] is False


def test_diff_layer_utility_vm_starts_from_the_parents(store: Any) -> None:
    """hcsshim's initUtilityVM: a diff layer touching UtilityVM gets a clone of its parent's."""
    make_base(store)
    store.create("uvm", "base")
    tar = (
        WinTarBuilder(base_time_ns=1_740_000_000_000_000_000)
        .dir("Files")
        .dir("UtilityVM", sd=None)
        .whiteout("UtilityVM/Files/EFI/Microsoft/Boot/bcd.log")
        .file(BCD, b"new BCD store")
        .bytes()
    )
    apply(store, "uvm", tar)
    d, base = layer_dir(store, "uvm"), layer_dir(store, "base")
    boot = d / "UtilityVM/Files/EFI/Microsoft/Boot"
    assert sorted(os.listdir(boot)) == ["BCD"]
    assert (boot / "BCD").read_bytes() == b"new BCD store"
    assert (d / "bcd.bak").read_bytes() == b"new BCD store"
    assert (base / BCD).read_bytes() == b"BCD-store" * 512  # the parent's store untouched
    assert (base / "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG").is_file()
    assert os.getxattr(d / "UtilityVM/Files/EFI", "user.mswindows.fileattr") == b"16"
    # the whole utility VM is this layer's now, as on Windows: diff writes it, no tombstone
    names = [e[0] for e in entries(diff_bytes(store, "uvm"))]
    assert "UtilityVM/Files/EFI/Microsoft" in names and BCD in names
    assert not (d / "tombstones.txt").exists()
    with pytest.raises(InvalidArchive):
        apply(store, "uvm", WinTarBuilder().dir("Files").whiteout("Hives/Sam_Delta").bytes())


def test_sized_sandbox_starts_from_its_parent(store: Any) -> None:
    """An explicit size: the sandbox is a loop-mounted ext4 image (another filesystem than the
    layers, so the parent's view is copied across), and writing past it fails."""
    from graphdriver import quota

    problem = quota.image_supported()
    if problem is not None:
        pytest.skip(problem)
    make_base(store)
    store.create_rw("sized", "base", CreateOpts(storage_opt={"size": "64M"}))
    assert store.record("sized").size_limit == 64 << 20
    with store.mounted("sized") as root:
        assert (root / "Windows/System32/notepad.exe").read_bytes() == b"MZnotepad" * 1000
        with pytest.raises(OSError) as info, open(root / "big", "wb") as f:
            for _ in range(80):
                f.write(bytes(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
    store.remove("sized")
    assert not any(str(store.home) in line
                   for line in Path("/proc/self/mountinfo").read_text().splitlines())
