"""graphdriver: container-layer storage (Docker's graph drivers) as a Python library.

    from graphdriver import open_driver
    d = open_driver("overlay", "/var/lib/graphdriver")
    d.create("base"); d.apply_diff("base", None, open("layer.tar", "rb"))
    with d.mounted("base") as root: ...
"""

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
from .registry import open_driver

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "Change",
    "ChangeKind",
    "CreateOpts",
    "DiffGetter",
    "Driver",
    "GraphDriverError",
    "IDMap",
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
