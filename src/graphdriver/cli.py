"""The ``graphdriver`` command (DESIGN.md "The command").

Every failure is one line on stderr and a non-zero exit: 1 for errors, 2 for bad usage (and for
``exists`` when it cannot tell), 130 when interrupted.  Imports are lazy so a command starts fast.
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


def default_root() -> str:
    env = os.environ.get("GRAPHDRIVER_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/graphdriver"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return os.path.join(xdg, "graphdriver")


class UsageError(Exception):
    pass


def _parser_class() -> type[argparse.ArgumentParser]:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # one line, exit 2
            raise UsageError(message)

    return _Parser


def _storage_opt(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        import argparse

        raise argparse.ArgumentTypeError(f"storage option {text!r} is not KEY=VALUE")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    import argparse

    _Parser = _parser_class()
    common = _Parser(add_help=False)
    g = common.add_argument_group("store")
    g.add_argument("--root", default=argparse.SUPPRESS, help="store root (default: "
                   "$GRAPHDRIVER_ROOT, /var/lib/graphdriver as root, else the XDG data dir)")
    g.add_argument("--runroot", default=argparse.SUPPRESS,
                   help="run root for mount counts (default /run/graphdriver)")
    g.add_argument("--driver", "-s", default=argparse.SUPPRESS,
                   help="driver name (default: the one this root uses, else the best that works)")
    g.add_argument("--storage-opt", action="append", type=_storage_opt, default=argparse.SUPPRESS,
                   metavar="K=V", help="driver option, e.g. size=10G (repeatable)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="log what is done (repairs, mounts) to stderr")

    p = _Parser(prog=PROG, parents=[common],
                description="Container layer storage: Docker's graph drivers as a command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[common], description=help_)

    cmd("status", "driver status")
    c = cmd("create", "create a layer")
    c.add_argument("id")
    c.add_argument("--parent", "-p", default=None)
    c.add_argument("--image", default=None, help="a --rw layer on top of this image")
    c.add_argument("--rw", action="store_true", help="a writable (container) layer")
    c.add_argument("--size", default=None, help="size limit of a --rw layer (e.g. 10G)")
    c.add_argument("--mount-label", default="")
    a = cmd("apply", "apply a layer tar (plain, gzip, zstd, xz, bzip2) to a layer")
    a.add_argument("id")
    a.add_argument("file", nargs="?", default="-")
    a.add_argument("--parent", "-p", default=None)
    d = cmd("diff", "write a tar of a layer's changes against its parent")
    d.add_argument("id")
    d.add_argument("-o", "--output", default=None)
    d.add_argument("--parent", "-p", default=None)
    d.add_argument("--exact", action="store_true",
                   help="the tar that was applied, byte for byte (from its tar-split metadata)")
    ch = cmd("changes", "list a layer's changes: A (added), C (changed), D (deleted)")
    ch.add_argument("id")
    ch.add_argument("--parent", "-p", default=None)
    ds = cmd("diff-size", "bytes of a layer's changes")
    ds.add_argument("id")
    ds.add_argument("--parent", "-p", default=None)
    m = cmd("mount", "mount a layer (reference counted); prints its path")
    m.add_argument("id")
    m.add_argument("--mount-label", default="")
    cmd("unmount", "drop one mount reference").add_argument("id")
    cmd("rm", "remove a layer").add_argument("id")
    cmd("exists", "exit 0 if the layer exists, 1 if not").add_argument("id")
    cmd("metadata", "driver facts about a layer").add_argument("id")
    cmd("ls", "list layers")
    cmd("cleanup", "unmount every mount of this store and zero the counts")
    sv = cmd("serve", "serve Docker's graphdriver plugin protocol on a unix socket")
    sv.add_argument("--socket", default=None,
                    help="socket path (default /run/docker/plugins/NAME.sock)")
    sv.add_argument("--name", default="graphdriver",
                    help="plugin name, as given to dockerd --storage-driver (default graphdriver)")
    from .images.command import add_parser

    add_parser(sub, [common])
    return p


# The common commands are parsed without argparse (its import and the parser above cost more
# than the rest of an ``exists``).  Only argument lists whose meaning is beyond doubt take this
# path; anything else (help, abbreviations, "--", values that look like options, bad usage) goes
# to argparse, which then says what it always said.  tests/test_startup.py checks that both give
# the same namespace.

# command -> (number of positionals, the defaults its subparser sets)
_FAST_COMMANDS: dict[str, tuple[int, dict[str, object]]] = {
    "status": (0, {}),
    "ls": (0, {}),
    "cleanup": (0, {}),
    "exists": (1, {}),
    "rm": (1, {}),
    "unmount": (1, {}),
    "metadata": (1, {}),
    "mount": (1, {"mount_label": ""}),
    "changes": (1, {"parent": None}),
    "diff-size": (1, {"parent": None}),
    "create": (1, {"parent": None, "image": None, "rw": False, "size": None, "mount_label": ""}),
}
_FAST_FLAGS = {"--json": "json", "--debug": "debug"}
_FAST_VALUES = {"--root": "root", "--runroot": "runroot", "--driver": "driver", "-s": "driver",
                "--storage-opt": "storage_opt"}


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
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        opts = before if command is None else after
        if arg in _FAST_FLAGS:
            opts[_FAST_FLAGS[arg]] = True
            continue
        if arg[:1] != "-":
            if command is None:
                if arg not in _FAST_COMMANDS:
                    return None
                command = arg
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
    if len(positionals) != count:
        return None
    # argparse: the subparser's namespace (its defaults, the options after the command, the
    # id) is copied over the top-level one (the options before it and the command).
    args = _Args(**before)
    args.__dict__.update(command=command, **defaults)
    args.__dict__.update(after)
    if positionals:
        args.__dict__["id"] = positionals[0]
    return args


def _open(args: argparse.Namespace) -> Any:
    from .registry import open_driver

    opts: dict[str, str] = {}
    for key, value in getattr(args, "storage_opt", None) or []:
        opts[key] = value
    return open_driver(getattr(args, "driver", None), getattr(args, "root", None) or default_root(),
                       opts, runroot=getattr(args, "runroot", None))


def _print_json(obj: object) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True) + "\n")


def _run(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    command = args.command
    if command == "create" and args.size is not None and not args.rw:
        raise UsageError("--size is only for writable layers: add --rw")
    if command == "serve":
        from .plugin import serve

        serve(args.socket, args.name, getattr(args, "driver", None), getattr(args, "root", None),
              getattr(args, "runroot", None), dict(getattr(args, "storage_opt", None) or []))
        return 0
    driver = _open(args)
    if command == "status":
        status = driver.status()
        if as_json:
            _print_json({"driver": driver.name, "home": str(driver.home), "status": status})
        else:
            print(f"Driver: {driver.name}")
            print(f"Home: {driver.home}")
            for key, value in status:
                print(f"{key}: {value}")
        return 0
    if command == "image":
        from .images.command import run

        return run(args, driver)
    if command == "create":
        from .driver import CreateOpts

        storage = {"size": args.size} if args.size is not None else {}
        opts = CreateOpts(mount_label=args.mount_label, storage_opt=storage)
        if getattr(args, "image", None) is not None:
            from .images.command import create_from_image

            if args.parent or not args.rw:
                raise UsageError("--image needs --rw and excludes --parent")
            create_from_image(driver, args.id, args.image, opts)
        elif args.rw:
            driver.create_rw(args.id, args.parent, opts)
        else:
            driver.create(args.id, args.parent, opts)
        if as_json:
            _print_json({"id": args.id, "parent": args.parent, "rw": bool(args.rw)})
        return 0
    if command == "apply":
        return _apply(driver, args, as_json)
    if command == "diff":
        return _diff(driver, args)
    if command == "changes":
        changes = driver.changes(args.id, args.parent)
        if as_json:
            _print_json([{"path": c.path, "kind": int(c.kind)} for c in changes])
        else:
            sys.stdout.write("".join(f"{c}\n" for c in changes))
        return 0
    if command == "diff-size":
        size = driver.diff_size(args.id, args.parent)
        _print_json({"size": size}) if as_json else print(size)
        return 0
    if command == "mount":
        path = driver.get(args.id, args.mount_label)
        _print_json({"id": args.id, "path": str(path)}) if as_json else print(path)
        return 0
    if command == "unmount":
        driver.record(args.id)  # unknown layer: an error, not a silent no-op
        driver.put(args.id)
        return 0
    if command == "rm":
        driver.remove(args.id)
        return 0
    if command == "exists":
        found = driver.exists(args.id)
        if as_json:
            _print_json({"id": args.id, "exists": found})
        return 0 if found else 1
    if command == "metadata":
        meta = driver.metadata(args.id)
        if as_json:
            _print_json(meta)
        else:
            for key, value in meta.items():
                print(f"{key}: {value}")
        return 0
    if command == "ls":
        ids = driver.layers()
        if as_json:
            _print_json([{"id": i, "parent": driver.parent(i), "mounts": driver.mount_count(i)}
                         for i in ids])
        else:
            sys.stdout.write("".join(f"{i}\n" for i in ids))
        return 0
    if command == "cleanup":
        driver.cleanup()
        return 0
    raise UsageError(f"unknown command {command!r}")


def _apply(driver: Any, args: argparse.Namespace, as_json: bool) -> int:
    from .progress import ProgressBar

    if args.file == "-":
        fd = sys.stdin.fileno()
        close = False
    else:
        try:
            fd = os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            from .errors import from_oserror

            raise from_oserror(exc, f"opening {args.file}") from None
        close = True
    try:
        st = os.fstat(fd)
        import stat as stat_mod

        total = st.st_size if stat_mod.S_ISREG(st.st_mode) else None
        start = os.lseek(fd, 0, os.SEEK_CUR) if total is not None else 0
        poll = (lambda: os.lseek(fd, 0, os.SEEK_CUR) - start) if total is not None else (lambda: 0)
        with ProgressBar(f"apply {args.id}", total, poll):
            result = driver.apply_diff_result(args.id, args.parent, fd)
    finally:
        if close:
            os.close(fd)
    if as_json:
        _print_json({"id": args.id, "size": result.size, "diffID": result.diff_id})
    else:
        print(result.size)
    return 0


def _diff(driver: Any, args: argparse.Namespace) -> int:
    from .progress import ProgressBar

    parent = driver.resolve_parent(args.id, args.parent)
    if args.exact:
        from .archive.tarsplit import write_exact_diff

        def exact(fd: int, layer_id: str, parent: str | None, progress: Any = None) -> None:
            write_exact_diff(driver, layer_id, fd)
        write_diff = exact
    else:
        write_diff = driver.write_diff
    if args.output is None:
        if sys.stdout.isatty():
            raise UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe")
        sys.stdout.flush()
        out_fd = sys.stdout.fileno()
        write_diff(out_fd, args.id, parent)
        return 0
    from pathlib import Path

    tmp = Path(args.output).with_name(f".{Path(args.output).name}.partial-{os.getpid()}")
    written = [0]
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with ProgressBar(f"diff {args.id}", None, lambda: written[0]):
                write_diff(fd, args.id, parent, progress=lambda n: written.__setitem__(0, n))
        finally:
            os.close(fd)
        os.rename(tmp, args.output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _fast_parse(sys.argv[1:] if argv is None else argv)
    if args is None:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as exc:
            sys.stderr.write(f"{PROG}: usage error: {exc}\n")
            return 2
    if getattr(args, "debug", False):
        import logging

        logging.basicConfig(level=logging.DEBUG, format=f"{PROG}: %(message)s")
    else:
        import logging

        logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)  # roll back like SIGINT
    from .errors import GraphDriverError

    try:
        return _run(args)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: usage error: {exc}\n")
        return 2
    except GraphDriverError as exc:
        if exc.exit_code == 130:  # Interrupted: as for KeyboardInterrupt below
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stderr.write(f"{PROG}: {type(exc).__name__}: {exc}\n")
        return 2 if args.command == "exists" else exc.exit_code
    except KeyboardInterrupt:
        # A second signal on the way out must not turn exit status 130 into death by signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stderr.write(f"{PROG}: interrupted; the operation was rolled back\n")
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
        return 2 if args.command == "exists" else 1
    finally:
        # The operation is over (done or rolled back): a signal now must not turn the exit
        # status into death by that signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
