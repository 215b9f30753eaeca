"""tar-split metadata: record a layer tar's raw bytes while applying it, re-assemble it exactly.

The format is vbatts/tar-split's ``tar/storage``: one JSON document per line, gzip'd on disk
(Docker keeps it as ``tar-split.json.gz``).  Each line is an entry

    {"type":2,"payload":"<base64 raw bytes>","position":N}                  a segment
    {"type":1,"name":"a/b","size":5,"payload":"<base64 crc64>","position":N}  a file's data

Segments hold header blocks (with PAX / GNU long-name headers), padding and the trailing bytes
verbatim; a file entry stands for ``size`` bytes of entry data, to be read back from the stored
layer by name and checked against the CRC-64 (ISO polynomial, as Go's ``hash/crc64``, big-endian
8 bytes).  Names that are not valid UTF-8 go to ``name_raw`` (base64) instead of ``name``.  Like
Go's packer and unpacker, a path may appear only once among the file entries.

Writing: :class:`TarSplitPacker` implements the tar reader's ``Recorder`` hook, including its
optional ``file_done(crc)``: the reader (in a confined child too, through the frame pipe of
recframes.py) checksums each entry's data as it goes by, so the packer writes every line in its
final form — gzip'd as it goes when asked (``compress=True``), which is how the store records: the
finished file is then renamed into place (graphdriver.exactdiff), with no second pass.
When a recorder is never told a CRC, the entry is written with a ``null`` payload and
:func:`finalize_recording` computes the CRCs from the files as the apply left them — the very
files :func:`assemble` reads back later.  Either way every file entry with data is checked
against the applied layer (a regular file of that size, not the same file as another entry),
unless the apply vouches for them (``ApplyResult.vouched``: it only created, on an empty target,
so the check provably passes; :meth:`TarSplitPacker.summary` then skips it).
A store whose names are matched as another filesystem matches them (windowsfilter: NTFS, regardless
of case) hands the check a :data:`Resolver`, which finds a recorded name the layer spells
otherwise; the recorded name stays as it was (the diff getter resolves it the same way).
A layer that tar-split cannot describe (GNU sparse entries, duplicate paths, files rewritten
later in the same archive) is marked "not exactly reproducible" with the reason, and its diff
falls back to the normal one.
"""

from __future__ import annotations

import binascii
import io
import os
import posixpath
import stat
import struct
import zlib
from _json import scanstring

from ..errors import GraphDriverError, InvalidArchive, NotFound, StoreCorrupt
from ..logs import get_logger
from .crc64 import crc64
from .jsontext import dumps as json_text
from .native import native_module
from .recframes import replay_frames

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager
    from pathlib import Path
    from typing import Any, BinaryIO

    from .tarstream import TarEntry

log = get_logger("graphdriver")

FILE_TYPE = 1
SEGMENT_TYPE = 2

#: file names inside ``meta/<id>/``
METADATA_NAME = "tar-split.json.gz"
UNREPRODUCIBLE_NAME = "tar-split.unreproducible"
#: gzip level of stored metadata (isal's 0-3 / zlib's 1-9): fast, the lines are small and many
METADATA_LEVEL = 1

_COPY = 1 << 20
_SPILL = 1 << 20  # bytes of file records kept in memory before they go to the spill file
_MAX_LINE = 64 << 20  # a segment line: the reader flushes at most ~1 MiB of raw bytes at once


def crc_bytes(crc: int) -> bytes:
    """The 8 bytes Go's ``Sum`` gives (big-endian): what a file entry's payload holds."""
    return crc.to_bytes(8, "big")


# ----- entries ------------------------------------------------------------------------------


class Entry:
    """One tar-split line (a plain class, not a dataclass: the confined child packs with it and
    dataclasses imports inspect)."""

    __slots__ = ("name", "payload", "position", "size", "type")

    def __init__(self, type: int, name: bytes = b"", size: int = 0,
                 payload: bytes | None = None, position: int = 0) -> None:
        self.type = type
        self.name = name
        self.size = size
        self.payload = payload
        self.position = position

    def _fields(self) -> tuple[int, bytes, int, bytes | None, int]:
        return (self.type, self.name, self.size, self.payload, self.position)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and self._fields() == other._fields()

    # mutable, so unhashable (as the dataclass was)
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Entry(type={self.type!r}, name={self.name!r}, size={self.size!r}, "
                f"payload={self.payload!r}, position={self.position!r})")


