"""The optional compiled helpers of the tar engine: ``graphdriver._fastapply`` (apply: headers,
runs of plain entries, tar-split frames and lines, the after-apply check),
``graphdriver._fastexport`` (export) and ``graphdriver._fastdigest`` (the diffID's sha256 thread).

:func:`native_module` is the one place that decides whether they are used: when built, unless
``GRAPHDRIVER_NO_NATIVE`` is set (non-empty).  Without them the pure-Python code does the same
work, byte for byte (the tests compare both paths).  Imports nothing from graphdriver (the
package root included), nor typing or importlib (the confined child's start-up).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from types import ModuleType


def import_module(name: str) -> ModuleType:
    """The module named *name* (absolute), imported: importlib.import_module's work for an
    absolute name, without importlib (the confined child's start-up)."""
    __import__(name)
    return sys.modules[name]


def native_module(name: str) -> ModuleType | None:
    """``graphdriver.<name>`` if it is built and allowed, else None."""
    if os.environ.get("GRAPHDRIVER_NO_NATIVE"):
        return None
    try:
        return import_module(f"graphdriver.{name}")
    except ImportError:  # not compiled: the pure-Python code does everything
        return None
