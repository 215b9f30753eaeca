"""Copy-on-write sandboxes on Windows images and their diffs as Windows layers (issue 17).

The base and delta layers are written by Go (``gowintar``: go-winio's and hcsshim's headers);
the sandbox's diff is checked entry by entry against rules read from hcsshim's importer
(``ociwclayer``/``wclayer`` legacy writer), go-winio's ``backuptar``, BuildKit's ``winlayers``
and go-containerregistry's ``internal/windows``, then applied as a new layer whose merged view
must equal the sandbox's.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import re
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
from tests.drivers.gowin import (
    ATTR_ARCHIVE,
    ATTR_DIRECTORY,
    ATTR_HIDDEN,
    ATTR_REPARSE,
    GoLayer,
)
from tests.treeutil import snapshot

from graphdriver import ChangeKind, CreateOpts, InvalidArgument
from graphdriver.archive.windows.defaults import DIRECTORY_SD, FILE_SD

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="copy-on-write sandboxes need root "
                                "(overlay mounts, whiteout devices)")

SD_APP = b"\x01\x00\x04\x80" + bytes(range(40))  # any descriptor: it must come back verbatim
# go-winio/hcsshim: a creation time is "sec[.frac]" without trailing zeros (formatPAXTime)
PAX_TIME = re.compile(r"^-?\d+(\.\d*[1-9])?$")


def base_layer() -> GoLayer:
    return (
        GoLayer()
        .dir("Files")
        .dir("Files/Program Files")
        .dir("Files/Program Files/App")
        .file("Files/Program Files/App/app.exe", b"MZapp" * 300, sd=SD_APP,
              eas={"$KERNEL.PURGE.APPXFICACHE": b"\x07\x08"},
              streams={"Zone.Identifier": b"[ZoneTransfer]\r\nZoneId=3\r\n", "meta": b"m" * 10})
        .file("Files/Program Files/App/readme.txt", b"read me")
        .file("Files/Program Files/App/settings.ini", b"[a]\r\n")
        .dir("Files/Windows", attrs=ATTR_DIRECTORY | ATTR_HIDDEN)
        .file("Files/Windows/win.ini", b"; win\r\n", attrs=ATTR_ARCHIVE | ATTR_HIDDEN)
        .file("Files/old.log", b"log")
    )


def delta_layer() -> GoLayer:
    return (
        GoLayer(base_ns=1_710_000_000_000_000_100)
        .dir("Files")
        .whiteout("Files/old.log")
        .dir("Files/Windows", attrs=ATTR_DIRECTORY | ATTR_HIDDEN)
        .file("Files/Windows/system.ini", b"[drivers]\r\n", sd=SD_APP)
    )


def records_of(data: bytes) -> dict[str, tuple[tarfile.TarInfo, dict[str, str]]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {m.name: (m, dict(m.pax_headers)) for m in tf}


def check_windows_layer(data: bytes) -> list[tarfile.TarInfo]:
    """Every rule of a Windows layer tar hcsshim's importer takes, entry by entry."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        members = list(tf)
    seen: set[str] = set()
    last_main: str | None = None
    last_dir_for_whiteouts: str | None = None
    for m in members:
        name, pax = m.name, m.pax_headers
        assert "\\" not in name and name.split("/")[0] == "Files", name
        parent, _, base = name.rpartition("/")
        if parent:  # hcsshim writes into the layer being built: the parent comes first
            assert parent in seen, f"{name}: its directory has no earlier entry"
        if base.startswith(".wh."):
            # hcsshim's reader: a bare header, right after its directory's entry (and the other
            # deletions in it), before the directory's children
            assert m.type == tarfile.REGTYPE and m.size == 0 and m.mode == 0, name
            assert not {k for k in pax if k != "path"}, (name, pax)
            assert last_dir_for_whiteouts == parent, f"{name} is not right after {parent}"
            continue
        if ":" in base:  # go-winio: a stream is a regular entry right after its file
            main = name.rsplit(":", 1)[0]
            assert m.type == tarfile.REGTYPE and last_main == main, name
            seen.add(name)
            continue
        # every file and directory: the three records, well-formed
        assert set(pax) >= {"MSWINDOWS.fileattr", "MSWINDOWS.rawsd",
                            "LIBARCHIVE.creationtime"}, (name, pax)
        attrs = int(pax["MSWINDOWS.fileattr"])
        assert 0 <= attrs < 1 << 32
        sd = binascii.a2b_base64(pax["MSWINDOWS.rawsd"].encode(), strict_mode=True)
        assert sd[0] == 1 and int.from_bytes(sd[2:4], "little") & 0x8000, name  # self-relative
        assert PAX_TIME.match(pax["LIBARCHIVE.creationtime"]), pax["LIBARCHIVE.creationtime"]
        if m.isdir():
            assert attrs & ATTR_DIRECTORY and m.mode == 0o40000, name
            last_dir_for_whiteouts = name
        elif m.issym():  # go-winio: a reparse point's entry (cISLNK), REPARSE_POINT kept
            assert attrs & ATTR_REPARSE and m.linkname, name
            assert m.mode == (0o160000 if attrs & ATTR_DIRECTORY else 0o120000), name
            last_dir_for_whiteouts = None
        else:
            assert m.type == tarfile.REGTYPE and not attrs & ATTR_DIRECTORY, name
            assert m.mode == (0o100000 if m.size else m.mode), name
            last_dir_for_whiteouts = None
        last_main = name
        seen.add(name)
    return members