def clean_path(name: bytes) -> bytes:
    """Go's ``filepath.Clean``, the key of the duplicate-path rule."""
    if not name:
        return b"."
    if (b"/." not in name and b"//" not in name and name[-1] != 0x2F
            and name[0] not in (0x2E, 0x2F)):
        return name  # already clean: no empty, "." or ".." part, not absolute
    norm = posixpath.normpath(name)
    return b"/" + norm.lstrip(b"/") if norm.startswith(b"//") else norm


# printable ASCII that Go's encoder writes as it is (no quote, backslash, <, >, &)
_PLAIN_NAME = bytes(sorted(frozenset(range(0x20, 0x7F)) - frozenset(b'"\\<>&')))


def _name_field(name: bytes) -> str:
    if not name.translate(None, _PLAIN_NAME):
        return f',"name":"{name.decode("ascii")}"'
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return f',"name_raw":"{binascii.b2a_base64(name, newline=False).decode()}"'
    quoted = json_text(text, ensure_ascii=False)
    quoted = quoted.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f',"name":{quoted}'


def encode_entry(e: Entry) -> bytes:
    """One JSON line, field for field as Go's encoder writes ``storage.Entry``."""
    parts = [f'{{"type":{e.type}']
    if e.name:
        parts.append(_name_field(e.name))
    if e.size:
        parts.append(f',"size":{e.size}')
    if e.payload is None:
        parts.append(',"payload":null')
    else:
        parts.append(f',"payload":"{binascii.b2a_base64(e.payload, newline=False).decode()}"')
    parts.append(f',"position":{e.position}}}\n')
    return "".join(parts).encode("utf-8")


def _bad(msg: str) -> InvalidArchive:
    return InvalidArchive(f"tar-split metadata: {msg}")


def decode_entry(line: bytes) -> Entry:
    # imported here, not with the module: the confined child's packer never decodes (json's
    # decoder and base64 import re)
    import base64
    import json

    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise _bad("an entry is not an object")
    typ = obj.get("type")
    if typ not in (FILE_TYPE, SEGMENT_TYPE):
        raise _bad(f"unknown entry type {typ!r}")
    name = b""
    raw = obj.get("name_raw")
    try:
        if raw:
            name = base64.b64decode(raw, validate=True)
        elif obj.get("name"):
            name = str(obj["name"]).encode("utf-8", "surrogateescape")
        payload = obj.get("payload")
        data = None if payload is None else base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as exc:
        raise _bad("bad base64") from exc
    size = obj.get("size", 0)
    pos = obj.get("position", 0)
    if not isinstance(size, int) or size < 0 or not isinstance(pos, int):
        raise _bad("bad size or position")
    return Entry(typ, name, size, data, pos)


def _written_file_name(line: bytes) -> bytes | None:
    """The name of a file line :func:`encode_entry` wrote (``name`` or ``name_raw`` comes right
    after ``type``), read without json: the confined child packs, and may need it, after its
    chroot (json's decoder imports re).  None: not such a line."""
    for key, raw in ((b'{"type":1,"name":"', False), (b'{"type":1,"name_raw":"', True)):
        if line.startswith(key):
            try:
                text, _ = scanstring(line.decode("utf-8"), len(key))
                if raw:
                    return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
                return text.encode("utf-8", "surrogateescape")
            except (ValueError, UnicodeError):
                return None
    return b"" if line.startswith(b'{"type":1,') else None


def read_entries(stream: BinaryIO) -> Iterator[Entry]:
    """Entries of a plain (not gzip'd) JSON-lines stream; refuses duplicate paths as Go does."""
    seen: set[bytes] = set()
    buf: Any = io.BufferedReader(stream, _COPY) if isinstance(stream, io.RawIOBase) else stream
    while True:
        line = buf.readline(_MAX_LINE)
        if not line:
            return
        if not line.endswith(b"\n") and len(line) >= _MAX_LINE:
            raise _bad("an entry is too long")
        if not line.strip():
            continue
        e = decode_entry(line)
        if e.type == FILE_TYPE:
            key = clean_path(e.name)
            if key in seen:
                raise _bad(f"duplicate path {e.name.decode('utf-8', 'replace')!r}")
            seen.add(key)
        yield e


def open_metadata(path: str | os.PathLike[str]) -> AbstractContextManager[BinaryIO]:
    """Open tar-split metadata, gzip'd or plain (a context manager: contextlib is imported by
    the store's side only, never by the confined child's packer)."""
    import contextlib

    return contextlib.contextmanager(_metadata_stream)(path)


