"""Windows layer tars: a stored layer's Windows metadata.  PAX records <-> ``user.mswindows.*``
xattrs, and the files at the layer root (``tombstones.txt``, ``linkmeta.json``,
``crosslinks.json``).  Never imports the importer, the walker or the exporter."""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os

from ...errors import GraphDriverError, InvalidArchive
from .names import (
    CROSSLINKS,
    DIR_FLAGS,
    HDR_CREATION_TIME,
    HDR_EA_PREFIX,
    HDR_FILE_ATTRIBUTES,
    HDR_MOUNT_POINT,
    HDR_RAW_SECURITY_DESCRIPTOR,
    HDR_SECURITY_DESCRIPTOR,
    LINKMETA,
    NEW_FILE,
    SIDE_DIR,
    SPARSE_PREFIX,
    STRUCTURAL_KEYS,
    TIME_KEYS,
    TOMBSTONE_HEADER,
    TOMBSTONES,
    X_CTIME_CREATION,
    X_EA,
    X_FILEATTR,
    X_MOUNTPOINT,
    X_PAX,
    X_RAWSD,
    X_SD,
    X_SIDE,
    XATTR_NAME_MAX,
    XATTR_PREFIX,
)


def bad_archive(msg: str) -> InvalidArchive:
    return InvalidArchive(f"invalid Windows layer: {msg}")


def _b64decode(value: str, key: str, name: str) -> bytes:
    try:
        return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise bad_archive(f"{name}: {key} is not base64") from exc


def _check_pax_time(value: str, key: str, name: str) -> None:
    whole, _, frac = value.partition(".")
    digits = whole[1:] if whole.startswith("-") else whole
    if not digits.isascii() or not digits.isdigit() or (frac and not (
            frac.isascii() and frac.isdigit())):
        raise bad_archive(f"{name}: {key} {value!r} is not a time")


def pax_to_xattrs(pax: dict[str, str], name: str) -> dict[str, bytes]:
    """The ``user.mswindows.*`` xattrs that keep an entry's PAX records (validated as go-winio)."""
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key in STRUCTURAL_KEYS or key.startswith(SPARSE_PREFIX):
            continue  # they describe the tar entry (its name, size, encoding), not the file
        raw = value.encode("utf-8", "surrogateescape")
        if key == HDR_FILE_ATTRIBUTES:
            if not value.isascii() or not value.isdigit() or int(value) > 0xFFFFFFFF:
                raise bad_archive(f"{name}: {key} {value!r} is not a 32-bit decimal number")
            out[X_FILEATTR] = raw
        elif key == HDR_RAW_SECURITY_DESCRIPTOR:
            out[X_RAWSD] = _b64decode(value, key, name)
        elif key == HDR_SECURITY_DESCRIPTOR:
            out[X_SD] = raw
        elif key == HDR_MOUNT_POINT:
            out[X_MOUNTPOINT] = raw
        elif key.startswith(HDR_EA_PREFIX) and len(key) > len(HDR_EA_PREFIX):
            xname = X_EA + key[len(HDR_EA_PREFIX):]
            if len(xname.encode("utf-8", "surrogateescape")) > XATTR_NAME_MAX:
                raise bad_archive(f"{name}: extended attribute name too long")
            out[xname] = _b64decode(value, key, name)
        elif key == HDR_CREATION_TIME:
            _check_pax_time(value, key, name)
            out[X_CTIME_CREATION] = raw
        elif key in TIME_KEYS:
            out[XATTR_PREFIX + key] = raw
        else:
            xname = X_PAX + key
            if len(xname.encode("utf-8", "surrogateescape")) > XATTR_NAME_MAX:
                raise bad_archive(f"{name}: PAX record name {key[:40]!r}... too long")
            out[xname] = raw
    return out


