#!/usr/bin/env python3
"""Build the benchmark layers from real data, cached outside the repository.

Full mode (the default) builds, under ``--cache`` (default ``/var/cache/graphdriver-bench``):

- ``rootfs.tar``: a ``debootstrap --variant=minbase bookworm`` root filesystem;
- ``npm.tar``: an ``npm install`` tree of at least 70k files;
- ``big.tar``: 1 GB in four 256 MB random files;
- ``small10k-base.tar`` and ``small10k-change.tar``: a 10k-file base layer and a layer of
  10 changes on top of it (modified, added, and deleted through ``.wh.`` whiteouts);
- ``rootfs.tar.gz``/``.zst`` and ``npm.tar.gz``/``.zst`` (``gzip -6``, ``zstd -3``);
- ``manifest.json``: what each layer holds (entries, bytes) and how it was made.

``--quick`` builds small synthetic stand-ins of the same shape (a few hundred files each) in
``CACHE/quick`` within seconds, for CI.  Every step is idempotent: an artifact that exists is
kept; each is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/graphdriver-bench")
TAR_CREATE = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
CHUNK = 4 << 20

# A create-react-app-like dependency set plus a few big UI/tool packages: well over 70k files.
NPM_PACKAGE = {
    "name": "graphdriver-bench-npm",
    "version": "1.0.0",
    "private": True,
    "dependencies": {
        "react-scripts": "5.0.1",
        "react": "^18",
        "react-dom": "^18",
        "typescript": "^4",
        "next": "^14",
        "@mui/material": "^5",
        "@mui/icons-material": "^5",
        "@emotion/react": "^11",
        "@emotion/styled": "^11",
        "lodash": "^4",
        "date-fns": "^2",
        "rxjs": "^7",
    },
}
NPM_MIN_FILES = 70_000


def log(msg: str) -> None:
    print(f"[make_layers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw: object) -> None:
    log("$ " + " ".join(argv))
    subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (deb822 or one-line sources)."""
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        candidates += sorted(p for p in d.iterdir() if p.suffix in (".sources", ".list"))
    for p in candidates:
        try:
            text = p.read_text()
        except OSError:
            continue
        if p.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                is_main = "debian-security" not in stanza
                if is_main and re.search(r"^Suites:.*\bbookworm\b", stanza, re.M):
                    m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                    if m:
                        return m.group(1)
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if m and "security" not in m.group(1):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def atomic_output(path: Path, build: Callable[[Path], None]) -> Path:
    """Build ``path`` through ``path.tmp`` unless it already exists."""
    if path.exists():
        log(f"have {path.name}")
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    build(tmp)
    os.replace(tmp, path)
    log(f"built {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def tar_dir(src: Path, out: Path) -> None:
    run([*TAR_CREATE, "-C", str(src), "-cf", str(out), "."])


def compress(src: Path, kind: str) -> Path:
    def build(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            if kind == "gz":
                if shutil.which("gzip"):
                    run(["gzip", "-6", "-c", str(src)], stdout=out)
                else:
                    with open(src, "rb") as f, gzip.GzipFile(fileobj=out, mode="wb",
                                                             compresslevel=6, mtime=0) as gz:
                        shutil.copyfileobj(f, gz, CHUNK)
            elif shutil.which("zstd"):
                run(["zstd", "-3", "-q", "-c", str(src)], stdout=out)
            else:
                import zstandard

                with open(src, "rb") as f:
                    zstandard.ZstdCompressor(level=3).copy_stream(f, out)

    return atomic_output(src.with_name(f"{src.name}.{kind}"), build)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- full (real data) layers


def build_rootfs(cache: Path, mirror: str) -> Path:
    tree = cache / "src" / "rootfs"

    def build(tmp: Path) -> None:
        if not (tree / "etc" / "debian_version").exists():
            if shutil.which("debootstrap") is None:
                raise SystemExit("debootstrap is missing: apt-get install debootstrap")
            staging = cache / "src" / "rootfs.tmp"
            if staging.exists():
                shutil.rmtree(staging)
            staging.parent.mkdir(parents=True, exist_ok=True)
            run(["debootstrap", "--variant=minbase", "bookworm", str(staging), mirror])
            os.replace(staging, tree)
        tar_dir(tree, tmp)

    return atomic_output(cache / "rootfs.tar", build)


def count_files(root: Path) -> int:
    n = 0
    for _, dirs, files in os.walk(root):
        n += len(files) + len(dirs)
    return n


def build_npm(cache: Path) -> Path:
    tree = cache / "src" / "npm"

    def build(tmp: Path) -> None:
        if not (tree / ".complete").exists():
            if shutil.which("npm") is None:
                raise SystemExit("npm is missing: apt-get install npm")
            staging = fresh_dir(cache / "src" / "npm.tmp")
            (staging / "package.json").write_text(json.dumps(NPM_PACKAGE, indent=1) + "\n")
            run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund",
                 "--legacy-peer-deps", "--no-update-notifier"], cwd=staging)
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(staging, tree)
            (tree / ".complete").write_text("")
        n = count_files(tree)
        if n < NPM_MIN_FILES:
            raise SystemExit(f"npm tree has {n} entries, fewer than {NPM_MIN_FILES}")
        tar_dir(tree, tmp)

    return atomic_output(cache / "npm.tar", build)


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def build_big(cache: Path, files: int, size: int) -> Path:
    def build(tmp: Path) -> None:
        src = fresh_dir(cache / "src" / "big")
        for i in range(files):
            write_random(src / f"blob{i}.bin", size)
        tar_dir(src, tmp)
        shutil.rmtree(src)

    return atomic_output(cache / "big.tar", build)