def _metadata_stream(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    f = open(path, "rb")  # noqa: SIM115
    try:
        magic = f.read(2)
        f.seek(0)
        if magic == b"\x1f\x8b":
            import gzip

            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            yield f
    finally:
        f.close()


class _RecordedTar(io.RawIOBase):
    """The tar a description stands for, with every file entry's data read as zeros: what a
    tar reader needs to see the headers again without the layer's files."""

    def __init__(self, entries: Iterator[Entry]) -> None:
        self._entries = entries
        self._raw = b""  # the rest of the current segment
        self._zeros = 0  # zero bytes still to give for the current file entry

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        mv = memoryview(buf).cast("B")
        while not self._raw and not self._zeros:
            e = next(self._entries, None)
            if e is None:
                return 0
            if e.type == SEGMENT_TYPE:
                self._raw = e.payload or b""
            else:
                self._zeros = e.size
        if self._raw:
            n = min(len(mv), len(self._raw))
            mv[:n] = self._raw[:n]
            self._raw = self._raw[n:]
            return n
        n = min(len(mv), self._zeros, len(_ZEROS))
        mv[:n] = _ZEROS[:n]
        self._zeros -= n
        return n


_ZEROS = bytes(_COPY)


def recorded_headers(meta: BinaryIO) -> Iterator[TarEntry]:
    """The entries (headers, PAX and GNU extensions applied) of the tar *meta* describes (plain
    JSON lines), in archive order, read from its segments alone: no file data is opened."""
    from .tarstream import TarReader  # the reader only for this: the packer never needs it

    yield from TarReader(_RecordedTar(read_entries(meta)), digest=False)  # type: ignore[arg-type]


# ----- writing ------------------------------------------------------------------------------

_fastapply = native_module("_fastapply")
#: the duplicate rule's native hash of a clean path and its check (TarSplitPacker), if built
_path_hash: Callable[[bytes], int] | None = _fastapply.path_hash if _fastapply else None
_first_duplicate: Callable[[bytearray], int | None] | None = (
    _fastapply.first_duplicate if _fastapply else None)
_first_duplicate_runs: Callable[[int, list[int], bytearray], int | None] | None = (
    _fastapply.first_duplicate_runs if _fastapply else None)
_U64 = struct.Struct("<Q")


_FILE_RECORD = struct.Struct("<QI")  # a file entry's size and name length (_fastapply.c too)


class TarSplitPacker:
    """The tar reader's Recorder, writing tar-split JSON lines to *out*.

    Plain lines by default; with ``compress=True`` the lines are gzip'd as they are written (one
    stream, finished by :meth:`close`).  A file's CRC comes from ``file()``, else from
    ``file_done()`` (the reader's checksum of the data that went by), else from ``data()`` (the
    entry's bytes fed by the caller); with none of them the entry gets a ``null`` payload for
    :func:`finalize_recording` to fill (``missing`` counts those).
    ``problem`` says why the stream cannot be described exactly (None when it can); ``files``
    lists (name, size) of the file entries with data, for the check after an apply.
    """

    def __init__(self, out: BinaryIO, compress: bool = False, level: int = 1,
                 spill_dir_fd: int | None = None) -> None:
        self._out = out
        self._pos = 0
        # a 64-bit hash of each clean path so far (duplicate rule), not the names: natively 8
        # bytes a path in one flat array, looked through once when the recording ends
        # (_fastapply.first_duplicate); else a set of hash(), checked as the paths come.  A
        # collision only costs a false "appears twice", i.e. a layer diffed without its
        # tar-split metadata
        self._hashes = _SpillBuffer(spill_dir_fd, sorted_runs=True) if _path_hash else None
        self._seen: set[int] = set()
        self._pending: Entry | None = None
        self._crc: int | None = None
        self._buf = bytearray()
        self._z: Any = None
        if compress:
            self._z = _gzip_compressor(level)
        self.compressed = compress
        self.problem: str | None = None
        self.bytes_described = 0
        self.missing = 0
        # the file entries with data, for the check after an apply: records of _FILE_RECORD
        # (size, name length) and the name, in one buffer (a list of tuples cost ~200 B each);
        # with *spill_dir_fd*, they and the hashes above go to unnamed files made there
        # (O_TMPFILE) every _SPILL bytes, so that memory stays flat in entries
        self._records = _SpillBuffer(spill_dir_fd)

    @property
    def lines(self) -> int:
        """How many lines (entries) were written so far."""
        return self._pos

    def _emit(self, e: Entry) -> None:
        e.position = self._pos
        self._pos += 1
        self._buf += encode_entry(e)
        if len(self._buf) >= _COPY:
            self._drain()

    def _drain(self) -> None:
        if self._buf:
            data = self._z.compress(self._buf) if self._z is not None else self._buf
            if data:
                self._out.write(data)
            self._buf.clear()

    def _flush_pending(self) -> None:
        e = self._pending
        if e is None:
            return
        self._pending = None
        if self._crc is not None:
            e.payload = crc_bytes(self._crc)
        else:
            self.missing += 1
        self._crc = None
        self._emit(e)

    def segment(self, raw: bytes) -> None:
        self._flush_pending()
        if raw:
            # encode_entry's line for a segment, without the Entry
            self.bytes_described += len(raw)
            b = self._buf
            b += b'{"type":2,"payload":"'
            b += binascii.b2a_base64(raw, newline=False)
            b += b'","position":%d}\n' % self._pos
            self._pos += 1
            if len(b) >= _COPY:
                self._drain()

    @property
    def file_records(self) -> bytearray:
        """The file records not spilled yet (see __init__); :meth:`record_chunks` has all."""
        return self._records.buf

    def _first_time(self, key: bytes) -> bool:
        """Whether the clean path *key* is new (the duplicate rule) as far as known now (the
        native way finds out at :meth:`close`); remembers it."""
        if self._hashes is not None:
            self._hashes.buf += _U64.pack(_path_hash(key))  # type: ignore[misc]
            self._hashes.spill()
            return True
        h = hash(key)
        if h in self._seen:
            return False
        self._seen.add(h)
        return True

    def _check_duplicates(self) -> None:
        """The duplicate rule over the hashes kept natively (see __init__), once at the end."""
        if self._hashes is None or self.problem is not None:
            return
        dup = self._hashes.first_duplicate()
        self._hashes.release()
        if dup is not None:
            name = self._written_name(dup)
            shown = "a path" if name is None else f"path {name.decode('utf-8', 'replace')!r}"
            self.problem = f"{shown} appears twice in the archive"

    def _written_name(self, h: int) -> bytes | None:
        """The name of the second file entry whose clean path hashes to *h*, read back from
        the lines written (None when the output cannot be read back)."""
        found = 0
        for line in self._written_lines():
            if not line.startswith(b'{"type":1,'):
                continue
            name = _written_file_name(line)
            if name is None:
                return None
            if _path_hash(clean_path(name)) == h:  # type: ignore[misc]
                found += 1
                if found == 2:
                    return name
        return None

    def _written_lines(self) -> Iterator[bytes]:
        """The lines written so far, read back (streamed) from an output that can be read:
        a file opened for reading too, or a BytesIO; nothing otherwise."""
        chunks: Iterator[bytes]
        if isinstance(self._out, io.BytesIO):
            chunks = iter((self._out.getvalue(),))
        else:
            try:
                fd = self._out.fileno()
                os.pread(fd, 1, 0)
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                return

            def read_all() -> Iterator[bytes]:
                off = 0
                while chunk := os.pread(fd, _COPY, off):
                    off += len(chunk)
                    yield chunk

            chunks = read_all()
        z = zlib.decompressobj(31) if self.compressed else None
        rest = b""
        try:
            for chunk in chunks:
                data = rest + (z.decompress(chunk) if z is not None else chunk)
                *lines, rest = data.split(b"\n")
                yield from lines
        except zlib.error:
            return
        if rest:
            yield rest

    def record_chunks(self) -> Iterator[bytes | bytearray]:
        """The file records (see ``file_records``) in order, spilled chunks first."""
        return self._records.chunks()

    def file(self, name: bytes, size: int, payload_crc64: int | None) -> None:
        self._flush_pending()
        if not self._first_time(clean_path(name)) and self.problem is None:
            self.problem = f"path {name.decode('utf-8', 'replace')!r} appears twice in the archive"
        self.bytes_described += size
        e = Entry(FILE_TYPE, bytes(name), size)
        if size <= 0:
            self._emit(e)
            return
        recs = self._records
        recs.buf += _FILE_RECORD.pack(size, len(e.name))
        recs.buf += e.name
        recs.spill()
        if payload_crc64 is not None:
            e.payload = crc_bytes(payload_crc64)
            self._emit(e)
            return
        self._pending = e
        self._crc = None

    @property
    def files(self) -> list[tuple[bytes, int]]:
        """(name, size) of the file entries with data, in archive order."""
        out: list[tuple[bytes, int]] = []
        for recs in self.record_chunks():
            pos, n, head = 0, len(recs), _FILE_RECORD.size
            while pos < n:
                size, length = _FILE_RECORD.unpack_from(recs, pos)
                pos += head
                out.append((bytes(recs[pos : pos + length]), size))
                pos += length
        return out

    def take_frames(self, buf: bytearray, start: int, end: int) -> int:
        """Turn the common-case recorder frames of a confined child (recframes.py) found
        in ``buf[start:end]`` into lines natively; returns how many bytes it took (0: the next
        frame is for the Python methods above).  Same lines as those methods write."""
        if self._pending is not None or _native_pack is None or self._hashes is None:
            return 0
        took, lines, self._pos, described, missing = _native_pack(
            buf, start, end, self._pos, self._hashes.buf, self._records.buf)
        if took:
            self.bytes_described += described
            self.missing += missing
            self._records.spill()
            self._hashes.spill()
            # lines is the native packer's own buffer (valid until its next call): compressed
            # from there, or written when big, without a copy
            if self._z is not None or len(lines) >= _COPY:
                self._drain()
                out = self._z.compress(lines) if self._z is not None else lines
                if out:
                    self._out.write(out)
            else:
                self._buf += lines
                if len(self._buf) >= _COPY:
                    self._drain()
        return int(took)

    def write_frames(self, frames: bytes | bytearray,
                     ready: Callable[[], None] | None = None) -> None:
        """Whole recorder frames (recframes.py) of a run of files the native apply wrote: the
        packer runs beside the reader (in the confined child), and the frames never cross a
        pipe.  With *ready*, they are complete once it has returned (recframes.py)."""
        if ready is not None:
            ready()
        if replay_frames(frames, 0, len(frames), self) != len(frames):
            raise InvalidArchive("tar-split: the native apply's frames end inside a frame")

    def verify(self, root_fd: int) -> str | None:
        """Why the applied layer beneath *root_fd* does not hold the recorded files as recorded
        (None: it does).  Call once the apply is done."""
        return verify_packed(root_fd, self)

    def summary(self, root_fd: int, vouched: bool = False) -> dict[str, Any]:
        """What :func:`graphdriver.exactdiff.finish_layer_recording` needs of a closed packer
        that ran elsewhere (the confined child), JSON-able; the recorded files are checked here
        (beneath *root_fd*) when the lines are final, unless the apply *vouched* for them (it
        proved by construction that the check would pass: ``ApplyResult.vouched``).
        ``checked`` says whether the check ran."""
        checked = self.problem is None and not self.missing and self.compressed and not vouched
        return {"problem": self.problem, "missing": self.missing, "lines": self._pos,
                "compressed": self.compressed, "checked": checked,
                "unverified": self.verify(root_fd) if checked else None}

    def file_done(self, crc64: int) -> None:
        """The CRC-64 of the current file entry's whole data (from the tar reader)."""
        if self._pending is not None:
            self._crc = crc64
            self._flush_pending()

    def data(self, chunk: bytes | memoryview) -> None:
        """Bytes of the current file entry's data (optional: lets the CRC come from the stream)."""
        if self._pending is None:
            return
        self._crc = crc64(chunk, self._crc or 0)

    def sparse(self, name: bytes) -> None:
        """The current entry is a GNU sparse file: tar-split cannot express it."""
        if self.problem is None:
            self.problem = f"{name.decode('utf-8', 'replace')!r} is a GNU sparse file"

    def close(self) -> None:
        self._flush_pending()
        self._drain()
        if self._z is not None:
            self._out.write(self._z.flush())
            self._z = None
        self._out.flush()
        self._check_duplicates()  # after the flush: the lines can be read back for the name

    def release(self) -> None:
        """Drop the spilled records (after the check: they are gone then)."""
        self._records.release()
        if self._hashes is not None:
            self._hashes.release()


class _SpillBuffer:
    """A byte buffer that only grows (records, hashes), moved to an unnamed file (O_TMPFILE)
    made in *dir_fd* every _SPILL bytes; kept in memory without *dir_fd* or if that fails.

    With *sorted_runs* it holds u64 path hashes, and each chunk is sorted before it goes, so
    that :meth:`first_duplicate` merges the runs with a few small buffers instead of loading
    them all."""

    def __init__(self, dir_fd: int | None, sorted_runs: bool = False) -> None:
        self.buf = bytearray()
        self._dir_fd = dir_fd
        self._fd = -1
        self._sizes: list[int] = []  # sizes of the chunks in the file, in order
        self._sorted = sorted_runs
        self._duplicate: int | None = None  # found inside a chunk while sorting it

    def spill(self) -> None:
        """Move the buffer to the file if it is big."""
        buf = self.buf
        if len(buf) < _SPILL or self._dir_fd is None:
            return
        if self._sorted:
            dup = _first_duplicate(buf)  # type: ignore[misc]
            if self._duplicate is None:
                self._duplicate = dup
        try:
            if self._fd < 0:
                self._fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                                   dir_fd=self._dir_fd)
            done = 0
            with memoryview(buf) as view:
                while done < len(buf):
                    done += os.write(self._fd, view[done:])
        except OSError as exc:
            log.debug("tar-split: keeping the records in memory (%s)", exc)
            self._dir_fd = None
            return
        self._sizes.append(len(buf))
        buf.clear()

    def chunks(self) -> Iterator[bytes | bytearray]:
        """Everything in order, spilled chunks first."""
        off = 0
        for size in self._sizes:
            chunk = os.pread(self._fd, size, off)
            if len(chunk) != size:
                raise StoreCorrupt("tar-split: a spill file is short")
            off += size
            yield chunk
        yield self.buf

    def first_duplicate(self) -> int | None:
        """A u64 that occurs twice among all those held, or None (*sorted_runs* only): the
        spilled runs merged with the rest natively, a few 64 KiB buffers at a time."""
        if self._duplicate is not None:
            return self._duplicate
        if not self._sizes:
            return _first_duplicate(self.buf)  # type: ignore[misc]
        try:
            return _first_duplicate_runs(self._fd, self._sizes, self.buf)  # type: ignore[misc]
        except EOFError as exc:
            raise StoreCorrupt("tar-split: a spill file is short") from exc

    def release(self) -> None:
        """Drop the file and the buffer."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._sizes.clear()
        self.buf.clear()


class PackedElsewhere:
    """A packer's :meth:`TarSplitPacker.summary` from the confined child, with the packer's
    attributes that finishing a recording reads (the check of the files was done there)."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.problem: str | None = summary["problem"]
        self.missing = int(summary["missing"])
        self.lines = int(summary["lines"])
        self.compressed = bool(summary["compressed"])
        #: whether the child checked the recorded files (False: the apply vouched for them)
        self.checked = bool(summary.get("checked", True))
        self._unverified: str | None = summary["unverified"]

    def verify(self, root_fd: int) -> str | None:
        return self._unverified


