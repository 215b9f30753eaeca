"""The command as a new user meets it (issue 16): what is stored is visible, the conventions every
command line has, messages a user can act on.  Every case runs the real command
(``python -m graphdriver``) against a real store.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from graphdriver.cli import build_parser
from tests.cli.conftest import EXAMPLES, GD
from tests.conftest import IS_ROOT
from tests.treeutil import TarBuilder

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the command tests run as root")

MiB = 1 << 20
UPPER_SIZE = len(b"Welcome to the example upper layer.\n") + 12 + 25


def command(*args: str, input: bytes | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphdriver", *args], input=input and input,
                          capture_output=True, timeout=120, **kw)


def stacked(gd: GD) -> None:
    """base <- app (both applied from the examples) <- ctr (writable, mounted once)."""
    gd.run("import", "base", str(EXAMPLES / "hello-base.tar.gz"))
    gd.run("import", "app", "--parent", "base", str(EXAMPLES / "hello-upper.tar.gz"))
    gd.run("create", "ctr", "--parent", "app", "--rw")
    gd.run("mount", "ctr")


# ---------------------------------------------------------------- see what is stored


def test_ls_is_a_table_with_parents(gd: GD) -> None:
    stacked(gd)
    lines = gd.out("ls").splitlines()
    assert lines[0].split() == ["ID", "PARENT", "KIND", "SIZE", "CREATED", "MOUNTS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["app", "base", "ctr"]
    recent = r"(Less than a second|1 second|\d+ seconds) ago"
    assert re.fullmatch(rf"app\s+base\s+ro\s+73 B\s+{recent}\s+0", rows["app"]), rows["app"]
    assert rows["base"].split()[1:3] == ["-", "ro"]
    assert rows["ctr"].split()[1:4] == ["app", "rw", "-"]
    assert rows["ctr"].split()[-1] == "1"
    # columns line up (docker's tabwriter: three spaces after the widest cell)
    for column in ("PARENT", "KIND", "SIZE", "CREATED", "MOUNTS"):
        at = lines[0].index(column)
        assert all(line[at - 3:at] == "   " and line[at] != " " for line in lines), column
    assert lines[0].index("PARENT") == len("base") + 3


def test_ls_quiet_format_json_and_tree(gd: GD) -> None:
    stacked(gd)
    assert sorted(gd.out("ls", "-q").split()) == ["app", "base", "ctr"]
    assert gd.out("ls", "--format", "{{.ID}} {{.Parent}}").splitlines() == [
        "base ", "app base", "ctr app"]
    table = gd.out("ls", "--format", "table {{.ID}}\\t{{.Kind}}").splitlines()
    assert [line.split() for line in table] == [["ID", "KIND"], ["base", "ro"], ["app", "ro"],
                                                ["ctr", "rw"]]
    lines = [json.loads(line) for line in gd.out("ls", "--format", "json").splitlines()]
    assert lines == json.loads(gd.out("--json", "ls"))  # the same fields either way
    app = next(x for x in lines if x["id"] == "app")
    assert app["parent"] == "base" and app["kind"] == "ro" and app["size"] == UPPER_SIZE
    assert app["mounts"] == 0 and app["limit"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", app["created"])
    assert gd.out("ls", "--tree") == (
        "base (ro, 137 B)\n"
        "└── app (ro, 73 B)\n"
        "    └── ctr (rw, -, 1 mounted)\n")
    err = gd.fails("ls", "--format", "{{.Nope}}", code=2)
    assert "unknown field .Nope" in err and err.endswith("see graphdriver ls --help")


def test_inspect_prints_records(gd: GD) -> None:
    stacked(gd)
    raw = gzip.decompress((EXAMPLES / "hello-upper.tar.gz").read_bytes())
    out = json.loads(gd.out("inspect", "app", "ctr"))
    assert [x["id"] for x in out] == ["app", "ctr"]
    app, ctr = out
    assert app["diffID"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert app["parents"] == ["base"] and ctr["parents"] == ["app", "base"]
    assert app["size"] == UPPER_SIZE and app["exactDiff"] is True
    assert ctr["exactDiff"] is False and "not made by applying an archive" in (
        ctr["exactDiffUnavailable"])
    assert ctr["kind"] == "rw" and ctr["mounts"] == 1 and ctr["driver"] == gd.driver
    assert app["metadata"] == json.loads(gd.out("--json", "metadata", "app"))
    assert "does not exist" in gd.fails("inspect", "app", "nope")


def test_rm_and_exists_take_several_ids(gd: GD) -> None:
    gd.run("create", "p")
    gd.run("create", "c", "--parent", "p")
    gd.run("create", "other")
    assert gd.run("exists", "p", "c").returncode == 0
    assert gd.run("exists", "p", "nope", ok=False).returncode == 1
    lines = [json.loads(x) for x in gd.out("--json", "exists", "p", "nope", ok=False).split("\n")
             if x]
    assert lines == [{"id": "p", "exists": True}, {"id": "nope", "exists": False}]
    gd.run("rm", "p", "c")  # the parent first on the command line: children go first
    assert gd.out("ls", "-q").split() == ["other"]


def test_import_is_create_and_apply_rolled_back_together(gd: GD, tmp_path: Path) -> None:
    out = json.loads(gd.out("--json", "import", "base", str(EXAMPLES / "hello-base.tar.gz")))
    assert out["id"] == "base" and out["size"] > 0
    assert gd.out("ls", "--format", "{{.ID}} {{.Parent}}").split() == ["base"]
    garbage = os.urandom(4096)
    err = gd.fails("import", "bad", "--parent", "base", "-", input=garbage)
    assert "not a tar archive" in err
    err = gd.fails("import", "bad2", str(tmp_path / "missing.tar"))
    assert err == f"graphdriver: NotFound: {tmp_path}/missing.tar: No such file or directory"
    assert gd.out("ls", "-q").split() == ["base"]  # neither left a layer behind


def test_read_only_commands_on_no_store_create_nothing(tmp_path: Path) -> None:
    root = tmp_path / "nothing-here"
    for args in (["ls"], ["status"], ["exists", "x"], ["inspect", "x"], ["metadata", "x"],
                 ["changes", "x"], ["diff", "x"], ["diff-size", "x"]):
        proc = command("--root", str(root), "--runroot", str(tmp_path / "run"), *args)
        assert proc.returncode == (2 if args[0] == "exists" else 1), (args, proc.stderr)
        err = proc.stderr.decode().strip()
        assert err == f"graphdriver: NotFound: no graphdriver store at {root}"
        assert not root.exists()


# ---------------------------------------------------------------- conventions


def test_version_has_one_source() -> None:
    import graphdriver

    proc = command("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode() == f"graphdriver {graphdriver.__version__}\n"
    assert version("graphdriver") == graphdriver.__version__
    assert command("--root", "/nonexistent", "--version").stdout == proc.stdout  # via argparse


def test_output_dash_is_stdout(gd: GD, tmp_path: Path) -> None:
    gd.run("import", "a", str(EXAMPLES / "hello-base.tar.gz"))
    gd.run("diff", "a", "-o", str(tmp_path / "a.tar"))
    assert gd.run("diff", "a", "-o", "-").stdout == (tmp_path / "a.tar").read_bytes()
    assert not (tmp_path / "-").exists() and not Path("-").exists()


def test_apply_refuses_to_read_a_terminal(gd: GD) -> None:
    gd.run("create", "a")
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([*gd.base, "apply", "a"], stdin=terminal, capture_output=True,
                              timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == 2
    assert proc.stderr.decode() == ("graphdriver: usage error: refusing to read a tar from a "
                                    "terminal: give FILE or a pipe; see graphdriver apply --help\n")


def test_every_argument_has_help_and_every_command_examples() -> None:
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, cmd in sub.choices.items():
        assert cmd.epilog and cmd.epilog.startswith("examples:\n"), name
        for action in cmd._actions:
            assert action.help, f"{name} {action.dest}"
        text = command(name, "--help").stdout.decode()
        assert "examples:\n  " in text, name
    for action in parser._actions:
        assert action.help, action.dest


def test_usage_errors_point_at_the_command_help_and_abbreviations_are_refused() -> None:
    for args, where in ((["ls", "--tre"], "graphdriver ls"),
                        (["--ro", "/x", "ls"], "graphdriver ls"),
                        (["exists"], "graphdriver exists"), (["frobnicate"], "graphdriver"),
                        (["create", "x", "--size", "1G"], "graphdriver create")):
        proc = command(*args)
        err = proc.stderr.decode()
        assert proc.returncode == 2, args
        assert err.startswith("graphdriver: usage error: ") and err.count("\n") == 1, err
        assert err.endswith(f"; see {where} --help\n"), err


def test_overlay2_is_overlay(tmp_path: Path) -> None:
    proc = command("--root", str(tmp_path / "r"), "--runroot", str(tmp_path / "run"),
                   "--driver", "overlay2", "create", "a")
    if b"NotSupported" in proc.stderr:
        pytest.skip(proc.stderr.decode().strip())
    proc = command("--root", str(tmp_path / "r"), "--runroot", str(tmp_path / "run"),
                   "--driver", "overlay2", "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("Driver: overlay\n")
    assert (tmp_path / "r" / "overlay").is_dir() and not (tmp_path / "r" / "overlay2").exists()


def test_unmount_of_an_unmounted_layer_warns_and_succeeds(gd: GD) -> None:
    gd.run("create", "a")
    proc = gd.run("unmount", "a")
    assert proc.returncode == 0
    assert proc.stderr.decode() == "graphdriver: warning: layer a is not mounted\n"
    assert "does not exist" in gd.fails("unmount", "nope")


def test_debug_logs_mounts_unmounts_and_removals(gd: GD) -> None:
    gd.run("create", "a")
    err = gd.run("--debug", "mount", "a").stderr.decode()
    assert "graphdriver: mounted layer a at " in err
    assert "graphdriver: unmounted layer a" in gd.run("unmount", "a", "--debug").stderr.decode()
    assert "graphdriver: removed layer a" in gd.run("rm", "a", "--debug").stderr.decode()
    assert gd.run("create", "b").stderr == b""  # and nothing without --debug


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_names_its_signal(gd: GD, sig: signal.Signals) -> None:
    gd.run("create", "a")
    data = TarBuilder().file("big", b"x" * (8 * MiB)).bytes()
    proc = subprocess.Popen([*gd.base, "apply", "a"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[: 2 * MiB])  # the apply is under way, waiting for the rest
    proc.stdin.flush()
    time.sleep(1.0)
    proc.send_signal(sig)
    proc.wait(timeout=60)  # stdin still open: the signal, not the end of the input, stops it
    proc.stdin.close()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    text = err.decode()
    assert text.count("\n") == 1 and f"interrupted by {sig.name}" in text, text
    assert "rolled back" in text
    assert gd.out("changes", "a") == ""


def test_interrupted_import_leaves_no_layer(gd: GD) -> None:
    data = TarBuilder().file("big", b"x" * (8 * MiB)).bytes()
    proc = subprocess.Popen([*gd.base, "import", "half", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(data[: 2 * MiB])
    proc.stdin.flush()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    proc.stdin.close()
    err = proc.stderr.read().decode()
    assert proc.returncode == 130 and "interrupted by SIGINT" in err, err
    assert gd.run("exists", "half", ok=False).returncode == 1


def test_completions_and_man_page_come_from_the_parser() -> None:
    commands = ["status", "create", "import", "apply", "diff", "ls", "inspect", "rm", "exists"]
    for shell in ("bash", "zsh", "fish"):
        proc = command("completion", shell)
        assert proc.returncode == 0, proc.stderr
        script = proc.stdout.decode()
        assert all(c in script for c in commands), shell
    if shutil.which("bash"):
        bash = command("completion", "bash").stdout
        assert subprocess.run(["bash", "-n"], input=bash, timeout=30).returncode == 0
    man = command("man").stdout.decode()
    assert man.startswith(".TH GRAPHDRIVER 1 ")
    for name in commands:
        assert f"\n.SS {name}\n" in man
    if shutil.which("groff"):
        text = subprocess.run(["groff", "-man", "-Tutf8"], input=man.encode(),
                              capture_output=True, timeout=30)
        plain = re.sub(rb".\x08", b"", text.stdout)  # overstrike bold
        assert text.returncode == 0 and b"EXIT STATUS" in plain and b"--tree" in plain


# ---------------------------------------------------------------- messages


def test_random_bytes_are_not_a_tar_archive(gd: GD) -> None:
    gd.run("create", "a")
    assert "not a tar archive" in gd.fails("apply", "a", "-", input=os.urandom(10000))
    assert "not a tar archive" in gd.fails("apply", "a", "-", input=b"hello\n")
    assert "not a tar archive" in gd.fails("apply", "a", "-",
                                           input=gzip.compress(os.urandom(3000)))


def test_a_directory_given_as_a_file_is_named(gd: GD, tmp_path: Path) -> None:
    gd.run("create", "a")
    err = gd.fails("apply", "a", str(tmp_path))
    assert err == f"graphdriver: InvalidArgument: {tmp_path} is a directory, not a layer tar"


def test_exact_diff_unavailable_says_why_in_plain_words(gd: GD) -> None:
    gd.run("create", "a")
    err = gd.fails("diff", "--exact", "a")
    assert err.startswith("graphdriver: ExactDiffUnavailable: layer a: ")
    assert "not made by applying an archive" in err and "tar-split" not in err
    debug = gd.run("--debug", "diff", "--exact", "a", ok=False).stderr.decode()
    assert "tar-split" in debug  # the detail, for whoever asks


def test_sizes_are_printed_once_in_human_units(gd: GD) -> None:
    if gd.driver != "overlay":
        pytest.skip("size limits are the overlay driver's")
    err = gd.fails("create", "t", "--rw", "--size", "1M")
    if "NotSupported" in err:
        pytest.skip(err)
    assert err.endswith("a size limit of 1 MiB is below the minimum of 8 MiB for a layer quota")
    assert "1048576" not in err and "8388608" not in err


def test_size_8m_holds_8_mib_of_file_data(gd: GD) -> None:
    if gd.driver != "overlay":
        pytest.skip("size limits are the overlay driver's")
    proc = gd.run("create", "q", "--rw", "--size", "8M", ok=False)
    if b"NotSupported" in proc.stderr:
        pytest.skip(proc.stderr.decode().strip())
    assert proc.returncode == 0, proc.stderr
    root = Path(gd.out("mount", "q").strip())
    try:
        (root / "eight").write_bytes(b"\1" * (8 * MiB))
        os.sync()
        (root / "eight").unlink()
        os.sync()
        with pytest.raises(OSError, match="No space left"), open(root / "nine", "wb") as f:
            f.write(b"\1" * (9 * MiB))
            f.flush()
            os.fsync(f.fileno())
    finally:
        gd.run("unmount", "q")


def test_permission_denied_says_what_to_do(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run as another user")
    root = tmp_path / "root"
    command("--root", str(root), "--runroot", str(tmp_path / "run"), "--driver", "vfs",
            "create", "a")
    os.chmod(tmp_path, 0o755)
    src = Path(__file__).resolve().parents[2] / "src"
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-S",
         "-m", "graphdriver", "--root", str(root), "--runroot", str(tmp_path / "run"),
         "--driver", "vfs", "ls"],
        capture_output=True, timeout=60, env={"PYTHONPATH": str(src), "HOME": "/"})
    err = proc.stderr.decode()
    if "No module named" in err:
        pytest.skip(f"the package is not readable by nobody: {err.strip()}")
    assert proc.returncode == 1, err
    assert err.startswith("graphdriver: PermissionDenied: permission denied: "), err
    assert err.endswith("(graphdriver needs root, or a user namespace: see README)\n"), err
    assert "NotSupported" not in err and err.count("\n") == 1


def test_windowsfilter_names_dot_prefixed_entries(tmp_path: Path) -> None:
    import io
    import tarfile

    def tar(*names: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in names:
                info = tarfile.TarInfo(name)
                data = b"" if name.endswith("/") else b"hi\n"
                info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    g = GD(tmp_path / "root", tmp_path / "run", "windowsfilter")
    proc = g.run("create", "w", ok=False)
    if proc.returncode != 0:
        pytest.skip(proc.stderr.decode().strip())
    err = g.fails("apply", "w", "-", input=tar("./", "./Files/", "./Files/a"))
    assert "entry './'" in err and "Files/, Hives/ and UtilityVM/" in err
    err = g.fails("apply", "w", "-", input=tar("./etc/", "./etc/passwd"))
    assert "entry './etc/'" in err and "outside Files/" in err
    assert g.out("apply", "w", "-", input=tar("Files/", "Files/a")).strip() == "3"  # from stdin
