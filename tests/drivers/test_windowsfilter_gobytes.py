"""Plain ``diff`` of a layer imported from a tar written by Go's archive/tar (as go-winio and
hcsshim write them) is that tar, byte for byte (issue 17)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
from tests.drivers.gowin import ATTR_ARCHIVE, ATTR_DIRECTORY, ATTR_HIDDEN, GoLayer

LONG_DIR = "Program Files (x86)/Common Files/Microsoft Shared/VisualStudio/Shell/Extensions"
ACCENTED = "R\u00e9sum\u00e9 \u30d5\u30a1\u30a4\u30eb.txt"


def round_trip(d: Any, layer_id: str, parent: str | None, data: bytes) -> bytes:
    d.create(layer_id, parent)
    d.apply_diff(layer_id, None, io.BytesIO(data))
    with d.diff(layer_id) as f:
        return bytes(f.read())


def first_difference(got: bytes, want: bytes) -> str:
    for off in range(0, max(len(got), len(want)), 512):
        g, w = got[off:off + 512], want[off:off + 512]
        if g != w:
            at = next(i for i in range(512) if g[i:i + 1] != w[i:i + 1])
            return (f"block at {off}, byte {at}: got {g[max(at - 20, 0):at + 40]!r} "
                    f"want {w[max(at - 20, 0):at + 40]!r}; block starts {w[:100]!r}")
    return "same"


def base() -> GoLayer:
    parts = LONG_DIR.split("/")
    layer = GoLayer().dir("Files").symlink("Files/Documents and Settings", "C:\\Users",
                                           junction=True, directory=True)
    for i in range(len(parts)):
        layer.dir("Files/" + "/".join(parts[:i + 1]))
    return (
        layer
        .file(f"Files/{LONG_DIR}/extension.vsixmanifest", b"<xml/>" * 10,
              streams={"Zone.Identifier": b"[ZoneTransfer]\r\nZoneId=3\r\n"})
        .file(f"Files/{LONG_DIR}/" + "\u00e4" * 60 + ".dll", b"MZ" * 100)
        .file("Files/" + ACCENTED, "caf\u00e9".encode())
        .dir("Files/Windows", attrs=ATTR_DIRECTORY | ATTR_HIDDEN, whole=True)
        .file("Files/Windows/empty-with-stream.txt", b"")
        .file("Files/Windows/empty-without-stream.txt", None)
        .file("Files/Windows/kernel32.dll", bytes(range(256)) * 9,
              eas={"$KERNEL.PURGE.ESBCACHE": b"\x01\x02\x03"})
        .file("Files/Windows/whole-second.ini", b"[x]\r\n", whole=True)
        .file("Files/Windows/win.ini", b"; win\r\n", attrs=ATTR_ARCHIVE | ATTR_HIDDEN, sd=None)
    )


def test_plain_diff_of_a_go_written_base_layer_is_its_bytes(store: Any, gowintar: Path) -> None:
    data = base().tar(gowintar)
    got = round_trip(store, "base", None, data)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), \
        first_difference(got, data)


def test_plain_diff_of_a_go_written_delta_is_its_bytes(store: Any, gowintar: Path) -> None:
    round_trip(store, "base", None, base().tar(gowintar))
    delta = (
        GoLayer(base_ns=1_710_000_000_000_000_100)
        .dir("Files")
        .whiteout("Files/" + ACCENTED)
        .dir("Files/Program Files (x86)")
        .dir("Files/Program Files (x86)/Common Files")
        .dir("Files/Program Files (x86)/Common Files/Microsoft Shared")
        .dir("Files/Program Files (x86)/Common Files/Microsoft Shared/VisualStudio")
        .dir("Files/Program Files (x86)/Common Files/Microsoft Shared/VisualStudio/Shell")
        .dir(f"Files/{LONG_DIR}")
        .whiteout(f"Files/{LONG_DIR}/extension.vsixmanifest")  # > 100 bytes, fits the prefix
        .whiteout(f"Files/{LONG_DIR}/" + "\u00e4" * 60 + ".dll")  # not ASCII: PAX path
        .dir("Files/Windows", attrs=ATTR_DIRECTORY | ATTR_HIDDEN)
        .whiteout("Files/Windows/win.ini")
        .file("Files/Windows/kernel32.dll", b"MZ-v2" * 100)
        .file("Files/Windows/new.txt", b"new", streams={"s1": b"1", "s2": b"22"})
    )
    data = delta.tar(gowintar)
    got = round_trip(store, "up", "base", data)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), \
        first_difference(got, data)


# ---- one name spelled in two letter cases: exact export (tar-split) ------------------------


def exact_diff(d: Any, layer_id: str) -> bytes:
    from graphdriver.exactdiff import write_exact_diff

    out = io.BytesIO()
    write_exact_diff(d, layer_id, out)
    return out.getvalue()


def test_exact_diff_of_names_spelled_in_two_cases(store: Any, gowintar: Path) -> None:
    """NTFS resolves ``Files/windows/system32/a.dll`` to the ``Files/Windows/System32`` the tar
    made before it: the import stores one directory, and the exact diff finds each recorded
    name in it (one match regardless of case) and gives the input's bytes back."""
    base_data = (
        GoLayer()
        .dir("Files")
        .dir("Files/Windows")
        .dir("Files/Windows/System32")
        .file("Files/Windows/System32/kernel32.dll", b"MZ" * 300,
              streams={"Zone.Identifier": b"ZoneId=3"})
        .file("Files/windows/system32/a.dll", b"lower-case path")
        .file("Files/WINDOWS/SYSTEM32/B.DLL", b"upper-case path")
        .dir("Files/windows/Temp")
        .file("Files/Windows/temp/t.txt", b"temp")
    ).tar(gowintar)
    store.create("base")
    store.apply_diff("base", None, io.BytesIO(base_data))
    assert sorted(os.listdir(store.home / "base" / "Files" / "Windows")) == ["System32", "Temp"]
    got = exact_diff(store, "base")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(base_data).hexdigest(), \
        first_difference(got, base_data)
    delta_data = (
        GoLayer(base_ns=1_710_000_000_000_000_100)
        .dir("Files")
        .dir("Files/WINDOWS")
        .dir("Files/windows/SYSTEM32")
        .file("Files/Windows/System32/KERNEL32.DLL", b"MZ-v2" * 100)
        .file("Files/windows/system32/new.dll", b"new")
    ).tar(gowintar)
    store.create("up", "base")
    store.apply_diff("up", None, io.BytesIO(delta_data))
    got = exact_diff(store, "up")
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(delta_data).hexdigest(), \
        first_difference(got, delta_data)


def test_a_name_rewritten_in_another_case_stays_unreproducible(store: Any,
                                                               gowintar: Path) -> None:
    """Two file entries of one name in two cases: NTFS keeps the second's data under the first
    spelling, so the first entry's bytes are gone and the exact diff is refused in one line
    (the plain diff still works)."""
    from graphdriver.errors import ExactDiffUnavailable

    data = (GoLayer().dir("Files").file("Files/a.txt", b"first").file("Files/A.TXT", b"second!")
            ).tar(gowintar)
    store.create("twice")
    store.apply_diff("twice", None, io.BytesIO(data))
    with pytest.raises(ExactDiffUnavailable, match=r"same file as another entry|bytes after"):
        exact_diff(store, "twice")
    assert (store.home / "twice" / "Files" / "a.txt").read_bytes() == b"second!"
