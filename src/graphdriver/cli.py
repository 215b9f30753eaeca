"""The ``graphdriver`` command (DESIGN.md "The command").

Owns the command line: the parser (and the fast hand parser of the common command lines), what
each command prints, and how an error becomes one line on stderr and an exit status: 1 for
errors, 2 for bad usage (and for ``exists`` when it cannot tell), 130 when interrupted.  Imports
are lazy so a command starts fast.  It calls drivers through their public methods only and never
imports a driver module (``registry`` picks one); nothing in the package imports it.
"""

from __future__ import annotations

import os
import sys

from . import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    import signal
    from typing import Any
else:
    import _signal as signal  # the same calls, without the enum wrappers (start-up time)

PROG = "graphdriver"

#: commands that only read: on a root that holds no store they say so and create nothing
READ_ONLY = frozenset({"ls", "status", "exists", "inspect", "metadata", "changes", "diff",
                       "diff-size"})


def default_root() -> str:
    env = os.environ.get("GRAPHDRIVER_ROOT")
    if env:
        return env
    from .idmap import real_root

    if real_root():
        return "/var/lib/graphdriver"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return os.path.join(xdg, "graphdriver")


class UsageError(Exception):
    """Bad usage: one line that ends with where the help is."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog  # e.g. "graphdriver ls": the --help to point at

    def line(self) -> str:
        return f"{PROG}: usage error: {self}; see {self.prog} --help"


def _parser_class() -> type[argparse.ArgumentParser]:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("allow_abbrev", False)  # --ro is not --root
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
            super().__init__(*args, **kwargs)

        def error(self, message: str) -> Any:  # one line, exit 2
            raise UsageError(message, self.prog)

    return _Parser


def _storage_opt(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        import argparse

        raise argparse.ArgumentTypeError(f"storage option {text!r} is not KEY=VALUE")
    return key, value


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from . import __version__

    _Parser = _parser_class()
    common = _Parser(add_help=False)
    g = common.add_argument_group("store")
    g.add_argument("--root", default=argparse.SUPPRESS, metavar="DIR", help="store root "
                   "(default: $GRAPHDRIVER_ROOT, /var/lib/graphdriver as root, else "
                   "$XDG_DATA_HOME/graphdriver)")
    g.add_argument("--runroot", default=argparse.SUPPRESS, metavar="DIR",
                   help="run root for mount counts (default /run/graphdriver as root, else "
                   "$XDG_RUNTIME_DIR/graphdriver)")
    g.add_argument("--driver", "-s", default=argparse.SUPPRESS, metavar="NAME",
                   help="overlay (also overlay2), vfs or windowsfilter (default: the one this "
                   "root uses, else the best that works here)")
    g.add_argument("--storage-opt", action="append", type=_storage_opt, default=argparse.SUPPRESS,
                   metavar="K=V", help="driver option, e.g. size=10G (repeatable)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="log every mount, unmount, removal and repair to stderr")

    p = _Parser(prog=PROG, parents=[common],
                description="Container layer storage: Docker's graph drivers as a command.",
                epilog=_examples("graphdriver create base && graphdriver apply base rootfs.tar.gz",
                                 "graphdriver ls --tree",
                                 "graphdriver COMMAND --help"))
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                           help="what to do (graphdriver COMMAND --help: its arguments)")
    sub.required = True

    def cmd(name: str, help_: str, *examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[common], description=help_,
                              epilog=_examples(*examples) if examples else None)

    def layer_id(parser: argparse.ArgumentParser, what: str = "the layer") -> None:
        parser.add_argument("id", metavar="ID", help=what)

    def parent_opt(parser: argparse.ArgumentParser, what: str) -> None:
        parser.add_argument("--parent", "-p", default=None, metavar="P", help=what)

    cmd("status", "driver status: name, home, backing filesystem, layer count",
        "graphdriver status", "graphdriver --json status")
    c = cmd("create", "create an empty layer", "graphdriver create base",
            "graphdriver create app --parent base",
            "graphdriver create ctr --parent app --rw --size 10G")
    layer_id(c, "the new layer's id")
    parent_opt(c, "the layer it is made on (default: none, a base layer)")
    c.add_argument("--image", default=None, metavar="REF",
                   help="a --rw layer on top of this image (excludes --parent)")
    c.add_argument("--rw", action="store_true", help="a writable (container) layer")
    c.add_argument("--size", default=None, metavar="SIZE",
                   help="size limit of a --rw layer, e.g. 10G (at least 8M)")
    c.add_argument("--mount-label", default="", metavar="LABEL", help="SELinux mount label")
    im = cmd("import", "create a layer and apply a layer tar to it, as one step (a failed "
             "apply removes the new layer)", "graphdriver import base rootfs.tar.gz",
             "curl -sL URL | graphdriver import app --parent base -")
    layer_id(im, "the new layer's id")
    parent_opt(im, "the layer it is made on (default: none)")
    im.add_argument("file", metavar="FILE", help="the layer tar (plain, gzip, zstd, xz, bzip2), "
                    "- for standard input")
    a = cmd("apply", "apply a layer tar (plain, gzip, zstd, xz, bzip2) to a layer; prints the "
            "bytes applied", "graphdriver apply base rootfs.tar.gz",
            "zstd -dc layer.tar.zst | graphdriver apply app -")
    layer_id(a)
    a.add_argument("file", nargs="?", default="-", metavar="FILE",
                   help="the layer tar (default -: standard input, which must not be a terminal)")
    parent_opt(a, "check that the layer's parent is P")
    d = cmd("diff", "write a tar of a layer's changes against its parent",
            "graphdriver diff app -o app.tar", "graphdriver diff app | zstd > app.tar.zst",
            "graphdriver diff --exact app | sha256sum")
    layer_id(d)
    d.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write to FILE (default, or -: standard output, not a terminal)")
    parent_opt(d, "diff against P instead of the layer's parent")
    d.add_argument("--exact", action="store_true",
                   help="the tar that was applied, byte for byte (same sha256)")
    ch = cmd("changes", "list a layer's changes: A (added), C (changed), D (deleted)",
             "graphdriver changes ctr")
    layer_id(ch)
    parent_opt(ch, "compare with P instead of the layer's parent")
    ds = cmd("diff-size", "bytes of a layer's changes", "graphdriver diff-size ctr")
    layer_id(ds)
    parent_opt(ds, "compare with P instead of the layer's parent")
    m = cmd("mount", "mount a layer (reference counted); prints its path",
            "cd \"$(graphdriver mount ctr)\" && ls", "graphdriver unmount ctr")
    layer_id(m)
    m.add_argument("--mount-label", default="", metavar="LABEL", help="SELinux mount label")
    layer_id(cmd("unmount", "drop one mount reference (the last one unmounts)",
                 "graphdriver unmount ctr"))
    r = cmd("rm", "remove layers (children first when several are given)",
            "graphdriver rm ctr", "graphdriver rm app base")
    r.add_argument("ids", nargs="+", metavar="ID", help="the layers")
    e = cmd("exists", "exit 0 if every layer exists, 1 if any is missing (2 on error)",
            "graphdriver exists base && echo present")
    e.add_argument("ids", nargs="+", metavar="ID", help="the layers")
    layer_id(cmd("metadata", "driver facts about a layer (paths, lower layers, ...)",
                 "graphdriver metadata app"))
    ins = cmd("inspect", "the layers' records as a JSON array: created, parents, diffID, size, "
              "limit, whether an exact diff is available, driver facts",
              "graphdriver inspect app", "graphdriver inspect base app | jq '.[].diffID'")
    ins.add_argument("ids", nargs="+", metavar="ID", help="the layers")
    ls = cmd("ls", "list layers: ID, PARENT, KIND (ro/rw), SIZE, CREATED, MOUNTS",
             "graphdriver ls", "graphdriver ls -q", "graphdriver ls --tree",
             "graphdriver ls --format '{{.ID}} {{.Parent}}'",
             "graphdriver ls --format 'table {{.ID}}\\t{{.Size}}'",
             "graphdriver ls --format json")
    ls.add_argument("-q", "--quiet", action="store_true", help="only the ids")
    ls.add_argument("--format", default=None, metavar="F",
                    help="a template of fields ({{.ID}} {{.Parent}} {{.Kind}} {{.Size}} "
                    "{{.Limit}} {{.Created}} {{.CreatedAt}} {{.Mounts}}; 'table ...' adds a "
                    "header), or json (one object a line)")
    ls.add_argument("--tree", action="store_true", help="the layers as a tree of parents")
    cmd("cleanup", "unmount every mount of this store and zero the counts",
        "graphdriver cleanup")
    sv = cmd("serve", "serve Docker's graphdriver plugin protocol on a unix socket",
             "graphdriver serve --name gd  # then: dockerd --storage-driver gd")
    sv.add_argument("--socket", default=None, metavar="PATH",
                    help="socket path (default /run/docker/plugins/NAME.sock)")
    sv.add_argument("--name", default="graphdriver",
                    help="plugin name, as given to dockerd --storage-driver (default graphdriver)")
    co = cmd("completion", "print a shell completion script (bash, zsh, fish)",
             "graphdriver completion bash > /etc/bash_completion.d/graphdriver",
             "graphdriver completion fish > ~/.config/fish/completions/graphdriver.fish")
    co.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell")
    un = cmd("unshare", "run a command (default: your shell) inside the store's user and mount "
             "namespace, where rootless mounts live (Podman's unshare); for ordinary users",
             "graphdriver unshare", "graphdriver unshare sh -c 'ls \"$(graphdriver mount ctr)\"'",
             "graphdriver unshare python -m pytest tests/conformance")
    un.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                    help="the command and its arguments (default: $SHELL)")
    cmd("man", "print the manual page (roff), generated from this parser",
        "graphdriver man > /usr/local/share/man/man1/graphdriver.1",
        "graphdriver man | man -l -")
    cmd("snapshotter", "serve containerd's snapshots service (proxy plugin) on a unix socket",
        "graphdriver --driver overlay snapshotter --address /run/graphdriver/snapshotter.sock"
        ).add_argument("--address", required=True, help="socket path")
    from .images.command import add_parser

    add_parser(sub, [common])
    return p


# The common commands are parsed without argparse (its import and the parser above cost more
# than the rest of an ``exists``).  Only argument lists whose meaning is beyond doubt take this
# path; anything else (help, abbreviations, "--", values that look like options, bad usage) goes
# to argparse, which then says what it always said.  tests/test_startup.py checks that both give
# the same namespace.

# command -> (positionals: 1 for "id", 0 for none, -1 for one or more "ids", 2 for "id" and
# "file" (apply's file may be left out: "-"); its defaults)
_FAST_COMMANDS: dict[str, tuple[int, dict[str, object]]] = {
    "status": (0, {}),
    "ls": (0, {"quiet": False, "format": None, "tree": False}),
    "cleanup": (0, {}),
    "exists": (-1, {}),
    "rm": (-1, {}),
    "unmount": (1, {}),
    "metadata": (1, {}),
    "inspect": (-1, {}),
    "mount": (1, {"mount_label": ""}),
    "changes": (1, {"parent": None}),
    "diff-size": (1, {"parent": None}),
    "create": (1, {"parent": None, "image": None, "rw": False, "size": None, "mount_label": ""}),
    "apply": (2, {"parent": None}),
    "import": (2, {"parent": None}),
}
_FAST_FLAGS = {"--json": "json", "--debug": "debug"}
_FAST_VALUES = {"--root": "root", "--runroot": "runroot", "--driver": "driver", "-s": "driver",
                "--storage-opt": "storage_opt"}
#: flags of one command (after it only)
_FAST_COMMAND_FLAGS = {"ls": {"-q": "quiet", "--quiet": "quiet", "--tree": "tree"}}


class _Args:
    """The parsed command line (what argparse's Namespace would hold)."""

    def __init__(self, **kwargs: object) -> None:
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        return f"_Args({', '.join(f'{k}={v!r}' for k, v in sorted(vars(self).items()))})"


def _fast_parse(argv: list[str]) -> Any:
    """The namespace argparse would build for ``argv``, or None to let argparse decide."""
    before: dict[str, Any] = {}  # global options given before the command
    after: dict[str, Any] = {}  # ... and after it (the subparser's: they win, as in argparse)
    command: str | None = None
    positionals: list[str] = []
    interrupted = False  # an option came after the first id: argparse takes one run of ids
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        opts = before if command is None else after
        interrupted = interrupted or (bool(positionals) and arg[:1] == "-")
        if arg in _FAST_FLAGS:
            opts[_FAST_FLAGS[arg]] = True
            continue
        own = _FAST_COMMAND_FLAGS.get(command or "")
        if own is not None and arg in own:
            opts[own[arg]] = True
            continue
        if arg[:1] != "-":
            if command is None:
                if arg not in _FAST_COMMANDS:
                    return None
                command = arg
            elif interrupted:
                return None  # "exists a --json b": argparse's business (it refuses b)
            else:
                positionals.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if eq and name.startswith("--") and name in _FAST_VALUES:
            pass  # --option=value
        elif not eq and arg in _FAST_VALUES and i < n and argv[i][:1] not in ("-", ""):
            name, value = arg, argv[i]
            i += 1
        else:
            return None  # help, an abbreviation, "--", "-", a missing value, -sVALUE ...
        dest = _FAST_VALUES[name]
        if dest == "storage_opt":
            key, sep, val = value.partition("=")
            if not sep or not key:
                return None  # argparse words the error
            opts.setdefault(dest, []).append((key, val))
        else:
            opts[dest] = value
    if command is None:
        return None
    count, defaults = _FAST_COMMANDS[command]
    if count == 2 and command == "apply" and len(positionals) == 1:
        positionals.append("-")
    if (len(positionals) != count) if count >= 0 else not positionals:
        return None
    # argparse: the subparser's namespace (its defaults, the options after the command, the
    # ids) is copied over the top-level one (the options before it and the command).
    args = _Args(**before)
    args.__dict__.update(command=command, **defaults)
    args.__dict__.update(after)
    if count < 0:
        args.__dict__["ids"] = positionals
    elif positionals:
        args.__dict__["id"] = positionals[0]
        if count == 2:
            args.__dict__["file"] = positionals[1]
    return args


# ----- opening the store --------------------------------------------------------------------


def _store_exists(root: str, driver: str | None) -> bool:
    from .registry import ALIASES, names

    for name in [ALIASES.get(driver, driver)] if driver else names():
        try:
            # EACCES: PermissionDenied, as it is
            entries = [e for e in os.listdir(os.path.join(root, name)) if e != "lost+found"]
        except (FileNotFoundError, NotADirectoryError):
            continue
        if entries:  # a store, or something else the store refuses to open ("not a ... store")
            return True
    return False


def _open(args: argparse.Namespace) -> Any:
    from .registry import open_driver

    root = getattr(args, "root", None) or default_root()
    driver = getattr(args, "driver", None)
    if args.command in READ_ONLY and not _store_exists(root, driver):
        from .errors import NotFound

        which = f" of driver {driver}" if driver else ""
        raise NotFound(f"no graphdriver store{which} at {root}")
    opts: dict[str, str] = {}
    for key, value in getattr(args, "storage_opt", None) or []:
        opts[key] = value
    return open_driver(driver, root, opts, runroot=getattr(args, "runroot", None))


def _print_json(obj: object) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True) + "\n")