def build_small_pair(cache: Path, nfiles: int) -> tuple[Path, Path]:
    """A base layer of ``nfiles`` small files and a layer of 10 changes on top of it."""
    per_dir = 100

    def name(i: int) -> str:
        return f"d{i // per_dir:03d}/f{i % per_dir:03d}.txt"

    def build_base(tmp: Path) -> None:
        src = fresh_dir(cache / "src" / "small-base")
        for i in range(nfiles):
            p = src / name(i)
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(f"file {i}\n".encode() * (1 + i % 7))
        tar_dir(src, tmp)
        shutil.rmtree(src)

    def build_change(tmp: Path) -> None:
        src = fresh_dir(cache / "src" / "small-change")
        step = nfiles // 10
        for k in range(5):  # 5 modified files
            p = src / name(k * step + 1)
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(b"changed\n" * (k + 1))
        for k in range(3):  # 3 added files
            p = src / f"d{k:03d}" / f"new{k}.txt"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(b"added\n")
        for k in range(2):  # 2 deleted files, as layer whiteouts
            victim = name(k * step + 5)
            p = src / os.path.dirname(victim) / (".wh." + os.path.basename(victim))
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(b"")
        tar_dir(src, tmp)
        shutil.rmtree(src)

    base = atomic_output(cache / "small10k-base.tar", build_base)
    change = atomic_output(cache / "small10k-change.tar", build_change)
    return base, change


# ---------------------------------------------------------------- quick (synthetic) layers


