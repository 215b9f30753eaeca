"""A streaming tar reader: GNU, PAX (local and global), ustar and v7 headers, sparse files.

Written for speed and for byte-exact accounting rather than for generality:

- one large reusable buffer; headers are parsed by slicing, entry data is handed out as
  memoryviews into that buffer (no per-chunk copies);
- every byte read from the input is hashed (``diff_id``), including the end-of-archive blocks and
  anything after them: the reader always reads its input to EOF; the hashing runs in a thread of
  its own (:mod:`.digest`), overlapping with whatever the consumer does with the entries;
- a :class:`Recorder` sees the archive exactly: raw header blocks (with PAX / GNU long-name
  headers and their data), padding and trailing bytes go to ``segment()``, each entry's data
  region is announced by ``file()``.  Concatenating segments and entry data in call order gives
  back the input stream byte for byte (what tar-split needs).  A recorder that also has
  ``file_done(crc64)`` gets, after each entry with data, the CRC-64 (Go's ISO table) of that
  data, computed as the data passes through the reader (whichever way it is consumed).

Any malformation (bad checksum, truncation, absurd numbers, broken PAX records) raises
:class:`~graphdriver.errors.InvalidArchive` with one line of explanation.
"""

from __future__ import annotations

import os
import posixpath
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

from ..errors import InvalidArchive
from .buffers import aligned_buffer
from .crc64 import crc64
from .digest import BackgroundDigest
from .native import native_module

_fastapply = native_module("_fastapply")
_native_header: Callable[[Any, int, int], tuple[Any, ...] | None] | None = (
    _fastapply.header if _fastapply else None)
_native_files: Callable[..., tuple[Any, ...]] | None = _fastapply.files if _fastapply else None

BLOCK = 512
BUFFER_SIZE = 1 << 20
# One read.  Small enough that what was read is still in the CPU's cache when it is parsed,
# hashed and written (a 256 KiB readv from the page cache is ~2.5x faster per byte than 1 MiB
# here); a quarter of the buffer, so the digest thread hashes a region while the next is read.
_READ = 256 << 10
MAX_META = 1 << 20  # cap on a PAX header, a GNU long name/link, a sparse map
MAX_SIZE = (1 << 63) - 1
MAX_ID = (1 << 32) - 1
# len(".fraction") -> factor to nanoseconds
_FRAC_SCALE: tuple[int, ...] = tuple(10 ** (10 - i) for i in range(11))

REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHARDEV = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
CONTIGUOUS = b"7"
REGULAR_TYPES = frozenset((REGULAR, CONTIGUOUS))

_PAX_LOCAL = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
_GNU_SPARSE = b"S"
_GNU_DUMPDIR = b"D"
_GNU_VOLHDR = b"V"
_GNU_MULTIVOL = b"M"
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_24 = bytes(24)
_OCTAL_DIGITS = b"01234567"
_DEC_DIGITS = b"0123456789"
# Keys of a global PAX header that must not leak into every later entry.
_GLOBAL_SKIP = frozenset(("path", "linkpath", "size"))


class Recorder(Protocol):
    """Receives the archive byte-exactly (see the module docstring).

    Optional: a ``file_done(crc64: int) -> None`` method (see :class:`CrcRecorder`)."""

    def segment(self, raw: bytes) -> None: ...

    def file(self, name: bytes, size: int, payload_crc64: int | None) -> None: ...


class CrcRecorder(Recorder, Protocol):
    """A Recorder that also takes each data-carrying entry's CRC-64 once its data has passed."""

    def file_done(self, crc64: int) -> None: ...


CrcFunc = Callable[[Any, int], int]


