"""Header encoding: ustar when it fits, PAX when it must; read back by tarfile and GNU tar."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from graphdriver.archive.tarwriter import (
    BLKTYPE,
    BLOCK,
    CHRTYPE,
    DIRTYPE,
    END_OF_ARCHIVE,
    REGTYPE,
    SYMTYPE,
    TarHeader,
    _pax_record,
    encode,
    padding,
)


def _archive(*entries: tuple[TarHeader, bytes]) -> bytes:
    out = bytearray()
    for hdr, data in entries:
        out += encode(hdr)
        out += data + bytes(padding(len(data)))
    out += END_OF_ARCHIVE
    return bytes(out)


def _read(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def _gnu_list(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "t.tar"
    p.write_bytes(data)
    r = subprocess.run(
        ["tar", "--numeric-owner", "-tvf", str(p)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def test_plain_entry_is_one_ustar_block() -> None:
    hdr = TarHeader(name=b"etc/passwd", mode=0o4755, uid=12, gid=34, size=5, mtime=1234567890)
    block = encode(hdr)
    assert len(block) == BLOCK
    assert block[257:265] == b"ustar\x0000"
    (m,) = _read(_archive((hdr, b"hello")))
    assert (m.name, m.mode, m.uid, m.gid, m.size, m.mtime) == (
        "etc/passwd", 0o4755, 12, 34, 5, 1234567890,
    )
    assert m.uname == "" and m.gname == ""


def test_checksum_is_valid() -> None:
    block = encode(TarHeader(name=b"x", size=3))
    chk = int(block[148:154], 8)
    assert chk == sum(block[:148]) + 8 * 32 + sum(block[156:])


def test_name_split_into_prefix_fits_ustar() -> None:
    name = b"/".join([b"d" * 60, b"e" * 60, b"f" * 90])
    block = encode(TarHeader(name=name))
    assert len(block) == BLOCK  # no PAX header needed
    (m,) = _read(_archive((TarHeader(name=name), b"")))
    assert m.name == name.decode()


@pytest.mark.parametrize(
    "name",
    [
        b"x" * 101,  # no slash to split at
        b"d/" + b"x" * 101,  # last component too long
        b"/".join([b"d" * 100] * 3),  # longer than prefix+name
        "caf\u00e9/na\u00efve".encode(),  # not ASCII
    ],
)
def test_names_needing_pax(name: bytes, tmp_path: Path) -> None:
    hdr = TarHeader(name=name, size=1)
    assert len(encode(hdr)) > BLOCK
    data = _archive((hdr, b"z"))
    (m,) = _read(data)
    assert m.name == name.decode()
    assert m.name in _gnu_list(tmp_path, data)


def test_long_and_non_ascii_link_targets() -> None:
    target = b"t/" * 80
    hdrs = [
        TarHeader(name=b"l1", typeflag=SYMTYPE, linkname=target),
        TarHeader(name=b"l2", typeflag=SYMTYPE, linkname="\u00fcber".encode()),
    ]
    m1, m2 = _read(_archive(*((h, b"") for h in hdrs)))
    assert m1.linkname == target.decode()
    assert m2.linkname == "\u00fcber"


def test_big_ids_and_times_go_to_pax(tmp_path: Path) -> None:
    hdr = TarHeader(name=b"big", uid=8**7, gid=2**32 - 2, mtime=-100, size=0)
    data = _archive((hdr, b""))
    (m,) = _read(data)
    assert (m.uid, m.gid, m.mtime) == (8**7, 2**32 - 2, -100)
    assert m.pax_headers["uid"] == str(8**7)
    assert str(8**7) in _gnu_list(tmp_path, data)


def test_subsecond_mtime_in_pax() -> None:
    hdr = TarHeader(name=b"t", mtime=1000, mtime_ns=250_000_000)
    (m,) = _read(_archive((hdr, b"")))
    assert m.pax_headers["mtime"] == "1000.25"
    hdr = TarHeader(name=b"t", mtime=-2, mtime_ns=750_000_000)
    (m,) = _read(_archive((hdr, b"")))
    assert m.pax_headers["mtime"] == "-1.25"


def test_huge_size_goes_to_pax() -> None:
    raw = encode(TarHeader(name=b"huge", size=8**11 + 5))
    body_len = int(raw[124:135], 8)
    body = raw[BLOCK : BLOCK + body_len]
    assert b" size=%d\n" % (8**11 + 5) in body
    assert raw[-BLOCK + 124 : -BLOCK + 136] == b"00000000000\0"


def test_xattrs_binary_values(tmp_path: Path) -> None:
    cap = b"\x00\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
    hdr = TarHeader(name=b"f", xattrs={"security.capability": cap, "user.k": b"v=1\n"})
    data = _archive((hdr, b""))
    (m,) = _read(data)
    assert m.pax_headers["SCHILY.xattr.user.k"] == "v=1\n"
    assert "SCHILY.xattr.security.capability" in m.pax_headers
    _gnu_list(tmp_path, data)


def test_devices_dirs_and_base256_device_numbers(tmp_path: Path) -> None:
    hdrs = [
        TarHeader(name=b"d/", typeflag=DIRTYPE, mode=0o1777),
        TarHeader(name=b"d/c", typeflag=CHRTYPE, devmajor=1, devminor=3),
        TarHeader(name=b"d/b", typeflag=BLKTYPE, devmajor=8**7 + 1, devminor=2),
    ]
    data = _archive(*((h, b"") for h in hdrs))
    d, c, b = _read(data)
    assert d.isdir() and d.mode == 0o1777
    assert (c.devmajor, c.devminor) == (1, 3)
    assert (b.devmajor, b.devminor) == (8**7 + 1, 2)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 90, 91, 92, 93, 994, 995, 996, 9994, 9995])
def test_pax_record_length_is_self_consistent(size: int) -> None:
    rec = _pax_record(b"k", b"v" * size)
    length, _, rest = rec.partition(b" ")
    assert int(length) == len(rec)
    assert rest == b"k=" + b"v" * size + b"\n"


def test_regular_typeflag_default() -> None:
    assert encode(TarHeader(name=b"a"))[156:157] == REGTYPE


def test_windows_headers_sort_every_record_and_name_the_pax_header_beside_the_entry() -> None:
    from graphdriver.archive.tarwriter import encode_sorted

    long = b"Files/" + b"d" * 120 + b"/f.txt"
    blk = encode_sorted(long, b"0", 0o100000, 3, 1_700_000_000,
                        {"MSWINDOWS.rawsd": b"AQAAgA==", "LIBARCHIVE.creationtime": b"1.5"})
    # Go's writeRawFile: DIR/PaxHeaders.0/BASE cut to its first 100 bytes, mode and mtime 0
    assert blk[:100] == (b"Files/" + b"d" * 120 + b"/PaxHeaders.0/f.txt")[:100]
    assert blk[100:108] == b"0000000\0" and blk[136:148] == b"00000000000\0"
    assert blk[329:345] == bytes(16)  # device fields left empty
    body = blk[512:512 + int(blk[124:135], 8)]
    keys = [rec.split(b" ", 1)[1].split(b"=", 1)[0] for rec in body.splitlines()]
    assert keys == sorted(keys) == [b"LIBARCHIVE.creationtime", b"MSWINDOWS.rawsd", b"path"]
    (m,) = _read(encode_sorted(b"Files/a", b"5", 0o40000, 0, 5, {"MSWINDOWS.fileattr": b"16"}) +
                 END_OF_ARCHIVE)
    assert m.name == "Files/a" and m.pax_headers["MSWINDOWS.fileattr"] == "16"
