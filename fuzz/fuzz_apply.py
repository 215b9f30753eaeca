"""atheris fuzz target over the tar engine: apply any bytes into a scratch directory.

For every input, ``apply_tar`` runs (in process, the same code the confined child runs) onto an
empty scratch directory nested two levels inside a sandbox:

    SANDBOX/canary/{victim,linked,linked2}   files that must never change
    SANDBOX/outer/canary2                    one more, beside the scratch dir's parent
    SANDBOX/outer/scratch/                   the apply target

and then checks the invariants of DESIGN.md rules 2 and 5:

- no exception other than graphdriver's own errors escapes (any other is a bug: a crash);
- nothing outside the scratch directory changed: the sandbox and ``outer`` hold exactly their
  original names, the canaries keep their content, inode and link count.

Run it:  python fuzz/fuzz_apply.py [CORPUS_DIR...] [libFuzzer flags]   (see fuzz/README.md)
Seeds:   python fuzz/fuzz_apply.py --write-seeds CORPUS_DIR
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["graphdriver"]):
    from graphdriver.archive.apply import ApplyOptions, apply_tar
    from graphdriver.errors import GraphDriverError
    from graphdriver.fsutil import remove_tree

_CANARY_DATA = b"do not touch\n"


class Sandbox:
    def __init__(self) -> None:
        where = os.environ.get("GRAPHDRIVER_FUZZ_TMP")
        if not where and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            where = "/dev/shm"
        self.base = Path(tempfile.mkdtemp(prefix="graphdriver-fuzz-", dir=where or None))
        (self.base / "canary").mkdir()
        (self.base / "outer").mkdir()
        for name in ("victim", "linked"):
            (self.base / "canary" / name).write_bytes(_CANARY_DATA)
        os.link(self.base / "canary" / "linked", self.base / "canary" / "linked2")
        (self.base / "outer" / "canary2").write_bytes(_CANARY_DATA)
        self.scratch = self.base / "outer" / "scratch"
        self.files = [self.base / "canary" / n for n in ("victim", "linked", "linked2")]
        self.files.append(self.base / "outer" / "canary2")
        self.facts = self._facts()

    def _facts(self) -> tuple[object, ...]:
        stats = tuple((os.lstat(p).st_ino, os.lstat(p).st_nlink, os.lstat(p).st_size,
                       os.lstat(p).st_mode) for p in self.files)
        return (sorted(os.listdir(self.base)), sorted(os.listdir(self.base / "canary")),
                sorted(n for n in os.listdir(self.base / "outer") if n != "scratch"), stats)

    def reset(self) -> None:
        if os.path.lexists(self.scratch):
            remove_tree(self.scratch)
        os.mkdir(self.scratch, 0o755)

    def check(self, data: bytes) -> None:
        now = self._facts()
        if now != self.facts:
            raise AssertionError(f"apply changed something outside its target: {now} != "
                                 f"{self.facts} (input {len(data)} bytes)")
        for p in self.files:
            if p.read_bytes() != _CANARY_DATA:
                raise AssertionError(f"apply wrote into {p}")


_SANDBOX: Sandbox | None = None


def sandbox() -> Sandbox:
    global _SANDBOX
    if _SANDBOX is None:
        _SANDBOX = Sandbox()
    return _SANDBOX


def TestOneInput(data: bytes) -> None:
    box = sandbox()
    box.reset()
    with contextlib.suppress(GraphDriverError):
        apply_tar(io.BytesIO(data), box.scratch, ApplyOptions())
    box.check(data)


def write_seeds(directory: Path) -> list[Path]:
    """Small valid layers covering the engine's features: a starting corpus."""
    import gzip
    import tarfile

    def tar(name: str, fmt: int, entries: list[tuple[str, bytes, str, bytes]]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            for path, kind, link, data in entries:
                ti = tarfile.TarInfo(path)
                ti.type = kind
                ti.linkname = link
                ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
                ti.mtime = 1_700_000_000
                ti.size = len(data) if kind == tarfile.REGTYPE else 0
                if name == "xattrs" and kind == tarfile.REGTYPE:
                    ti.pax_headers = {"SCHILY.xattr.user.k": "v"}
                t.addfile(ti, io.BytesIO(data) if ti.size else None)
        return buf.getvalue()

    d, f, s, h = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    basic = [("etc", d, "", b""), ("etc/passwd", f, "", b"root:x:0:0\n"),
             ("bin", s, "usr/bin", b""), ("usr/bin/sh", f, "", b"#!" * 40),
             ("etc/link", h, "etc/passwd", b""), ("etc/.wh.old", f, "", b""),
             ("var/.wh..wh..opq", f, "", b""), ("var/log", d, "", b"")]
    seeds = {
        "basic.tar": tar("basic", tarfile.USTAR_FORMAT, basic),
        "pax.tar": tar("pax", tarfile.PAX_FORMAT, [("a/" + "n" * 150, f, "", b"x" * 600)]),
        "gnu.tar": tar("gnu", tarfile.GNU_FORMAT, [("b/" + "m" * 120, f, "", b"y"),
                                                   ("l", s, "t" * 120, b"")]),
        "xattrs.tar": tar("xattrs", tarfile.PAX_FORMAT, [("x", f, "", b"data")]),
    }
    seeds["basic.tar.gz"] = gzip.compress(seeds["basic.tar"], mtime=0)
    try:
        import zstandard

        seeds["basic.tar.zst"] = zstandard.ZstdCompressor().compress(seeds["basic.tar"])
    except ImportError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
        out.append(directory / name)
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        for path in write_seeds(Path(sys.argv[2])):
            print(path)
        return
    logging.disable(logging.CRITICAL)  # the engine logs skipped xattrs and the like
    atheris.Setup(sys.argv, TestOneInput)
    # libFuzzer ends the process with exit(): no Python cleanup runs after this.  The sandbox
    # (one small directory, emptied before every input) stays in GRAPHDRIVER_FUZZ_TMP or
    # /dev/shm as graphdriver-fuzz-*.
    atheris.Fuzz()


if __name__ == "__main__":
    main()
