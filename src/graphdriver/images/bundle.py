"""Reading the files of an image archive, whether a directory or a tar (plain, or gzip/xz/zstd/
bzip2-compressed as ``docker load`` takes them, from a file or stdin).

A plain tar file is read in place (member offsets, ``pread``); a compressed one, or a pipe, is
first decompressed into an unlinked spool file, because ``docker save``'s ``manifest.json`` comes
after the layers it names.  Owns member lookup and bounded reads; imports ``archive.compression``
and ``errors``; never a driver.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..archive.compression import decompress_stream
from ..errors import InvalidArchive, NotFound
from .manifest import DigestCheck

MAX_SMALL = 64 << 20


class _Slice(io.RawIOBase):
    """``size`` bytes of *fd* from *offset*, by pread (the fd stays the bundle's)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self.fd, self.pos, self.end = fd, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), self.end - self.pos)
        if n <= 0:
            return 0
        got = os.preadv(self.fd, [view[:n]], self.pos)
        if got == 0:
            raise InvalidArchive("the archive is truncated")
        self.pos += got
        return got


class Bundle:
    """The files of an archive by their path inside it."""

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def read(self, name: str, limit: int = MAX_SMALL) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidArchive(f"{name} in the archive is larger than {limit} bytes")
        return data

    def close(self) -> None:
        pass


class DirBundle(Bundle):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        clean = os.path.normpath(name.lstrip("/"))
        if clean.startswith(".."):
            raise InvalidArchive(f"path {name!r} leaves the archive")
        return self.root / clean

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"the archive has no {name}") from exc
        except OSError as exc:
            raise InvalidArchive(f"reading {name}: {exc.strerror}") from exc


class TarBundle(Bundle):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            self._index()
        except BaseException:
            os.close(fd)
            raise

    def _index(self) -> None:
        try:
            with os.fdopen(os.dup(self.fd), "rb") as f:
                f.seek(0)
                tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed below
                for m in tar:
                    self.members[_clean(m.name)] = m
                tar.close()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidArchive(f"not a readable image archive (tar): {exc}") from exc
        if not self.members:
            raise InvalidArchive("the image archive is empty")

    def _member(self, name: str, depth: int = 0) -> tarfile.TarInfo:
        m = self.members.get(_clean(name))
        if m is None:
            raise NotFound(f"the archive has no {name}")
        if (m.issym() or m.islnk()) and depth < 8:
            target = m.linkname if m.islnk() else os.path.join(os.path.dirname(m.name),
                                                                m.linkname)
            return self._member(target, depth + 1)
        if not m.isfile():
            raise InvalidArchive(f"{name} in the archive is not a file")
        return m

    def exists(self, name: str) -> bool:
        try:
            self._member(name)
        except (NotFound, InvalidArchive):
            return False
        return True

    def open(self, name: str) -> BinaryIO:
        m = self._member(name)
        return io.BufferedReader(_Slice(self.fd, m.offset_data, m.size), 1 << 20)  # type: ignore[return-value]

    def close(self) -> None:
        os.close(self.fd)


def _clean(name: str) -> str:
    return os.path.normpath(name.lstrip("/")).removeprefix("./")


def open_bundle(source: str, spool_dir: Path) -> Bundle:
    """A directory, a tar file (any of the compressions), or ``-`` (stdin)."""
    if source != "-" and os.path.isdir(source):
        return DirBundle(Path(source))
    try:
        fd = os.dup(0) if source == "-" else os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NotFound(f"opening {source}: {exc.strerror}") from exc
    try:
        from ..archive.compression import detect

        if stat.S_ISREG(os.fstat(fd).st_mode) and detect(os.pread(fd, 6, 0)) == "none":
            return TarBundle(os.dup(fd))
        return TarBundle(_spool_decompressed(fd, spool_dir))
    finally:
        os.close(fd)


def _spool_decompressed(fd: int, spool_dir: Path) -> int:
    out = spool_file(spool_dir)
    try:
        with os.fdopen(fd, "rb", closefd=False) as src:
            plain = decompress_stream(src)
            while chunk := plain.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
    except BaseException:
        os.close(out)
        raise
    return out


@dataclass(frozen=True)
class LayerFile:
    """One layer of an image in an archive: its path, and its digest and size when known."""

    path: str
    digest: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class LoadItem:
    """One image found in an archive: its config bytes, its layers, its names (full refs)."""

    config: bytes
    layers: list[LayerFile]
    names: list[str]
    manifest: bytes | None = None
    manifest_type: str | None = None


class VerifyingReader(io.RawIOBase):
    """A layer file read through a DigestCheck (when its digest is known)."""

    def __init__(self, stream: BinaryIO, check: DigestCheck | None) -> None:
        super().__init__()
        self.stream = stream
        self.check = check
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self.stream.read(len(view))
        if not data:
            if not self.done and self.check is not None:
                self.check.finish()
            self.done = True
            return 0
        if self.check is not None:
            self.check.update(data)
        view[:len(data)] = data
        return len(data)

    def drain_and_verify(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()
        super().close()


class ArchiveWriter:
    """Where ``image save`` writes: a tar (streamed) or a directory.  Files are added whole:
    a small one from bytes, a layer from a file descriptor (size known)."""

    def add_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def add_fd(self, name: str, fd: int, size: int) -> None:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TarArchiveWriter(ArchiveWriter):
    def __init__(self, out: BinaryIO) -> None:
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.names: set[str] = set()
        self._dirs: set[str] = set()

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        parent = os.path.dirname(name)
        if parent and parent not in self._dirs:
            self._dirs.add(parent)
            d = tarfile.TarInfo(parent)
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
            self.tar.addfile(d)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        self.names.add(name)
        return info

    def add_bytes(self, name: str, data: bytes) -> None:
        self.tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def add_fd(self, name: str, fd: int, size: int) -> None:
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
            self.tar.addfile(self._info(name, size), f)

    def has(self, name: str) -> bool:
        return name in self.names

    def close(self) -> None:
        self.tar.close()


class DirArchiveWriter(ArchiveWriter):
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "wb") as f:
            write(f)
        os.rename(tmp, path)

    def add_bytes(self, name: str, data: bytes) -> None:
        def write(f: BinaryIO) -> None:
            f.write(data)

        self._write(name, write)

    def add_fd(self, name: str, fd: int, size: int) -> None:
        def copy(f: BinaryIO) -> None:
            offset = 0
            while offset < size:
                sent = os.copy_file_range(fd, f.fileno(), size - offset, offset_src=offset)
                if sent == 0:
                    raise InvalidArchive(f"{name}: the spool file ended early")
                offset += sent

        self._write(name, copy)

    def has(self, name: str) -> bool:
        return (self.root / name).exists()


def spool_file(spool_dir: Path) -> int:
    """An unlinked read/write file in *spool_dir* (O_TMPFILE where the filesystem has it)."""
    try:
        return os.open(spool_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        import tempfile

        fd, name = tempfile.mkstemp(dir=spool_dir)
        os.unlink(name)
        return fd
