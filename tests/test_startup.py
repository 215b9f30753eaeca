"""Start-up of the ``graphdriver`` command (issue 7, start-up row): what a command imports.

Structural, never timed: a real ``python -m graphdriver`` runs in a subprocess (``-S``, the
package from this tree) and reports ``sys.modules`` at exit; the modules a light command has no
use for must not be there.  And the hand-written fast path of the command line must build the
namespace argparse builds, whenever it takes an argument list at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphdriver.cli import UsageError, _fast_parse, build_parser

SRC = Path(__file__).resolve().parents[1] / "src"

# Run the command as `python -m graphdriver` does, and write sys.modules at exit.
_RUNNER = """
import atexit, runpy, sys
out = sys.argv[1]
sys.argv = ["graphdriver", *sys.argv[2:]]
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
runpy.run_module("graphdriver", run_name="__main__", alter_sys=True)
"""

# What no light command (exists, status, ls, metadata, rm) may import.
HEAVY = {
    "argparse",  # the fast path parses these command lines
    "typing",
    "dataclasses",
    "inspect",
    "subprocess",
    "_hashlib",  # OpenSSL
    "secrets",
    "tarfile",
    "signal",  # _signal is enough
    "logging",  # loaded only when a message is logged (graphdriver.logs)
    "graphdriver.archive",
    "graphdriver.driver",
    "graphdriver.plugin",
    "graphdriver.progress",
    "isal",
    "zstandard",
}


def _modules(tmp_path: Path, *args: str) -> tuple[int, set[str]]:
    out = tmp_path / "modules.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(SRC)
    proc = subprocess.run([sys.executable, "-S", "-c", _RUNNER, str(out), *args],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.exists(), proc.stderr
    return proc.returncode, set(out.read_text().split())


# ... except these: the store's class attribute is a whiteout format object (a leaf module that
# imports os and stat only; the archive package's __init__ is a docstring).
LIGHT_EXCEPTIONS = {"graphdriver.archive", "graphdriver.archive.whiteout"}
# graphdriver.units is not heavy: ``ls`` prints human sizes with it, and the one module it
# imports (re) is loaded by pathlib anyway (checked below).


def _heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods - LIGHT_EXCEPTIONS
                  if m in HEAVY or m.split(".")[0] in HEAVY
                  or any(m.startswith(h + ".") for h in HEAVY))


def _store(tmp_path: Path, driver: str) -> Path:
    root = tmp_path / "root"
    for argv in (["create", "base"], ["create", "top", "--parent", "base"]):
        proc = subprocess.run([sys.executable, "-m", "graphdriver", "--root", str(root),
                               "--driver", driver, *argv],
                              env={**os.environ, "PYTHONPATH": str(SRC)},
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            if "NotSupported" in proc.stderr:
                pytest.skip(f"{driver} does not work here: {proc.stderr.strip()}")
            raise AssertionError(proc.stderr)
    return root


def _overlay_usable() -> str | None:
    if os.geteuid() != 0:
        return "overlay needs root"
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            if "overlay" not in f.read().split():
                return "no overlayfs in this kernel"
    except OSError as exc:
        return f"/proc/filesystems: {exc}"
    return None


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
@pytest.mark.parametrize("command", [["exists", "top"], ["exists", "nosuch"], ["status"], ["ls"],
                                     ["metadata", "top"], ["--json", "ls"], ["rm", "top"],
                                     ["exists", "top", "base"], ["ls", "-q"], ["ls", "--tree"]])
def test_light_commands_import_little(tmp_path: Path, driver: str, command: list[str]) -> None:
    if driver == "overlay" and (why := _overlay_usable()):
        pytest.skip(why)
    root = _store(tmp_path, driver)
    rc, mods = _modules(tmp_path, "--root", str(root), *command)
    assert rc == (1 if command == ["exists", "nosuch"] else 0)
    assert _heavy(mods) == []
    assert "re" in mods  # loaded anyway: graphdriver.units costs nothing more
    assert f"graphdriver.drivers.{driver}" in mods  # it did open the store
    if driver == "vfs":
        assert "graphdriver.drivers.overlay" not in mods  # the registry imports only the one used
        assert "graphdriver.mount" not in mods and "graphdriver.quota" not in mods
        if command[-2:-1] != ["rm"] and command != ["status"]:  # those statfs / remove trees
            assert "ctypes" not in mods and "shutil" not in mods  # vfs needs neither to open


def test_new_root_picks_a_driver_without_heavy_imports(tmp_path: Path) -> None:
    rc, mods = _modules(tmp_path, "--root", str(tmp_path / "fresh"), "cleanup")
    assert rc == 0
    assert _heavy(mods) == []
    assert "graphdriver.drivers.windowsfilter" not in mods  # never auto-selected, never imported


def test_read_only_command_on_no_store_opens_nothing(tmp_path: Path) -> None:
    rc, mods = _modules(tmp_path, "--root", str(tmp_path / "fresh"), "exists", "x")
    assert rc == 2  # "no graphdriver store at ...": exists cannot tell
    assert _heavy(mods) == []
    assert not any(m.startswith("graphdriver.drivers.") for m in mods)
    assert not (tmp_path / "fresh").exists()


def test_unusual_command_line_still_goes_through_argparse(tmp_path: Path) -> None:
    rc, mods = _modules(tmp_path, "--root", str(tmp_path / "r"), "exists", "--", "x")
    assert "argparse" in mods  # "--" is argparse's business
    assert rc == 2  # no store at r


# ---------------------------------------------------------------- the fast path = argparse


def _argparse(argv: list[str]) -> dict[str, object] | None:
    try:
        return vars(build_parser().parse_args(argv))
    except (UsageError, SystemExit):
        return None


FAST = [
    ["exists", "x"],
    ["--root", "/r", "exists", "x"],
    ["--root=/r", "exists", "x", "--json"],
    ["exists", "x", "--root", "/r", "--runroot", "/run/x", "--driver", "vfs"],
    ["-s", "overlay", "--storage-opt", "size=1G", "status", "--storage-opt", "a=b"],
    ["--json", "--debug", "ls"],
    ["--json", "ls", "--json"],
    ["--root", "/a", "metadata", "m", "--root", "/b"],
    ["--root=", "cleanup"],
    ["mount", "m"],
    ["unmount", "m"],
    ["rm", "m"],
    ["changes", "c"],
    ["diff-size", "c"],
    ["create", "n"],
    ["exists", "ls"],
    ["--root", "status", "ls"],
    ["--storage-opt=k=v=w", "exists", "a=b"],
    ["exists", "a", "b"],
    ["rm", "a", "b", "c"],
    ["inspect", "a"],
    ["inspect", "a", "b"],
    ["ls", "-q"],
    ["ls", "--quiet", "--json"],
    ["ls", "--tree"],
    ["--json", "ls", "-q", "--tree"],
    ["apply", "a", "layer.tar"],
    ["apply", "a"],
    ["--root", "/r", "apply", "a", "l.tar.gz", "--json"],
    ["import", "a", "layer.tar"],
]

SLOW = [
    [],
    ["--help"],
    ["exists", "--help"],
    ["exists"],
    ["exists", "--", "x"],
    ["exists", "-"],
    ["exists", "-1"],
    ["--ro", "/r", "exists", "x"],  # an abbreviation
    ["--root"],
    ["--root", "-x", "exists", "x"],
    ["--root", "", "exists", "x"],
    ["-s=vfs", "ls"],
    ["-svfs", "ls"],
    ["--json=1", "ls"],
    ["--storage-opt", "nokey", "ls"],
    ["--storage-opt", "=v", "ls"],
    ["create", "n", "--rw"],
    ["create", "n", "-p", "base"],
    ["mount", "m", "--mount-label", "l"],
    ["apply", "x", "-"],  # "-" is argparse's business
    ["apply", "x", "f", "g"],
    ["apply", "x", "f", "--parent", "p"],
    ["diff", "x"],
    ["serve"],
    ["nosuchcommand"],
    ["rm"],
    ["inspect"],
    ["-q", "ls"],  # ls's own flag before the command
    ["ls", "--format", "{{.ID}}"],
    ["ls", "--format=json"],
    ["ls", "--quiet=1"],
    ["exists", "x", "-q"],
    ["import", "x"],
    ["completion", "bash"],
    ["man"],
    ["--version"],
]


@pytest.mark.parametrize("argv", FAST, ids=" ".join)
def test_fast_path_takes_common_command_lines(argv: list[str]) -> None:
    fast = _fast_parse(argv)
    assert fast is not None
    assert vars(fast) == _argparse(argv)


@pytest.mark.parametrize("argv", SLOW, ids=lambda a: " ".join(a) or "(empty)")
def test_fast_path_leaves_the_rest_to_argparse(argv: list[str]) -> None:
    assert _fast_parse(argv) is None


_TOKENS = st.sampled_from([
    "exists", "status", "ls", "rm", "mount", "unmount", "metadata", "cleanup", "create",
    "changes", "diff-size", "apply", "diff", "--root", "--root=/r", "--runroot", "--driver",
    "-s", "--storage-opt", "--storage-opt=a=b", "--json", "--debug", "--parent", "-p", "--rw",
    "--", "-", "-h", "--ro", "a", "b=c", "x=", "", "/tmp/r", "-x", "vfs", "-q", "--quiet",
    "--tree", "--format", "inspect", "import",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_TOKENS, max_size=7))
def test_fast_path_agrees_with_argparse(argv: list[str]) -> None:
    fast = _fast_parse(argv)
    if fast is not None:
        assert vars(fast) == _argparse(argv)


# ---------------------------------------------------------------- the confined child's imports

# What the confined apply child may not import (issue 18): it starts once per layer, and each of
# these costs milliseconds it has no use for.  logging is loaded only when a message is logged.
CHILD_HEAVY = {"logging", "json", "re", "typing", "inspect", "dataclasses", "pathlib", "runpy",
               "enum", "ast", "tokenize", "argparse", "subprocess", "tarfile", "urllib"}


def _layer(path: Path) -> None:
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/hello", b"hello\n"), ("etc/h\u00e9llo", b"x" * 5000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        sub = tarfile.TarInfo("etc/sub")
        sub.type = tarfile.DIRTYPE
        sub.mode = 0o755
        tar.addfile(sub)
    path.write_bytes(raw.getvalue())


#: ... and, where the native helpers are built, none of these either: the standard library's
#: pure-Python packages whose work a C module or a native helper does in the child (contextlib,
#: collections, functools: try/except and _collections/_functools; threading, queue: the packer's
#: thread on _thread and _queue; hashlib, weakref: the native digest loads _hashlib itself;
#: ctypes: openat2 and PR_SET_PDEATHSIG in _fastapply; importlib: __import__; anycrc's Python
#: module: its extension loaded as a library by _fastdigest), with what only they imported
CHILD_HEAVY_NATIVE = {"contextlib", "collections", "functools", "threading", "queue", "heapq",
                      "hashlib", "_blake2", "weakref", "ctypes", "importlib", "warnings", "anycrc",
                      "bitarray", "types", "operator", "keyword", "reprlib", "itertools",
                      "encodings.ascii"}


@pytest.mark.parametrize(("compression", "native", "ahead"), [
    pytest.param("none", True, False, id="native-spawned"),
    pytest.param("none", True, True, id="native-ahead"),
    pytest.param("zstd", True, True, id="native-ahead-zstd"),
    pytest.param("none", False, False, id="python-spawned"),
    pytest.param("none", False, True, id="python-ahead")])
def test_confined_child_imports_little(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capfd: pytest.CaptureFixture[str],
                                       compression: str, native: bool, ahead: bool) -> None:
    """The real child of a real apply (the journal kept, tar-split packed in the child), its
    imports listed by ``-X importtime`` (inherited through the environment), started for the
    job or ahead of it (the store's way: it preloads while it waits); with the native helpers,
    and without them (``GRAPHDRIVER_NO_NATIVE``: the Python fallbacks' modules must then be in
    before the chroot, and the apply works).  Not gzip: isal's threaded gzip reader imports
    typing (and re) itself; zstd with the native decoder, whose libzstd is loaded with the
    stream, imports no python-zstandard."""
    from graphdriver.archive.apply import ApplyOptions, commit_journal
    from graphdriver.archive.confine import start_child
    from graphdriver.archive.isolate import APPLY_JOB, apply_confined
    from graphdriver.archive.native import native_module

    if native and native_module("_fastapply") is None:
        pytest.skip("the native helpers are not built")
    if not native:
        monkeypatch.setenv("GRAPHDRIVER_NO_NATIVE", "1")  # the child's (this process has loaded)
    layer = tmp_path / "layer.tar"
    _layer(layer)
    if compression == "zstd":
        if native_module("_fastzstd") is None:
            pytest.skip("the native zstd decoder is not built")
        import zstandard

        layer.write_bytes(zstandard.ZstdCompressor().compress(layer.read_bytes()))
    target = tmp_path / "target"
    target.mkdir()
    packed = tmp_path / "tar-split.gz"
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    with open(layer, "rb") as src, open(packed, "wb") as out:
        capfd.readouterr()
        child = start_child(APPLY_JOB) if ahead else None
        try:
            result = apply_confined(src.fileno(), target, ApplyOptions(
                journal=True, packer_fd=out.fileno(), child=child))
        finally:
            if child is not None:
                child.discard()
        err = capfd.readouterr().err
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        commit_journal(fd)
    finally:
        os.close(fd)
    assert (target / "etc" / "h\u00e9llo").read_bytes() == b"x" * 5000
    assert result.recording is not None and packed.stat().st_size > 0
    # the child's lines: from its header on (this process does not time its imports)
    child_err = err[err.index("import time: self [us]"):]
    imported = {line.rsplit("|", 1)[1].strip() for line in child_err.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "graphdriver.archive.apply" in imported  # the test can fail: it sees the job's imports
    heavy = sorted(m for m in imported if m.split(".")[0] in CHILD_HEAVY)
    assert heavy == []
    if native:
        heavy = sorted(m for m in imported
                       if m in CHILD_HEAVY_NATIVE or m.split(".")[0] in CHILD_HEAVY_NATIVE)
        assert heavy == []
        if native_module("_fastdigest").FUSED:  # its own sha256: OpenSSL is never loaded
            assert "_hashlib" not in imported
    else:  # the test can fail: the fallbacks' modules are seen
        assert {"ctypes", "hashlib", "anycrc"} <= imported


# ---------------------------------------------------------------- the parent of a store's apply

# Run a store's apply (vfs, a real child) and write the parent's sys.modules at the moment the
# child has been handed the job: the parent's preparation ran before it, and must not have
# imported the tar engine (the child runs it) nor subprocess (the child is posix_spawn'ed).
_APPLY_RUNNER = """
import io, sys, tarfile
from graphdriver import open_driver
from graphdriver.store import LayerStore
out, root = sys.argv[1], sys.argv[2]
prepare = LayerStore._prepare_commit
def spy(self):
    open(out, "w").write("\\n".join(sorted(sys.modules)))
    prepare(self)
LayerStore._prepare_commit = spy
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w") as tar:
    info = tarfile.TarInfo("hello")
    info.size = 6
    tar.addfile(info, io.BytesIO(b"hello\\n"))
layer = raw.getvalue()
del tarfile, raw  # what the test itself needed
sys.modules.pop("tarfile", None)
d = open_driver("vfs", root, runroot=root + "/run")
d.create("a")
d.apply_diff("a", None, io.BytesIO(layer))
print(open(f"{d.get('a')}/hello").read(), end="")
"""

#: what the parent of an apply may not have imported when its child takes the job
APPLY_PARENT_HEAVY = {"graphdriver.archive.apply", "graphdriver.archive.tarstream",
                      "graphdriver.archive.digest", "_hashlib", "subprocess",
                      "graphdriver.exactdiff", "graphdriver.archive.tarsplit", "anycrc"}


def test_the_parent_of_an_apply_leaves_the_engine_to_its_child(tmp_path: Path) -> None:
    out = tmp_path / "modules.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(SRC)
    proc = subprocess.run([sys.executable, "-c", _APPLY_RUNNER, str(out),
                           str(tmp_path / "root")],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello\n"  # the child applied the layer
    mods = set(out.read_text().split())
    assert "graphdriver.archive.confine" in mods  # the test can fail: it saw the parent's
    assert sorted(mods & APPLY_PARENT_HEAVY) == []


def test_the_store_names_the_raw_tarsplit_file_as_exactdiff_does() -> None:
    from graphdriver.exactdiff import RAW_NAME
    from graphdriver.layers import MetaDir

    assert MetaDir.TARSPLIT_RAW == RAW_NAME
