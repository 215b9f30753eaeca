"""Snapshot a directory tree (every fact a layer keeps) so two trees can be compared."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

Entry = tuple[Any, ...]


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        if name.startswith("security.selinux"):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


def _sparse_digest(path: str, st: os.stat_result) -> str:
    """sha256 of a file's data; a sparse file hashes its data extents and their offsets (a
    different digest than the same bytes stored densely), so a 60 GiB hole (Go's sparse test
    tars) costs nothing."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if st.st_blocks * 512 >= st.st_size:
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            return h.hexdigest()
        pos = 0
        while pos < st.st_size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            h.update(b"@%d:" % data)
            os.lseek(fd, data, os.SEEK_SET)
            left = hole - data
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            pos = hole
        return "sparse:" + h.hexdigest()
    finally:
        os.close(fd)


def snapshot(root: str | os.PathLike[str], *, mtimes: bool = True, dir_mtimes: bool = False,
             sparse: bool = False, whiteout_mtimes: bool = True, metadata: bool = True,
             with_root: bool = False, mtime_seconds: bool = False) -> dict[str, Entry]:
    """path -> (kind, mode, uid, gid, size/target/digest/rdev, mtime, xattrs, link group).

    Hard-link groups are compared by the sorted list of names sharing an inode.  ``sparse``
    hashes only the data extents of sparse files (see _sparse_digest); ``whiteout_mtimes=False``
    leaves out the times of 0/0 character devices (overlay whiteouts, made at apply time);
    ``metadata=False`` keeps only kinds, contents, link targets and hard-link groups (no mode,
    owner or xattrs: what a format without Unix metadata, a Windows layer, carries);
    ``with_root`` adds the root directory itself as ``"."``; ``mtime_seconds`` keeps mtimes in
    whole seconds (what a tar written with second times carries).
    """
    root = os.fspath(root)
    entries: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def record(full: str, rel: str) -> None:
        st = os.lstat(full)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if sparse:
                digest = _sparse_digest(full, st)
            else:
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(chunk)
                digest = h.hexdigest()
            what: Any = ("f", st.st_size, digest)
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        elif stat.S_ISDIR(mode):
            what = ("d",)
        elif stat.S_ISLNK(mode):
            what = ("l", os.readlink(full))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            what = ("c" if stat.S_ISCHR(mode) else "b", os.major(st.st_rdev),
                    os.minor(st.st_rdev))
        elif stat.S_ISFIFO(mode):
            what = ("p",)
        else:
            what = ("?",)
        mtime = st.st_mtime_ns // 10**9 if mtime_seconds else st.st_mtime_ns
        keep_mtime = (mtimes and not stat.S_ISLNK(mode)
                      and (dir_mtimes or not stat.S_ISDIR(mode))
                      and (whiteout_mtimes or what != ("c", 0, 0)))
        if metadata:
            entries[rel] = (what, stat.S_IMODE(mode), st.st_uid, st.st_gid,
                            mtime if keep_mtime else None, _xattrs(full))
        else:
            entries[rel] = (what, mtime if keep_mtime else None)

    if with_root:
        record(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            record(full, os.path.relpath(full, root))
    for names in inodes.values():
        if len(names) > 1:
            group = tuple(sorted(names))
            for n in names:
                entries[n] = (*entries[n], group)
    return entries


def diff_snapshots(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    """Human-readable differences (empty when equal)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"only in second: {k} {b[k]}")
        elif k not in b:
            out.append(f"only in first: {k} {a[k]}")
        elif a[k] != b[k]:
            out.append(f"differs: {k}: {a[k]} != {b[k]}")
    return out


# --- building tars for tests ---------------------------------------------------------------


class TarBuilder:
    """Builds a layer tar in memory with tarfile (test data only, not the engine)."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt)  # noqa: SIM115
        self.mtime = 1_700_000_000  # fixed, so the same builder calls make the same bytes

    def _info(self, name: str, kind: bytes, mode: int, **kw: Any) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.mtime = kw.pop("mtime", self.mtime)
        ti.uid = kw.pop("uid", 0)
        ti.gid = kw.pop("gid", 0)
        ti.uname = ti.gname = ""
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    def dir(self, name: str, mode: int = 0o755, **kw: Any) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> TarBuilder:
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str, **kw: Any) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.SYMTYPE, 0o777, linkname=target, **kw))
        return self

    def hardlink(self, name: str, target: str, **kw: Any) -> TarBuilder:
        self.tar.addfile(self._info(name, tarfile.LNKTYPE, 0o644, linkname=target, **kw))
        return self

    def whiteout(self, path: str) -> TarBuilder:
        head, _, base = path.rpartition("/")
        return self.file(f"{head}/.wh.{base}" if head else f".wh.{base}")

    def opaque(self, dirpath: str) -> TarBuilder:
        return self.file(f"{dirpath.rstrip('/')}/.wh..wh..opq")

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()

    def write(self, path: Path) -> Path:
        path.write_bytes(self.bytes())
        return path
