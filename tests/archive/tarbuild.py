"""Helpers for the tar-engine tests: hand-built tar members and tree snapshots."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def base256(value: int, width: int) -> bytes:
    """GNU base-256 number field (0x80 marker for positives, two's complement for negatives)."""
    if value >= 0:
        raw = bytearray(value.to_bytes(width, "big"))
        raw[0] |= 0x80
        return bytes(raw)
    return value.to_bytes(width, "big", signed=True)


def header(
    name: str | bytes,
    *,
    type: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_600_000_000,
    linkname: str | bytes = b"",
    fmt: str = "ustar",
    devmajor: int = 0,
    devminor: int = 0,
    fields: dict[tuple[int, int], bytes] | None = None,
    checksum: str | int = "unsigned",
) -> bytes:
    """One 512-byte header.  *fields* overrides byte ranges before the checksum is computed."""
    nb = name.encode() if isinstance(name, str) else name
    lb = linkname.encode() if isinstance(linkname, str) else linkname
    blk = bytearray(BLOCK)
    blk[0 : len(nb[:100])] = nb[:100]
    blk[100:108] = _octal(mode, 8)
    blk[108:116] = _octal(uid, 8)
    blk[116:124] = _octal(gid, 8)
    blk[124:136] = _octal(size, 12) if size >= 0 else base256(size, 12)
    blk[136:148] = _octal(mtime, 12)
    blk[156:157] = type
    blk[157 : 157 + len(lb[:100])] = lb[:100]
    if fmt == "ustar":
        blk[257:265] = b"ustar\x0000"
    elif fmt == "gnu":
        blk[257:265] = b"ustar  \0"
    if fmt in ("ustar", "gnu"):
        blk[265:269] = b"root"
        blk[297:301] = b"root"
        blk[329:337] = _octal(devmajor, 8)
        blk[337:345] = _octal(devminor, 8)
    for (a, b), v in (fields or {}).items():
        blk[a:b] = v.ljust(b - a, b"\0")[: b - a]
    blk[148:156] = b" " * 8
    if isinstance(checksum, int):
        total = checksum
    elif checksum == "signed":
        total = sum(x - 256 if x >= 128 else x for x in blk)
    else:
        total = sum(blk)
    blk[148:156] = (b"%06o" % (total & 0o777777)) + b"\0 "
    return bytes(blk)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str | bytes, data: bytes = b"", **kw: Any) -> bytes:
    if kw.get("type", b"0") in (b"0", b"7", b"\0"):
        kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)


def pax_records(records: Iterable[tuple[str, bytes | str]]) -> bytes:
    out = b""
    for key, value in records:
        v = value.encode() if isinstance(value, str) else value
        body = b" " + key.encode() + b"=" + v + b"\n"
        n = len(body) + 1
        while len(str(n).encode()) + len(body) != n:
            n = len(str(n).encode()) + len(body)
        out += str(n).encode() + body
    return out


def pax_member(records: Iterable[tuple[str, bytes | str]] | bytes, type: bytes = b"x") -> bytes:
    data = records if isinstance(records, bytes) else pax_records(records)
    return header(b"./PaxHeaders/x", type=type, size=len(data)) + pad(data)


def end() -> bytes:
    return bytes(2 * BLOCK)


def build(*parts: bytes) -> bytes:
    return b"".join(parts) + end()


# ---- snapshots -------------------------------------------------------------------------------
# ---- GNU tar and a rich source tree --------------------------------------------------------
HAVE_GNU_TAR = shutil.which("tar") is not None and b"GNU tar" in subprocess.run(
    ["tar", "--version"], capture_output=True, check=False
).stdout
IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root (owners, devices, trusted.* xattrs)"
)
needs_gnu_tar = pytest.mark.skipif(not HAVE_GNU_TAR, reason="GNU tar is not installed")


def gnu_tar(*args: str | os.PathLike[str]) -> None:
    subprocess.run(["tar", *map(os.fspath, args)], check=True, capture_output=True)


def gnu_extract(tar: Path, dest: Path) -> None:
    gnu_tar("--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tar, "-C", dest)


def _set(path: Path, uid: int, gid: int, mode: int | None, mtime: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    if mode is not None:
        os.chmod(path, mode)
    os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def make_rich_tree(
    root: Path, *, devices: bool = True, xattrs: bool = True, long_names: bool = True
) -> None:
    """A tree with every kind of entry apply handles (as root: owners, devices, trusted xattrs)."""
    t = 1_650_000_000_123_456_789
    root.mkdir(exist_ok=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/su").write_bytes(b"\x7fELF" + os.urandom(3000))
    (root / "usr/bin/empty").write_bytes(b"")
    (root / "usr/lib").mkdir()
    (root / "usr/lib/big").write_bytes(os.urandom(3 << 20))
    os.link(root / "usr/bin/su", root / "usr/bin/su-hardlink")
    os.symlink("usr/bin", root / "bin")
    os.symlink("/etc/passwd", root / "etc/abs-link")
    os.symlink("../nowhere", root / "etc/dangling")
    (root / "tmp").mkdir()
    (root / "home/user/deep/er/still").mkdir(parents=True)
    (root / "home/user/deep/er/still/f").write_text("deep")
    (root / "ro").mkdir()
    (root / "ro/inside").write_text("x")
    long_dir = root / ("L" * 120) / ("M" * 120) if long_names else root / "L" / "M"
    long_dir.mkdir(parents=True)
    (long_dir / ("n" * 160 if long_names else "n")).write_text("long name")
    (root / "unicodé-名前").write_text("utf8")
    with open(root / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data" * 1000)
        f.seek(4 << 20)
        f.write(b"end")
    if devices:
        os.mkfifo(root / "fifo", 0o640)
        os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(root / "loop", 0o660 | 0o060000, os.makedev(7, 200))
    if xattrs:
        os.setxattr(root / "etc/passwd", "user.comment", b"hello\x00binary\xff")
        os.setxattr(root / "usr/bin/su", "security.capability", bytes.fromhex(
            "0100000200200000000000000000000000000000"))
        os.setxattr(root / "home", "user.dir", b"on a dir")
        os.setxattr(root / "home", "trusted.test", b"t")
    _set(root / "usr/bin/su", 0, 0, 0o4755, t)
    _set(root / "etc/passwd", 0, 0, 0o644, t + 1)
    _set(root / "usr/bin/empty", 1000, 1000, 0o600, t + 2)
    _set(root / "usr/lib/big", 3, 4, 0o640, t + 3)
    if devices:
        _set(root / "fifo", 12, 34, 0o640, t + 4)
    _set(root / "sparse", 0, 0, 0o644, t + 5)
    _set(root / "unicodé-名前", 65534, 65534, 0o644, t + 6)
    _set(root / "home/user/deep/er/still/f", 1000, 100, 0o2755, t + 7)
    os.chown(root / "etc/abs-link", 5, 6, follow_symlinks=False)
    _set(root / "tmp", 0, 0, 0o1777, t + 8)
    _set(root / "home/user", 1000, 1000, 0o2750, t + 9)
    _set(root / "ro/inside", 0, 0, 0o444, t + 10)
    _set(root / "ro", 0, 0, 0o555, t + 11)
    for d in ["home/user/deep/er/still", "home/user/deep/er", "home/user/deep", "home",
              "usr/bin", "usr/lib", "usr", "etc", long_dir, long_dir.parent]:
        p = root / d
        os.utime(p, ns=(t + 20, t + 20))
    os.utime(root, ns=(t + 30, t + 30))
