"""windowsfilter against hcsshim's format: the bugs of issue 17, one test each."""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from tests.drivers.wintar_build import (
    WinTarBuilder,
    apply,
    base_layer,
    diff_bytes,
    diff_layer,
    entries,
)
from tests.mountutil import mount_points_under

from graphdriver import CreateOpts, InvalidArchive, open_driver
from graphdriver.mount import mount_points


def make_base(d: Any, layer_id: str = "base") -> None:
    d.create(layer_id)
    apply(d, layer_id, base_layer())


def quota_or_skip() -> None:
    from graphdriver import quota

    problem = quota.image_supported()
    if problem is not None:
        pytest.skip(problem)


# ---- GNU.sparse.* records describe the encoding, not the file --------------------------------


def _sparse_entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    """A PAX sparse 1.0 entry (GNU tar's --sparse-version=1.0): one extent holding ``data``."""
    d, _, base = name.rpartition("/")
    sparse_map = f"1\n0\n{len(data)}\n".encode()
    sparse_map += bytes(-len(sparse_map) % 512)
    info = tarfile.TarInfo(f"{d}/GNUSparseFile.0/{base}")
    info.size = len(sparse_map) + len(data)
    info.mode = 0o100000
    info.uname = info.gname = ""
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": name, "GNU.sparse.realsize": str(len(data)),
                        "MSWINDOWS.fileattr": "32", "mtime": "1700000000.5"}
    return info, sparse_map + data


def test_gnu_sparse_records_are_not_kept(store: Any) -> None:
    info, payload = _sparse_entry("Files/sparse.bin", b"S" * 700)
    data = WinTarBuilder().dir("Files").raw(info, payload).bytes()
    store.create("sp")
    apply(store, "sp", data)
    stored = Path(store.metadata("sp")["dir"]) / "Files/sparse.bin"
    assert not any("sparse" in n for n in os.listxattr(stored))
    out = {e[0]: e for e in entries(diff_bytes(store, "sp"))}
    _, _, size, _, pax, content = out["Files/sparse.bin"]
    assert (size, content) == (700, b"S" * 700)
    assert not any(k.startswith("GNU.sparse.") for k in pax)
    assert pax["MSWINDOWS.fileattr"] == "32"


# ---- layerID aliases share their target's count ----------------------------------------------


def test_layer_id_alias_counts_on_its_target(store: Any) -> None:
    make_base(store)
    store.create("alias")
    store.set_id("alias", "base")
    via_alias = store.get("alias")
    direct = store.get("base")
    assert via_alias == direct
    assert store.mount_count("base") == 2 and store.mount_count("alias") == 2
    store.put("alias")
    assert store.mount_count("base") == 1
    assert (direct / "Windows/System32/notepad.exe").read_bytes() == b"MZnotepad" * 1000
    store.put("base")
    assert store.mount_count("base") == 0
    assert not direct.exists()


# ---- layerchain.json is absolute with a relative --root --------------------------------------


def test_layerchain_absolute_with_relative_root(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = open_driver("windowsfilter", Path("rel-root"), runroot=tmp_path / "run")
    try:
        make_base(d)
        d.create("up", "base")
        apply(d, "up", diff_layer())
        d.create_rw("sb", "up")
        for layer in ("up", "sb"):
            ldir = Path(d.metadata(layer)["dir"])
            assert ldir.is_absolute()
            chain = json.loads((ldir / "layerchain.json").read_text())
            assert chain and all(os.path.isabs(p) and os.path.isdir(p) for p in chain), chain
    finally:
        d.cleanup()


# ---- the diff getter matches names as NTFS does ----------------------------------------------


def test_diff_getter_matches_case_insensitively(store: Any) -> None:
    data = (WinTarBuilder().dir("Files").dir("Files/Dir").file("Files/dir/a.TXT", b"payload")
            .bytes())
    store.create("c")
    apply(store, "c", data)
    getter = store.diff_getter("c")
    try:
        with getter.open("Files/dir/a.TXT") as f:
            assert f.read() == b"payload"
        with getter.open("Files/DIR/A.txt") as f:
            assert f.read() == b"payload"
        with pytest.raises(FileNotFoundError):
            getter.open("Files/dir/b.txt")
    finally:
        getter.close()


# ---- sandbox sizes -------------------------------------------------------------------------


def _fill(root: Path, megabytes: int) -> None:
    with pytest.raises(OSError) as info, open(root / "big", "wb") as f:
        for _ in range(megabytes):
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)


