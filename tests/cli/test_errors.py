"""The error classes (issue 16): each is also the builtin a Python caller expects, errno maps to
the class a user can act on, and no re-raise drops its cause."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from graphdriver import errors
from graphdriver.errors import from_oserror

SRC = Path(__file__).resolve().parents[2] / "src" / "graphdriver"


@pytest.mark.parametrize(("cls", "builtin"), [
    (errors.NotFound, LookupError),
    (errors.ExactDiffUnavailable, LookupError),
    (errors.InvalidArgument, ValueError),
    (errors.PermissionDenied, PermissionError),
    (errors.NoSpace, OSError),
    (errors.AlreadyExists, FileExistsError),
    (errors.InUse, RuntimeError),
    (errors.NotSupported, NotImplementedError),
])
def test_errors_are_the_matching_builtins(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, errors.GraphDriverError) and issubclass(cls, builtin)
    err = cls("one line\nnot two")
    assert str(err) == "one line not two"


@pytest.mark.parametrize(("code", "cls"), [
    (errno.ENOENT, errors.NotFound), (errno.ENOSPC, errors.NoSpace),
    (errno.EDQUOT, errors.NoSpace), (errno.EEXIST, errors.AlreadyExists),
    (errno.EBUSY, errors.InUse), (errno.EACCES, errors.PermissionDenied),
    (errno.EPERM, errors.PermissionDenied), (errno.EOPNOTSUPP, errors.NotSupported),
    (errno.EISDIR, errors.InvalidArgument), (errno.EIO, errors.GraphDriverError),
])
def test_from_oserror(code: int, cls: type[Exception]) -> None:
    err = from_oserror(OSError(code, "reason", "/some/path"), "doing it")
    assert type(err) is cls
    assert "/some/path" in str(err)


def test_permission_denied_says_what_to_do() -> None:
    err = from_oserror(PermissionError(errno.EACCES, "Permission denied", "/var/lib/x"), "ls")
    assert str(err) == ("permission denied: ls (/var/lib/x) (graphdriver needs root, or a user "
                        "namespace: see README)")


def test_a_path_is_named_once() -> None:
    err = from_oserror(FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b.tar"),
                       "/a/b.tar")
    assert str(err) == "/a/b.tar: No such file or directory"


def _handlers_dropping_causes(tree: ast.AST) -> list[int]:
    """Lines of ``raise ... from None`` directly inside an except clause."""
    found = []

    def visit(node: ast.AST, in_handler: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_handler = False
        if isinstance(node, ast.ExceptHandler):
            in_handler = True
        if (in_handler and isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant)
                and node.cause.value is None):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_handler)

    visit(tree, False)
    return found


def test_no_re_raise_drops_its_cause() -> None:
    dropped = {str(p.relative_to(SRC)): lines for p in sorted(SRC.rglob("*.py"))
               if (lines := _handlers_dropping_causes(ast.parse(p.read_text())))}
    assert dropped == {}, "raise ... from exc keeps the cause; from None drops it"
