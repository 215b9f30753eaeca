"""Build Windows layer tars the way go-winio's backuptar (hcsshim's exporter) writes them.

Written with Python's ``tarfile`` (PAX format), independently of graphdriver's own writer, so a
round trip through the driver is checked against a second implementation:

- every file and directory entry carries ``MSWINDOWS.fileattr`` (decimal), ``MSWINDOWS.rawsd``
  (base64 of the binary security descriptor), ``LIBARCHIVE.creationtime`` and Go's PAX
  ``mtime``/``atime``/``ctime`` (Windows times have 100 ns resolution: "sec.fraction");
- an alternate data stream is a regular entry ``name:stream`` right after its file, with the
  file's times and no Windows records;
- a hard link (hcsshim's second name of a file) has fileattr, creationtime and times, mode 0644;
- a symlink or junction is type '2' with ``MSWINDOWS.mountpoint=1`` for a junction;
- a whiteout is a bare header (``tar.Header{Name: ...}``): type '0', no records.
"""

from __future__ import annotations

import base64
import io
import tarfile
from typing import Any

FILE_ATTRIBUTE_READONLY = 0x1
FILE_ATTRIBUTE_HIDDEN = 0x2
FILE_ATTRIBUTE_SYSTEM = 0x4
FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_ARCHIVE = 0x20
FILE_ATTRIBUTE_REPARSE_POINT = 0x400

# A self-relative security descriptor: O:BAG:SYD:(A;;FA;;;SY)(A;;FA;;;BA)(A;;0x1200a9;;;BU)
SD_DEFAULT = bytes.fromhex(
    "01000480140000002400000000000000300000000102000000000005200000002002000001010000000000"
    "05120000000200540003000000000014ff011f000101000000000005120000000000180"
    "0ff011f0001020000000000052000000020020000000018a9001200010200000000000520000000210200"
    "00"
)
SD_OTHER = bytes(range(20, 80))


def pax_time(ns: int) -> str:
    """go-winio's formatPAXTime for a non-negative time in nanoseconds."""
    sec, frac = divmod(ns, 1_000_000_000)
    if frac == 0:
        return str(sec)
    return f"{sec}.{frac:09d}".rstrip("0")