def test_sandbox_round_trip(store: Any, gowintar: Path) -> None:
    base_tar, delta_tar = base_layer().tar(gowintar), delta_layer().tar(gowintar)
    store.create("base")
    store.apply_diff("base", None, io.BytesIO(base_tar))
    store.create("up", "base")
    store.apply_diff("up", None, io.BytesIO(delta_tar))
    store.create_rw("ctr", "up")
    sandbox_dir = Path(store.metadata("ctr")["dir"])
    assert sum(len(f) + len(d) for _, d, f in os.walk(sandbox_dir)) < 10  # nothing copied

    with store.mounted("ctr") as root:
        assert sorted(os.listdir(root)) == ["Program Files", "Windows"]  # old.log deleted
        assert not (root / "Program Files/App/app.exe:meta").exists()
        with open(root / "Program Files/App/app.exe", "ab") as f:  # modified, has streams
            f.write(b"-patched")
        (root / "Program Files/App/readme.txt").unlink()  # deleted
        os.rename(root / "Program Files/App/settings.ini", root / "Program Files/App/conf.ini")
        (root / "Program Files/App/new.dll").write_bytes(b"MZnew")  # added
        os.mkdir(root / "Tools")
        (root / "Tools/tool.exe").write_bytes(b"MZtool")
        (root / "Windows/win.ini").write_bytes(b"; rewritten\r\n")
        view = snapshot(root, metadata=False, mtimes=False)

    changes = {c.path: c.kind for c in store.changes("ctr")}
    assert changes == {
        "Files": ChangeKind.MODIFY,
        "Files/Program Files": ChangeKind.MODIFY,
        "Files/Program Files/App": ChangeKind.MODIFY,
        "Files/Program Files/App/readme.txt": ChangeKind.DELETE,
        "Files/Program Files/App/settings.ini": ChangeKind.DELETE,  # renamed: gone ...
        "Files/Program Files/App/conf.ini": ChangeKind.ADD,  # ... and added
        "Files/Program Files/App/app.exe": ChangeKind.MODIFY,
        "Files/Program Files/App/new.dll": ChangeKind.ADD,
        "Files/Tools": ChangeKind.ADD,
        "Files/Tools/tool.exe": ChangeKind.ADD,
        "Files/Windows": ChangeKind.MODIFY,
        "Files/Windows/win.ini": ChangeKind.MODIFY,
    }
    with store.diff("ctr") as f:
        data = f.read()
    members = check_windows_layer(data)
    assert [m.name for m in members] == [
        "Files", "Files/Program Files", "Files/Program Files/App",
        "Files/Program Files/App/.wh.readme.txt", "Files/Program Files/App/.wh.settings.ini",
        "Files/Program Files/App/app.exe", "Files/Program Files/App/app.exe:Zone.Identifier",
        "Files/Program Files/App/app.exe:meta", "Files/Program Files/App/conf.ini",
        "Files/Program Files/App/new.dll", "Files/Tools", "Files/Tools/tool.exe",
        "Files/Windows", "Files/Windows/win.ini"]
    assert store.diff_size("ctr") == sum(
        m.size for m in members if m.isreg() and ":" not in m.name)

    got, base_in, delta_in = records_of(data), records_of(base_tar), records_of(delta_tar)
    # a modified file keeps the lower file's Windows records byte for byte
    for name, source in (("Files/Program Files/App/app.exe", base_in),
                         ("Files/Windows/win.ini", base_in), ("Files/Windows", delta_in)):
        lower = {k: v for k, v in source[name][1].items() if not k.startswith(("mtime",
                                                                               "atime", "ctime"))}
        assert {k: got[name][1][k] for k in lower} == lower, name
    for s in ("Zone.Identifier", "meta"):
        stream = f"Files/Program Files/App/app.exe:{s}"
        assert got[stream][0].size == base_in[stream][0].size
    # new files and directories: BuildKit's defaults, the creation time well-formed
    for name, sd, attrs in (("Files/Program Files/App/new.dll", FILE_SD, "32"),
                            ("Files/Program Files/App/conf.ini", FILE_SD, "32"),
                            ("Files/Tools", DIRECTORY_SD, "16")):
        info, pax = got[name]
        assert pax["MSWINDOWS.fileattr"] == attrs
        assert base64.b64decode(pax["MSWINDOWS.rawsd"]) == sd
        assert float(pax["LIBARCHIVE.creationtime"]) == pytest.approx(info.mtime, abs=1)

    # applied as a new layer on the sandbox's parent: the same merged view
    store.create("img", "up")
    assert store.apply_diff("img", None, io.BytesIO(data)) == store.diff_size("ctr")
    with store.mounted("img") as merged:
        assert snapshot(merged, metadata=False, mtimes=False) == view
    img = Path(store.metadata("img")["dir"]) / "Files/Program Files/App"
    assert (img / "app.exe:meta").read_bytes() == b"m" * 10