# ----- the commands -------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "create" and args.size is not None and not args.rw:
        raise UsageError("--size is only for writable layers: add --rw", f"{PROG} create")
    if command == "ls" and args.tree and args.format is not None:
        raise UsageError("--tree and --format do not go together", f"{PROG} ls")
    if command == "serve":
        from .plugin import serve

        serve(args.socket, args.name, getattr(args, "driver", None), getattr(args, "root", None),
              getattr(args, "runroot", None), dict(getattr(args, "storage_opt", None) or []))
        return 0
    if command == "completion":
        sys.stdout.write(_completion(args.shell))
        return 0
    if command == "man":
        from .manpage import manpage

        sys.stdout.write(manpage(build_parser()))
        return 0
    handler = _COMMANDS.get(command)
    if handler is None and command not in ("unshare", "snapshotter", "image"):
        raise UsageError(f"unknown command {command!r}")
    _enter_namespace(args)
    if command == "unshare":
        return _unshare(args)
    if command in ("apply", "import") and getattr(args, "driver", None) != "windowsfilter":
        return _with_apply_child(args)
    driver = _open(args)
    if command == "snapshotter":
        from .snapshotter.command import run

        return run(driver, args.address)
    if command == "image":
        from .images.command import run as run_image

        return run_image(args, driver)
    assert handler is not None
    return handler(driver, args, bool(getattr(args, "json", False)))


