"""Build the two small example layers the README's demo applies (deterministic output).

    python examples/make_examples.py   # writes examples/hello-base.tar.gz, hello-upper.tar.gz
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MTIME = 1_700_000_000


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mtime = MTIME
    info.mode = mode
    info.type = kind
    info.linkname = link
    info.uname = info.gname = ""
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def build(path: Path, entries: list[tuple]) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            _add(tar, *entry[:2], **(entry[2] if len(entry) > 2 else {}))
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())


def main() -> None:
    d = {"kind": tarfile.DIRTYPE, "mode": 0o755}
    build(HERE / "hello-base.tar.gz", [
        ("etc", None, d),
        ("etc/hostname", b"hello\n"),
        ("etc/motd", b"Welcome to the example base layer.\n"),
        ("etc/os-release", b'NAME="graphdriver example"\nID=example\n'),
        ("usr", None, d),
        ("usr/bin", None, d),
        ("usr/bin/hello", b"#!/bin/sh\necho hello from a layer\n", {"mode": 0o755}),
        ("bin", None, {"kind": tarfile.SYMTYPE, "mode": 0o777, "link": "usr/bin"}),
        ("var", None, d),
        ("var/cache", None, d),
        ("var/cache/old.db", b"stale cache\n"),
        ("var/cache/index", b"stale index\n"),
        ("tmp", None, {"kind": tarfile.DIRTYPE, "mode": 0o1777}),
    ])
    build(HERE / "hello-upper.tar.gz", [
        ("etc", None, d),
        ("etc/motd", b"Welcome to the example upper layer.\n"),
        ("etc/.wh.os-release", b""),
        ("var", None, d),
        ("var/cache", None, d),
        ("var/cache/.wh..wh..opq", b""),
        ("var/cache/fresh.db", b"fresh cache\n"),
        ("usr", None, d),
        ("usr/bin", None, d),
        ("usr/bin/greet", b"#!/bin/sh\necho greetings\n", {"mode": 0o755}),
        ("usr/bin/hi", None, {"kind": tarfile.LNKTYPE, "link": "usr/bin/greet"}),
    ])


if __name__ == "__main__":
    main()
