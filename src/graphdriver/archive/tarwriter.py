"""Tar header encoding: ustar when the entry fits, PAX extended headers when it does not.

This is the writing counterpart of what Go's archive/tar does for moby's layer tars
(``Format = FormatPAX``): a plain ustar header whenever every field fits, preceded by a PAX
``x`` header carrying only what ustar cannot hold — long or non-ASCII names and link targets,
ids >= 8**7, sizes >= 8**11, times outside ustar's range or with sub-second precision, and
``SCHILY.xattr.*`` records.  Device numbers too large for octal use the GNU base-256 form.
uname/gname stay empty (numeric ownership, as moby writes it).  Windows layer headers have their
own encoder here (:func:`encode_sorted`, go-winio's layout).  A leaf: imports nothing from
graphdriver.
"""

from __future__ import annotations

import mmap
import struct
import zlib

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)

REGTYPE = b"0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
PAXTYPE = b"x"

_NAME_MAX = 100
_PREFIX_MAX = 155


class TarHeader:
    """One tar entry's metadata.  ``name`` and ``linkname`` are raw bytes (file names are).

    ``mtime`` is seconds since the epoch; ``mtime_ns``, the sub-second part in nanoseconds, is
    written (as PAX mtime) only when non-zero.  It behaves as the dataclass it was (keyword or
    positional init in field order, repr, eq), written out so that exporting does not import
    dataclasses and inspect (~12 ms of a command's first diff)."""

    __slots__ = ("devmajor", "devminor", "gid", "gname", "linkname", "mode", "mtime",
                 "mtime_ns", "name", "records", "size", "typeflag", "uid", "uname", "xattrs")
    _FIELDS = ("name", "typeflag", "mode", "uid", "gid", "size", "mtime", "mtime_ns",
               "linkname", "devmajor", "devminor", "uname", "gname", "xattrs", "records")

    def __init__(
        self,
        name: bytes,
        typeflag: bytes = REGTYPE,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime: int = 0,
        mtime_ns: int | None = None,
        linkname: bytes = b"",
        devmajor: int = 0,
        devminor: int = 0,
        uname: bytes = b"",
        gname: bytes = b"",
        xattrs: dict[str, bytes] | None = None,
        records: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.name = name
        self.typeflag = typeflag
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime = mtime
        self.mtime_ns = mtime_ns
        self.linkname = linkname
        self.devmajor = devmajor
        self.devminor = devminor
        self.uname = uname
        self.gname = gname
        self.xattrs = {} if xattrs is None else xattrs
        #: further PAX records (key, value), written first in this order (GNU sparse 1.0)
        self.records = [] if records is None else records

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._FIELDS)
        return f"TarHeader({inner})"


def padding(size: int) -> int:
    """Bytes of zero padding after *size* bytes of file data."""
    return -size % BLOCK


def _octal(value: int, width: int) -> bytes | None:
    """``width``-byte octal field (digits + NUL), or None when it does not fit."""
    if value < 0 or value >= 8 ** (width - 1):
        return None
    return b"%0*o\0" % (width - 1, value)