def _with_apply_child(args: argparse.Namespace) -> int:
    """``apply``/``import``: the confined child of the Linux apply is started before the store
    is opened (its start-up and imports overlap the open, the locks and the markers; the apply
    hands it the job); a child the command did not use is stopped on the way out."""
    from .archive.confine import discard_prespawned, prespawn
    from .archive.jobs import LINUX_APPLY

    prespawn(LINUX_APPLY)
    try:
        return _COMMANDS[args.command](_open(args), args, bool(getattr(args, "json", False)))
    finally:
        discard_prespawned()


def _enter_namespace(args: argparse.Namespace) -> None:
    """An ordinary user: join the store's user and mount namespace (DESIGN.md rule 7) -- except
    for a mount, which would die with this process's view of it: that one is refused."""
    from .errors import NotSupported
    from .userns import needs_namespace

    if not needs_namespace():
        return
    if args.command == "mount":
        raise NotSupported("rootless, a mount lives in the store's user namespace: run it inside "
                           "`graphdriver unshare` (e.g. graphdriver unshare sh -c 'ls "
                           "\"$(graphdriver mount ID)\"')")
    from pathlib import Path

    from .refcount import default_runroot
    from .userns import enter

    runroot = getattr(args, "runroot", None)
    try:
        enter(Path(runroot) if runroot else default_runroot())
    except NotSupported as exc:
        if args.command == "unshare":
            raise
        from .logs import get_logger

        # vfs works without a namespace (files then all become the user's)
        get_logger("graphdriver").warning("%s; going on without one", exc)


