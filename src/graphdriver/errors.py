"""One exception hierarchy for everything graphdriver raises.

Every failure a user can cause (a bad id, a missing layer, a hostile archive, a full disk) is one
of these; the command prints it as a single line and exits non-zero.  ``exit_code`` is what the
command uses.  Each class also derives from the builtin a Python caller would expect
(``NotFound`` is a ``LookupError``, ``NoSpace`` an ``OSError``, ...), so ``except LookupError``
works too.

Imports nothing of graphdriver (every module imports this one).
"""

from __future__ import annotations

import errno as _errno
import os


class GraphDriverError(Exception):
    """Base of every error graphdriver raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:
        text = super().__str__()
        # One line, always: a message with embedded newlines would break the CLI contract.
        return " ".join(text.split()) if "\n" in text else text


class NotFound(GraphDriverError, LookupError):
    """A layer, a parent or a file that should exist does not."""


class ExactDiffUnavailable(NotFound):
    """The tar applied to a layer cannot be reproduced byte for byte (``diff --exact``); a plain
    diff still works."""


class AlreadyExists(GraphDriverError, FileExistsError):
    """A layer with that id exists already."""


class InvalidArgument(GraphDriverError, ValueError):
    """A malformed id, option, size or call."""

    exit_code = 2


class InUse(GraphDriverError, RuntimeError):
    """The layer is mounted or has children."""


class UnsafeArchive(GraphDriverError, ValueError):
    """An archive tried to write, link or delete outside its layer, or to store what it must not."""


class InvalidArchive(GraphDriverError, ValueError):
    """An archive that is not a readable tar (truncated, corrupt, bad checksum, absurd sizes)."""


class NotSupported(GraphDriverError, NotImplementedError):
    """This driver or feature cannot work here (kernel, filesystem)."""


class PermissionDenied(GraphDriverError, PermissionError):
    """The operation needs privileges this process does not have (EACCES, EPERM)."""


class StoreCorrupt(GraphDriverError):
    """On-disk state that repair cannot explain."""


class NoSpace(GraphDriverError, OSError):
    """The filesystem or the layer's quota is full."""


class RegistryError(GraphDriverError):
    """A registry could not be reached, refused a request or answered something unusable."""


class Unauthorized(RegistryError):
    """A registry answered 401 or 403: credentials missing, wrong or insufficient."""


class Interrupted(GraphDriverError):
    """SIGINT or SIGTERM arrived; the operation was rolled back."""

    exit_code = 130


#: what a PermissionDenied message ends with: what the user can do about it
PERMISSION_HINT = "graphdriver needs root, or a user namespace: see README"


def from_oserror(exc: OSError, what: str) -> GraphDriverError:
    """Turn an OSError met while doing *what* into the matching graphdriver error.

    The caller raises it ``from exc``, so the original error stays attached as the cause.
    """
    if isinstance(exc, GraphDriverError):
        return exc
    reason = exc.strerror or str(exc)
    named = exc.filename is not None and os.fsdecode(exc.filename) in what
    where = f" ({exc.filename})" if exc.filename and not named else ""
    msg = f"{what}: {reason}{where}"
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return NoSpace(msg)
    if exc.errno == _errno.ENOENT:
        return NotFound(msg)
    if exc.errno == _errno.EEXIST:
        return AlreadyExists(msg)
    if exc.errno in (_errno.EBUSY,):
        return InUse(msg)
    if exc.errno == _errno.EISDIR:
        return InvalidArgument(f"{what}: {exc.filename or 'the path'} is a directory")
    if exc.errno in (_errno.EPERM, _errno.EACCES):
        return PermissionDenied(f"permission denied: {what}{where} ({PERMISSION_HINT})")
    if exc.errno in (_errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.ENODEV):
        return NotSupported(msg)
    return GraphDriverError(msg)


class NotAStore(GraphDriverError):
    """A home that graphdriver did not make and cannot adopt (it holds someone else's files)."""

    exit_code = 2