class TarEntry:
    """One member of the archive, after PAX / GNU extensions have been applied.

    Rarely used fields keep class-level defaults (cheap to create one per entry); ``xattrs``,
    ``pax`` and ``sparse`` are replaced, never mutated in place, when an entry has them.
    """

    name: str
    raw_name: bytes
    type: bytes
    mode: int
    type_bits: int = 0  # the file-type bits of the header's mode (S_IFMT; go-winio writes them)
    uid: int
    gid: int
    size: int  # logical size of the file (the real size for sparse files)
    data_size: int  # bytes of the entry's data region in the archive
    mtime_ns: int
    atime_ns: int | None = None
    ctime_ns: int | None = None
    linkname: str = ""
    raw_linkname: bytes = b""
    _uname: str | None = None
    _gname: str | None = None
    _raw_owner: bytes = b""  # ustar uname + gname fields, decoded only when asked for
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = {}  # noqa: RUF012 - shared empty default, replaced when set
    _pax_raw: dict[str, bytes] | None = None  # merged PAX records, decoded when ``pax`` is asked
    _pax: dict[str, str] | None = None
    sparse: list[tuple[int, int]] | None = None  # (offset, length) data chunks

    @property
    def pax(self) -> dict[str, str]:
        """PAX records of the entry (global then local), xattr records excepted, as text."""
        if self._pax is None:
            raw = self._pax_raw
            self._pax = {} if raw is None else {
                k: v.decode("utf-8", "surrogateescape")
                for k, v in raw.items()
                if not k.startswith("SCHILY.xattr.")
            }
        return self._pax

    @pax.setter
    def pax(self, value: dict[str, str]) -> None:
        self._pax = value

    @property
    def uname(self) -> str:
        if self._uname is None:
            return self._raw_owner[:32].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        return self._uname

    @uname.setter
    def uname(self, value: str) -> None:
        self._uname = value

    @property
    def gname(self) -> str:
        if self._gname is None:
            return self._raw_owner[32:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        return self._gname

    @gname.setter
    def gname(self, value: str) -> None:
        self._gname = value

    @property
    def is_regular(self) -> bool:
        return self.type in REGULAR_TYPES

    def __repr__(self) -> str:
        return f"TarEntry({self.name!r}, type={self.type!r}, size={self.size})"


def _bad(msg: str) -> InvalidArchive:
    return InvalidArchive(f"invalid tar: {msg}")


def parse_number(field: bytes, what: str) -> int:
    """An octal (NUL/space terminated) or base-256 tar number field."""
    s = field.rstrip(b"\0 ")
    if s.isdigit():  # the common case: plain digits, then NULs or spaces
        try:
            return int(s, 8)
        except ValueError:
            raise _bad(f"{what} field {field!r} is not a number") from None
    if field and field[0] & 0x80:
        if field[0] & 0x40:  # 0xff...: negative, two's complement over the whole field
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes((field[0] & 0x7F,)) + field[1:], "big")
    s = field.split(b"\0", 1)[0].strip(b" ")
    if not s:
        return 0
    if s.translate(None, _OCTAL_DIGITS):
        raise _bad(f"{what} field {field!r} is not a number")
    return int(s, 8)


def _decimal(value: str | bytes, what: str) -> int:
    v = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    neg = v.startswith(b"-")
    digits = v[1:] if neg else v
    if not digits or not digits.isdigit() or len(digits) > 30:
        shown = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        raise _bad(f"PAX {what} {shown!r} is not a number")
    n = int(digits)
    return -n if neg else n


def _pax_time_ns(value: str | bytes, what: str) -> int:
    if isinstance(value, bytes):
        # fast path: "<seconds>.<9 digits>" or "<seconds>", the forms tar writers produce
        dot = value.find(b".")
        if dot < 0:
            if value.isdigit() and len(value) <= 30:
                return int(value) * 1_000_000_000
        elif 0 < dot <= 30 and 1 < len(value) - dot <= 10:
            digits = value[:dot] + value[dot + 1 :]
            if digits.isdigit():  # GNU tar drops trailing zeros of the fraction
                return int(digits) * _FRAC_SCALE[len(value) - dot]
        value = value.decode("utf-8", "surrogateescape")
    whole, _, frac = value.partition(".")
    neg = whole.startswith("-")
    sec = _decimal(whole, what) if whole not in ("", "-") else 0
    if frac:
        if not frac.isascii() or not frac.isdigit():
            raise _bad(f"PAX {what} {value!r} is not a time")
        ns = int((frac + "000000000")[:9])
        return sec * 1_000_000_000 - ns if neg else sec * 1_000_000_000 + ns
    return sec * 1_000_000_000


