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


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


def add_parser(subparsers: Any, parents: list[Any]) -> None:
    p = subparsers.add_parser(
        "image", help="pull, push, load, save, commit images", parents=parents,
        description="the image store: images as records over this store's layers",
        epilog=_examples("graphdriver image pull localhost:5000/library/busybox",
                         "graphdriver image ls", "graphdriver image IMAGE_COMMAND --help"))
    sub = p.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", parser_class=type(p),
                           help="what to do (graphdriver image IMAGE_COMMAND --help)")
    sub.required = True

    def cmd(name: str, help_: str, *examples: str) -> Any:
        return sub.add_parser(name, help=help_, description=help_, parents=parents,
                              epilog=_examples(*examples))

    def refs(c: Any, what: str = "images: references (busybox, host:port/repo:tag, "
             "repo@sha256:...) or IDs") -> None:
        c.add_argument("refs", nargs="+", metavar="REF", help=what)

    def registry_opts(c: Any) -> None:
        c.add_argument("--creds", default=None, metavar="USER:PASS",
                       help="registry credentials (default: REGISTRY_AUTH_FILE, then "
                       "DOCKER_CONFIG/~/.docker/config.json, else anonymous)")
        c.add_argument("--insecure", action="store_true",
                       help="allow plain HTTP and unverified TLS to this registry")
        c.add_argument("-q", "--quiet", action="store_true", help="print only the result")

    c = cmd("pull", "pull an image from a registry; prints its ID",
            "graphdriver image pull localhost:5000/library/debian:12",
            "graphdriver image pull --platform linux/arm64 registry.example:5000/app:1")
    c.add_argument("ref", metavar="REF", help="the image reference")
    c.add_argument("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
                   help="which image of a multi-platform index (default: the driver's)")
    registry_opts(c)
    c = cmd("push", "push an image to a registry",
            "graphdriver image push localhost:5000/app:1",
            "graphdriver image push app:1 localhost:5000/team/app:1 --compression zstd")
    c.add_argument("ref", metavar="REF", help="the local image")
    c.add_argument("dest", nargs="?", default=None, metavar="DEST-REF",
                   help="where to push it (default: REF)")
    c.add_argument("--compression", default="gzip", choices=["gzip", "zstd"],
                   help="how new layer blobs are compressed (default gzip)")
    registry_opts(c)
    c = cmd("load", "load images from a docker-archive or an OCI layout (tar or directory)",
            "graphdriver image load busybox.tar", "skopeo copy ... | graphdriver image load -")
    c.add_argument("input", nargs="?", default="-", metavar="FILE|DIR|-",
                   help="the archive (gzip, xz, zstd accepted) or layout directory; - is stdin")
    c.add_argument("-i", "--input", dest="input_opt", default=None, metavar="FILE",
                   help="the archive, as docker load -i takes it")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    c = cmd("save", "save images to a docker-archive or an OCI layout",
            "graphdriver image save busybox -o busybox.tar",
            "graphdriver image save app:1 app:2 --format oci-dir -o ./layout")
    refs(c)
    c.add_argument("-o", "--output", default=None, metavar="FILE|DIR",
                   help="where to write (default: standard output; a directory for oci-dir)")
    c.add_argument("--format", dest="archive_format", default="docker-archive",
                   choices=["docker-archive", "oci-archive", "oci-dir"],
                   help="the archive format (default docker-archive)")
    c = cmd("ls", "list images", "graphdriver image ls", "graphdriver image ls -q")
    c.add_argument("-q", "--quiet", action="store_true", help="image IDs only")
    c.add_argument("-f", "--format", dest="template", default=None, metavar="TEMPLATE",
                   help="a Go-style template, e.g. '{{.Repository}}:{{.Tag}}'")
    c = cmd("inspect", "JSON about images, with docker image inspect's keys",
            "graphdriver image inspect busybox", "graphdriver image inspect -f '{{.Id}}' busybox")
    refs(c)
    c.add_argument("-f", "--format", dest="template", default=None, metavar="TEMPLATE",
                   help="a Go-style template, e.g. '{{.Id}}'")
    c = cmd("tag", "name an image", "graphdriver image tag busybox localhost:5000/busybox:1")
    c.add_argument("source", metavar="SRC", help="the image")
    c.add_argument("target", metavar="DST", help="the new name")
    c = cmd("history", "an image's history entries", "graphdriver image history busybox")
    c.add_argument("ref", metavar="REF", help="the image")
    c = cmd("rm", "remove tags and images", "graphdriver image rm busybox",
            "graphdriver image rm --force sha256:0123456789ab")
    refs(c)
    c.add_argument("-f", "--force", action="store_true",
                   help="remove an image given by ID with all its tags")
    cmd("prune", "remove layers the image store made that nothing holds",
        "graphdriver image prune")
    cmd("mount", "mount an image's root filesystem read-only; prints its path",
        "ls $(graphdriver image mount busybox)").add_argument("ref", metavar="REF",
                                                                help="the image")
    cmd("unmount", "drop one mount of an image", "graphdriver image unmount busybox"
        ).add_argument("ref", metavar="REF", help="the image")
    c = cmd("commit", "commit a container layer as a new image; prints its ID",
            "graphdriver image commit ctr localhost:5000/app:2 -m 'add config'",
            "graphdriver image commit ctr app:2 -c 'CMD [\"/app\"]' -c 'ENV A=1'")
    c.add_argument("layer", metavar="ID", help="the container layer (create ID --rw --image REF)")
    c.add_argument("ref", nargs="?", default=None, metavar="REF", help="the new image's name")
    c.add_argument("-m", "--message", default="", help="the history entry's comment")
    c.add_argument("-a", "--author", default="", help="the image's author")
    c.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="CMD, ENTRYPOINT, ENV, LABEL, WORKDIR or USER, as docker commit takes "
                   "them (repeatable)")


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


#: what httpx and httpcore import whenever it is installed though a synchronous client never
#: uses it: trio (httpcore's probe for an async backend, ~90 ms) and httpx's own command-line
#: tool (click, rich, pygments, ~25 ms).  The command marks them absent before the client is
#: imported (``_registry_client_imports``); a library user's process is left as it is.
UNUSED_BY_THE_CLIENT = ("trio", "httpx._main")


def _registry_client_imports() -> None:
    for name in UNUSED_BY_THE_CLIENT:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "not importable"


def _pull(store: Any, args: Any) -> int:
    _registry_client_imports()
    from .platform import parse
    from .pull import PullOptions, pull

    opts = PullOptions(platform=parse(args.platform) if args.platform else None,
                       creds=_creds(args), insecure=args.insecure, quiet=args.quiet)
    print(pull(store, args.ref, opts))
    return 0


def _push(store: Any, args: Any) -> int:
    _registry_client_imports()
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