def xattrs_to_pax(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    """The PAX records (key -> raw value) an entry gets back from its stored xattrs."""
    out: dict[str, bytes] = {}
    for xname, value in xattrs.items():
        if not xname.startswith(XATTR_PREFIX):
            continue
        if xname == X_FILEATTR:
            out[HDR_FILE_ATTRIBUTES] = value
        elif xname == X_RAWSD:
            out[HDR_RAW_SECURITY_DESCRIPTOR] = base64.b64encode(value)
        elif xname == X_SD:
            out[HDR_SECURITY_DESCRIPTOR] = value
        elif xname == X_MOUNTPOINT:
            out[HDR_MOUNT_POINT] = value
        elif xname.startswith(X_EA):
            out[HDR_EA_PREFIX + xname[len(X_EA):]] = base64.b64encode(value)
        elif xname == X_CTIME_CREATION:
            out[HDR_CREATION_TIME] = value
        elif xname.startswith(X_PAX):
            out[xname[len(X_PAX):]] = value
        elif xname[len(XATTR_PREFIX):] in TIME_KEYS:
            out[xname[len(XATTR_PREFIX):]] = value
    return out


def read_win_xattrs(path: int | str, layer_fd: int | None = None) -> dict[str, bytes]:
    """The ``user.mswindows.*`` xattrs of an open fd (or a path; symlinks not followed).

    With ``layer_fd`` (the layer's root), values kept in side files are read back in place of
    the ``user.mswindows.side`` reference; without it the reference is returned as it is (to be
    copied to another file of a layer holding the same side files).
    """
    follow = isinstance(path, int)  # an fd: the flag is not allowed (and means nothing)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for n in names:
        if n.startswith(XATTR_PREFIX):
            with contextlib.suppress(OSError):
                out[n] = os.getxattr(path, n, follow_symlinks=follow)
    if layer_fd is not None and X_SIDE in out:
        for n, digest in _side_refs(out.pop(X_SIDE)).items():
            out[n] = _read_side_file(layer_fd, digest)
    return out


def set_win_xattrs(fd: int, xattrs: dict[str, bytes], replace: bool,
                   layer_fd: int | None = None) -> None:
    """Set the xattrs on ``fd``; with ``layer_fd``, a value the filesystem has no room for (an
    NTFS security descriptor or EA may be up to 64 KiB, ext4 keeps one block of xattrs) goes to
    a side file ``winmeta/<sha256>`` of the layer, named in ``user.mswindows.side``."""
    if replace:
        for n in os.listxattr(fd):
            if n.startswith(XATTR_PREFIX) and n not in xattrs:
                os.removexattr(fd, n)
    side = _side_refs(xattrs[X_SIDE]) if X_SIDE in xattrs else {}
    direct: list[str] = []
    for n, v in xattrs.items():
        if n == X_SIDE:
            continue
        try:
            os.setxattr(fd, n, v)
            direct.append(n)
        except OSError as exc:
            if exc.errno not in _NO_ROOM or layer_fd is None:
                raise
            side[n] = _write_side_file(layer_fd, v)
    if not side:
        return
    # The reference itself needs room: move the largest values out until it fits.
    direct.sort(key=lambda n: len(xattrs[n]))
    while True:
        try:
            os.setxattr(fd, X_SIDE, json.dumps(side, sort_keys=True).encode())
            return
        except OSError as exc:
            if exc.errno not in _NO_ROOM or not direct or layer_fd is None:
                raise
        n = direct.pop()
        side[n] = _write_side_file(layer_fd, xattrs[n])
        os.removexattr(fd, n)


_NO_ROOM = (errno.ENOSPC, errno.E2BIG, errno.ERANGE)


def _side_refs(raw: bytes) -> dict[str, str]:
    return {str(k): str(v) for k, v in json.loads(raw).items()}


def _write_side_file(layer_fd: int, value: bytes) -> str:
    digest = hashlib.sha256(value).hexdigest()
    with contextlib.suppress(FileExistsError):
        os.mkdir(SIDE_DIR, 0o700, dir_fd=layer_fd)
    dfd = os.open(SIDE_DIR, DIR_FLAGS, dir_fd=layer_fd)
    try:
        try:
            os.stat(digest, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            write_small_file(dfd, digest, value)
    finally:
        os.close(dfd)
    return digest


def _read_side_file(layer_fd: int, digest: str) -> bytes:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise GraphDriverError(f"windowsfilter: bad side-file reference {digest[:70]!r}")
    fd = os.open(f"{SIDE_DIR}/{digest}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=layer_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def adopt_side_files(src_layer_fd: int, dst_layer_fd: int) -> None:
    """Hard-link the side files of ``src_layer_fd`` into ``dst_layer_fd`` (files the new layer
    shares with a parent, hard links or cloned metadata, keep their references)."""
    try:
        sfd = os.open(SIDE_DIR, DIR_FLAGS, dir_fd=src_layer_fd)
    except FileNotFoundError:
        return
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(SIDE_DIR, 0o700, dir_fd=dst_layer_fd)
        dfd = os.open(SIDE_DIR, DIR_FLAGS, dir_fd=dst_layer_fd)
        try:
            for n in os.listdir(sfd):
                with contextlib.suppress(FileExistsError):
                    os.link(n, n, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def file_attributes(xattrs: dict[str, bytes]) -> int:
    raw = xattrs.get(X_FILEATTR)
    return int(raw) if raw and raw.isdigit() else 0


def time_ns(value: bytes | None) -> int | None:
    if value is None:
        return None
    text = value.decode("ascii", "replace")
    whole, _, frac = text.partition(".")
    try:
        sec = int(whole) if whole not in ("", "-") else 0
        ns = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        return None
    neg = whole.startswith("-")
    return sec * 1_000_000_000 - ns if neg else sec * 1_000_000_000 + ns


# ----- tombstones.txt and linkmeta.json -------------------------------------------------------


def parse_tombstones(data: bytes) -> list[str]:
    """Deleted paths (relative to ``Files``, "/"-separated) from hcsshim's tombstones.txt."""
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    if not lines or lines[0].lstrip("\ufeff").strip() != "Version 1.0":
        raise GraphDriverError("invalid tombstones.txt: no 'Version 1.0' header")
    out = []
    for line in lines[1:]:
        p = line.strip("\r").replace("\\", "/").strip("/")
        if p:
            out.append(p)
    return out


def format_tombstones(paths: list[str]) -> bytes:
    body = "".join("\\" + p.replace("/", "\\") + "\n" for p in paths)
    return TOMBSTONE_HEADER + b"\n" + body.encode("utf-8", "surrogateescape")


def read_tombstones(layer_fd: int) -> list[str]:
    try:
        fd = os.open(TOMBSTONES, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer_fd)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as f:
        return parse_tombstones(f.read())


def read_linkmeta(layer_fd: int) -> dict[str, dict[str, bytes]]:
    try:
        fd = os.open(LINKMETA, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer_fd)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        obj = json.loads(f.read())
    return {path: {k: base64.b64decode(v) for k, v in meta.items()} for path, meta in obj.items()}


def read_crosslinks(layer_fd: int) -> dict[str, str]:
    """Names of this layer that are hard links to a parent layer's file -> that file's path."""
    try:
        fd = os.open(CROSSLINKS, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=layer_fd)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        return {str(k): str(v) for k, v in json.loads(f.read()).items()}


def write_small_file(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, NEW_FILE, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