def _gzip_compressor(level: int) -> Any:
    """A gzip-framed deflate compressor: isal's (several times faster) when it is installed."""
    try:
        from isal import isal_zlib  # type: ignore[import-not-found, import-untyped, unused-ignore]

        return isal_zlib.compressobj(min(max(level, 0), 3), isal_zlib.DEFLATED, 31)
    except ImportError:
        return zlib.compressobj(level, zlib.DEFLATED, 31)


def load_compressor() -> None:
    """Import the compressor of a packer that gzips its lines (before a confined child's chroot,
    ahead of its job: the packer is made once the job has come)."""
    _gzip_compressor(METADATA_LEVEL)


# ----- finishing a recording made during an apply --------------------------------------------

if TYPE_CHECKING:
    #: ``resolve(root_fd, path)``: the stored spelling of a recorded *path* (relative, beneath
    #: ``root_fd``) that is not there as written, or None; the check then looks at that file
    Resolver = Callable[[int, str], str | None]


class Recording:
    """Whether a layer's tar-split record reproduces its tar, and why not (a plain class: see
    :class:`Entry`)."""

    __slots__ = ("reason", "reproducible")

    def __init__(self, reproducible: bool, reason: str | None = None) -> None:
        self.reproducible = reproducible
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recording) and (self.reproducible, self.reason) == (
            other.reproducible, other.reason)

    # mutable, so unhashable (as the dataclass was)
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Recording(reproducible={self.reproducible!r}, reason={self.reason!r})"


