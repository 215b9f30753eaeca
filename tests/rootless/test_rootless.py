"""graphdriver as an ordinary user (DESIGN.md rule 7, issue 16 "Rootless"): a real unprivileged
user runs separate commands — the store's persistent user and mount namespace (``graphdriver
unshare``), ``mount`` refused outside it, files of other owners through subordinate ids,
``user.overlay.*`` where root has ``trusted.overlay.*``, XDG defaults, ``--size`` refused — and
the conformance suite for vfs and overlay inside ``graphdriver unshare``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rootless.conftest import REPO, User
from tests.treeutil import TarBuilder

SUBORDINATE = "/etc/subuid"


def _subordinate_start(user: User) -> int:
    for line in Path(SUBORDINATE).read_text().splitlines():
        name, start, _count = line.split(":")
        if name == user.name:
            return int(start)
    raise AssertionError(f"{user.name} has no subordinate ids")


def test_defaults_follow_xdg(user: User) -> None:
    user.gd_ok("create", "first")  # the default root, under ~/.local/share
    out = json.loads(user.gd_ok("--json", "status"))
    home = user.home / ".local/share/graphdriver" / out["driver"]
    assert out["home"] == str(home)
    marker = json.loads((home / ".graphdriver-store").read_text())
    assert marker["xattr_namespace"] == "user"
    pid = int((user.runtime / "graphdriver/userns/pause.pid").read_text())
    assert os.stat(f"/proc/{pid}").st_uid == user.uid
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")


def test_mount_lives_in_unshare(user: User) -> None:
    root = f"{user.home}/mounting"
    gd = ("--root", root, "--driver", "overlay")
    base = (TarBuilder().dir("etc").file("etc/hello", b"hi\n", uid=1000, gid=1000)
            .file("keep", b"kept\n").dir("opq").file("opq/old", b"old\n").bytes())
    app = TarBuilder().whiteout("etc/hello").dir("opq").opaque("opq").file("opq/new", b"n\n")
    user.gd_ok(*gd, "import", "base", str(user.give(user.home / "base.tar", base)))
    user.gd_ok(*gd, "import", "app", "--parent", "base",
               str(user.give(user.home / "app.tar", app.bytes())))
    home = Path(root) / "overlay"
    # other owners land through the subordinate ids; overlay's own xattrs are user.overlay.*
    assert (home / "base/diff/etc/hello").stat().st_uid == _subordinate_start(user) + 999
    assert os.getxattr(home / "app/diff/opq", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(home / "app/diff/opq")
    st = os.lstat(home / "app/diff/etc/hello")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    user.gd_ok(*gd, "create", "ctr", "--parent", "app", "--rw")
    refused = user.gd(*gd, "mount", "ctr")
    assert refused.returncode == 1
    assert refused.stderr.decode().count("\n") == 1
    assert "graphdriver unshare" in refused.stderr.decode()

    path = user.gd_ok(*gd, "unshare", user.python, "-m", "graphdriver", *gd, "mount",
                      "ctr").strip()
    seen = user.gd(*gd, "unshare", "sh", "-c",
                   f'cat "{path}/keep"; ls "{path}/opq"; test ! -e "{path}/etc/hello" && '
                   f'echo new > "{path}/new" && echo wrote')
    assert seen.returncode == 0, seen.stderr.decode()
    assert seen.stdout.decode().split() == ["kept", "new", "wrote"]
    assert "A /new" in user.gd_ok(*gd, "changes", "ctr").splitlines()
    user.gd_ok(*gd, "unmount", "ctr")
    gone = user.gd(*gd, "unshare", "test", "-e", f"{path}/keep")
    assert gone.returncode == 1  # unmounted in the namespace, by a command run outside it
    user.gd_ok(*gd, "rm", "ctr", "app", "base")


def test_user_overlay_xattr_from_tar_refused(user: User) -> None:
    root = f"{user.home}/xattrs"
    bad = TarBuilder().dir("d", pax_headers={"SCHILY.xattr.user.overlay.opaque": "y"}).bytes()
    proc = user.gd("--root", root, "--driver", "overlay", "import", "bad",
                   str(user.give(user.home / "bad.tar", bad)))
    assert proc.returncode == 1
    assert "UnsafeArchive" in proc.stderr.decode() and "user.overlay.opaque" in proc.stderr.decode()
    assert user.gd("--root", root, "exists", "bad").returncode == 1


@pytest.mark.parametrize("driver", ["overlay", "vfs"])
def test_size_not_supported_rootless(user: User, driver: str) -> None:
    proc = user.gd("--root", f"{user.home}/sized-{driver}", "--driver", driver, "create", "q",
                   "--rw", "--size", "64M")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "NotSupported" in err, err


def test_runroot_without_xdg_runtime_dir(user: User) -> None:
    proc = user.gd("--root", f"{user.home}/noxdg", "--driver", "vfs", "create", "x",
                   unset=("XDG_RUNTIME_DIR",))
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"XDG_RUNTIME_DIR is not set: the run root is /tmp/graphdriver-run-{user.uid}" \
        in proc.stderr.decode()
    private = Path(f"/tmp/graphdriver-run-{user.uid}")
    st = private.stat()
    assert st.st_uid == user.uid and stat.S_IMODE(st.st_mode) == 0o700


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_conformance_suite_as_user(user: User, driver: str) -> None:
    basetemp = user.home / f"pytest-{driver}"
    proc = user.gd("unshare", user.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "--rootdir", str(REPO), "--basetemp", str(basetemp), "-k", driver,
                   str(REPO / "tests/conformance"), timeout=900)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out[-3000:] + proc.stderr.decode()[-2000:]
    assert " passed" in out and " failed" not in out  # (an expected failure says "xfailed")


def test_without_subordinate_ids_files_become_the_users(user_without_subids: User) -> None:
    u = user_without_subids
    root = f"{u.home}/store"
    tar = TarBuilder().dir("etc", uid=1000, gid=1000).file("etc/a", b"a", uid=1000, gid=1000)
    proc = u.gd("--root", root, "--driver", "vfs", "import", "base",
                str(u.give(u.home / "base.tar", tar.bytes())))
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "only your own id is mapped" in err and "stored as yours" in err
    assert (Path(root) / "vfs/dir/base/etc/a").stat().st_uid == u.uid
    again = u.gd("--root", root, "exists", "base")  # the namespace is made once: warned once
    assert again.returncode == 0 and "only your own id" not in again.stderr.decode()


def test_roots_overlay_store_refused_in_one_line(user: User) -> None:
    root = user.home / "roots"
    made = subprocess.run([sys.executable, "-m", "graphdriver", "--root", str(root), "--runroot",
                           str(user.home / "roots-run"), "--driver", "overlay", "create", "a"],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"overlay does not work here as root: {made.stderr.strip()}")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    proc = user.gd("--root", str(root), "--driver", "overlay", "ls")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert "NotSupported" in err and "made by root" in err
