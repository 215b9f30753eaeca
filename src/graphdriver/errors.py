"""One exception hierarchy for everything graphdriver raises.

Every failure a user can cause (a bad id, a missing layer, a hostile archive, a full disk) is one
of these; the command prints it as a single line and exits non-zero.  ``exit_code`` is what the
command uses.
"""

from __future__ import annotations

import errno as _errno


class GraphDriverError(Exception):
    """Base of every error graphdriver raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:
        text = super().__str__()
        # One line, always: a message with embedded newlines would break the CLI contract.
        return " ".join(text.split()) if "\n" in text else text


class NotFound(GraphDriverError):
    """A layer, a parent or a file that should exist does not."""


class AlreadyExists(GraphDriverError):
    """A layer with that id exists already."""


class InvalidArgument(GraphDriverError):
    """A malformed id, option, size or call."""

    exit_code = 2


class InUse(GraphDriverError):
    """The layer is mounted or has children."""


class UnsafeArchive(GraphDriverError):
    """An archive tried to write, link or delete outside its layer, or to store what it must not."""


class InvalidArchive(GraphDriverError):
    """An archive that is not a readable tar (truncated, corrupt, bad checksum, absurd sizes)."""


class NotSupported(GraphDriverError):
    """This driver or feature cannot work here (kernel, filesystem, privileges)."""


class StoreCorrupt(GraphDriverError):
    """On-disk state that repair cannot explain."""


class NoSpace(GraphDriverError):
    """The filesystem or the layer's quota is full."""


class RegistryError(GraphDriverError):
    """A registry could not be reached, refused a request or answered something unusable."""


class Unauthorized(RegistryError):
    """A registry answered 401 or 403: credentials missing, wrong or insufficient."""


class Interrupted(GraphDriverError):
    """SIGINT or SIGTERM arrived; the operation was rolled back."""

    exit_code = 130


def from_oserror(exc: OSError, what: str) -> GraphDriverError:
    """Turn an OSError met while doing *what* into the matching graphdriver error."""
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    msg = f"{what}: {reason}{where}"
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return NoSpace(msg)
    if exc.errno == _errno.ENOENT:
        return NotFound(msg)
    if exc.errno == _errno.EEXIST:
        return AlreadyExists(msg)
    if exc.errno in (_errno.EBUSY,):
        return InUse(msg)
    if exc.errno in (_errno.EPERM, _errno.EACCES, _errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.ENODEV):
        return NotSupported(msg)
    return GraphDriverError(msg)