def build_quick_rootfs(cache: Path) -> Path:
    def build(tmp: Path) -> None:
        src = fresh_dir(cache / "src" / "rootfs")
        for d in ("bin", "etc", "usr/lib", "usr/share/doc", "var/log", "tmp"):
            (src / d).mkdir(parents=True, exist_ok=True)
        os.chmod(src / "tmp", 0o1777)
        for i in range(150):
            p = src / "usr/lib" / f"lib{i}.so"
            p.write_bytes(os.urandom(512 + 37 * i))
        for i in range(100):
            (src / "usr/share/doc" / f"doc{i}").write_text(f"doc {i}\n" * 20)
        (src / "bin/sh").write_bytes(b"\x7fELF" + os.urandom(4000))
        os.chmod(src / "bin/sh", 0o4755)
        os.link(src / "bin/sh", src / "bin/dash")
        os.symlink("sh", src / "bin/bash")
        os.symlink("/usr/lib", src / "lib")
        (src / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        if os.geteuid() == 0:
            os.chown(src / "etc/passwd", 0, 42)
        with contextlib.suppress(OSError):
            os.setxattr(src / "bin/sh", "user.bench", b"1")
        tar_dir(src, tmp)
        shutil.rmtree(src)

    return atomic_output(cache / "rootfs.tar", build)


def build_quick_npm(cache: Path) -> Path:
    def build(tmp: Path) -> None:
        src = fresh_dir(cache / "src" / "npm")
        for pkg in range(40):
            d = src / "node_modules" / f"pkg{pkg}" / "lib"
            d.mkdir(parents=True)
            (d.parent / "package.json").write_text(json.dumps({"name": f"pkg{pkg}"}))
            for i in range(12):
                (d / f"m{i}.js").write_text(f"module.exports = {i};\n" * (1 + i))
        tar_dir(src, tmp)
        shutil.rmtree(src)

    return atomic_output(cache / "npm.tar", build)


# ---------------------------------------------------------------- manifest


def describe(path: Path) -> dict[str, object]:
    if path.suffix in (".gz", ".zst"):
        return {"file": path.name, "bytes": path.stat().st_size, "compression": path.suffix[1:]}
    entries = 0
    data = 0
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            entries += 1
            if m.isreg():
                data += m.size
    return {"file": path.name, "bytes": path.stat().st_size, "entries": entries,
            "file_data_bytes": data}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"cache directory (default {DEFAULT_CACHE}; --quick uses CACHE/quick)")
    ap.add_argument("--quick", action="store_true",
                    help="small synthetic stand-ins in seconds, for CI")
    ap.add_argument("--mirror", default=None, help="Debian mirror for debootstrap "
                    "(default: the one in /etc/apt/sources.list*)")
    args = ap.parse_args(argv)

    cache: Path = args.cache / "quick" if args.quick else args.cache
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    layers: dict[str, Path] = {}
    if args.quick:
        layers["rootfs"] = build_quick_rootfs(cache)
        layers["npm"] = build_quick_npm(cache)
        layers["big"] = build_big(cache, 2, 4 << 20)
        layers["small10k-base"], layers["small10k-change"] = build_small_pair(cache, 300)
        how = "synthetic quick stand-ins"
    else:
        mirror = args.mirror or debian_mirror()
        layers["rootfs"] = build_rootfs(cache, mirror)
        layers["npm"] = build_npm(cache)
        layers["big"] = build_big(cache, 4, 256 << 20)
        layers["small10k-base"], layers["small10k-change"] = build_small_pair(cache, 10_000)
        how = f"debootstrap minbase bookworm from {mirror}; npm install of " + ", ".join(
            f"{k}@{v}" for k, v in NPM_PACKAGE["dependencies"].items()  # type: ignore[attr-defined]
        )
    for base in ("rootfs", "npm"):
        for kind in ("gz", "zst"):
            layers[f"{base}.{kind}"] = compress(layers[base], kind)

    manifest_path = cache / "manifest.json"
    old: dict[str, object] = {}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
    old_layers = old.get("layers", {}) if isinstance(old, dict) else {}
    described: dict[str, object] = {}
    for key, path in layers.items():
        prev = old_layers.get(key) if isinstance(old_layers, dict) else None
        if isinstance(prev, dict) and prev.get("bytes") == path.stat().st_size:
            described[key] = prev
        else:
            log(f"describing {path.name}")
            described[key] = describe(path)
    manifest = {"quick": args.quick, "how": how, "layers": described}
    tmp = manifest_path.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    for key, info in described.items():
        assert isinstance(info, dict)
        print(f"{key:18} {info.get('entries', '-'):>7} entries {info['bytes'] / 1e6:>9.1f} MB  "
              f"{cache / str(info['file'])}")
    log(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
