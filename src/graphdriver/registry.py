"""Which drivers exist and which one a root uses (moby's graphdriver.New rules).

Drivers register a name, a factory and a priority.  ``open_driver(None, root)`` picks the driver
whose home in the root already holds layers (two such homes: the caller must choose), else the
first driver in priority order that works here.  A driver that raises ``NotSupported`` is skipped;
any other error while opening is fatal.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from . import TYPE_CHECKING
from .errors import InvalidArgument, NotSupported
from .idmap import IDENTITY, IDMap

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Factory = Callable[..., Any]


class Registration:
    """One registered driver (a plain class: dataclasses costs start-up time)."""

    __slots__ = ("module", "name", "priority")

    def __init__(self, name: str, module: str, priority: int) -> None:
        self.name = name
        self.module = module  # imported on first use, so the command starts fast
        self.priority = priority  # higher is preferred

    def __repr__(self) -> str:
        return (f"Registration(name={self.name!r}, module={self.module!r}, "
                f"priority={self.priority!r})")


_REGISTRY: dict[str, Registration] = {}


def register(name: str, module: str, priority: int) -> None:
    _REGISTRY[name] = Registration(name, module, priority)


register("overlay", "graphdriver.drivers.overlay", 100)
register("vfs", "graphdriver.drivers.vfs", 10)
register("windowsfilter", "graphdriver.drivers.windowsfilter", 0)  # never auto-selected


#: other names of registered drivers (Docker calls overlay "overlay2")
ALIASES = {"overlay2": "overlay"}


def names() -> list[str]:
    return [r.name for r in sorted(_REGISTRY.values(), key=lambda r: -r.priority)]


def driver_class(name: str) -> Any:
    reg = _REGISTRY.get(ALIASES.get(name, name))
    if reg is None:
        raise InvalidArgument(f"unknown driver {name!r} (known: {', '.join(names())})")
    try:
        module = importlib.import_module(reg.module)
    except ModuleNotFoundError as exc:
        if exc.name == reg.module:
            raise NotSupported(f"driver {name} is not built into this graphdriver") from exc
        raise
    return module.DRIVER


def _home_in_use(home: Path) -> bool:
    meta = home / "meta"
    try:
        return any(not n.startswith(".") for n in os.listdir(meta))
    except (FileNotFoundError, NotADirectoryError):
        return False


def open_driver(
    name: str | None,
    root: str | os.PathLike[str],
    options: dict[str, str] | None = None,
    idmap: IDMap = IDENTITY,
    runroot: str | os.PathLike[str] | None = None,
) -> Any:
    """Open the store of driver ``name`` (or the one this root uses) under ``root/<name>``."""
    root = Path(root)
    run = Path(runroot) if runroot else None
    if name:
        name = ALIASES.get(name, name)
        return driver_class(name)(root / name, options, idmap, run)
    used = [n for n in names() if _home_in_use(root / n)]
    if len(used) > 1:
        raise InvalidArgument(
            f"{root} has layers of several drivers ({', '.join(used)}): choose one with --driver"
        )
    if used:
        return driver_class(used[0])(root / used[0], options, idmap, run)
    reasons = []
    for candidate in names():
        if _REGISTRY[candidate].priority <= 0:
            continue
        try:
            return driver_class(candidate)(root / candidate, options, idmap, run)
        except NotSupported as exc:
            reasons.append(f"{candidate}: {exc}")
    raise NotSupported("no driver works here: " + "; ".join(reasons))