def test_case_twins_are_refused(store: Any, gowintar: Path) -> None:
    store.create("base")
    store.apply_diff("base", None, io.BytesIO(base_layer().tar(gowintar)))
    store.create_rw("ctr", "base")
    with store.mounted("ctr") as root:
        (root / "Windows/WIN.INI").write_text("twin")
    with pytest.raises(InvalidArgument, match="differ only in case") as info:
        store.diff_size("ctr")
    assert "\n" not in str(info.value)
    store.create_rw("ctr2", "base")
    with store.mounted("ctr2") as root:
        (root / "a.txt").write_text("1")
        (root / "A.TXT").write_text("2")
    with pytest.raises(InvalidArgument, match=r"Files/A\.TXT and Files/a\.txt"), \
            store.diff("ctr2") as f:
        f.read()


def test_sized_cow_sandbox(store: Any, gowintar: Path) -> None:
    from graphdriver import quota

    problem = quota.image_supported()
    if problem is not None:
        pytest.skip(problem)
    store.create("base")
    store.apply_diff("base", None, io.BytesIO(base_layer().tar(gowintar)))
    store.create_rw("sized", "base", CreateOpts(storage_opt={"size": "32M"}))
    with store.mounted("sized") as root:
        assert (root / "Windows/win.ini").read_bytes() == b"; win\r\n"
        with pytest.raises(OSError) as err, open(root / "big", "wb") as f:
            for _ in range(48):
                f.write(bytes(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        assert err.value.errno in (errno.ENOSPC, errno.EDQUOT)
    assert stat.S_ISREG(os.lstat(Path(store.metadata("sized")["dir"]) / "quota.img").st_mode)


def test_new_symlinks_get_the_attributes_hcsshim_exports(store: Any, gowintar: Path) -> None:
    """go-winio's header of a symlink hcsshim exported: REPARSE_POINT (1024), and with
    DIRECTORY (1040, mode bits of both) for a link to a directory; hcsshim's importer hands the
    attributes on as they are (BuildKit's none would be read as 0)."""
    store.create("base")
    store.apply_diff("base", None, io.BytesIO(base_layer().tar(gowintar)))
    store.create_rw("ctr", "base")
    with store.mounted("ctr") as root:
        os.symlink("Program Files", root / "to-dir")  # a directory of a lower layer only
        os.symlink("/Program Files/App/", root / "Windows/abs-dir")
        os.symlink("old.log", root / "to-file")
        os.symlink("nowhere", root / "dangling")
        os.symlink("C:\\Windows", root / "windows-form")
        os.symlink("../..", root / "Windows/outside")
        os.symlink("..", root / "Windows/to-root")
    with store.diff("ctr") as f:
        data = f.read()
    check_windows_layer(data)
    got = records_of(data)
    want = {"to-dir": 1040, "Windows/abs-dir": 1040, "Windows/to-root": 1040, "to-file": 1024,
            "dangling": 1024, "windows-form": 1024, "Windows/outside": 1024}
    for name, attrs in want.items():
        info, pax = got[f"Files/{name}"]
        assert int(pax["MSWINDOWS.fileattr"]) == attrs, name
        assert info.mode == (0o160000 if attrs & ATTR_DIRECTORY else 0o120000), name
        sd = DIRECTORY_SD if attrs & ATTR_DIRECTORY else FILE_SD
        assert base64.b64decode(pax["MSWINDOWS.rawsd"]) == sd, name
    store.create("img", "base")
    store.apply_diff("img", None, io.BytesIO(data))
    with store.diff("img") as f:
        again = records_of(f.read())
    for name in want:
        assert again[f"Files/{name}"][1] == got[f"Files/{name}"][1], name
        assert again[f"Files/{name}"][0].mode == got[f"Files/{name}"][0].mode, name
