"""``graphdriver image ...``: the command's image subcommands (issue 13's grammar).

``add_parser(subparsers, parents)`` registers ``image`` and its subcommands; ``run(args,
driver)`` runs one and returns the exit status.  Owns arguments and output; imports this
package; never a driver module (the driver is handed in by cli.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument


def add_parser(subparsers: Any, parents: list[Any]) -> None:
    p = subparsers.add_parser("image", help="pull, push, load, save, commit images",
                              description="the image store", parents=parents)
    sub = p.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND",
                           parser_class=type(p))
    sub.required = True

    def cmd(name: str, help_: str) -> Any:
        return sub.add_parser(name, help=help_, description=help_, parents=parents)

    def registry_opts(c: Any) -> None:
        c.add_argument("--creds", default=None, metavar="USER:PASS")
        c.add_argument("--insecure", action="store_true",
                       help="allow plain HTTP and unverified TLS to this registry")
        c.add_argument("-q", "--quiet", action="store_true")

    c = cmd("pull", "pull an image from a registry; prints its ID")
    c.add_argument("ref")
    c.add_argument("--platform", default=None, metavar="OS/ARCH[/VARIANT]")
    registry_opts(c)
    c = cmd("push", "push an image to a registry")
    c.add_argument("ref")
    c.add_argument("dest", nargs="?", default=None)
    c.add_argument("--compression", default="gzip", choices=["gzip", "zstd"])
    registry_opts(c)
    c = cmd("load", "load images from a docker-archive or an OCI layout (tar or directory)")
    c.add_argument("input", nargs="?", default="-")
    c.add_argument("-i", "--input", dest="input_opt", default=None)
    c.add_argument("-q", "--quiet", action="store_true")
    c = cmd("save", "save images to a docker-archive or an OCI layout")
    c.add_argument("refs", nargs="+")
    c.add_argument("-o", "--output", default=None)
    c.add_argument("--format", dest="archive_format", default="docker-archive",
                   choices=["docker-archive", "oci-archive", "oci-dir"])
    c = cmd("ls", "list images")
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument("-f", "--format", dest="template", default=None)
    c = cmd("inspect", "JSON about images, with docker image inspect's keys")
    c.add_argument("refs", nargs="+")
    c.add_argument("-f", "--format", dest="template", default=None)
    c = cmd("tag", "name an image")
    c.add_argument("source")
    c.add_argument("target")
    c = cmd("history", "an image's history entries")
    c.add_argument("ref")
    c = cmd("rm", "remove tags and images")
    c.add_argument("refs", nargs="+")
    c.add_argument("-f", "--force", action="store_true")
    cmd("prune", "remove layers the image store made that nothing holds")
    cmd("mount", "mount an image's root filesystem read-only; prints its path").add_argument(
        "ref")
    cmd("unmount", "drop one mount of an image").add_argument("ref")
    c = cmd("commit", "commit a container layer as a new image; prints its ID")
    c.add_argument("layer")
    c.add_argument("ref", nargs="?", default=None)
    c.add_argument("-m", "--message", default="")
    c.add_argument("-a", "--author", default="")
    c.add_argument("-c", "--change", action="append", default=[])


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True) + "\n")


def run(args: Any, driver: Any) -> int:
    from .store import ImageStore

    store = ImageStore(driver)
    try:
        return _COMMANDS[args.image_command](store, args)
    finally:
        store.close()


def _creds(args: Any) -> Any:
    from .auth import parse_creds

    return parse_creds(args.creds) if args.creds else None


def _pull(store: Any, args: Any) -> int:
    from .platform import parse
    from .pull import PullOptions, pull

    opts = PullOptions(platform=parse(args.platform) if args.platform else None,
                       creds=_creds(args), insecure=args.insecure, quiet=args.quiet)
    print(pull(store, args.ref, opts))
    return 0


def _push(store: Any, args: Any) -> int:
    from .push import PushOptions, push

    digest = push(store, args.ref, args.dest, PushOptions(
        creds=_creds(args), insecure=args.insecure, compression=args.compression,
        quiet=args.quiet))
    if not args.quiet:
        print(digest)
    return 0


def _load(store: Any, args: Any) -> int:
    from .transfer import load

    source = args.input_opt or args.input
    if source == "-" and sys.stdin.isatty():
        raise InvalidArgument("refusing to read an archive from a terminal: give FILE or a pipe")
    for line in load(store, source):
        print(line)
    return 0


def _save(store: Any, args: Any) -> int:
    from .transfer import save

    if args.archive_format == "oci-dir":
        if not args.output:
            raise InvalidArgument("--format oci-dir needs -o DIR")
        save(store, args.refs, Path(args.output), args.archive_format)
        return 0
    if args.output is None:
        if sys.stdout.isatty():
            raise InvalidArgument("refusing to write a tar to a terminal: use -o FILE or a pipe")
        sys.stdout.flush()
        with os.fdopen(os.dup(sys.stdout.fileno()), "wb") as out:
            save(store, args.refs, out, args.archive_format)
        return 0
    target = Path(args.output)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            save(store, args.refs, out, args.archive_format)
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 0


def _ls(store: Any, args: Any) -> int:
    from .inspect import ls_rows, render

    rows = ls_rows(store)
    if args.quiet:
        seen: list[str] = []
        for r in rows:
            if r["ID"] not in seen:
                seen.append(r["ID"])
        sys.stdout.write("".join(f"{i}\n" for i in seen))
    elif args.template:
        sys.stdout.write("".join(render(args.template, r) + "\n" for r in rows))
    elif getattr(args, "json", False):
        _print_json(rows)
    else:
        table = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")] + [
            (r["Repository"], r["Tag"], r["ID"], r["CreatedSince"], r["Size"]) for r in rows]
        widths = [max(len(str(row[i])) for row in table) for i in range(5)]
        for row in table:
            print("   ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _inspect(store: Any, args: Any) -> int:
    from .inspect import docker_inspect, render

    out = [docker_inspect(store, store.resolve(r)) for r in args.refs]
    if args.template:
        sys.stdout.write("".join(render(args.template, o) + "\n" for o in out))
    else:
        print(json.dumps(out, indent=4))
    return 0


def _tag(store: Any, args: Any) -> int:
    store.tag(args.source, args.target)
    return 0


def _history(store: Any, args: Any) -> int:
    from .inspect import history_rows

    rows = history_rows(store.resolve(args.ref))
    if getattr(args, "json", False):
        _print_json(rows)
        return 0
    print(f"{'CREATED':<20} {'CREATED BY':<50} {'LAYER':<14} COMMENT")
    for r in rows:
        layer = r["Layer"][7:19] if r["Layer"] else "<missing>" if not r["EmptyLayer"] else "-"
        by = str(r["CreatedBy"]).replace("\n", " ")
        print(f"{r['CreatedSince']:<20} {by[:50]:<50} {layer:<14} {r['Comment']}")
    return 0


def _rm(store: Any, args: Any) -> int:
    for ref in args.refs:
        for line in store.remove(ref, force=args.force):
            print(line)
    return 0


def _prune(store: Any, args: Any) -> int:
    removed = store.prune()
    for layer_id in removed:
        print(f"deleted: sha256:{layer_id}")
    return 0


def _mount(store: Any, args: Any) -> int:
    path = store.mount(args.ref)
    _print_json({"ref": args.ref, "path": str(path)}) if getattr(args, "json", False) \
        else print(path)
    return 0


def _unmount(store: Any, args: Any) -> int:
    store.unmount(args.ref)
    return 0


def _commit(store: Any, args: Any) -> int:
    from .commit import commit

    print(commit(store, args.layer, args.ref, message=args.message, changes=args.change,
                 author=args.author))
    return 0


_COMMANDS = {"pull": _pull, "push": _push, "load": _load, "save": _save, "ls": _ls,
             "inspect": _inspect, "tag": _tag, "history": _history, "rm": _rm,
             "prune": _prune, "mount": _mount, "unmount": _unmount, "commit": _commit}


def create_from_image(driver: Any, layer_id: str, ref: str, opts: Any) -> None:
    """``create ID --rw --image REF`` (called by cli.py)."""
    from .store import ImageStore

    store = ImageStore(driver)
    try:
        store.create_container_layer(layer_id, ref, opts)
    finally:
        store.close()
