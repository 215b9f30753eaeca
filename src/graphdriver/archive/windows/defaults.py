"""Windows layer tars: the Windows metadata a file gets when it was made on Linux (a sandbox's
new file), as BuildKit's winlayers writes it: ``MSWINDOWS.fileattr`` 16 for a directory and 32
(ARCHIVE) for a file, the default self-relative security descriptors below as
``MSWINDOWS.rawsd``, and ``LIBARCHIVE.creationtime`` = the modification time, well-formed
(``sec[.frac]``, where BuildKit's ``%d.%d`` drops the leading zeros of the nanoseconds).
go-containerregistry writes only a ``rawsd`` (owner and group BUILTIN\\Users); the fuller
BuildKit set is what Windows needs to run the file.  A symbolic link gets REPARSE_POINT (1024),
and REPARSE_POINT|DIRECTORY (1040) with the directory descriptor when it points to a directory:
the attributes go-winio's ``BasicInfoHeader`` writes for a symlink that hcsshim exported, which
hcsshim's importer hands on as they are (``FileInfoFromHeader``; BuildKit writes none, which
hcsshim reads as 0: a reparse point whose attributes lack REPARSE_POINT, and a directory link
that would be made as a file).  Imports only ``names``."""

from __future__ import annotations

import base64
import struct

from .names import (
    FILE_ATTRIBUTE_DIRECTORY,
    FILE_ATTRIBUTE_REPARSE_POINT,
    HDR_CREATION_TIME,
    HDR_FILE_ATTRIBUTES,
    HDR_RAW_SECURITY_DESCRIPTOR,
)

FILE_ATTRIBUTE_ARCHIVE = 0x20

# SIDs as (identifier authority, sub-authorities)
SID_BUILTIN_ADMINISTRATORS = (5, (32, 544))  # BA
SID_BUILTIN_USERS = (5, (32, 545))  # BU
SID_LOCAL_SYSTEM = (5, (18,))  # SY
SID_CREATOR_OWNER = (3, (0,))  # CO

ACCESS_ALLOWED = 0
OBJECT_INHERIT, CONTAINER_INHERIT, INHERIT_ONLY = 0x1, 0x2, 0x8
FILE_ALL_ACCESS = 0x1F01FF  # FA
GENERIC_ALL = 0x10000000  # GA
READ_AND_EXECUTE = 0x1200A9
LIST_CONTENTS = 0x4  # LC
DELETE_CHILD = 0x2  # DC

_SE_DACL_PRESENT = 0x0004
_SE_SELF_RELATIVE = 0x8000

Sid = tuple[int, tuple[int, ...]]
Ace = tuple[int, int, int, Sid]  # type, flags, access mask, SID


def encode_sid(sid: Sid) -> bytes:
    authority, subs = sid
    return (struct.pack("<BB", 1, len(subs)) + authority.to_bytes(6, "big")
            + b"".join(struct.pack("<I", s) for s in subs))


def security_descriptor(owner: Sid, group: Sid, dacl: list[Ace]) -> bytes:
    """A self-relative security descriptor: header, owner, group, then the DACL."""
    owner_b, group_b = encode_sid(owner), encode_sid(group)
    aces = b""
    for ace_type, flags, mask, sid in dacl:
        sid_b = encode_sid(sid)
        aces += struct.pack("<BBHI", ace_type, flags, 8 + len(sid_b), mask) + sid_b
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(aces), len(dacl), 0) + aces
    owner_at = 20
    group_at = owner_at + len(owner_b)
    dacl_at = group_at + len(group_b)
    header = struct.pack("<BBHIIII", 1, 0, _SE_SELF_RELATIVE | _SE_DACL_PRESENT,
                         owner_at, group_at, 0, dacl_at)
    return header + owner_b + group_b + acl


#: O:BAG:SYD:(A;;FA;;;BA)(A;;FA;;;SY)(A;;0x1200a9;;;BU)
FILE_SD = security_descriptor(SID_BUILTIN_ADMINISTRATORS, SID_LOCAL_SYSTEM, [
    (ACCESS_ALLOWED, 0, FILE_ALL_ACCESS, SID_BUILTIN_ADMINISTRATORS),
    (ACCESS_ALLOWED, 0, FILE_ALL_ACCESS, SID_LOCAL_SYSTEM),
    (ACCESS_ALLOWED, 0, READ_AND_EXECUTE, SID_BUILTIN_USERS),
])

_OICI = OBJECT_INHERIT | CONTAINER_INHERIT
#: O:BAG:SYD:(A;OICI;FA;;;BA)(A;OICI;FA;;;SY)(A;;FA;;;BA)(A;OICIIO;GA;;;CO)(A;OICI;0x1200a9;;;BU)
#: (A;CI;LC;;;BU)(A;CI;DC;;;BU)
DIRECTORY_SD = security_descriptor(SID_BUILTIN_ADMINISTRATORS, SID_LOCAL_SYSTEM, [
    (ACCESS_ALLOWED, _OICI, FILE_ALL_ACCESS, SID_BUILTIN_ADMINISTRATORS),
    (ACCESS_ALLOWED, _OICI, FILE_ALL_ACCESS, SID_LOCAL_SYSTEM),
    (ACCESS_ALLOWED, 0, FILE_ALL_ACCESS, SID_BUILTIN_ADMINISTRATORS),
    (ACCESS_ALLOWED, _OICI | INHERIT_ONLY, GENERIC_ALL, SID_CREATOR_OWNER),
    (ACCESS_ALLOWED, _OICI, READ_AND_EXECUTE, SID_BUILTIN_USERS),
    (ACCESS_ALLOWED, CONTAINER_INHERIT, LIST_CONTENTS, SID_BUILTIN_USERS),
    (ACCESS_ALLOWED, CONTAINER_INHERIT, DELETE_CHILD, SID_BUILTIN_USERS),
])


def pax_time(ns: int) -> bytes:
    """``sec[.frac]`` with the fraction's trailing zeros cut (go-winio's formatPAXTime)."""
    sec, frac = divmod(ns, 1_000_000_000)
    if frac == 0:
        return b"%d" % sec
    if sec < 0:
        return (b"-%d.%09d" % (-(sec + 1), 1_000_000_000 - frac)).rstrip(b"0")
    return (b"%d.%09d" % (sec, frac)).rstrip(b"0")


def new_file_records(kind: str, mtime_ns: int) -> dict[str, bytes]:
    """The Windows records of a file made on Linux; ``kind`` is "dir", "file", "symlink" or
    "dir-symlink" (a link to a directory)."""
    if kind == "dir":
        attrs, sd = FILE_ATTRIBUTE_DIRECTORY, DIRECTORY_SD
    elif kind == "symlink":
        attrs, sd = FILE_ATTRIBUTE_REPARSE_POINT, FILE_SD
    elif kind == "dir-symlink":
        attrs, sd = FILE_ATTRIBUTE_REPARSE_POINT | FILE_ATTRIBUTE_DIRECTORY, DIRECTORY_SD
    else:
        attrs, sd = FILE_ATTRIBUTE_ARCHIVE, FILE_SD
    return {HDR_FILE_ATTRIBUTES: b"%d" % attrs,
            HDR_RAW_SECURITY_DESCRIPTOR: base64.b64encode(sd),
            HDR_CREATION_TIME: pax_time(mtime_ns)}