def _unshare(args: argparse.Namespace) -> int:
    """Run the command (or the user's shell) in the namespace joined above."""
    from .idmap import real_root

    if real_root():
        raise UsageError("unshare is for ordinary users: as root, mounts are made in your own "
                         "namespace", f"{PROG} unshare")
    argv = list(args.cmd) or [os.environ.get("SHELL") or "/bin/sh"]
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        from .errors import from_oserror

        raise from_oserror(exc, f"unshare: {argv[0]}") from exc
    return 127  # not reached: exec replaced this process


def _status(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    status = driver.status()
    if as_json:
        _print_json({"driver": driver.name, "home": str(driver.home), "status": status})
    else:
        print(f"Driver: {driver.name}")
        print(f"Home: {driver.home}")
        for key, value in status:
            print(f"{key}: {value}")
    return 0


def _create(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    opts = None  # the defaults (driver.py's dataclass is not imported for them: start-up time)
    if args.size is not None or args.mount_label or getattr(args, "image", None) is not None:
        from .driver import CreateOpts

        storage = {"size": args.size} if args.size is not None else {}
        opts = CreateOpts(mount_label=args.mount_label, storage_opt=storage)
    if getattr(args, "image", None) is not None:
        from .images.command import create_from_image

        if args.parent or not args.rw:
            raise UsageError("--image needs --rw and excludes --parent", f"{PROG} create")
        create_from_image(driver, args.id, args.image, opts)
    elif args.rw:
        driver.create_rw(args.id, args.parent, opts)
    else:
        driver.create(args.id, args.parent, opts)
    if as_json:
        _print_json({"id": args.id, "parent": args.parent, "rw": bool(args.rw)})
    return 0


def _apply_cmd(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    result = _apply_file(driver, args.id, args.parent, args.file, f"{PROG} apply")
    _print_applied(args.id, result, as_json)
    return 0


def _import(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    fd, close = _open_input(args.file, f"{PROG} import")  # before the layer exists
    try:
        driver.create(args.id, args.parent)
        try:
            result = _apply_fd(driver, args.id, None, fd)
        except BaseException:
            _remove_quietly(driver, args.id)
            raise
    finally:
        if close:
            os.close(fd)
    _print_applied(args.id, result, as_json)
    return 0


def _remove_quietly(driver: Any, layer_id: str) -> None:
    """Roll back an import: the new layer goes, whatever interrupts the caller meanwhile."""
    import contextlib

    from .errors import GraphDriverError

    old = [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        with contextlib.suppress(GraphDriverError, OSError):
            driver.remove(layer_id)
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


def _print_applied(layer_id: str, result: Any, as_json: bool) -> None:
    if as_json:
        _print_json({"id": layer_id, "size": result.size, "diffID": result.diff_id})
    else:
        print(result.size)


def _open_input(path: str, prog: str) -> tuple[int, bool]:
    """The fd of a layer tar to read (and whether to close it): a file, or stdin for "-"."""
    import stat as stat_mod

    if path == "-":
        if sys.stdin.isatty():
            raise UsageError("refusing to read a tar from a terminal: give FILE or a pipe", prog)
        return sys.stdin.fileno(), False
    from .errors import InvalidArgument, from_oserror

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, path) from exc
    if stat_mod.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{path} is a directory, not a layer tar")
    return fd, True


def _apply_file(driver: Any, layer_id: str, parent: str | None, path: str, prog: str) -> Any:
    fd, close = _open_input(path, prog)
    try:
        return _apply_fd(driver, layer_id, parent, fd)
    finally:
        if close:
            os.close(fd)


def _apply_fd(driver: Any, layer_id: str, parent: str | None, fd: int) -> Any:
    import stat as stat_mod

    from .progress import ProgressBar

    st = os.fstat(fd)
    total = st.st_size if stat_mod.S_ISREG(st.st_mode) else None
    start = os.lseek(fd, 0, os.SEEK_CUR) if total is not None else 0
    poll = (lambda: os.lseek(fd, 0, os.SEEK_CUR) - start) if total is not None else (lambda: 0)
    with ProgressBar(f"apply {layer_id}", total, poll):
        return driver.apply_diff_result(layer_id, parent, fd)


def _changes(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    changes = driver.changes(args.id, args.parent)
    if as_json:
        _print_json([{"path": c.path, "kind": int(c.kind)} for c in changes])
    else:
        sys.stdout.write("".join(f"{c}\n" for c in changes))
    return 0


def _diff_size(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    size = driver.diff_size(args.id, args.parent)
    _print_json({"size": size}) if as_json else print(size)
    return 0


def _mount(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    path = driver.get(args.id, args.mount_label)
    _print_json({"id": args.id, "path": str(path)}) if as_json else print(path)
    return 0


def _unmount(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    driver.record(args.id)  # unknown layer: an error, not a silent no-op
    if driver.mount_count(args.id) == 0:
        # moby's Put of a layer that is not mounted succeeds; say so all the same
        sys.stderr.write(f"{PROG}: warning: layer {args.id} is not mounted\n")
        return 0
    driver.put(args.id)
    return 0


def _rm(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    from .errors import GraphDriverError

    ids = list(dict.fromkeys(args.ids))
    given = set(ids)

    def depth(layer_id: str) -> int:  # how many of the given layers lie below it
        try:
            return sum(1 for rec in driver.chain(layer_id)[1:] if rec.id in given)
        except GraphDriverError:
            return 0  # the removal says what is wrong with it

    for layer_id in sorted(ids, key=depth, reverse=True):  # children before their parents
        driver.remove(layer_id)
    return 0


def _exists(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    missing = False
    for layer_id in args.ids:
        found = driver.exists(layer_id)
        missing |= not found
        if as_json:
            _print_json({"id": layer_id, "exists": found})
    return 1 if missing else 0


def _metadata(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    meta = driver.metadata(args.id)
    if as_json:
        _print_json(meta)
    else:
        for key, value in meta.items():
            print(f"{key}: {value}")
    return 0


def _cleanup(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    driver.cleanup()
    return 0


def _timestamp(created: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


def _layer_facts(driver: Any, rec: Any) -> dict[str, Any]:
    """What ``ls`` shows of a layer (``--json`` and ``--format json`` carry exactly this)."""
    size = rec.extra.get("applied_size")
    return {"id": rec.id, "parent": rec.parent, "kind": rec.kind,
            "size": size if isinstance(size, int) else None, "limit": rec.size_limit,
            "created": _timestamp(rec.created), "mounts": driver.mount_count(rec.id)}


def _inspect(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    from .exactdiff import exact_available

    out = []
    for layer_id in args.ids:
        chain = driver.chain(layer_id)
        facts = _layer_facts(driver, chain[0])
        exact, why = exact_available(driver, layer_id)
        facts.update(parents=[rec.id for rec in chain[1:]],
                     diffID=chain[0].diff_id, madeBy=chain[0].made_by, holders=chain[0].holders,
                     exactDiff=exact,
                     exactDiffUnavailable=None if exact else why, driver=driver.name,
                     metadata=driver.metadata(layer_id))
        out.append(facts)
    import json

    sys.stdout.write(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


_FIELDS = ("ID", "Parent", "Kind", "Size", "Limit", "Created", "CreatedAt", "Mounts")
_TABLE = "table {{.ID}}\t{{.Parent}}\t{{.Kind}}\t{{.Size}}\t{{.Created}}\t{{.Mounts}}"


def _field_texts(facts: dict[str, Any], age: float) -> dict[str, str]:
    """The template fields of a layer created *age* seconds ago, as ``ls`` prints them."""
    from .units import human_bytes, human_duration

    return {"ID": facts["id"], "Parent": facts["parent"] or "",
            "Kind": facts["kind"],
            "Size": "-" if facts["size"] is None else human_bytes(facts["size"]),
            "Limit": "-" if facts["limit"] is None else human_bytes(facts["limit"]),
            "Created": human_duration(max(0.0, age)) + " ago",
            "CreatedAt": facts["created"], "Mounts": str(facts["mounts"])}


def _render(template: str, fields: dict[str, str]) -> str:
    """Docker's ``--format``: ``{{.Field}}`` replaced, anything else kept as written."""
    import re

    def field(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in fields:
            raise UsageError(f"--format: unknown field .{name} (fields: "
                             f"{', '.join('.' + f for f in _FIELDS)})", f"{PROG} ls")
        return fields[name]

    text = re.sub(r"\{\{\s*\.(\w+)\s*\}\}", field, template)
    if "{{" in text:
        raise UsageError(f"--format: cannot read {template!r}: only {{{{.Field}}}} is understood",
                         f"{PROG} ls")
    return text


def _ls(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    import time

    ids = driver.layers()
    if args.quiet:
        sys.stdout.write("".join(f"{i}\n" for i in ids))
        return 0
    records = sorted((driver.record(i) for i in ids), key=lambda r: (r.created, r.id))
    layers = [_layer_facts(driver, rec) for rec in records]
    now = time.time()
    ages = {rec.id: now - rec.created for rec in records}
    if args.format == "json":
        sys.stdout.write("".join(_json_line(f) for f in layers))
        return 0
    broken = driver.broken_layers()
    if as_json and args.format is None and not args.tree:
        _print_json(layers + [{"id": i, "broken": why} for i, why in broken.items()])
        return 0
    if args.tree:
        sys.stdout.write(_tree(layers, ages))
        return 0
    template = (args.format if args.format is not None else _TABLE)
    template = template.replace("\\t", "\t").replace("\\n", "\n")
    rows = [_field_texts(f, ages[f["id"]]) for f in layers]
    if template.startswith("table"):
        template = template[5:].lstrip(" ")
        header = {name: name.upper() for name in _FIELDS}
        header["CreatedAt"] = "CREATED AT"
        for row in rows:
            row["Parent"] = row["Parent"] or "-"
        lines = [_render(template, header), *(_render(template, r) for r in rows)]
        sys.stdout.write(_columns(lines))
    else:
        sys.stdout.write("".join(_render(template, r) + "\n" for r in rows))
    sys.stdout.write("".join(f"{i} (broken: {why})\n" for i, why in broken.items()))
    return 0


def _json_line(obj: object) -> str:
    import json

    return json.dumps(obj, sort_keys=True) + "\n"


def _columns(lines: list[str]) -> str:
    """Tab-separated cells aligned as docker's tabwriter does (three spaces between columns)."""
    cells = [line.split("\t") for line in lines]
    widths: list[int] = []
    for row in cells:
        for i, cell in enumerate(row[:-1]):
            if i == len(widths):
                widths.append(0)
            widths[i] = max(widths[i], len(cell))
    out = []
    for row in cells:
        padded = [cell.ljust(widths[i] + 3) for i, cell in enumerate(row[:-1])]
        out.append(("".join(padded) + row[-1]).rstrip() + "\n")
    return "".join(out)


def _tree(layers: list[dict[str, Any]], ages: dict[str, float]) -> str:
    """Each layer under its parent: ``base (ro, 12 MiB)`` / ``└── app (ro, 3 KiB)``."""
    known = {f["id"] for f in layers}
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for f in layers:
        kids.setdefault(f["parent"] if f["parent"] in known else None, []).append(f)
    out: list[str] = []

    def walk(facts: dict[str, Any], prefix: str, branch: str, last: bool) -> None:
        texts = _field_texts(facts, ages[facts["id"]])
        mounts = f", {texts['Mounts']} mounted" if facts["mounts"] else ""
        out.append(f"{prefix}{branch}{facts['id']} ({facts['kind']}, {texts['Size']}{mounts})\n")
        below = kids.get(facts["id"], [])
        inner = prefix + ("" if not branch else ("    " if last else "│   "))
        for i, child in enumerate(below):
            end = i == len(below) - 1
            walk(child, inner, "└── " if end else "├── ", end)

    for root in kids.get(None, []):
        walk(root, "", "", True)
    return "".join(out)


def _completion(shell: str) -> str:
    """A completion script for *shell*, generated from the parser by shtab (file arguments
    complete as files, directories as directories)."""
    import shtab

    parser = build_parser()
    for action in _all_actions(parser):
        if action.dest in ("file", "output", "socket"):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif action.dest in ("root", "runroot"):
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    return str(shtab.complete(parser, shell=shell))


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    import argparse

    out = []
    for action in parser._actions:
        out.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out.extend(_all_actions(sub))
    return out


def _diff(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    from .progress import ProgressBar

    parent = driver.resolve_parent(args.id, args.parent)
    if args.exact:
        from .exactdiff import write_exact_diff

        def exact(fd: int, layer_id: str, parent: str | None, progress: Any = None) -> None:
            write_exact_diff(driver, layer_id, fd)
        write_diff = exact
    else:
        write_diff = driver.write_diff
    from .outputs import STDOUT, open_output

    output = args.output or STDOUT
    if output == STDOUT and sys.stdout.isatty():
        raise UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe",
                         f"{PROG} diff")
    written = [0]
    with open_output(output) as fd, ProgressBar(f"diff {args.id}", None, lambda: written[0]):
        write_diff(fd, args.id, parent, progress=lambda n: written.__setitem__(0, n))
    return 0


_COMMANDS = {
    "status": _status,
    "create": _create,
    "import": _import,
    "apply": _apply_cmd,
    "diff": _diff,
    "changes": _changes,
    "diff-size": _diff_size,
    "mount": _mount,
    "unmount": _unmount,
    "rm": _rm,
    "exists": _exists,
    "metadata": _metadata,
    "inspect": _inspect,
    "ls": _ls,
    "cleanup": _cleanup,
}

_OTHER_COMMANDS = frozenset({"serve", "completion", "man", "snapshotter", "image", "unshare"})

# ----- main ---------------------------------------------------------------------------------

_SIGNAL_NAMES: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
_received: list[int] = []  # the signal that interrupted the command


def _terminate(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _configure_logging(debug: bool) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format=f"{PROG}: %(message)s")


def _quiet_signals() -> None:
    """The operation is over (done or rolled back): a signal now must not turn the exit status
    into death by that signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def command() -> int:
    """The console script and ``python -m graphdriver``: :func:`main`, then out without the
    interpreter's finalization when nothing needs it (its teardown of every module is ~10 ms of
    a short command).  Only for the command lines of the fast parser (light commands that write
    to stdout and stderr only, and reap every child they start); the exit functions (logging's
    flush) run; a thread that is not a daemon keeps the ordinary exit, which joins it.  Returns
    (for the ordinary exit) in those cases, or when the last flush fails (the ordinary exit
    reports that as Python does)."""
    status = main()
    if _fast_parse(sys.argv[1:]) is None:
        return status
    threading = sys.modules.get("threading")
    if threading is not None and any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                     if t is not threading.main_thread()):
        return status
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return status
    import atexit

    atexit._run_exitfuncs()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    args = _fast_parse(argv)
    if args is None:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as exc:
            if exc.prog == PROG:  # e.g. an unknown option after the command: point at its help
                command = next((a for a in argv if a in _COMMANDS or a in _OTHER_COMMANDS), None)
                exc.prog = f"{PROG} {command}" if command else PROG
            sys.stderr.write(exc.line() + "\n")
            return 2
    from . import logs

    debug = bool(getattr(args, "debug", False))
    if debug or args.command not in _FAST_COMMANDS:  # (serve, image, ... log through logging)
        _configure_logging(debug)
    else:  # the store, the drivers and archive/ log through logs: logging only when needed
        logs.on_first_use = lambda: _configure_logging(debug)
    signal.signal(signal.SIGTERM, _terminate)  # roll back like SIGINT
    from .errors import GraphDriverError

    failed = 2 if args.command == "exists" else 1
    try:
        return _run(args)
    except UsageError as exc:
        sys.stderr.write(exc.line() + "\n")
        return 2
    except GraphDriverError as exc:
        if exc.exit_code == 130:  # Interrupted: as for KeyboardInterrupt below
            _quiet_signals()
        if debug and exc.__cause__ is not None:
            logs.get_logger("graphdriver").debug("caused by: %r", exc.__cause__)
        sys.stderr.write(f"{PROG}: {type(exc).__name__}: {exc}\n")
        return failed if exc.exit_code == 1 else exc.exit_code
    except KeyboardInterrupt:
        # A second signal on the way out must not turn exit status 130 into death by signal.
        _quiet_signals()
        name = _SIGNAL_NAMES.get(_received[0] if _received else signal.SIGINT, "a signal")
        sys.stderr.write(f"{PROG}: interrupted by {name}; the operation was rolled back\n")
        return 130
    except BrokenPipeError:
        import contextlib

        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        from .errors import from_oserror

        err = from_oserror(exc, args.command)
        sys.stderr.write(f"{PROG}: {type(err).__name__}: {err}\n")
        return failed
    finally:
        _quiet_signals()