def _check_file(root_fd: int, name: bytes, size: int, inodes: set[tuple[int, int]],
                flags: int = os.O_PATH,
                resolve: Resolver | None = None) -> tuple[int | None, str | None]:
    """Open a stored file that must be a regular file of *size* bytes, and not the same file as
    an earlier entry's (a later entry wrote through it): (fd, None), or (None, why not)."""
    from .pathres import open_beneath

    path = name.decode("utf-8", "surrogateescape").lstrip("/")
    shown = name.decode("utf-8", "replace")
    try:
        fd = open_beneath(root_fd, path, flags | os.O_NOFOLLOW)
    except OSError as exc:
        stored = resolve(root_fd, path) if resolve is not None else None
        if stored is None or stored == path:
            return None, f"{shown!r} is not in the layer after the apply ({exc.strerror})"
        return _check_file(root_fd, os.fsencode(stored), size, inodes, flags)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    why = None
    ino = (st.st_dev, st.st_ino)
    if not stat.S_ISREG(st.st_mode):
        why = f"{shown!r} is not a regular file after the apply"
    elif st.st_size != size:
        why = (f"{shown!r} has {st.st_size} bytes after the apply, "
               f"the archive gave {size} (sparse or rewritten)")
    elif ino in inodes:
        why = f"{shown!r} is the same file as another entry after the apply (rewritten)"
    if why is not None:
        os.close(fd)
        return None, why
    inodes.add(ino)
    return fd, None