def _base256(value: int, width: int) -> bytes:
    """GNU base-256 numeric field (high bit of the first byte set), for huge device numbers."""
    if value < 0 or value >= 256 ** (width - 1):
        raise ValueError(f"number {value} too large for a tar header")
    return b"\x80" + value.to_bytes(width - 1, "big")


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) so that prefix + "/" + name == name, each fitting ustar; None if none."""
    if len(name) <= _NAME_MAX:
        return b"", name
    if len(name) > _PREFIX_MAX + 1 + _NAME_MAX:
        return None
    # The rightmost slash keeps the prefix short enough; scan from the earliest workable one.
    start = max(len(name) - _NAME_MAX - 1, 0)
    i = name.find(b"/", start)
    while i != -1:
        if i <= _PREFIX_MAX and 0 < len(name) - i - 1 <= _NAME_MAX:
            return name[:i], name[i + 1 :]
        if i > _PREFIX_MAX:
            return None
        i = name.find(b"/", i + 1)
    return None


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


_MAGIC = b"ustar\x0000"
_MAGIC_SUM = sum(_MAGIC)
_SPACES_SUM = 8 * 0x20


def _ustar_block(
    name: bytes,
    prefix: bytes,
    typeflag: bytes,
    mode: bytes,
    uid: bytes,
    gid: bytes,
    size: bytes,
    mtime: bytes,
    linkname: bytes,
    uname: bytes,
    gname: bytes,
    devmajor: bytes,
    devminor: bytes,
) -> bytes:
    blk = b"".join((
        name.ljust(100, b"\0"), mode, uid, gid, size, mtime, b"        ", typeflag,
        linkname.ljust(100, b"\0"), _MAGIC, uname.ljust(32, b"\0"), gname.ljust(32, b"\0"),
        devmajor, devminor, prefix.ljust(155, b"\0"), bytes(12),
    ))
    # the checksum counts its own field as spaces; an ASCII block sums below 65521 (512 * 127),
    # where adler32's low half is exactly 1 + the byte sum
    chk = (zlib.adler32(blk) & 0xFFFF) - 1 if blk.isascii() else sum(blk)
    return blk[:148] + b"%06o\0 " % chk + blk[156:]


def _format_pax_time(sec: int, nsec: int) -> bytes:
    if nsec == 0:
        return b"%d" % sec
    if sec < 0 and nsec:
        # -1.25 s is sec=-2, nsec=750000000: PAX writes the signed decimal value.
        total = sec * 1_000_000_000 + nsec
        whole, frac = divmod(-total, 1_000_000_000)
        return (b"-%d.%09d" % (whole, frac)).rstrip(b"0")
    return (b"%d.%09d" % (sec, nsec)).rstrip(b"0")


_MAX7 = 8**7
_MAX11 = 8**11


def encode(h: TarHeader) -> bytes:
    """The header block(s) for *h*: an optional PAX ``x`` header, then the ustar header."""
    name, linkname = h.name, h.linkname
    if (
        len(name) <= _NAME_MAX
        and len(linkname) <= _NAME_MAX
        and not h.xattrs
        and not h.records
        and not h.mtime_ns
        and 0 <= h.uid < _MAX7
        and 0 <= h.gid < _MAX7
        and 0 <= h.size < _MAX11
        and 0 <= h.mtime < _MAX11
        and 0 <= h.devmajor < _MAX7
        and 0 <= h.devminor < _MAX7
        and name.isascii()
        and linkname.isascii()
    ):
        # The common case: everything fits one ustar block.
        return _ustar_block(
            name, b"", h.typeflag, b"%07o\0" % (h.mode & 0o7777), b"%07o\0" % h.uid,
            b"%07o\0" % h.gid, b"%011o\0" % h.size, b"%011o\0" % h.mtime, linkname,
            h.uname[:32], h.gname[:32], b"%07o\0" % h.devmajor, b"%07o\0" % h.devminor,
        )
    return _encode_general(h)


def _encode_general(h: TarHeader) -> bytes:
    pax: list[tuple[bytes, bytes]] = list(h.records)

    split = _split_ustar(h.name) if h.name.isascii() else None
    if split is None:
        pax.append((b"path", h.name))
        prefix, short = b"", _ascii_tail(h.name, _NAME_MAX)
    else:
        prefix, short = split

    linkname = h.linkname
    if len(linkname) > _NAME_MAX or not linkname.isascii():
        pax.append((b"linkpath", linkname))
        linkname = _ascii_tail(linkname, _NAME_MAX)

    def numeric(key: bytes, value: int, width: int) -> bytes:
        field_ = _octal(value, width)
        if field_ is None:
            pax.append((key, b"%d" % value))
            return _octal(0, width) or b""
        return field_

    uid = numeric(b"uid", h.uid, 8)
    gid = numeric(b"gid", h.gid, 8)
    size = numeric(b"size", h.size, 12)
    nsec = h.mtime_ns or 0
    mtime = _octal(h.mtime, 12)
    if mtime is None or nsec:
        pax.append((b"mtime", _format_pax_time(h.mtime, nsec)))
        if mtime is None:
            mtime = _octal(0, 12) or b""
    devmajor = _octal(h.devmajor, 8) or _base256(h.devmajor, 8)
    devminor = _octal(h.devminor, 8) or _base256(h.devminor, 8)
    mode = _octal(h.mode & 0o7777, 8) or b""

    for key in sorted(h.xattrs):
        pax.append((b"SCHILY.xattr." + key.encode("utf-8", "surrogateescape"), h.xattrs[key]))

    main = _ustar_block(
        short, prefix, h.typeflag, mode, uid, gid, size, mtime, linkname,
        h.uname[:32], h.gname[:32], devmajor, devminor,
    )
    if not pax:
        return main
    body = b"".join(_pax_record(k, v) for k, v in pax)
    base = h.name.rstrip(b"/").rsplit(b"/", 1)
    pax_name = b"PaxHeaders.0/" + _ascii_tail(base[-1], 80)
    zero8 = _octal(0, 8) or b""
    xhdr = _ustar_block(
        pax_name, b"", PAXTYPE, _octal(0o644, 8) or b"", zero8, zero8,
        _octal(len(body), 12) or b"", mtime, b"", b"", b"", zero8, zero8,
    )
    return xhdr + body + bytes(padding(len(body))) + main


def encode_sorted(name: bytes, typeflag: bytes, mode: int, size: int, mtime: int,
                  records: dict[str, bytes], linkname: bytes = b"",
                  ustar_ok: bool = False) -> bytes:
    """A Windows layer tar's header, byte for byte as Go's archive/tar writes the headers
    go-winio and hcsshim build (``Format: tar.FormatPAX``): a PAX ``x`` header with every record
    sorted by key, then the ustar block.  The ``x`` header is Go's ``writeRawFile``: named
    ``DIR/PaxHeaders.0/BASE`` made ASCII and cut to its first 100 bytes, mode, ids and mtime 0,
    device fields left empty.  A name or link target that is not ASCII of at most 100 bytes goes
    in PAX (``path``/``linkpath``) and the block keeps its ASCII characters, the first 100.
    ``ustar_ok``: the header had no format chosen (hcsshim's whiteouts), so a long ASCII name
    that ustar's prefix field can take is split there as Go does, without PAX.  Ids are 0,
    uname/gname empty; a ``mtime`` outside ustar's range is written as 0 (the exact time rides in
    the records)."""
    recs = dict(records)
    short, prefix = name, b""
    if len(name) > _NAME_MAX or not name.isascii():
        split = _go_split_ustar(name) if ustar_ok and not recs else None
        if split is None:
            recs["path"] = name
            short = _go_ascii(name)[:_NAME_MAX]
        else:
            prefix, short = split
    link = linkname
    if len(linkname) > _NAME_MAX or not linkname.isascii():
        recs["linkpath"] = linkname
        link = _go_ascii(linkname)[:_NAME_MAX]
    if size >= _MAX11:
        recs["size"] = b"%d" % size
    zero8 = _octal(0, 8) or b""
    zero12 = _octal(0, 12) or b""
    mtime_field = _octal(mtime if 0 <= mtime < _MAX11 else 0, 12) or b""
    main = _ustar_block(short, prefix, typeflag, _octal(mode, 8) or b"", zero8, zero8,
                        _octal(size if size < _MAX11 else 0, 12) or b"", mtime_field, link,
                        b"", b"", zero8, zero8)
    if not recs:
        return main
    body = b"".join(_pax_record(k.encode("utf-8", "surrogateescape"), recs[k])
                    for k in sorted(recs))
    d, _, base = name.rpartition(b"/")
    pax_name = _go_ascii((d + b"/" if d else b"") + b"PaxHeaders.0/" + base)[:_NAME_MAX]
    empty8 = bytes(8)
    xhdr = _ustar_block(pax_name.rstrip(b"/"), b"", PAXTYPE, zero8, zero8, zero8,
                        _octal(len(body), 12) or b"", zero12, b"", b"", b"", empty8, empty8)
    return xhdr + body + bytes(padding(len(body))) + main


def _go_ascii(name: bytes) -> bytes:
    """Go's ``toASCII``: the name without its non-ASCII characters (and NULs)."""
    return name if name.isascii() and b"\0" not in name else bytes(
        c for c in name if 0 < c < 0x80)


