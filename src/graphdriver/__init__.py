"""graphdriver: container-layer storage (Docker's graph drivers) as a Python library.

    from graphdriver import open_driver
    d = open_driver("overlay", "/var/lib/graphdriver")
    d.create("base"); d.apply_diff("base", None, open("layer.tar", "rb"))
    with d.mounted("base") as root: ...

The names below are imported on first use (PEP 562), so that ``import graphdriver`` -- and the
``graphdriver`` command, and the confined apply child -- start without loading every module.
"""

from __future__ import annotations

#: ``typing.TYPE_CHECKING`` for the package's modules, without importing typing (start-up time):
#: ``from . import TYPE_CHECKING``.  Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from .archive.changes import Change, ChangeKind
    from .driver import CreateOpts, DiffGetter, Driver, mounted
    from .errors import (
        AlreadyExists,
        GraphDriverError,
        InUse,
        InvalidArchive,
        InvalidArgument,
        NoSpace,
        NotFound,
        NotSupported,
        StoreCorrupt,
        UnsafeArchive,
    )
    from .idmap import IDMap
    from .images.store import ImageStore
    from .registry import open_driver

__version__ = "0.1.0"

_LAZY = {
    "Change": "archive.changes",
    "ChangeKind": "archive.changes",
    "CreateOpts": "driver",
    "DiffGetter": "driver",
    "Driver": "driver",
    "mounted": "driver",
    "AlreadyExists": "errors",
    "GraphDriverError": "errors",
    "InUse": "errors",
    "InvalidArchive": "errors",
    "InvalidArgument": "errors",
    "NoSpace": "errors",
    "NotFound": "errors",
    "NotSupported": "errors",
    "StoreCorrupt": "errors",
    "UnsafeArchive": "errors",
    "IDMap": "idmap",
    "ImageStore": "images.store",
    "open_driver": "registry",
}

__all__ = [
    "AlreadyExists",
    "Change",
    "ChangeKind",
    "CreateOpts",
    "DiffGetter",
    "Driver",
    "GraphDriverError",
    "IDMap",
    "ImageStore",
    "InUse",
    "InvalidArchive",
    "InvalidArgument",
    "NoSpace",
    "NotFound",
    "NotSupported",
    "StoreCorrupt",
    "UnsafeArchive",
    "mounted",
    "open_driver",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphdriver' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