def _file_crc(root_fd: int, name: bytes, size: int, inodes: set[tuple[int, int]],
              resolve: Resolver | None = None) -> tuple[int | None, str | None]:
    """CRC of a stored file that must be a regular file of *size* bytes; (None, why) if not."""
    fd, why = _check_file(root_fd, name, size, inodes, os.O_RDONLY | os.O_NONBLOCK, resolve)
    if fd is None:
        return None, why
    try:
        crc = 0
        got = 0
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            buf = bytearray(_COPY)
            mv = memoryview(buf)
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                crc = crc64(mv[:n], crc)
                got += n
        if got != size:
            return None, f"{name.decode('utf-8', 'replace')!r} changed while it was read"
        return crc, None
    finally:
        os.close(fd)


# the native line maker for the apply child's frames (TarSplitPacker.take_frames), if built
_native_pack: Callable[..., tuple[int, memoryview, int, int, int]] | None = (
    _fastapply.pack_frames if _fastapply else None)


def verify_packed(root_fd: int, packer: TarSplitPacker,
                  resolve: Resolver | None = None) -> str | None:
    """_verify_files for what *packer* recorded: natively when built (~1 system call per file,
    chunk by chunk of the records); anything not plainly right is looked at, and told, the
    Python way (names not found as written are handed to *resolve*)."""
    if _fastapply is not None:
        linked: set[int] = set()  # inodes with more than one link, across the chunks
        if all(_fastapply.verify_files(root_fd, chunk, linked) == -1
               for chunk in packer.record_chunks()):
            return None
    return _verify_files(root_fd, packer.files, resolve)


