"""Windows layer tars: the names every part shares (PAX record keys, the files at a stored
layer's root, the ``user.mswindows.*`` xattr names, go-winio's mode bits) and :func:`fold`, the
case-insensitive match of Windows names.  Imports nothing from graphdriver."""

from __future__ import annotations

import os

HDR_FILE_ATTRIBUTES = "MSWINDOWS.fileattr"
HDR_SECURITY_DESCRIPTOR = "MSWINDOWS.sd"
HDR_RAW_SECURITY_DESCRIPTOR = "MSWINDOWS.rawsd"
HDR_MOUNT_POINT = "MSWINDOWS.mountpoint"
HDR_EA_PREFIX = "MSWINDOWS.xattr."
HDR_CREATION_TIME = "LIBARCHIVE.creationtime"

FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_REPARSE_POINT = 0x400

TOP_DIRS = ("Files", "Hives", "UtilityVM")
TOMBSTONES = "tombstones.txt"
LINKMETA = "linkmeta.json"
CROSSLINKS = "crosslinks.json"
SIDE_DIR = "winmeta"  # xattr values too large for the filesystem, by sha256
TOMBSTONE_HEADER = b"\xef\xbb\xbfVersion 1.0"

# Files the Windows import process mutates; backed up at import, served from the backup by diff
# getters so tar-split can re-assemble the original tar (hcsshim ociwclayer mutatedFiles).
MUTATED_FILES = {
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD": "bcd.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG": "bcd.log.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG1": "bcd.log1.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG2": "bcd.log2.bak",
}

XATTR_PREFIX = "user.mswindows."
X_FILEATTR = XATTR_PREFIX + "fileattr"
X_RAWSD = XATTR_PREFIX + "rawsd"
X_SD = XATTR_PREFIX + "sd"
X_MOUNTPOINT = XATTR_PREFIX + "mountpoint"
X_EA = XATTR_PREFIX + "xattr."
X_CTIME_CREATION = XATTR_PREFIX + "creationtime"
X_PAX = XATTR_PREFIX + "pax."
X_SIDE = XATTR_PREFIX + "side"  # JSON: xattr name -> sha256 of its value in SIDE_DIR
X_EMPTY_MODE = XATTR_PREFIX + "emptymode"  # an empty file's tar mode when it was MODE_REG
X_STREAM_INDEX = XATTR_PREFIX + "streamindex"  # an alternate stream's place after its file
TIME_KEYS = ("mtime", "atime", "ctime")
# Records that describe the tar entry itself, not the file: never stored.
STRUCTURAL_KEYS = frozenset(("path", "linkpath", "size"))
SPARSE_PREFIX = "GNU.sparse."  # the sparse encoding of an entry's data: never stored either
XATTR_NAME_MAX = 255

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_RW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

MODE_DIR = 0o40000
MODE_REG = 0o100000
MODE_LNK = 0o120000


def fold(name: str) -> str:
    """The case-insensitive key of a Windows name (simple, one-to-one upper-casing as NTFS)."""
    if name.isascii():
        return name.upper()
    return "".join(u if len(u := c.upper()) == 1 else c for c in name)