def test_store_default_size_is_enforced(tmp_path: Path) -> None:
    quota_or_skip()
    d = open_driver("windowsfilter", tmp_path / "root", {"size": "32M"}, runroot=tmp_path / "run")
    try:
        make_base(d)
        d.create_rw("sb", "base")
        assert d.record("sb").size_limit == 32 << 20
        with d.mounted("sb") as root:
            assert (root / "Windows/win.ini").is_file()
            _fill(root, 48)
        d.create_rw("big", "base", CreateOpts(storage_opt={"size": "64M"}))
        assert d.record("big").size_limit == 64 << 20
    finally:
        d.cleanup()
    assert not mount_points_under(tmp_path)


def test_relative_root_quota_mounted_once(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    quota_or_skip()
    monkeypatch.chdir(tmp_path)
    d = open_driver("windowsfilter", Path("rel"), runroot=tmp_path / "run")
    try:
        d.create_rw("sb", None, CreateOpts(storage_opt={"size": "32M"}))
        for _ in range(3):
            d.get("sb")
        image = str(tmp_path / "rel" / "windowsfilter" / "sb" / "quota")
        assert mount_points().count(image) == 1
        for _ in range(3):
            d.put("sb")
    finally:
        d.cleanup()
    assert not mount_points_under(tmp_path)


# ---- what hcsshim refuses ------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "message"), [
    (WinTarBuilder().dir("Files").whiteout("Files/gone"), "base layer cannot have deletions"),
])
def test_base_layer_refusals(store: Any, layer: WinTarBuilder, message: str) -> None:
    store.create("b")
    with pytest.raises(InvalidArchive, match=message):
        apply(store, "b", layer.bytes())


@pytest.mark.parametrize(("layer", "message"), [
    (WinTarBuilder().dir("Files").dir("UtilityVM/Files").dir("UtilityVM/Files/EFI"),
     "missing UtilityVM directory"),
    (WinTarBuilder().dir("Files").file("UtilityVM/Files/new.txt", b"x"),
     "missing UtilityVM directory"),
    (WinTarBuilder().dir("UtilityVM", sd=None).dir("UtilityVM/Other"),
     "outside UtilityVM/Files"),
    (WinTarBuilder().dir("UtilityVM", sd=None).whiteout("UtilityVM/Files/EFI/nothing-here"),
     "UtilityVM path that does not exist"),
])
def test_delta_layer_refusals(store: Any, layer: WinTarBuilder, message: str) -> None:
    make_base(store)
    store.create("up", "base")
    with pytest.raises(InvalidArchive, match=message):
        apply(store, "up", layer.bytes())
    assert not (Path(store.metadata("up")["dir"]) / "UtilityVM").exists()


def test_delta_layer_accepted_forms(store: Any) -> None:
    """What hcsshim takes: a UtilityVM deletion without the UtilityVM entry, and UtilityVM/Files
    entries after it."""
    make_base(store)
    store.create("up", "base")
    apply(store, "up", WinTarBuilder().dir("Files")
          .whiteout("UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG").bytes())
    store.create("up2", "up")
    apply(store, "up2", WinTarBuilder().dir("UtilityVM", sd=None).dir("UtilityVM/Files")
          .file("UtilityVM/Files/new.txt", b"n").bytes())


# ---- names longer than the host allows -----------------------------------------------------


def test_name_over_name_max_is_one_clear_line(store: Any) -> None:
    long = "\u00e9" * 200  # 200 UTF-16 units (NTFS takes 255), 400 UTF-8 bytes
    store.create("n")
    with pytest.raises(InvalidArchive, match="NAME_MAX") as info:
        apply(store, "n", WinTarBuilder().dir("Files").file(f"Files/{long}", b"x").bytes())
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


# ---- Windows metadata of any size NTFS allows ----------------------------------------------


def test_large_security_descriptor_and_eas_round_trip(store: Any) -> None:
    """A 60 KiB security descriptor and two 30 KiB EAs on one file: more than ext4 keeps in an
    inode's xattrs (one block); stored in side files, written back exactly."""
    big_sd = bytes(range(256)) * 240
    eas = {"$BIG.ONE": b"\x01" * 30_000, "$BIG.TWO": b"\x02" * 30_000}
    data = (WinTarBuilder().dir("Files", sd=big_sd)
            .file("Files/big.txt", b"content", sd=big_sd, eas=eas)
            .file("Files/small.txt", b"s").bytes())
    store.create("m")
    apply(store, "m", data)
    assert entries(diff_bytes(store, "m")) == entries(data)
    store.create("up", "m")
    apply(store, "up", WinTarBuilder().dir("Files").link("Files/again.txt", "Files/big.txt",
                                                        source=WinTarBuilder().file(
                                                            "Files/big.txt", b"")).bytes())
    out = {e[0]: e for e in entries(diff_bytes(store, "up"))}
    assert out["Files/again.txt"][3] == "Files/big.txt"