def parse_pax(data: bytes) -> list[tuple[str, bytes]]:
    """PAX records ``"%d %s=%s\\n"`` in order (keys may repeat: GNU sparse 0.0)."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:
            if data[pos:].strip(b"\0"):
                raise _bad("PAX header has data after NUL padding")
            break
        sp = data.find(b" ", pos, pos + 21)
        if sp < 0:
            raise _bad("PAX record without a length")
        length_s = data[pos:sp]
        if not length_s.isdigit():
            raise _bad(f"PAX record length {length_s!r} is not a number")
        length = int(length_s)
        end = pos + length
        if length <= sp - pos + 1 or end > n or data[end - 1] != 0x0A:
            raise _bad("PAX record length does not match its record")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise _bad("PAX record without a key")
        out.append((key.decode("utf-8", "surrogateescape"), value))
        pos = end
    return out


def clean_name(raw: bytes) -> str:
    """Normalized relative name: no leading "/" or "./", no trailing "/"; a climbing ".." stays."""
    name = raw.decode("utf-8", "surrogateescape")
    if not name.startswith((".", "/")) and "/." not in name and "//" not in name:
        return name[:-1] if name.endswith("/") else name
    norm = posixpath.normpath(name)
    if norm in (".", "/", "//"):
        return ""
    return norm.lstrip("/")


def _parse_gnu_sparse(blk: bytes, start: int, count: int) -> list[tuple[int, int]]:
    out = []
    for i in range(count):
        off = start + i * 24
        if blk[off] == 0:
            break
        out.append(
            (parse_number(blk[off : off + 12], "sparse offset"),
             parse_number(blk[off + 12 : off + 24], "sparse length"))
        )
    return out


class TarReader:
    """Iterate the entries of an uncompressed tar stream; read each entry's data before the next."""

    def __init__(
        self, stream: BinaryIO, recorder: Recorder | None = None, digest: bool = True
    ) -> None:
        self._stream = stream
        self._recorder = recorder
        self._digest = BackgroundDigest() if digest else None
        self._buf = aligned_buffer(BUFFER_SIZE)
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._eof = False
        self._remaining = 0  # data bytes of the current entry not yet consumed
        self._pad = 0  # padding after the current entry's data
        self._seg = bytearray()  # pending raw bytes for the recorder
        # CRC-64 of the current entry's data for a recorder with file_done (None: not wanted)
        self._file_done: Callable[[int], None] | None = getattr(recorder, "file_done", None)
        self._crcf: CrcFunc | None = crc64 if self._file_done is not None else None
        self._crc_on = False  # the current entry's data is being checksummed
        self._crc = 0
        self._global: dict[str, bytes] = {}
        self._done = False
        self.bytes_read = 0
        self._diff_id: str | None = None

    # ---- buffer -------------------------------------------------------------------------------
    def _fill(self, need: int) -> bool:
        """Make at least *need* bytes available at ``_pos``; False if the input ends first."""
        avail = self._end - self._pos
        if avail >= need:
            return True
        if self._eof:
            return False
        size = len(self._buf)
        if need > size:
            if self._digest is not None:
                self._digest.wait()
            bigger = aligned_buffer(need)
            bigger[:avail] = self._mv[self._pos : self._end]
            self._mv.release()
            self._buf = bigger
            self._mv = memoryview(bigger)
            self._pos, self._end = 0, avail
            size = need
        # Reads go on at the end while there is room; the front is reused (after the digest
        # thread is done with it) when what is needed does not fit behind.
        if self._pos and (self._pos + need > size or (avail == 0 and size - self._end < _READ)):
            if self._digest is not None:
                self._digest.wait()
            if avail:
                self._mv[:avail] = self._mv[self._pos : self._end]
            self._pos = 0
            self._end = avail
        mv = self._mv
        while self._end - self._pos < need:
            end = self._end
            n = self._stream.readinto(mv[end : min(end + _READ, size)])  # type: ignore[attr-defined]
            if not n:
                self._eof = True
                return False
            if self._digest is not None:
                self._digest.update(mv[end : end + n])
            self._end = end + n
            self.bytes_read += n
        return True

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise _bad(f"archive truncated in {what}")
        b = bytes(self._mv[self._pos : self._pos + n])
        self._pos += n
        return b

    def _skip_current(self) -> None:
        """Consume what is left of the current entry's data and its padding."""
        rem = self._remaining
        crcf = self._crcf if self._crc_on else None
        while rem:
            if self._pos == self._end and not self._fill(1):
                raise _bad("archive truncated in entry data")
            n = min(rem, self._end - self._pos)
            if crcf is not None:
                self._crc = crcf(self._mv[self._pos : self._pos + n], self._crc)
            self._pos += n
            rem -= n
        self._remaining = 0
        if self._pad:
            if self._recorder is None and self._end - self._pos >= self._pad:
                self._pos += self._pad
                self._pad = 0
                return
            pad = self._take(self._pad, "padding")
            self._pad = 0
            if self._recorder is not None:
                self._seg += pad

    # ---- data access ---------------------------------------------------------------------------
    def chunks(self, limit: int | None = None) -> Iterator[memoryview]:
        """The current entry's raw data region, as views valid until the next call."""
        rem = self._remaining if limit is None else min(limit, self._remaining)
        while rem:
            if self._pos == self._end and not self._fill(1):
                raise _bad("archive truncated in entry data")
            n = min(rem, self._end - self._pos)
            start = self._pos
            self._pos += n
            self._remaining -= n
            rem -= n
            view = self._mv[start : start + n]
            if self._crc_on:
                self._crc = self._crcf(view, self._crc)  # type: ignore[misc]
            yield view

    def read_data(self, entry: TarEntry, limit: int = MAX_META) -> bytes:
        """The whole (small) data of the current entry; InvalidArchive beyond *limit*."""
        if self._remaining > limit:
            raise _bad(f"data of {entry.name!r} exceeds {limit} bytes")
        return b"".join(bytes(c) for c in self.chunks())

    def take_buffered(self) -> memoryview | None:
        """The current entry's whole data region if it is buffered already (it is then consumed;
        the view is valid until the reader reads on), else None."""
        rem = self._remaining
        pos = self._pos
        if self._end - pos < rem:
            return None
        self._pos = pos + rem
        self._remaining = 0
        view = self._mv[pos : pos + rem]
        if self._crc_on:
            self._crc = self._crcf(view, self._crc)  # type: ignore[misc]
        return view

    def copy_data(self, entry: TarEntry, fd: int) -> int:
        """Write the current entry's file content to *fd* (holes seeked over); returns its size."""
        write = os.write
        if entry.sparse is None:
            rem = self._remaining
            pos = self._pos
            if self._end - pos >= rem:  # all of it is buffered already: one write
                self._pos = pos + rem
                self._remaining = 0
                chunk = self._mv[pos : pos + rem]
                if self._crc_on:
                    self._crc = self._crcf(chunk, self._crc)  # type: ignore[misc]
                while chunk:
                    n = write(fd, chunk)
                    chunk = chunk[n:]
                return entry.size
            for chunk in self.chunks():
                while chunk:
                    n = write(fd, chunk)
                    chunk = chunk[n:]
            return entry.size
        pwrite = os.pwrite
        for off, length in entry.sparse:
            pos = off
            for chunk in self.chunks(length):
                while chunk:
                    n = pwrite(fd, chunk, pos)
                    chunk = chunk[n:]
                    pos += n
        os.ftruncate(fd, entry.size)
        return entry.size

    # ---- headers -------------------------------------------------------------------------------
    def _read_block(self) -> bytes | None:
        if not self._fill(BLOCK):
            if self._end - self._pos == 0:
                return None
            raise _bad("archive truncated in a header")
        blk = bytes(self._mv[self._pos : self._pos + BLOCK])
        self._pos += BLOCK
        if self._recorder is not None:
            self._seg += blk
        return blk

    def _meta_data(self, size: int, what: str) -> bytes:
        """Data of a PAX / long-name header: part of the header sequence, so segment bytes."""
        if size < 0 or size > MAX_META:
            raise _bad(f"{what} of {size} bytes (limit {MAX_META})")
        padded = (size + BLOCK - 1) & ~(BLOCK - 1)
        data = self._take(padded, what)
        if self._recorder is not None:
            self._seg += data
        return data[:size]

    def _flush_segment(self) -> None:
        if self._recorder is not None and self._seg:
            self._recorder.segment(bytes(self._seg))
            self._seg.clear()

    def _finish(self) -> None:
        """Read to EOF (trailing blocks and garbage are hashed and recorded)."""
        while True:
            if self._pos < self._end:
                if self._recorder is not None:
                    self._seg += self._mv[self._pos : self._end]
                    if len(self._seg) >= BUFFER_SIZE:
                        self._flush_segment()
                self._pos = self._end
            if not self._fill(1):
                break
        self._flush_segment()
        self._done = True
        if self._digest is not None:
            self._diff_id = "sha256:" + self._digest.hexdigest()

    @property
    def diff_id(self) -> str:
        if self._digest is None:
            raise ValueError("TarReader was created with digest=False")
        if self._diff_id is None:
            raise ValueError("diff_id is known once the archive has been read to its end")
        return self._diff_id

    def drain(self) -> None:
        """Skip whatever is left of the archive (entries and trailing bytes) up to EOF."""
        for _ in self:
            pass

    def _settle(self) -> None:
        """Finish the current entry: skip what is left of its data and padding, hand its CRC to
        the recorder (before the next header, and before a native run of files)."""
        if self._remaining or self._pad:
            self._skip_current()
        if self._crc_on:
            self._crc_on = False
            self._file_done(self._crc)  # type: ignore[misc]

    def can_apply_files(self) -> bool:
        """Whether :meth:`apply_files` can work here: the native helper is built, and the
        recorder, if any, takes raw frames (the confined apply's PipeRecorder)."""
        rec = self._recorder
        return _native_files is not None and (rec is None or hasattr(rec, "write_frames"))

    def apply_files(
        self, dirs: dict[str, tuple[int, str, bool]], euid: int, egid: int, umask: int
    ) -> tuple[int, int, tuple[int, str, str] | None]:
        """Apply natively the run of plain regular files that starts here (see ``files`` in
        _fastapply.c: root, an empty target, directories from *dirs*); the run ends at the first
        entry of another kind, which the caller then reads as usual.

        Returns (files applied, their bytes, error): error is (errno, step, real path) for the
        last file, created but not finished.  Call only where the previous entry's data has been
        consumed (between entries) and when :meth:`can_apply_files`."""
        if self._global or self._done:
            return 0, 0, None
        self._settle()
        rec = self._recorder
        pos, count, size, frames, pad, error = _native_files(  # type: ignore[misc]
            self._buf, self._pos, self._end, dirs, euid, egid, umask,
            None if rec is None else self._seg, self._crcf)
        if count:
            self._pos = pos
            self._pad = pad
            if rec is not None:
                self._seg.clear()
                rec.write_frames(frames)  # type: ignore[attr-defined]
        return count, size, error

    def __iter__(self) -> Iterator[TarEntry]:
        rec = self._recorder
        done = self._file_done
        while not self._done:
            if self._remaining or self._pad or self._crc_on:
                self._settle()  # the previous entry's data (and its CRC) has all gone by
            entry = self._next_header()
            if entry is None:
                self._finish()
                return
            if rec is not None:
                self._flush_segment()
                rec.file(entry.raw_name, entry.data_size, None)
                if done is not None and entry.data_size:
                    self._crc_on = True
                    self._crc = 0
            yield entry

    def _next_header(self) -> TarEntry | None:
        native = _native_header
        if native is not None and not self._global:
            # only what is buffered: reading ahead could wait on a pipe for bytes that come
            # after this entry has been applied; a sequence cut by the buffer's end goes the
            # Python way, which reads exactly what it needs
            r = native(self._buf, self._pos, self._end)
            if r is not None:
                return self._native_entry(r)
        return self._next_header_py()

    def _native_entry(self, r: tuple[Any, ...]) -> TarEntry:
        """An entry from the native parser's tuple (see _fastapply.c)."""
        (consumed, typ, size, data_size, mode, uid, gid, mtime_ns, atime_ns, ctime_ns, raw_name,
         name, raw_link, link, owner, devmajor, devminor, pax, xattrs) = r
        pos = self._pos
        if self._recorder is not None:
            self._seg += self._mv[pos : pos + consumed]
        self._pos = pos + consumed
        e = TarEntry()
        e.type = typ
        e.size = size
        e.data_size = data_size
        e.mode = mode & 0o7777
        if mode > 0o7777:
            e.type_bits = mode & 0o170000
        e.uid = uid
        e.gid = gid
        e.mtime_ns = mtime_ns
        if atime_ns is not None:
            e.atime_ns = atime_ns
        if ctime_ns is not None:
            e.ctime_ns = ctime_ns
        e.raw_name = raw_name
        e.name = clean_name(raw_name) if name is None else name
        e.raw_linkname = raw_link
        e.linkname = link
        if owner:
            e._raw_owner = owner
        if devmajor or devminor:
            e.devmajor = devmajor
            e.devminor = devminor
        if pax is not None:
            e._pax_raw = pax
            if "uname" in pax:
                e.uname = pax["uname"].decode("utf-8", "surrogateescape")
            if "gname" in pax:
                e.gname = pax["gname"].decode("utf-8", "surrogateescape")
        if xattrs is not None:
            e.xattrs = xattrs
        self._remaining = data_size
        self._pad = -data_size & (BLOCK - 1)
        return e

    def _next_header_py(self) -> TarEntry | None:
        pax: dict[str, bytes] = {}
        sparse00: list[int] = []
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            blk = self._read_block()
            if blk is None:
                if pax or longname is not None or longlink is not None:
                    raise _bad("archive ends after an extended header")
                return None  # no end-of-archive marker: accepted, as Go's reader does
            if blk == _ZERO_BLOCK:
                if pax or longname is not None or longlink is not None:
                    raise _bad("end-of-archive marker after an extended header")
                nxt = self._read_block()
                if nxt is not None and nxt != _ZERO_BLOCK:
                    raise _bad("a lone zero block followed by more data")
                return None
            # checksum: unsigned and signed sums accepted (field counted as spaces)
            f = blk[148:156].rstrip(b"\0 ")
            stored = int(f, 8) if f.isdigit() and b"8" not in f and b"9" not in f else (
                parse_number(blk[148:156], "checksum")
            )
            field_sum = sum(blk[148:156])
            if blk.isascii():
                total = (zlib.adler32(blk) & 0xFFFF) - 1  # exact: an ASCII block sums < 65521
                if total - field_sum + 256 != stored:
                    raise _bad(f"header checksum mismatch at offset {self.bytes_read}")
            else:
                unsigned = sum(blk) - field_sum + 256
                if unsigned != stored:
                    high = sum(1 for b in blk if b & 0x80)
                    high -= sum(1 for b in blk[148:156] if b & 0x80)
                    if unsigned - 256 * high != stored:
                        raise _bad(f"header checksum mismatch at offset {self.bytes_read}")
            typ = blk[156:157]
            f = blk[124:136].rstrip(b"\0 ")
            size = int(f, 8) if f.isdigit() and b"8" not in f and b"9" not in f else (
                parse_number(blk[124:136], "size")
            )
            if size < 0 or size > MAX_SIZE:
                raise _bad(f"entry size {size} out of range")
            if typ in (_PAX_LOCAL, _PAX_GLOBAL):
                records = parse_pax(self._meta_data(size, "PAX header"))
                if typ == _PAX_GLOBAL:
                    for k, v in records:
                        if k not in _GLOBAL_SKIP and not k.startswith("GNU.sparse."):
                            self._global[k] = v
                    continue
                for k, v in records:
                    if k == "GNU.sparse.offset" or k == "GNU.sparse.numbytes":
                        sparse00.append(_decimal(v, k))
                    pax[k] = v
                continue
            if typ == _GNU_LONGNAME:
                longname = self._meta_data(size, "GNU long name").split(b"\0", 1)[0]
                continue
            if typ == _GNU_LONGLINK:
                longlink = self._meta_data(size, "GNU long link name").split(b"\0", 1)[0]
                continue
            if typ == _GNU_MULTIVOL:
                raise _bad("multi-volume archives are not supported")
            return self._make_entry(blk, typ, size, pax, sparse00, longname, longlink)

    def _make_entry(
        self,
        blk: bytes,
        typ: bytes,
        size: int,
        pax: dict[str, bytes],
        sparse00: list[int],
        longname: bytes | None,
        longlink: bytes | None,
    ) -> TarEntry:
        e = TarEntry()
        magic = blk[257:265]
        gnu = magic == b"ustar  \0"
        ustar = not gnu and blk[257:262] == b"ustar"
        nul = blk.find(0, 0, 100)
        raw_name = blk[: nul if nul >= 0 else 100]
        if ustar:
            prefix = blk[345:500].split(b"\0", 1)[0]
            if prefix:
                raw_name = prefix + b"/" + raw_name
        if longname is not None:
            raw_name = longname
        raw_link = longlink if longlink is not None else blk[157:257].split(b"\0", 1)[0]
        # inlined fast path of parse_number for the four fields every entry has
        try:
            f = blk[100:108].rstrip(b"\0 ")
            mode = int(f, 8) if f.isdigit() else parse_number(blk[100:108], "mode")
            e.mode = mode & 0o7777
            if mode > 0o7777:
                e.type_bits = mode & 0o170000
            f = blk[108:116].rstrip(b"\0 ")
            e.uid = int(f, 8) if f.isdigit() else parse_number(blk[108:116], "uid")
            f = blk[116:124].rstrip(b"\0 ")
            e.gid = int(f, 8) if f.isdigit() else parse_number(blk[116:124], "gid")
            f = blk[136:148].rstrip(b"\0 ")
            mtime = int(f, 8) if f.isdigit() else parse_number(blk[136:148], "mtime")
        except ValueError:
            raise _bad("a numeric header field holds a non-octal digit") from None
        e.mtime_ns = mtime * 1_000_000_000
        if ustar or gnu:
            e._raw_owner = blk[265:329]
            if typ in (CHARDEV, BLOCKDEV):
                e.devmajor = parse_number(blk[329:337], "devmajor")
                e.devminor = parse_number(blk[337:345], "devminor")
        if gnu and typ != _GNU_SPARSE and blk[345:369] != _ZERO_24:
            a = parse_number(blk[345:357], "atime")
            c = parse_number(blk[357:369], "ctime")
            if a:
                e.atime_ns = a * 1_000_000_000
            if c:
                e.ctime_ns = c * 1_000_000_000
        if typ == b"\0" or typ == b"":
            typ = DIRECTORY if raw_name.endswith(b"/") else REGULAR
        data_size = size
        if typ in (HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO):
            data_size = 0 if typ != DIRECTORY else size  # GNU may give dirs a size; skip it
            size = 0
        if typ == _GNU_DUMPDIR:
            typ = DIRECTORY
            size = 0
        if typ == _GNU_SPARSE:
            chunks = _parse_gnu_sparse(blk, 386, 4)
            extended = blk[482]
            while extended:
                ext = self._read_block()
                if ext is None:
                    raise _bad("archive truncated in a GNU sparse header")
                chunks += _parse_gnu_sparse(ext, 0, 21)
                extended = ext[504]
                if len(chunks) > MAX_META // 24:
                    raise _bad("GNU sparse map too large")
            e.sparse = chunks
            size = parse_number(blk[483:495], "sparse real size")
            typ = REGULAR
        # apply global then local PAX records
        merged = {**self._global, **pax} if self._global else pax
        if merged:
            xattrs: dict[str, bytes] | None = None
            for k, v in merged.items():
                if k == "mtime":
                    e.mtime_ns = _pax_time_ns(v, k)
                elif k == "atime":
                    e.atime_ns = _pax_time_ns(v, k)
                elif k == "ctime":
                    e.ctime_ns = _pax_time_ns(v, k)
                elif k.startswith("SCHILY.xattr."):
                    if xattrs is None:
                        xattrs = {}
                    xattrs[k[13:]] = v
                elif k == "path":
                    raw_name = v
                elif k == "linkpath":
                    raw_link = v
                elif k == "size":
                    size = _decimal(v, k)
                    if size < 0 or size > MAX_SIZE:
                        raise _bad(f"PAX size {size} out of range")
                    if typ in (HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, FIFO):
                        size = 0
                    else:
                        data_size = size
                elif k == "uid":
                    e.uid = _decimal(v, k)
                elif k == "gid":
                    e.gid = _decimal(v, k)
                elif k == "uname":
                    e.uname = v.decode("utf-8", "surrogateescape")
                elif k == "gname":
                    e.gname = v.decode("utf-8", "surrogateescape")
            e._pax_raw = merged
            if xattrs:
                e.xattrs = xattrs
            if "GNU.sparse.major" in merged or "GNU.sparse.size" in merged or (
                "GNU.sparse.map" in merged
            ):
                raw_name, size, data_size = self._pax_sparse(
                    e, e.pax, sparse00, raw_name, data_size
                )
        if e.uid < 0 or e.uid > MAX_ID or e.gid < 0 or e.gid > MAX_ID:
            raise _bad(f"uid/gid {e.uid}/{e.gid} out of range")
        if size < 0 or data_size < 0:
            raise _bad("negative size")
        e.type = typ
        e.raw_name = raw_name
        name = raw_name.decode("utf-8", "surrogateescape")
        if name.startswith((".", "/")) or "/." in name or "//" in name:
            name = clean_name(raw_name)
        elif name.endswith("/"):
            name = name[:-1]
        e.name = name
        e.raw_linkname = raw_link
        e.linkname = raw_link.decode("utf-8", "surrogateescape")
        e.size = size
        e.data_size = data_size
        self._remaining = data_size
        self._pad = -data_size & (BLOCK - 1)
        if e.sparse is not None:
            self._check_sparse(e)
        return e

    def _pax_sparse(
        self,
        e: TarEntry,
        pax: dict[str, str],
        sparse00: list[int],
        raw_name: bytes,
        data_size: int,
    ) -> tuple[bytes, int, int]:
        major = pax.get("GNU.sparse.major")
        real = pax.get("GNU.sparse.realsize") or pax.get("GNU.sparse.size")
        if real is None:
            raise _bad("PAX sparse entry without a real size")
        size = _decimal(real, "GNU.sparse.realsize")
        if "GNU.sparse.name" in pax:
            raw_name = pax["GNU.sparse.name"].encode("utf-8", "surrogateescape")
        nums: list[int]
        if major == "1":
            nums, used = self._read_sparse10_map(data_size)
            data_size -= used
        elif "GNU.sparse.map" in pax:
            text = pax["GNU.sparse.map"]
            nums = [_decimal(x, "GNU.sparse.map") for x in text.split(",")] if text else []
        else:
            nums = sparse00
        if len(nums) % 2:
            raise _bad("odd number of values in a sparse map")
        e.sparse = [(nums[i], nums[i + 1]) for i in range(0, len(nums), 2)]
        return raw_name, size, data_size

    def _read_sparse10_map(self, data_size: int) -> tuple[list[int], int]:
        """GNU sparse 1.0: the map fills whole blocks at the start of the data region.

        Like Go's reader (and tar-split after it) the map is treated as part of the header
        sequence: its blocks go to the recorder's segment, and the entry's data is what follows.
        """
        text = bytearray()
        used = 0
        want: int | None = None
        while True:
            if data_size - used < BLOCK:
                raise _bad("sparse map larger than its entry")
            blk = self._take(BLOCK, "sparse map")
            if self._recorder is not None:
                self._seg += blk
            used += BLOCK
            text += blk
            if len(text) > MAX_META:
                raise _bad("sparse map too large")
            complete = text.split(b"\n")[:-1]
            if want is None and complete:
                want = _decimal(bytes(complete[0]), "sparse map count")
                if want < 0 or want > MAX_META:
                    raise _bad("sparse map count out of range")
            if want is not None and len(complete) >= 1 + 2 * want:
                nums = [_decimal(bytes(x), "sparse map") for x in complete[1 : 1 + 2 * want]]
                return nums, used

    def _check_sparse(self, e: TarEntry) -> None:
        assert e.sparse is not None
        total = 0
        last = 0
        for off, length in e.sparse:
            if off < last or length < 0 or off + length > e.size:
                raise _bad(f"sparse map of {e.name!r} is inconsistent")
            last = off + length
            total += length
        if total != self._remaining:
            raise _bad(f"sparse data of {e.name!r} does not match its size")
