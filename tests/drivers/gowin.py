"""Reference Windows layer tars written by Go: ``gowintar/main.go`` builds headers as go-winio's
backuptar and hcsshim's exporter do and writes them with Go's archive/tar.  The tool is built
once per test session (offline, ``GO111MODULE=off``, a private ``GOCACHE``)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).parent / "gowintar" / "main.go"

ATTR_READONLY = 0x1
ATTR_HIDDEN = 0x2
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_REPARSE = 0x400


def build_tool(workdir: Path) -> Path | str:
    """The built tool, or why it cannot be built here (a string)."""
    go = shutil.which("go")
    if go is None:
        return "no Go toolchain (Debian golang-go)"
    out = workdir / "gowintar"
    env = {**os.environ, "GOCACHE": str(workdir / "gocache"), "GOPATH": str(workdir / "gopath"),
           "GO111MODULE": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
    proc = subprocess.run([go, "build", "-o", str(out), str(SOURCE)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        return f"go build failed: {proc.stderr.strip()[:300]}"
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class GoLayer:
    """Entries of a Windows layer tar, in the order they are written (hcsshim's export order
    when the caller adds them so: names sorted bytewise in each directory, a directory followed
    by its whiteouts and then its contents)."""

    base_ns: int = 1_700_000_000_123_456_700
    entries: list[dict[str, Any]] = field(default_factory=list)

    def _times(self, whole: bool) -> dict[str, int]:
        self.base_ns += 1_000_000_000 if whole else 1_000_001_100
        t = self.base_ns - (self.base_ns % 1_000_000_000 if whole else 0)
        return {"mtime": t, "atime": t + (0 if whole else 300), "ctime": t + 600,
                "create": t - 55_000_000}

    def dir(self, name: str, attrs: int = ATTR_DIRECTORY, sd: bytes | None = b"\x01\x00\x04\x80",
            whole: bool = False) -> GoLayer:
        self.entries.append({"name": name, "attrs": attrs, **self._times(whole),
                             "sd": b64(sd) if sd is not None else None})
        return self

    def file(self, name: str, data: bytes | None, attrs: int = ATTR_ARCHIVE,
             sd: bytes | None = b"\x01\x00\x04\x80\x14", eas: dict[str, bytes] | None = None,
             streams: dict[str, bytes] | None = None, whole: bool = False) -> GoLayer:
        self.entries.append({
            "name": name, "attrs": attrs, **self._times(whole),
            "sd": b64(sd) if sd is not None else None,
            "data": b64(data) if data is not None else None,
            "eas": [[k, b64(v)] for k, v in (eas or {}).items()],
            "streams": [[k, b64(v)] for k, v in (streams or {}).items()],
        })
        return self

    def symlink(self, name: str, target: str, junction: bool = False,
                directory: bool = False) -> GoLayer:
        attrs = ATTR_REPARSE | (ATTR_DIRECTORY if directory else 0)
        self.entries.append({"name": name, "attrs": attrs, **self._times(False),
                             "sd": b64(b"\x01\x00\x04\x80"), "symlink": target,
                             "mountpoint": junction})
        return self

    def whiteout(self, path: str) -> GoLayer:
        d, _, base = path.rpartition("/")
        self.entries.append({"name": f"{d}/.wh.{base}", "whiteout": True})
        return self

    def tar(self, tool: Path) -> bytes:
        proc = subprocess.run([str(tool)], input=json.dumps(self.entries).encode(),
                              capture_output=True, timeout=120, check=True)
        return proc.stdout
