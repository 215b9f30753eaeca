"""A streaming tar reader: GNU, PAX, ustar, STAR and v7 headers, sparse files.

It reads headers as Go's ``archive/tar`` reads them (Go's reader is Docker's, so a layer means
here what it means there; tests/archive/test_go_testdata.py holds the two side by side): every
number field must parse, except a GNU header's atime/ctime; the last local PAX header and GNU
long name before an entry count, an empty PAX value keeps the header's field; global PAX headers
are checked and skipped, their records reach no entry; an input that ends after an extended
header or inside the last entry's padding simply ends.  It never imports upward (no driver, no
store); it owns only the reading of tar streams.

Written for speed and for byte-exact accounting rather than for generality:

- one large reusable buffer; headers are parsed by slicing, entry data is handed out as
  memoryviews into that buffer (no per-chunk copies); or, for a stream that can be mapped (an
  uncompressed regular file in the confined child), the file's own pages, mapped: nothing is
  copied in, and the pages far enough behind the reader and the digest are dropped again;
- every byte read from the input is hashed (``diff_id``), including the end-of-archive blocks and
  anything after them: the reader always reads its input to EOF; the hashing runs in a thread of
  its own (:mod:`.digest`), overlapping with whatever the consumer does with the entries;
- a :class:`Recorder` sees the archive exactly: raw header blocks (with PAX / GNU long-name
  headers and their data), padding and trailing bytes go to ``segment()``, each entry's data
  region is announced by ``file()``.  Concatenating segments and entry data in call order gives
  back the input stream byte for byte (what tar-split needs).  A recorder that also has
  ``file_done(crc64)`` gets, after each entry with data, the CRC-64 (Go's ISO table) of that
  data, computed as the data passes through the reader (whichever way it is consumed).  A
  recorder that takes frames later on a thread of its own (``defers_frames``: the confined
  child's BufferedRecorder) gets the native runs' frames with their header bytes and CRCs, and
  big entries' CRC frames, filled in by the digest thread instead (:meth:`TarReader._fill_later`).

Any malformation (bad checksum, truncation, absurd numbers, broken PAX records) raises
:class:`~graphdriver.errors.InvalidArchive` with one line of explanation.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import struct
import zlib

from ..errors import InvalidArchive
from .buffers import aligned_buffer
from .crc64 import crc64
from .digest import (
    FUSED_CRC,
    NATIVE_CRC,
    BackgroundDigest,
    frames_worker,
    hash_progress,
    take_hash_over,
)
from .native import native_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable, Iterator
    from functools import partial
    from typing import Any, BinaryIO, Protocol

    from .._fastdigest import Digest as NativeDigest
    from .digest import ThreadDigest
else:
    # the same classes from their C modules: the collections and functools packages are ~3 ms
    # of the confined child's start-up, for nothing else it needs
    from _collections import deque
    from _functools import partial

_fastapply = native_module("_fastapply")
_native_header: Callable[[Any, int, int], tuple[Any, ...] | None] | None = (
    _fastapply.header if _fastapply else None)
_native_files: Callable[..., tuple[Any, ...]] | None = _fastapply.files if _fastapply else None
#: the native thread that finishes the native runs' regular files (their data, owner, mode,
#: times, close) beside the reader (see _fastapply.c's Writer): a map stays whole until the
#: reader is closed; the part of the buffer a run's files are in is not written again before
#: the writer is past them (_reuse)
_FileWriter: Callable[[], Any] | None = getattr(_fastapply, "Writer", None)

BLOCK = 512
#: the reader's buffer.  4 MiB, not 1: the digest thread may lag that far behind the reader
#: before the reader waits to reuse a region (_reuse), and an entry of up to that much data goes
#: through the native runs (rootfs.tar: the reader's waits for the digest 16 -> 4 ms, its
#: futex sleeps halved; the driver's apply 0.93 of 1 MiB's in a 21-run same-run A/B; 8 MiB
#: was slower: the digest then hashes bytes gone from the CPU's cache)
BUFFER_SIZE = 1 << 22
#: an entry of this much data or more (that the Python code reads: bigger than the buffer) has
#: its CRC computed by the digest thread, piece by piece, when the recorder takes frames later
CRC_LATER_FROM = 1 << 20
# a job of _fastdigest's fill_frames: offset, length (with a kind: bits 62, 61, 60), where to write
_CRC_END = struct.Struct("<QQQ")
_ADD_JOB = 1 << 62
_END_JOB = 1 << 61
_JOIN_JOB = 1 << 60
#: a big entry's piece has its CRC computed by the reader (then joined to the digest thread's)
#: when the digest thread has more than this many slots to do: it is the slower one (the sha256
#: of a region takes ~8 times its CRC), and the reader would soon wait for it -- unless the
#: digest thread folds that CRC into its sha256's pass (FUSED_CRC: there it costs nothing)
_DIGEST_BEHIND = (1 << 62) if FUSED_CRC else 3
# One read.  Small enough that what was read is still in the CPU's cache when it is parsed,
# hashed and written (a 256 KiB readv from the page cache is ~2.5x faster per byte than 1 MiB
# here); a sixteenth of the buffer, so the digest thread hashes a region while the next is read.
_READ = 256 << 10
#: a mapped input (_fill_mapped): made available at least this much at a time; the digest may
#: lag this far behind (the reader waits past that); pages this far behind both the reader and
#: the digest are dropped from the process, this much at a time
MAP_STEP = 1 << 20
#: 16 MiB, not a buffer's worth: the digest hashes at one speed (~1.8 GB/s) and the reader goes
#: at the speed of the entries (fast through a run of 1-10 MB files, slow through small ones);
#: held within 4 MiB of each other, each waited for the other in turn and a CPU stood idle for
#: ~20% of a rootfs apply (the RSS this costs is the file's pages mapped meanwhile, at most
#: the lag: 42 MB at most for the rootfs instead of 31, nothing where the reader is the slower)
MAP_LAG = 16 << 20
MAP_KEEP = 4 << 20
#: how far the file writer's oldest pending file may lag behind a mapped reader (which waits
#: past that): where the writer creates files too, it is often that far behind, and the pages
#: of its files stay mapped until it wrote them
WRITER_LAG = 8 << 20
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
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_24 = bytes(24)
_OCTAL_DIGITS = b"01234567"
# Types whose size field carries no data (Go's isHeaderOnlyType)
_HEADER_ONLY = frozenset((HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO))
# Header layouts (Go's formats): v7, ustar (and PAX), GNU, and STAR
_V7, _USTAR, _GNU, _STAR = range(4)


if TYPE_CHECKING:  # the recorder's interface is the type checker's business only

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


def _cstr(field: bytes) -> bytes:
    """A C string field: up to its first NUL (Go's parseString)."""
    nul = field.find(0)
    return field if nul < 0 else field[:nul]


def parse_number(field: bytes, what: str) -> int:
    """A numeric header field as Go's parseNumeric reads it: base-256 when the first byte has its
    high bit set (two's complement), else octal between spaces and NULs, cut at an inner NUL."""
    if field and field[0] & 0x80:
        inv = 0xFF if field[0] & 0x40 else 0
        x = (field[0] ^ inv) & 0x7F
        for c in field[1:]:
            if x >> 56:
                raise _bad(f"{what} field {field!r} overflows")
            x = x << 8 | (c ^ inv)
        if x >> 63:
            raise _bad(f"{what} field {field!r} overflows")
        return ~x if inv else x
    s = _cstr(field.strip(b" \0"))
    if not s:
        return 0
    if s.translate(None, _OCTAL_DIGITS):
        raise _bad(f"{what} field {field!r} is not a number")
    v = int(s, 8)
    if v >> 64:
        raise _bad(f"{what} field {field!r} overflows")
    return v - (1 << 64) if v >> 63 else v  # Go's int64(uint64)


def _checksum_ok(blk: bytes) -> bool:
    """The stored checksum (octal only) is the unsigned or the signed sum of the block, the
    checksum field counted as spaces."""
    f = blk[148:156].rstrip(b"\0 ")
    if f.isdigit() and b"8" not in f and b"9" not in f:
        stored = int(f, 8)
    else:
        s = _cstr(blk[148:156].strip(b" \0"))
        if s.translate(None, _OCTAL_DIGITS):
            return False
        stored = int(s, 8) if s else 0
    field_sum = sum(blk[148:156])
    if blk.isascii():
        return (zlib.adler32(blk) & 0xFFFF) - 1 - field_sum + 256 == stored  # < 65521: exact
    unsigned = sum(blk) - field_sum + 256
    if unsigned == stored:
        return True
    high = sum(1 for b in blk if b & 0x80) - sum(1 for b in blk[148:156] if b & 0x80)
    return unsigned - 256 * high == stored


def _format(blk: bytes) -> int:
    """Which header layout the block has, by its magic (Go's getFormat)."""
    magic = blk[257:263]
    if magic == b"ustar\0":
        return _STAR if blk[508:512] == b"tar\0" else _USTAR
    if magic == b"ustar " and blk[263:265] == b" \0":
        return _GNU
    return _V7


# (format, name, linkname, size, mode, uid, gid, mtime, devmajor, devminor, atime, ctime)
_Header = tuple[int, bytes, bytes, int, int, int, int, int, int, int, int | None, int | None]


def _parse_header(blk: bytes, offset: int) -> _Header:
    """Every field of one header block, as Go's readHeader reads them: each number must parse
    (InvalidArchive otherwise), except a GNU header's atime and ctime, which an entry's meaning
    does not depend on: when either does not parse, both are dropped and the field is taken, as
    Go does for archives of its writers before 1.8, for a ustar prefix if it is ASCII."""
    if not _checksum_ok(blk):
        raise _bad(f"header checksum mismatch at offset {offset}")
    fmt = _format(blk)
    end = blk.find(0, 0, 100)
    name = blk[: end if end >= 0 else 100]
    devmajor = devminor = 0
    atime = ctime = None
    # the common case inline: digits, then NULs or spaces (an 8 or a 9 raises ValueError)
    try:
        f = blk[124:136].rstrip(b"\0 ")
        size = int(f, 8) if f.isdigit() else parse_number(blk[124:136], "size")
        f = blk[100:108].rstrip(b"\0 ")
        mode = int(f, 8) if f.isdigit() else parse_number(blk[100:108], "mode")
        f = blk[108:116].rstrip(b"\0 ")
        uid = int(f, 8) if f.isdigit() else parse_number(blk[108:116], "uid")
        f = blk[116:124].rstrip(b"\0 ")
        gid = int(f, 8) if f.isdigit() else parse_number(blk[116:124], "gid")
        f = blk[136:148].rstrip(b"\0 ")
        mtime = int(f, 8) if f.isdigit() else parse_number(blk[136:148], "mtime")
        if fmt != _V7:
            f = blk[329:337].rstrip(b"\0 ")
            devmajor = int(f, 8) if f.isdigit() else parse_number(blk[329:337], "devmajor")
            f = blk[337:345].rstrip(b"\0 ")
            devminor = int(f, 8) if f.isdigit() else parse_number(blk[337:345], "devminor")
    except ValueError as exc:
        raise _bad("a numeric header field holds a non-octal digit") from exc
    if fmt != _V7:
        prefix = b""
        if fmt == _USTAR:
            end = blk.find(0, 345, 500)
            prefix = blk[345 : end if end >= 0 else 500]
        elif fmt == _STAR:
            prefix = _cstr(blk[345:476])
            atime = parse_number(blk[476:488], "atime")
            ctime = parse_number(blk[488:500], "ctime")
        elif blk[345:369] != _ZERO_24:
            try:
                atime = parse_number(blk[345:357], "atime") if blk[345] else None
                ctime = parse_number(blk[357:369], "ctime") if blk[357] else None
            except InvalidArchive:
                atime = ctime = None
                prefix = _cstr(blk[345:500])
                if not prefix.isascii():
                    prefix = b""
        if prefix:
            name = prefix + b"/" + name
    end = blk.find(0, 157, 257)
    return (fmt, name, blk[157 : end if end >= 0 else 257], size, mode, uid, gid, mtime,
            devmajor, devminor, atime, ctime)


def _pax_int(value: bytes, what: str) -> int:
    """A decimal PAX value as Go's strconv.ParseInt(v, 10, 64) reads it (a sign may lead)."""
    digits = value[1:] if value[:1] in (b"+", b"-") else value
    digits = digits.lstrip(b"0") or b"0" if digits.isdigit() else b""
    if not digits or len(digits) > 19:
        raise _bad(f"PAX {what} {value!r} is not a number")
    n = -int(digits) if value[:1] == b"-" else int(digits)
    if not -(1 << 63) <= n < 1 << 63:
        raise _bad(f"PAX {what} {value!r} is out of range")
    return n


def _pax_time_ns(value: bytes, what: str) -> int:
    """A PAX time, "<seconds>[.<fraction>]" (Go's parsePAXTime: a fraction beyond nanoseconds is
    cut, a negative time counts its fraction down)."""
    dot = value.find(b".")
    if dot < 0:
        if value.isdigit() and len(value) <= 18:  # the common forms first
            return int(value) * 1_000_000_000
        return _pax_int(value, what) * 1_000_000_000
    if 0 < dot <= 18 and 1 < len(value) - dot <= 10:
        digits = value[:dot] + value[dot + 1 :]
        if digits.isdigit():  # GNU tar drops trailing zeros of the fraction
            return int(digits) * _FRAC_SCALE[len(value) - dot]
    sec = _pax_int(value[:dot], what)
    frac = value[dot + 1 :]
    if not frac:
        return sec * 1_000_000_000
    if not frac.isdigit():
        raise _bad(f"PAX {what} {value!r} is not a time")
    ns = int((frac + b"00000000")[:9])
    return sec * 1_000_000_000 - ns if value[:1] == b"-" else sec * 1_000_000_000 + ns


# PAX keys whose values are C strings elsewhere: Go refuses a NUL in them
_PAX_STRINGS = frozenset(("path", "linkpath", "uname", "gname"))


def parse_pax(data: bytes) -> dict[str, bytes]:
    """The records ``"%d %s=%s\\n"`` of a PAX header, as Go's parsePAX reads them: a later record
    replaces an earlier one of the same key; GNU sparse 0.0's repeated offset/numbytes records
    become one ``GNU.sparse.map``.  Anything else than records (NUL padding included) is refused,
    as are NULs in a key or in a path, link path, user or group name."""
    out: dict[str, bytes] = {}
    sparse_map: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n:
        sp = data.find(b" ", pos)
        if sp < 0:
            raise _bad("PAX record without a length")
        length_s = data[pos:sp]
        digits = length_s[1:] if length_s[:1] == b"+" else length_s
        digits = digits.lstrip(b"0") or b"0" if digits.isdigit() else b""
        if not digits or len(digits) > 19:
            raise _bad(f"PAX record length {length_s!r} is not a number")
        end = pos + int(digits)
        if end - pos < 5 or end > n or end <= sp + 1 or data[end - 1] != 0x0A:
            raise _bad("PAX record length does not match its record")
        rkey, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq or not rkey:
            raise _bad("PAX record without a key")
        key = rkey.decode("utf-8", "surrogateescape")
        if 0 in (value if key in _PAX_STRINGS else rkey):
            raise _bad(f"PAX record {key!r} holds a NUL")
        if key == "GNU.sparse.offset" or key == "GNU.sparse.numbytes":
            if (key == "GNU.sparse.offset") == bool(len(sparse_map) % 2) or 0x2C in value:
                raise _bad("GNU sparse 0.0 records out of order")
            sparse_map.append(value)
        else:
            out[key] = value
        pos = end
    if sparse_map:
        out["GNU.sparse.map"] = b",".join(sparse_map)
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
        self, stream: BinaryIO, recorder: Recorder | None = None, digest: bool = True,
        handoff: Any = None,
    ) -> None:
        """*digest*: hash what is read (:attr:`diff_id`).  *handoff*: the page of a hash of
        the input that the parent of a confined apply runs while its child starts
        (:mod:`.inputdigest`): a mapped reader takes it over at its first read, unless it is
        done (:meth:`_take_over`); its :attr:`diff_id` is then the whole stream's."""
        self._stream = stream
        self._recorder = recorder
        # (without this side's own sha256, whose state is what moves over, the parent's hash
        # runs to its end and the reader hashes it all: its diffID is the one taken)
        self._handoff = handoff if digest and FUSED_CRC else None
        #: whether the reader hashes what it reads (its diff_id); False while the parent's
        #: hash does (see *handoff*), and for good with digest=False
        self.hashes = digest and self._handoff is None
        self._digest: ThreadDigest | NativeDigest | None = None
        if self.hashes:
            self._digest = BackgroundDigest()
        elif digest:  # fills in the frames until it takes the hash over (resume)
            self._digest = frames_worker()
        # a map offset below which the bytes were hashed by the parent (_take_over)
        self._hash_from = 0
        # regions of the buffer handed to the digest and maybe not hashed yet: (lap, start,
        # sequence number), in hand-over order; a lap is one pass from the buffer's front
        self._regions: deque[tuple[int, int, int]] = deque()
        self._lap = 0
        self._pos = 0
        # a stream that can be mapped is (_fill_mapped): the map is the buffer, never written
        mapping: Callable[[], tuple[Any, int] | None] | None = getattr(stream, "mapping", None)
        mapped = mapping() if mapping is not None else None
        #: whether the input is read through a map of its file
        self.mapped = mapped is not None
        self._released = 0  # the map's pages below this were dropped (MADV_DONTNEED)
        # a mapped reader's own buffer for big data (_read_piece), made when first needed,
        # and the digest's last job that reads each _READ part of it
        self._bounce: memoryview | None = None
        self._bounce_seqs: list[int] = []
        self._bounce_slot = 0
        self._last_seq = -1  # the digest's last job handed over
        # the native runs' file writer (made at the first run; see finish_writes and
        # stop_writes), and the runs, as (lap, start, the files handed over up to the run's
        # end), in order: a part of the buffer is not reused before the writer is past the
        # files in it (_reuse); a map's pages are not dropped before then (_fill_mapped)
        self._writer: Any = None
        self._wruns: deque[tuple[int, int, int]] = deque()
        if mapped is not None:
            self._buf, self._pos = mapped
        else:
            self._buf = aligned_buffer(BUFFER_SIZE)
        self._map_start = self._pos  # where the stream starts in the map (0 if not mapped)
        if self._handoff is not None and not self.mapped:
            # the parent's hash stops; this reader hashes it all (the part the parent hashed
            # is gone from its buffer by the time it would take over)
            take_hash_over(self._handoff)
            self._handoff = None
            self._digest = BackgroundDigest()
            self.hashes = True
        self._mv = memoryview(self._buf)
        self._end = self._pos
        self._eof = False
        self._remaining = 0  # data bytes of the current entry not yet consumed
        self._pad = 0  # padding after the current entry's data
        self._seg = bytearray()  # pending raw bytes for the recorder
        # CRC-64 of the current entry's data for a recorder with file_done (None: not wanted)
        self._file_done: Callable[[int], None] | None = getattr(recorder, "file_done", None)
        self._crcf: CrcFunc | None = crc64 if self._file_done is not None else None
        # the native runs' frames filled in by the digest thread (header bytes and CRCs:
        # _fastdigest's fill_frames), for a recorder that reads them later, on a thread of its
        # own (BufferedRecorder)
        self._frames_by_digest = (digest and NATIVE_CRC and self._crcf is not None
                               and getattr(recorder, "defers_frames", False))
        self._crc_on = False  # the current entry's data is being checksummed
        self._crc = 0
        # a big entry's CRC frame, filled in by the digest thread (None: the CRC is _crc)
        self._crc_frame: bytearray | None = None
        self._done = False
        self._first = True  # no entry read yet: bad bytes here mean "not a tar archive"
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
        if self.mapped:
            return self._fill_mapped(need)
        size = len(self._buf)
        if need > size:
            if self._digest is not None:
                self._digest.wait()
                self._regions.clear()
            if self._wruns:  # the old buffer goes: the writer must be done with it
                self._writer.wait_for(self._wruns[-1][2])
                self._wruns.clear()
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
            self._lap += 1
            self._reuse(avail)
            if avail:
                self._mv[:avail] = self._mv[self._pos : self._end]
            self._pos = 0
            self._end = avail
        mv = self._mv
        while self._end - self._pos < need:
            end = self._end
            stop = min(end + _READ, size)
            self._reuse(stop)
            n = self._stream.readinto(mv[end:stop])  # type: ignore[attr-defined]
            if not n:
                self._eof = True
                return False
            if self._digest is not None:
                self._regions.append((self._lap, end, self._digest.update(mv[end : end + n])))
            self._end = end + n
            self.bytes_read += n
        return True

    def _fill_mapped(self, need: int) -> bool:
        """:meth:`_fill` from the map: at least the next MAP_STEP bytes become available and go
        to the digest (in _READ regions).  The digest may lag MAP_LAG behind them (the reader
        waits past that); the pages MAP_KEEP behind both the reader and the digest -- the
        regions it is done with no longer count -- leave the process (its RSS stays flat in
        the layer's size; the file's page cache stays).  The file writer's files count as the
        digest's regions do: it may lag WRITER_LAG behind, and the pages of the runs it has still
        files of stay (were they dropped, its writes would fault them in again, to stay)."""
        if self._handoff is not None:
            self._take_over()
        end, size = self._end, len(self._buf)
        stop = min(max(end + MAP_STEP, self._pos + need), size)
        wruns = self._wruns
        if wruns:
            writer = self._writer
            done = writer.handed() - writer.pending()
            while wruns and wruns[0][2] <= done:
                wruns.popleft()
            while wruns and wruns[0][1] < stop - WRITER_LAG:
                writer.wait_for(wruns.popleft()[2])
        regions = self._regions
        digest = self._digest
        if digest is not None:
            while regions and digest.is_done(regions[0][2]):  # their pages may go
                regions.popleft()
            while regions and regions[0][1] < stop - MAP_LAG:
                digest.wait_for(regions.popleft()[2])
            mv = self._mv
            for at in range(max(end, self._hash_from), stop, _READ):
                regions.append((0, at, digest.update(mv[at : min(at + _READ, stop)])))
        self.bytes_read += stop - end
        self._end = stop
        # below what the digest may still read (the regions not known to be done: a native
        # run's frame jobs start where the run did, below the reads handed over before them)
        low = min(self._pos, min((r[1] for r in regions), default=self._pos),
                  wruns[0][1] if wruns else self._pos) - MAP_KEEP
        low -= low % mmap.PAGESIZE
        if low - self._released >= MAP_KEEP:
            self._buf.madvise(mmap.MADV_DONTNEED, self._released, low - self._released)
            self._released = low
        if stop == size:
            self._eof = True
            self._stream.mapped_to(size)  # type: ignore[attr-defined]
        return stop - self._pos >= need

    def _take_over(self) -> None:
        """At the first read: stop the parent's hash, which ran while this child started, and
        hash on from where it got -- its state goes into the digest's worker (which only
        filled in frames so far), and the reads are hashed from its stop on, in the pass that
        also does the big files' CRCs.  The parent's copy out of the page cache and its sha256
        then no longer take a CPU from the writes for the rest of the apply (the rootfs: ~50 ms
        of CPU less, 0.92 of GNU tar against 1.03 in a 24-run A/B).  A hash that is done (it
        hashed the whole input, or failed: its result says) is left as it is."""
        handoff, self._handoff = self._handoff, None
        if hash_progress(handoff)[1]:
            return
        state, hashed = take_hash_over(handoff)
        digest = self._digest
        assert digest is not None and self._end == self._map_start  # nothing read yet
        digest.resume(state)  # type: ignore[union-attr]  # the native worker
        self.hashes = True
        self._hash_from = self._map_start + hashed

    def _reuse(self, upto: int) -> None:
        """Before the buffer's bytes below *upto* are written again: wait until the digest has
        hashed the regions of an earlier lap that start there (only those: the digest goes on
        with the rest of the buffer while the reader fills its front), and until the file
        writer is past the files of an earlier lap's runs that start there."""
        seq = self._earlier(self._wruns, upto)
        if seq is not None:
            self._writer.wait_for(seq)
        seq = self._earlier(self._regions, upto)
        if seq is not None and self._digest is not None:
            self._digest.wait_for(seq)

    def _earlier(self, queue: deque[tuple[int, int, int]], upto: int) -> int | None:
        """Of *queue*'s (lap, start, sequence number) in hand-over order, the number of the
        latest of an earlier lap that starts below *upto* -- its worker does them in order, so
        waiting for it covers those before it, which leave the queue with it -- or None."""
        last = -1
        for i, (lap, start, _) in enumerate(queue):
            if lap >= self._lap:
                break
            if start < upto:
                last = i
        if last < 0:
            return None
        for _ in range(last):
            queue.popleft()
        return queue.popleft()[2]

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise _bad(f"archive truncated in {what}")
        b = bytes(self._mv[self._pos : self._pos + n])
        self._pos += n
        return b

    def _skip_current(self) -> None:
        """Consume what is left of the current entry's data and its padding."""
        rem = self._remaining
        crc_on = self._crc_on
        while rem:
            if self._pos == self._end and not self._fill(1):
                raise _bad("archive truncated in entry data")
            n = min(rem, self._end - self._pos)
            if crc_on:
                self._checksum(self._pos, n)
            self._pos += n
            rem -= n
        self._remaining = 0
        if self._pad:
            if self._recorder is None and self._end - self._pos >= self._pad:
                self._pos += self._pad
                self._pad = 0
                return
            # an input that ends inside the last entry's padding ends there (Go reads it so)
            n = self._pad if self._fill(self._pad) else self._end - self._pos
            if self._recorder is not None:
                self._seg += self._mv[self._pos : self._pos + n]
            self._pos += n
            self._pad = 0

    # ---- data access ---------------------------------------------------------------------------
    def chunks(self, limit: int | None = None) -> Iterator[memoryview]:
        """The current entry's raw data region, as views valid until the next call."""
        rem = self._remaining if limit is None else min(limit, self._remaining)
        while rem:
            if self._pos == self._end:
                # a mapped reader's big data goes the read way: the digest is the slower half of
                # big files, and it then hashes what the read just brought into the cache (no
                # page of the map is faulted in, then dropped)
                if self.mapped and rem > MAP_STEP:
                    view = self._read_piece(min(rem, _READ))
                    rem -= len(view)
                    yield view
                    continue
                if not self._fill(1):
                    raise _bad("archive truncated in entry data")
            n = min(rem, self._end - self._pos)
            start = self._pos
            self._pos += n
            self._remaining -= n
            rem -= n
            if self._crc_on:
                self._checksum(start, n)
            yield self._mv[start : start + n]

    def _read_piece(self, n: int) -> memoryview:
        """A mapped reader's next *n* (<= _READ) bytes of entry data (none of them available
        yet), read into a buffer of the reader's own instead of taken from the map (big
        entries' data: see :meth:`chunks`), as :meth:`chunks` hands them out."""
        if self._bounce is None:
            self._bounce = memoryview(aligned_buffer(BUFFER_SIZE))
            self._bounce_seqs = [-1] * (BUFFER_SIZE // _READ)
        seqs = self._bounce_seqs
        slot = self._bounce_slot
        self._bounce_slot = (slot + 1) % len(seqs)
        digest = self._digest
        at = self._end
        n = min(n, len(self._buf) - at)
        if n <= 0:
            raise _bad("archive truncated in entry data")
        start = slot * _READ
        if digest is not None and seqs[slot] >= 0:
            digest.wait_for(seqs[slot])  # the digest is done with this part
        view = self._bounce[start : start + n]
        got = 0
        while got < n:
            k = self._stream.pread_into(view[got:], at + got)  # type: ignore[attr-defined]
            if not k:
                raise _bad("archive truncated in entry data")
            got += k
        if digest is not None:  # (from where the parent's hash stopped, if it is ahead)
            self._last_seq = digest.update(view[min(max(self._hash_from - at, 0), n):])
        if self._crc_on:
            self._checksum(start, n, self._bounce)
        if digest is not None:
            seqs[slot] = self._last_seq
        self.bytes_read += n
        self._pos = self._end = at + n
        self._remaining -= n
        return view

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
        if self._crc_on:
            self._checksum(pos, rem)
        return self._mv[pos : pos + rem]

    def copy_data(self, entry: TarEntry, fd: int) -> int:
        """Write the current entry's file content to *fd* (holes seeked over); returns its size."""
        write = os.write
        if entry.sparse is None:
            rem = self._remaining
            pos = self._pos
            if self._end - pos >= rem:  # all of it is buffered already: one write
                self._pos = pos + rem
                self._remaining = 0
                if self._crc_on:
                    self._checksum(pos, rem)
                chunk = self._mv[pos : pos + rem]
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
            if self._first:
                raise InvalidArchive("not a tar archive (truncated: shorter than one tar header)")
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
        if not self._fill(size):
            raise _bad(f"archive truncated in {what}")
        # an input that ends inside the padding ends there, as after an entry's data (Go)
        n = padded if self._fill(padded) else self._end - self._pos
        data = bytes(self._mv[self._pos : self._pos + n])
        self._pos += n
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
        digest = self._digest
        if digest is not None and self.hashes:
            self._diff_id = "sha256:" + digest.hexdigest()
        elif digest is not None:  # the frames' worker: done once every job is
            digest.wait()
            digest.close()

    @property
    def diff_id(self) -> str:
        if not self.hashes:
            raise ValueError("TarReader was created with digest=False, or the parent's hash "
                             "of its input was not taken over")
        if self._diff_id is None:
            raise ValueError("diff_id is known once the archive has been read to its end")
        return self._diff_id

    def drain(self) -> None:
        """Skip whatever is left of the archive (entries and trailing bytes) up to EOF."""
        for _ in self:
            pass

    def _settle(self) -> None:
        """Finish the current entry: skip what is left of its data and padding, hand its CRC to
        the recorder (before the next header, and before a native run of entries)."""
        if self._remaining or self._pad:
            self._skip_current()
        if self._crc_on:
            self._crc_on = False
            frame = self._crc_frame
            if frame is None:
                self._file_done(self._crc)  # type: ignore[misc]
            else:  # the digest thread writes the CRC of the pieces it added up (_checksum)
                self._crc_frame = None
                self._recorder.write_frames(  # type: ignore[union-attr]
                    frame, self._fill_later(self._pos, frame, _CRC_END.pack(0, _END_JOB, 1)))

    def _checksum(self, start: int, n: int, source: memoryview | None = None) -> None:
        """The current entry's data at ``buffer[start:start + n]`` (or *source*'s: a mapped
        reader's own buffer) goes into its CRC: now, or
        (a big entry, for a recorder that takes frames later) by the digest thread -- unless it
        is behind (the sha256 is the slower half of an apply of big files): the reader then
        computes the piece's CRC, which the digest thread joins to its running one (where the
        digest thread's CRC is free, _DIGEST_BEHIND is never reached)."""
        frame = self._crc_frame
        data = self._mv if source is None else source
        if frame is None:
            self._crc = self._crcf(data[start : start + n], self._crc)  # type: ignore[misc]
        elif n:
            if self._digest.pending() > _DIGEST_BEHIND:  # type: ignore[union-attr]  # not None
                crc = self._crcf(data[start : start + n], 0)  # type: ignore[misc]
                self._fill_later(start, frame, _CRC_END.pack(crc, n | _JOIN_JOB, 0), source)
            else:
                self._fill_later(start, frame, _CRC_END.pack(start, n | _ADD_JOB, 0), source)

    def can_apply_files(self) -> bool:
        """Whether :meth:`apply_files` can work here: the native helper is built, and the
        recorder, if any, takes raw frames (the confined apply's PipeRecorder)."""
        rec = self._recorder
        return _native_files is not None and (rec is None or hasattr(rec, "write_frames"))

    def apply_files(
        self, dirs: dict[str, tuple[int, str, bool]],
        dir_times: dict[str, tuple[int, int, int | None]], links: set[str], euid: int,
        egid: int, umask: int, cache_limit: int,
    ) -> tuple[int, int, tuple[int, str, str] | None, int]:
        """Apply natively the run of plain entries that starts here (see ``files`` in
        _fastapply.c: root, an empty target; regular files, new directories, symlinks, hard
        links; parents from the applier's directory cache *dirs*, into which new directories
        go, their times into *dir_times*, new symlinks into *links*); the run ends at the first
        entry of another kind, which the caller then reads as usual.

        Returns (entries applied, bytes of their regular files, error, need): error is (errno,
        step, real path) for the last entry, created but not finished; need is 0, or the bytes
        the next entry takes when the run stopped only because they are not all buffered
        (:meth:`prefetch` them, then call again).  Call only where the previous entry's data has
        been consumed (between entries) and when :meth:`can_apply_files`.

        A recorder that lends its frame buffers (``lend_frames``: the threaded BufferedRecorder)
        gets the frames written into them, a full one handed on (``flush``) and the run taken
        up again in the next."""
        if self._done:
            return 0, 0, None, 0
        rec: Any = self._recorder  # (the frames' methods are not the Recorder protocol's)
        lend: Callable[[], tuple[bytearray, int]] | None = getattr(rec, "lend_frames", None)
        writer = self._writer
        if writer is None and _FileWriter is not None:
            writer = self._writer = _FileWriter()
        applied = total = 0
        while True:
            self._settle()
            jobs = bytearray() if self._frames_by_digest else None
            lent = None if lend is None else lend()
            run_start = self._pos
            pos, count, size, frames, pad, error, need = _native_files(  # type: ignore[misc]
                self._buf, self._pos, self._end, dirs, dir_times, links, euid, egid, umask,
                cache_limit, None if rec is None else self._seg,
                self._crcf if jobs is None else jobs, *(lent or (None, 0)), writer)
            if writer is not None:
                if count:
                    self._wruns.append((self._lap, run_start, writer.handed()))
                if error is None:
                    error = writer.check()  # an earlier file of this run or of one before
            applied += count
            total += size
            if count:
                start = self._pos
                self._pos = pos
                self._pad = pad
                self._first = False
                if rec is not None:
                    self._seg.clear()
                    ready = None
                    if jobs:
                        ready = self._fill_later(start, frames if lent is None else lent[0], jobs)
                    if lent is None:
                        rec.write_frames(frames, ready)
                    else:
                        rec.frames_lent(frames, ready)  # frames: where they end in lent[0]
            if need >= 0 or lent is None:
                return applied, total, error, need
            # the lent buffer is full: on in another one, unless it was empty (an entry whose
            # frames fit in none goes the usual way)
            if not lent[1] and not count:
                return applied, total, error, 0
            rec.flush()

    def prepare_writes(self, creates: bool) -> None:
        """Before the first native run of an apply onto an empty target: with *creates*, the
        file writer creates the runs' new files as well (see _fastapply.c's Writer), and every
        entry the caller applies itself must then come after :meth:`settle_writes` and be
        named to :meth:`note_applied`."""
        if creates and self._writer is None and _FileWriter is not None:
            self._writer = _FileWriter()  # now: the names noted before the first run count
            self._writer.create_files()

    def settle_writes(self) -> tuple[int, str, str] | None:
        """Where the writer creates files: wait until it is past every file handed to it
        (before the caller applies an entry itself, or closes a directory the runs had);
        returns the first failure, as :meth:`apply_files` does."""
        writer = self._writer
        if writer is None or not writer.pending():
            return None
        error: tuple[int, str, str] | None = writer.wait()
        return error

    def note_applied(self, name: str) -> None:
        """Where the writer creates files: *name* (a clean path) and its parents were made or
        changed outside the native runs, so no run hands a file of that name to the writer."""
        if self._writer is not None:  # (a writer that does not create ignores it)
            self._writer.note(name.encode("utf-8", "surrogateescape"))

    def finish_writes(self) -> tuple[int, str, str] | None:
        """Wait until the file writer has finished every file the native runs handed it, and
        stop it; returns (errno, step, real path) of the first that failed (as apply_files
        does), else None.  Call at the end of an apply, before anything looks at the files."""
        writer, self._writer = self._writer, None
        self._wruns.clear()
        if writer is None:
            return None
        try:
            error: tuple[int, str, str] | None = writer.wait()
        finally:
            writer.close()
        return error

    def stop_writes(self) -> None:
        """Stop the file writer at once (an apply that fails): the files still pending are
        closed unwritten; it reads the map no more."""
        writer, self._writer = self._writer, None
        self._wruns.clear()
        if writer is not None:
            writer.close()

    def _fill_later(self, start: int, frames: bytearray, jobs: bytes | bytearray,
                    source: memoryview | None = None) -> Callable[[], None]:
        """Hand *jobs* (a native run's, its entries from *start* on in the buffer; a big
        entry's CRC) to the digest thread, which fills *frames* in with header bytes and CRCs;
        returns what waits until it has: the recorder calls it before it reads the frames.  The
        buffer from *start* on is not reused before then either (a region of the digest's, see
        _reuse).  *source*: the jobs read that instead (:meth:`_read_piece`'s buffer, which
        keeps its own account)."""
        digest = self._digest
        assert digest is not None
        seq = digest.fill_frames(  # type: ignore[union-attr]
            self._buf if source is None else source, frames, jobs)
        if source is None:
            self._regions.append((self._lap, start, seq))
        self._last_seq = seq
        return partial(digest.wait_for, seq)

    def prefetch(self, need: int) -> bool:
        """Buffer the next *need* bytes (from where :meth:`apply_files` stopped: the next entry,
        headers and data, which it has to read anyway); False when they do not fit in the buffer
        as it is, or the input ends first (the entry then goes the usual way)."""
        return need <= BUFFER_SIZE and self._fill(need)

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
                    if self._frames_by_digest and entry.data_size >= CRC_LATER_FROM:
                        self._crc_frame = bytearray(b"C" + bytes(8))
            self._first = False
            yield entry

    def _next_header(self) -> TarEntry | None:
        native = _native_header
        if native is not None:
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
            if pax.get("uname"):  # an empty value keeps the header's name (Go's mergePAX)
                e.uname = pax["uname"].decode("utf-8", "surrogateescape")
            if pax.get("gname"):
                e.gname = pax["gname"].decode("utf-8", "surrogateescape")
        if xattrs is not None:
            e.xattrs = xattrs
        self._remaining = data_size
        self._pad = -data_size & (BLOCK - 1)
        return e

    def _next_header_py(self) -> TarEntry | None:
        """The next entry, its extended headers applied as Go's reader applies them: the last
        local PAX header and the last GNU long name / long link name before it count; a global
        PAX header is checked and skipped, and drops what came before it (Go hands it out as an
        entry of its own; neither Go nor Docker applies its records to later entries)."""
        pax: dict[str, bytes] | None = None
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            blk = self._read_block()
            if blk is None:
                return None  # the end, even right after extended headers (as Go reads it)
            if blk == _ZERO_BLOCK:
                nxt = self._read_block()
                if nxt is not None and nxt != _ZERO_BLOCK:
                    raise _bad("a lone zero block followed by more data")
                return None
            try:
                h = _parse_header(blk, self.bytes_read)
            except InvalidArchive as exc:
                if self._first:  # bad bytes before any entry: not a tar at all
                    raise InvalidArchive(f"not a tar archive ({exc})") from exc
                raise
            typ = blk[156:157]
            size = h[3]
            if size < 0 and typ not in _HEADER_ONLY:
                raise _bad(f"entry size {size} out of range")
            if typ == _PAX_LOCAL:
                pax = parse_pax(self._meta_data(size, "PAX header"))
            elif typ == _PAX_GLOBAL:
                parse_pax(self._meta_data(size, "global PAX header"))
                pax = longname = longlink = None
            elif typ == _GNU_LONGNAME:
                longname = _cstr(self._meta_data(size, "GNU long name"))
            elif typ == _GNU_LONGLINK:
                longlink = _cstr(self._meta_data(size, "GNU long link name"))
            else:
                return self._make_entry(blk, h, typ, pax, longname, longlink)

    def _make_entry(
        self,
        blk: bytes,
        h: _Header,
        typ: bytes,
        pax: dict[str, bytes] | None,
        longname: bytes | None,
        longlink: bytes | None,
    ) -> TarEntry:
        e = TarEntry()
        (fmt, raw_name, raw_link, size, mode, uid, gid, mtime, devmajor, devminor, atime,
         ctime) = h
        e.mode = mode & 0o7777
        if mode > 0o7777:
            e.type_bits = mode & 0o170000
        e.uid = uid
        e.gid = gid
        e.mtime_ns = mtime * 1_000_000_000
        if fmt != _V7:
            e._raw_owner = blk[265:329]
            if devmajor or devminor:
                e.devmajor = devmajor
                e.devminor = devminor
        if atime is not None:
            e.atime_ns = atime * 1_000_000_000
        if ctime is not None:
            e.ctime_ns = ctime * 1_000_000_000
        if pax:
            # Go's mergePAX: an empty value keeps the header's field; xattr records are kept
            # whatever their value (moby sets each SCHILY.xattr record it finds)
            xattrs: dict[str, bytes] | None = None
            for k, v in pax.items():
                if k.startswith("SCHILY.xattr."):
                    if xattrs is None:
                        xattrs = {}
                    xattrs[k[13:]] = v
                elif not v:
                    continue
                elif k == "mtime":
                    e.mtime_ns = _pax_time_ns(v, k)
                elif k == "atime":
                    e.atime_ns = _pax_time_ns(v, k)
                elif k == "ctime":
                    e.ctime_ns = _pax_time_ns(v, k)
                elif k == "path":
                    raw_name = v
                elif k == "linkpath":
                    raw_link = v
                elif k == "size":
                    size = _pax_int(v, k)
                elif k == "uid":
                    e.uid = _pax_int(v, k)
                elif k == "gid":
                    e.gid = _pax_int(v, k)
                elif k == "uname":
                    e.uname = v.decode("utf-8", "surrogateescape")
                elif k == "gname":
                    e.gname = v.decode("utf-8", "surrogateescape")
            e._pax_raw = pax
            if xattrs:
                e.xattrs = xattrs
        if longname:
            raw_name = longname
        if longlink:
            raw_link = longlink
        if typ == b"\0":
            typ = DIRECTORY if raw_name.endswith(b"/") else REGULAR
        data_size = 0 if typ in _HEADER_ONLY else size
        if data_size < 0 or data_size > MAX_SIZE:
            raise _bad(f"entry size {size} out of range")
        if typ == _GNU_SPARSE:
            if fmt != _GNU:
                raise _bad("a GNU sparse entry without a GNU header")
            size, e.sparse = self._read_gnu_sparse_map(blk)
            typ = REGULAR
        elif pax is not None:
            raw_name, size, data_size = self._pax_sparse(e, typ, pax, raw_name, size, data_size)
        if typ in _HEADER_ONLY:
            size = 0
        elif typ == _GNU_DUMPDIR:  # a directory; its data (a listing, sparse or not) skipped
            typ = DIRECTORY
            size = 0
            e.sparse = None
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

    def _read_gnu_sparse_map(self, blk: bytes) -> tuple[int, list[tuple[int, int]]]:
        """Old GNU sparse: the real size and the map, in the header and its extension blocks."""
        size = parse_number(blk[483:495], "sparse real size")
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
        return size, chunks

    def _pax_sparse(
        self,
        e: TarEntry,
        typ: bytes,
        pax: dict[str, bytes],
        raw_name: bytes,
        size: int,
        data_size: int,
    ) -> tuple[bytes, int, int]:
        """GNU sparse files in PAX records (0.0, 0.1, 1.0), recognised as Go recognises them; an
        entry that is not one comes back as it was."""
        major = pax.get("GNU.sparse.major", b"")
        minor = pax.get("GNU.sparse.minor", b"")
        if major == b"0" and minor in (b"0", b"1"):
            v1 = False
        elif major == b"1" and minor == b"0":
            v1 = True
        elif major or minor or not pax.get("GNU.sparse.map"):
            return raw_name, size, data_size  # not sparse, or a version nobody knows
        else:
            v1 = False  # 0.0 and 0.1 name no version: a map says which
        if typ in _HEADER_ONLY:
            raise _bad(f"a sparse map on an entry of type {typ!r}")
        raw_name = pax.get("GNU.sparse.name") or raw_name
        real = pax.get("GNU.sparse.size") or pax.get("GNU.sparse.realsize")
        if real:
            size = _pax_int(real, "GNU.sparse.realsize")
        nums: list[int]
        if v1:
            nums, used = self._read_sparse10_map(data_size)
            data_size -= used
        else:
            count = _pax_int(pax.get("GNU.sparse.numblocks", b""), "GNU.sparse.numblocks")
            text = pax.get("GNU.sparse.map", b"")
            parts = text.split(b",") if text else []
            if count < 0 or len(parts) != 2 * count:
                raise _bad("GNU.sparse.map does not hold GNU.sparse.numblocks entries")
            nums = [_pax_int(x, "GNU.sparse.map") for x in parts]
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
        lines = 0
        while want is None or lines < 1 + 2 * want:
            if data_size - used < BLOCK:
                raise _bad("sparse map larger than its entry")
            blk = self._take(BLOCK, "sparse map")
            if self._recorder is not None:
                self._seg += blk
            used += BLOCK
            text += blk
            lines += blk.count(b"\n")
            if len(text) > MAX_META:
                raise _bad("sparse map too large")
            if want is None and lines:
                want = _pax_int(bytes(text[: text.index(b"\n")]), "sparse map count")
                if want < 0:
                    raise _bad("sparse map count out of range")
        tokens = bytes(text).split(b"\n", 1 + 2 * want)[1 : 1 + 2 * want]
        return [_pax_int(x, "sparse map") for x in tokens], used

    def _check_sparse(self, e: TarEntry) -> None:
        assert e.sparse is not None
        if e.size < 0:
            raise _bad(f"sparse file {e.name!r} of negative size")
        total = 0
        last = 0
        for off, length in e.sparse:
            if off < last or length < 0 or off + length > e.size:
                raise _bad(f"sparse map of {e.name!r} is inconsistent")
            last = off + length
            total += length
        if total != self._remaining:
            raise _bad(f"sparse data of {e.name!r} does not match its size")