def _go_split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """Go's ``splitUSTARPath``: (prefix, name) at the last slash within the prefix's reach."""
    length = len(name)
    if length <= _NAME_MAX or not name.isascii():
        return None
    if length > _PREFIX_MAX + 1:
        length = _PREFIX_MAX + 1
    elif name[length - 1:length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    suffix = len(name) - i - 1
    if i <= 0 or suffix > _NAME_MAX or suffix == 0 or i > _PREFIX_MAX:
        return None
    return name[:i], name[i + 1:]


def _ascii_tail(name: bytes, limit: int) -> bytes:
    """A printable ASCII stand-in for a name that goes in PAX (readers use the PAX record)."""
    safe = bytes(c if 32 <= c < 127 else 0x5F for c in name)
    return safe[-limit:]


# name, mode, uid, gid, size, mtime, checksum, typeflag, linkname, magic+version, (uname, gname
# empty), devmajor, devminor, (prefix and padding empty): the layout of a plain ustar block.
_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s8s64x8s8s167x")
_SPACES = b"        "


def pack_ustar_into(
    buf: bytearray | mmap.mmap,
    offset: int,
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bool:
    """Write one plain ustar block at *offset* of *buf* if the entry fits one; else False.

    Byte for byte what ``encode`` returns for a ``TarHeader`` with these fields, no xattrs, no
    sub-second time and empty uname/gname; *buf* must have 512 bytes free at *offset*.
    """
    if not (
        len(name) <= _NAME_MAX
        and len(linkname) <= _NAME_MAX
        and 0 <= uid < _MAX7
        and 0 <= gid < _MAX7
        and 0 <= size < _MAX11
        and 0 <= mtime < _MAX11
        and 0 <= devmajor < _MAX7
        and 0 <= devminor < _MAX7
        and name.isascii()
        and linkname.isascii()
    ):
        return False
    _USTAR.pack_into(
        buf, offset, name, b"%07o" % (mode & 0o7777), b"%07o" % uid, b"%07o" % gid,
        b"%011o" % size, b"%011o" % mtime, _SPACES, typeflag, linkname, _MAGIC,
        b"%07o" % devmajor, b"%07o" % devminor,
    )
    # every byte is ASCII: adler32's low half is 1 + the byte sum (see _ustar_block)
    chk = (zlib.adler32(memoryview(buf)[offset : offset + BLOCK]) & 0xFFFF) - 1
    buf[offset + 148 : offset + 156] = b"%06o\0 " % chk
    return True