class WinTarBuilder:
    """``WinTarBuilder().dir("Files").file("Files/a.txt", b"x").bytes()``."""

    def __init__(self, base_time_ns: int = 1_700_000_000_123_456_700) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(  # noqa: SIM115 - closed by bytes()
            fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)
        self._t = base_time_ns
        self.meta: dict[str, tuple[int, int, int]] = {}  # name -> (attrs, time, creation)

    def _next_time(self) -> int:
        self._t += 1_000_001_100  # a bit more than a second, in 100 ns steps
        return self._t

    def _times(self, t: int) -> dict[str, str]:
        return {"mtime": pax_time(t), "atime": pax_time(t + 300), "ctime": pax_time(t + 600)}

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)

    def _info(self, name: str, type_: bytes, t: int, pax: dict[str, str]) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = type_
        info.mtime = t // 1_000_000_000
        info.mode = 0
        info.uname = info.gname = ""
        info.pax_headers = {**self._times(t), **pax}
        return info

    def _win(self, attrs: int, sd: bytes | None, creation: int,
             eas: dict[str, bytes] | None) -> dict[str, str]:
        pax = {"MSWINDOWS.fileattr": str(attrs), "LIBARCHIVE.creationtime": pax_time(creation)}
        if sd is not None:
            pax["MSWINDOWS.rawsd"] = base64.b64encode(sd).decode()
        for k, v in (eas or {}).items():
            pax["MSWINDOWS.xattr." + k] = base64.b64encode(v).decode()
        return pax

    def dir(self, name: str, attrs: int = FILE_ATTRIBUTE_DIRECTORY, sd: bytes | None = SD_DEFAULT,
            eas: dict[str, bytes] | None = None) -> WinTarBuilder:
        t = self._next_time()
        self._add(self._info(name, tarfile.DIRTYPE, t, self._win(attrs, sd, t - 77_000_000, eas)))
        return self

    def file(self, name: str, data: bytes, attrs: int = FILE_ATTRIBUTE_ARCHIVE,
             sd: bytes | None = SD_DEFAULT, eas: dict[str, bytes] | None = None,
             streams: dict[str, bytes] | None = None) -> WinTarBuilder:
        t = self._next_time()
        self.meta[name] = (attrs, t, t - 55_000_000)
        info = self._info(name, tarfile.REGTYPE, t, self._win(attrs, sd, t - 55_000_000, eas))
        info.size = len(data)
        self._add(info, data)
        for sname, sdata in (streams or {}).items():
            s = self._info(f"{name}:{sname}", tarfile.REGTYPE, t, {})
            s.size = len(sdata)
            self._add(s, sdata)
        return self

    def link(self, name: str, target: str, source: WinTarBuilder | None = None) -> WinTarBuilder:
        """A second name of ``target`` (added earlier here, or in ``source``'s layer)."""
        meta = (source or self).meta
        found = meta.get(target) or next(
            (v for k, v in meta.items() if k.upper() == target.upper()), None)
        assert found is not None, f"link target {target} was not added"
        attrs, t, creation = found
        self._next_time()
        info = self._info(name, tarfile.LNKTYPE, t, self._win(attrs, None, creation, None))
        info.linkname = target
        info.mode = 0o644
        self._add(info)
        return self

    def symlink(self, name: str, target: str, junction: bool = False,
                directory: bool = False) -> WinTarBuilder:
        t = self._next_time()
        attrs = FILE_ATTRIBUTE_REPARSE_POINT | (FILE_ATTRIBUTE_DIRECTORY if directory else 0)
        pax = self._win(attrs, SD_DEFAULT, t - 3_000, None)
        if junction:
            pax["MSWINDOWS.mountpoint"] = "1"
        info = self._info(name, tarfile.SYMTYPE, t, pax)
        info.linkname = target
        self._add(info)
        return self

    def whiteout(self, name: str) -> WinTarBuilder:
        d, _, base = name.rpartition("/")
        info = tarfile.TarInfo(f"{d}/.wh.{base}" if d else f".wh.{base}")
        info.mtime = 0
        info.mode = 0
        info.uname = info.gname = ""
        self._add(info)
        return self

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> WinTarBuilder:
        self._add(info, data)
        return self

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def entries(data: bytes) -> list[tuple[str, bytes, int, str, dict[str, str], bytes]]:
    """(name, type, size, linkname, PAX records, content) of every entry, read with tarfile."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            content = b""
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                content = f.read()
            pax = dict(m.pax_headers)
            if "path" in pax:  # tarfile writes directory names with a "/", Go does not
                pax["path"] = pax["path"].rstrip("/")
            out.append((m.name, m.type, m.size, m.linkname, pax, content))
    return out


def base_builder() -> WinTarBuilder:
    """A base layer: Files with a system tree, Hives, and a UtilityVM with the BCD store.

    Entries are in hcsshim's export order (names sorted bytewise in each directory, each
    directory followed by its streams, its whiteouts, then its contents), so a round trip
    through the driver gives back the same sequence.
    """
    return (
        WinTarBuilder()
        .dir("Files")
        .symlink("Files/Documents and Settings", "C:\\Users", junction=True, directory=True)
        .dir("Files/Users")
        .dir("Files/Users/Public")
        .file("Files/Users/Public/desktop.ini", b"[.ShellClassInfo]\r\n", sd=SD_OTHER,
              streams={"Zone.Identifier": b"[ZoneTransfer]\r\nZoneId=3\r\n"})
        .dir("Files/Windows", attrs=FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_SYSTEM)
        .dir("Files/Windows/System32")
        .file("Files/Windows/System32/kernel32.dll", b"MZ" + bytes(range(256)) * 40,
              eas={"$KERNEL.PURGE.ESBCACHE": b"\x01\x02\x03"})
        .file("Files/Windows/System32/notepad.exe", b"MZnotepad" * 1000)
        .link("Files/Windows/notepad.exe", "Files/Windows/System32/notepad.exe")
        .file("Files/Windows/win.ini", b"; for 16-bit app support\r\n",
              attrs=FILE_ATTRIBUTE_ARCHIVE | FILE_ATTRIBUTE_HIDDEN)
        .file("Files/empty.txt", b"")
        .dir("Hives", sd=None)
        .file("Hives/DefaultUser_Delta", b"regf" + b"\0" * 4092, sd=None)
        .file("Hives/Sam_Delta", b"regf" + b"\1" * 2044, sd=None)
        .dir("UtilityVM", sd=None)
        .dir("UtilityVM/Files")
        .dir("UtilityVM/Files/EFI")
        .dir("UtilityVM/Files/EFI/Microsoft")
        .dir("UtilityVM/Files/EFI/Microsoft/Boot")
        .file("UtilityVM/Files/EFI/Microsoft/Boot/BCD", b"BCD-store" * 512)
        .file("UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG", b"BCD-log" * 10)
    )


def base_layer() -> bytes:
    return base_builder().bytes()


#: bytes of file data in base_layer (hcsshim's import size: streams and links not counted)
BASE_SIZE = 19 + 10242 + 9000 + 26 + 0 + 4096 + 2048 + 4608 + 70
#: what diff_layer's import returns
DIFF_SIZE = 9600 + 1500


def diff_layer() -> bytes:
    """A layer on top of ``base_layer``: deletions (in other case), new files, links, streams."""
    return (
        WinTarBuilder(base_time_ns=1_710_000_000_000_000_100)
        .dir("Files")
        .whiteout("Files/users")
        .dir("Files/Windows", attrs=FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_SYSTEM)
        .whiteout("Files/Windows/WIN.INI")
        .dir("Files/Windows/System32")
        .file("Files/Windows/System32/notepad.exe", b"MZnotepad-v2" * 800)
        .dir("Files/app")
        .file("Files/app/app.exe", b"MZapp" * 300, streams={"Zone.Identifier": b"ZoneId=3",
                                                             "meta": b"m" * 10})
        .link("Files/app/app2.exe", "Files/app/app.exe")
        .link("Files/app/kernel.dll", "Files/Windows/System32/kernel32.dll",
              source=base_builder())
        .bytes()
    )


def apply(d: Any, layer_id: str, data: bytes) -> int:
    """Import ``data`` into the layer; the bytes of file data it held (hcsshim's size)."""
    return int(d.apply_diff(layer_id, None, io.BytesIO(data)))


def diff_bytes(d: Any, layer_id: str) -> bytes:
    with d.diff(layer_id) as f:
        return bytes(f.read())


