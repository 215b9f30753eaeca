"""The import rules of ARCHITECTURE.md, checked on the source (issue 11, "Done when").

Every module under ``src/graphdriver`` is parsed with :mod:`ast` (nothing is imported) and its
imports become edges of a graph: module-level and function-level imports alike, since a
function-level import is still a dependency (it only runs later).  Imports inside an
``if TYPE_CHECKING:`` block are left out: they never run, exist only for annotations, and are the
standard way to name a type without a run-time dependency -- counting them would forbid the
annotations that document a call across packages.

Checked: no import cycle; nothing under ``archive/`` imports ``drivers/``, ``store``, ``cli``,
``plugin`` or the package root; no module imports another module's ``_private`` name, neither with
``from m import _name`` nor as ``m._name`` on an imported module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "graphdriver"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: known violations outside the archive package, each being removed by the helper named
#: (issue 11): (importing module, private name) -> owner.  The lead empties this after merging.
KNOWN_PRIVATE: dict[tuple[str, str], str] = {}

#: the "module" of a private attribute read on an object whose class lives in another module
OBJECT = "<an object of another module>"

ARCHIVE_FORBIDDEN = ("graphdriver.drivers", "graphdriver.store", "graphdriver.cli",
                     "graphdriver.plugin")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)  # modules this one imports (run time)
    #: (module, name) for every ``from m import _name`` and ``m._name`` on an imported module
    private_uses: set[tuple[str, str]] = field(default_factory=set)
    #: the private names this module defines (functions, classes, attributes it assigns)
    own: set[str] = field(default_factory=set)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _resolve(mod: Module, level: int, target: str | None) -> str:
    """The absolute module a ``from`` import names (``level`` dots, then ``target``)."""
    if level == 0:
        return target or ""
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, minus the bodies of ``if TYPE_CHECKING:`` (their ``else`` branches kept)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _parse(path: Path, known: set[str]) -> Module:
    name, is_package = _module_name(path)
    mod = Module(name, path, is_package)
    tree = ast.parse(path.read_bytes(), str(path))
    aliases: dict[str, str] = {}  # local name -> module it is bound to
    nodes = list(_runtime_nodes(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                mod.imports.add(alias.name)
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node.level, node.module)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # ``from . import tarstream``: the submodule itself
                    mod.imports.add(sub)
                    aliases[alias.asname or alias.name] = sub
                    continue
                mod.imports.add(base)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    mod.private_uses.add((base, alias.name))
    own = mod.own = _own_private_names(tree)
    outside = {a.asname or a.name.split(".")[0] for n in nodes
               if isinstance(n, ast.Import | ast.ImportFrom)
               and not (isinstance(n, ast.ImportFrom) and n.level)
               for a in n.names
               if ((n.module if isinstance(n, ast.ImportFrom) else a.name) or "").split(".")[0]
               != PACKAGE}
    for node in nodes:
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in aliases:  # ``ts._native_create``
            mod.private_uses.add((aliases[base.id], node.attr))
        elif isinstance(base, ast.Name) and base.id in ("self", "cls", *outside):
            continue  # its own object, or another library's module (``os._exit``)
        elif node.attr not in own:  # ``driver._resolve_parent``: defined in another module
            mod.private_uses.add((OBJECT, node.attr))
    return mod


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_private_names(tree: ast.AST) -> set[str]:
    """The private names a module defines itself: functions, classes, and attributes it assigns
    (``self._x = ...``, ``_x: int``), which its own code may use on any object of its classes."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
    return {n for n in own if _private(n)}


def _modules() -> dict[str, Module]:
    paths = sorted(SRC.rglob("*.py"))
    known = {_module_name(p)[0] for p in paths}
    return {m.name: m for m in (_parse(p, known) for p in paths)}


MODULES = _modules()


def _edges(mod: Module) -> set[str]:
    """Imported modules that exist here, the package root's implicit import aside (importing
    ``graphdriver.x`` runs ``graphdriver/__init__`` first, whoever asks: not an edge)."""
    return {m for m in mod.imports if m in MODULES and m != mod.name}


def _cycle() -> list[str] | None:
    """One import cycle, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(MODULES):
        if state.get(start):
            continue
        path = [start]
        state[start] = 1
        iters = [iter(sorted(_edges(MODULES[start])))]
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(_edges(MODULES[nxt]))))
    return None


def test_the_walker_sees_the_package() -> None:
    # the test can fail: it finds what it must find
    assert "graphdriver.archive.apply" in MODULES
    assert "graphdriver.archive.tarstream" in _edges(MODULES["graphdriver.archive.apply"])
    assert "graphdriver.errors" in _edges(MODULES["graphdriver.archive.apply"])


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_archive_imports_nothing_above_it() -> None:
    bad = sorted(
        f"{m.name} imports {target}"
        for m in MODULES.values() if m.name.startswith(f"{PACKAGE}.archive")
        for target in m.imports
        if target == PACKAGE or target.startswith(ARCHIVE_FORBIDDEN))
    assert not bad, "; ".join(bad)


def _private_violations() -> list[tuple[str, str, str]]:
    """Private names of graphdriver modules used from another one.  A private attribute read on
    an object counts when another graphdriver module defines that name (``driver._x``); one
    that no graphdriver module defines is a library's own business (argparse's ``_actions``)."""
    out = []
    for m in MODULES.values():
        for target, name in m.private_uses:
            if target == OBJECT and not any(name in o.own for o in MODULES.values()
                                            if o.name != m.name):
                continue
            if target != m.name and (target in MODULES or target == OBJECT):
                out.append((m.name, target, name))
    return sorted(out)


def _owner(v: tuple[str, str, str]) -> str | None:
    return KNOWN_PRIVATE.get((v[0], v[2]))


def test_no_private_name_of_another_module_inside_archive() -> None:
    bad = [v for v in _private_violations() if v[0].startswith(f"{PACKAGE}.archive")]
    assert not bad, "; ".join(f"{a} uses {b}.{n}" for a, b, n in bad)


def test_no_private_name_of_another_module_unowned() -> None:
    bad = [v for v in _private_violations() if _owner(v) is None]
    assert not bad, "; ".join(f"{a} uses {b}.{n}" for a, b, n in bad)


def test_no_private_name_of_another_module_at_all() -> None:
    bad = _private_violations()
    assert not bad, "; ".join(f"{a} uses {b}.{n}" for a, b, n in bad)