def _verify_files(root_fd: int, files: list[tuple[bytes, int]],
                  resolve: Resolver | None = None) -> str | None:
    """Why the applied layer does not hold *files* as recorded (None: it does).

    The same checks as :func:`_check_file`, at one ``fstatat`` per file: each directory is
    opened once beneath the root (no symlink on the way), the file looked up in it unfollowed.
    A name not found as written is looked at by :func:`_check_file` (with *resolve*).
    """
    from .pathres import open_beneath

    inodes: set[tuple[int, int]] = set()
    cur_dir: str | None = None
    dir_fd = -1
    stat_ = os.stat

    def look_at(name: bytes, size: int) -> str | None:
        """:func:`_check_file`'s word on one entry (None: it is right), its file closed."""
        fd, why = _check_file(root_fd, name, size, inodes, resolve=resolve)
        if fd is not None:
            os.close(fd)
        return why

    try:
        for name, size in files:
            path = name.decode("utf-8", "surrogateescape").lstrip("/")
            parent, _, base = path.rpartition("/")
            if base in ("", ".", ".."):
                why = look_at(name, size)
                if why is not None:
                    return why
                continue
            if parent != cur_dir:
                if dir_fd >= 0:
                    os.close(dir_fd)
                    dir_fd = -1
                cur_dir = None
                try:
                    dir_fd = open_beneath(root_fd, parent, os.O_PATH | os.O_DIRECTORY
                                          | os.O_NOFOLLOW)
                except OSError:
                    why = look_at(name, size)  # not there as written: resolved, or why not
                    if why is not None:
                        return why
                    continue
                cur_dir = parent
            try:
                st = stat_(base, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                why = look_at(name, size)
                if why is not None:
                    return why
                continue
            ino = (st.st_dev, st.st_ino)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size or ino in inodes:
                return look_at(name, size) or (  # says which, in words
                    f"{name.decode('utf-8', 'replace')!r} changed during the check")
            inodes.add(ino)
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
    return None


def mark_unreproducible(out_path: Path, reason: str, *leftovers: Path) -> Recording:
    for p in (*leftovers, out_path):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    out_path.with_name(UNREPRODUCIBLE_NAME).write_text(reason + "\n")
    return Recording(False, reason)


def _open_root(root: str | os.PathLike[str] | int) -> int:
    if isinstance(root, int):
        return root
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def finalize_recording(raw: BinaryIO, root: str | os.PathLike[str] | int, out_path: Path,
                       problem: str | None = None,
                       resolve: Resolver | None = None) -> Recording:
    """Turn the JSON lines the apply wrote (*raw*, plain or gzip'd, seekable) into ``out_path``
    (gzip'd), computing missing CRCs from the applied files beneath *root* and checking the
    others' files (names not found as written are handed to *resolve*).  When the layer cannot
    be reproduced exactly, writes ``tar-split.unreproducible`` (the reason) beside *out_path*
    instead.
    """
    import contextlib
    import gzip
    from pathlib import Path

    out_path = Path(out_path)
    marker = out_path.with_name(UNREPRODUCIBLE_NAME)
    tmp = out_path.with_name(out_path.name + ".tmp")
    root_fd = _open_root(root)
    reason = problem
    try:
        if reason is None:
            inodes: set[tuple[int, int]] = set()
            magic = raw.read(2)
            raw.seek(0)
            try:
                with contextlib.ExitStack() as stack:
                    src: BinaryIO = raw
                    if magic == b"\x1f\x8b":
                        src = stack.enter_context(  # type: ignore[assignment]
                            gzip.GzipFile(fileobj=raw, mode="rb"))
                    f = stack.enter_context(open(tmp, "wb"))
                    packer = TarSplitPacker(f, compress=True,  # type: ignore[arg-type]
                                            level=METADATA_LEVEL)
                    for e in read_entries(src):
                        if e.type == FILE_TYPE and e.size > 0:
                            if e.payload is None:
                                crc, why = _file_crc(root_fd, e.name, e.size, inodes,
                                                     resolve)
                                if crc is None:
                                    reason = why
                                    break
                                e.payload = crc_bytes(crc)
                            else:
                                fd, why = _check_file(root_fd, e.name, e.size, inodes,
                                                      resolve=resolve)
                                if fd is None:
                                    reason = why
                                    break
                                os.close(fd)
                        packer._emit(e)
                    packer.close()
                    f.flush()
                    os.fsync(f.fileno())
            except InvalidArchive as exc:
                reason = str(exc)
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
                reason = f"the recording is unreadable ({exc})"
        if reason is None:
            os.replace(tmp, out_path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
            return Recording(True)
        return mark_unreproducible(out_path, reason, tmp)
    finally:
        if not isinstance(root, int):
            os.close(root_fd)


# ----- re-assembly ------------------------------------------------------------------------------

if TYPE_CHECKING:
    Opener = Callable[[str], BinaryIO]


def _write_all(out: int | BinaryIO, data: bytes | memoryview) -> None:
    if isinstance(out, int):
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(out, mv):]
    else:
        out.write(data)


def assemble(meta: BinaryIO, open_file: Opener, out: int | BinaryIO, what: str = "layer") -> int:
    """Write the exact tar described by *meta* (plain JSON lines) to *out*; returns its size.

    File data comes from ``open_file(path)``; a file whose size or CRC differs from what was
    recorded raises StoreCorrupt (one line), as tar-split's "file integrity checksum failed".
    """
    total = 0
    buf = bytearray(_COPY)
    mv = memoryview(buf)
    for e in read_entries(meta):
        if e.type == SEGMENT_TYPE:
            if e.payload:
                _write_all(out, e.payload)
                total += len(e.payload)
            continue
        if e.size == 0:
            continue
        shown = e.name.decode("utf-8", "replace")
        if e.payload is None or len(e.payload) != 8:
            raise _bad(f"file entry {shown!r} has no checksum")
        name = e.name.decode("utf-8", "surrogateescape")
        try:
            f = open_file(name)
        except OSError as exc:
            raise NotFound(f"{what}: {shown!r} is gone ({exc.strerror}); "
                           "cannot reproduce the diff exactly") from exc
        except GraphDriverError as exc:
            raise NotFound(f"{what}: {shown!r}: {exc}; cannot reproduce the diff exactly") from exc
        with f:
            crc = 0
            left = e.size
            while left:
                n = f.readinto(mv[: min(left, _COPY)])  # type: ignore[attr-defined]
                if not n:
                    break
                crc = crc64(mv[:n], crc)
                _write_all(out, mv[:n])
                left -= n
            if left or f.read(1):
                raise StoreCorrupt(f"{what}: {shown!r} changed size since it was applied; "
                                   "cannot reproduce the diff exactly")
        if crc_bytes(crc) != e.payload:
            raise StoreCorrupt(f"{what}: {shown!r} changed since it was applied (crc64 mismatch); "
                               "cannot reproduce the diff exactly")
        total += e.size
    return total
