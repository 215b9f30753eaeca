"""Which drivers exist and which one a root uses (moby's graphdriver.New rules).

Drivers register a name, a factory, a priority and their layout directory.  One rule says which
driver a home belongs to (:func:`drivers_using`, also the plugin's): ``open_driver(None, root)``
picks the driver whose home in the root already holds its layers (two such homes: the caller must
choose), else the first driver in priority order that works here.  A driver that raises
``NotSupported`` is skipped; any other error while opening is fatal.
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

    __slots__ = ("layout", "module", "name", "priority")

    def __init__(self, name: str, module: str, priority: int, layout: str | None) -> None:
        self.name = name
        self.module = module  # imported on first use, so the command starts fast
        self.priority = priority  # higher is preferred
        self.layout = layout  # a directory only this driver makes in its home, if any

    def __repr__(self) -> str:
        return (f"Registration(name={self.name!r}, module={self.module!r}, "
                f"priority={self.priority!r}, layout={self.layout!r})")


_REGISTRY: dict[str, Registration] = {}


def register(name: str, module: str, priority: int, layout: str | None = None) -> None:
    _REGISTRY[name] = Registration(name, module, priority, layout)


register("overlay", "graphdriver.drivers.overlay", 100, "l")  # overlay2's short links
register("vfs", "graphdriver.drivers.vfs", 10, "dir")
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


def _holds_layers(home: Path) -> bool:
    meta = home / "meta"
    try:
        return any(not n.startswith(".") for n in os.listdir(meta))
    except (FileNotFoundError, NotADirectoryError):
        return False


def drivers_using(home_of: Callable[[str], Path], candidates: list[str] | None = None) -> list[str]:
    """The drivers (of *candidates*, default all; priority order) whose home already holds their
    layers: a layer record in ``meta/`` and no other driver's layout directory (overlay's ``l/``,
    vfs's ``dir/``) beside it.

    ``home_of(name)`` is where that driver's home would be: ``root / name`` for a store root,
    the same directory for every name for a plugin's ``Init`` home.
    """
    out = []
    for name in candidates if candidates is not None else names():
        home = home_of(name)
        others = (r.layout for r in _REGISTRY.values() if r.name != name and r.layout)
        if _holds_layers(home) and not any((home / other).is_dir() for other in others):
            out.append(name)
    return out


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
    used = drivers_using(lambda n: root / n)
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
