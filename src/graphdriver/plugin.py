"""Docker's graphdriver plugin protocol over HTTP/1.1 on a unix socket (``graphdriver serve``).

The spec is docker/cli ``docs/extend/plugins_graphdriver.md`` and moby 20.10
``daemon/graphdriver/proxy.go``: every call is a POST to ``/Plugin.Activate`` or
``/GraphDriver.<Method>`` with a JSON body (``{"ID", "Parent", "MountLabel", "StorageOpt"}``) and a
JSON answer (``Err`` on failure, with a non-200 status).  Two calls carry raw tars:

- ``/GraphDriver.ApplyDiff?id=&parent=`` sends the layer tar as the (chunked) request body; it
  is decoded as a stream and handed to the driver's apply, never buffered whole;
- ``/GraphDriver.Diff`` answers with the tar itself, streamed in chunks.  When the layer was
  made by an apply and its tar-split metadata is intact, that tar is the applied one, byte for
  byte (``Capabilities: {"ReproducesExactDiffs": true}``, so Docker keeps no tar-split copy of
  its own and checks the digest on ``docker save``).

Requests arrive concurrently (one thread per connection, bounded, each held to the time limits of
``serving.Limits``: the server survives its clients); the store's file locks make that safe.  The
store lives where ``Init``'s ``Home`` says (``<data-root>/<plugin name>``), which wins over
``--root``.  Answers are exact: a field of the wrong JSON type is an ``InvalidArgument`` naming
it, and a ``Diff`` is checked and its first bytes read before the ``200``.

Front-end row: never imported by the store, the drivers, the tar engine or the helpers.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from .driver import CreateOpts
from .errors import GraphDriverError, InvalidArchive, InvalidArgument, NotFound, NotSupported
from .idmap import IDENTITY, IDMap
from .layers import validate_id
from .serving import DeadlineReader, Limits, UnixServer, serve_until_signalled

log = logging.getLogger("graphdriver.plugin")

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
PLUGIN_DIR = Path("/run/docker/plugins")
_CHUNK = 1 << 20
_MAX_JSON = 16 << 20


# ----- HTTP bodies ----------------------------------------------------------------------------


class ChunkedReader(io.RawIOBase):
    """A chunked transfer-encoded request body, decoded as a stream."""

    def __init__(self, rfile: BinaryIO) -> None:
        self._f = rfile
        self._left = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _line(self) -> bytes:
        line = self._f.readline(4096)
        if not line.endswith(b"\n"):
            raise InvalidArchive("request body: truncated chunked encoding")
        return line

    def readinto(self, b: Any) -> int:
        if self._done:
            return 0
        if self._left == 0:
            text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(text, 16)
            except ValueError as exc:
                raise InvalidArchive(f"request body: bad chunk size {text[:20]!r}") from exc
            if size < 0:
                raise InvalidArchive("request body: negative chunk size")
            if size == 0:
                while self._line().strip():  # trailers up to the empty line
                    pass
                self._done = True
                return 0
            self._left = size
        view = memoryview(b).cast("B")
        n = self._f.readinto(view[: min(len(view), self._left)])  # type: ignore[attr-defined]
        if not n:
            raise InvalidArchive("request body: connection closed inside a chunk")
        self._left -= n
        if self._left == 0 and self._f.read(2) not in (b"\r\n",):
            raise InvalidArchive("request body: chunk not followed by CRLF")
        return int(n)

    @property
    def finished(self) -> bool:
        return self._done


class LimitedReader(io.RawIOBase):
    """A Content-Length request body."""

    def __init__(self, rfile: BinaryIO, length: int) -> None:
        self._f = rfile
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(b).cast("B")
        n = self._f.readinto(view[: min(len(view), self._left)])  # type: ignore[attr-defined]
        if not n:
            raise InvalidArchive("request body: connection closed before Content-Length")
        self._left -= n
        return int(n)

    @property
    def finished(self) -> bool:
        return self._left <= 0


class ChunkedWriter(io.RawIOBase):
    """Writes a response body in chunks of up to 1 MiB (buffered), then the final chunk."""

    def __init__(self, wfile: BinaryIO) -> None:
        self._w = wfile
        self._buf = bytearray()
        self.total = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = len(memoryview(b).cast("B"))
        self._buf += b
        self.total += n
        if len(self._buf) >= _CHUNK:
            self._flush_chunk()
        return n

    def _flush_chunk(self) -> None:
        if self._buf:
            self._w.write(b"%x\r\n" % len(self._buf))
            self._w.write(self._buf)
            self._w.write(b"\r\n")
            self._buf.clear()

    def finish(self) -> None:
        self._flush_chunk()
        self._w.write(b"0\r\n\r\n")
        self._w.flush()


# ----- the plugin ----------------------------------------------------------------------------


class Plugin:
    """The protocol's methods over one driver, opened at Init."""

    def __init__(self, driver_name: str | None = None, root: str | os.PathLike[str] | None = None,
                 runroot: str | os.PathLike[str] | None = None,
                 options: dict[str, str] | None = None) -> None:
        self.driver_name = driver_name
        self.root = Path(root) if root else None
        self.runroot = Path(runroot) if runroot else None
        self.options = dict(options or {})
        self.driver: Any = None
        self._lock = threading.Lock()

    # ----- Init --------------------------------------------------------------------------

    def _open(self, home: Path, options: dict[str, str], idmap: IDMap) -> Any:
        from .registry import driver_class, drivers_using, names

        if self.driver_name:
            return driver_class(self.driver_name)(home, options, idmap, self.runroot)
        # A home that already holds a driver's layers keeps that driver (the registry's rule).
        candidates = drivers_using(lambda _name: home)[:1] or names()
        reasons = []
        for name in candidates:
            try:
                return driver_class(name)(home, options, idmap, self.runroot)
            except NotSupported as exc:
                reasons.append(f"{name}: {exc}")
        raise NotSupported("no driver works here: " + "; ".join(reasons))

    def init(self, req: dict[str, Any]) -> dict[str, Any]:
        home_text = _str(req, "Home")
        if home_text:
            home = Path(home_text)
        elif self.root is not None:
            home = self.root / (self.driver_name or "graphdriver")
        else:
            raise InvalidArgument("Init without a Home and no --root given")
        options = dict(self.options)
        for opt in _str_list(req, "Opts"):
            key, sep, value = opt.partition("=")
            if not sep:
                raise InvalidArgument(f"storage option {opt!r} is not KEY=VALUE")
            options[key.strip()] = value.strip()
        idmap = _idmap(_id_maps(req, "UIDMaps"), _id_maps(req, "GIDMaps"))
        with self._lock:
            if self.driver is not None and Path(self.driver.home) == home:
                return {}
            self.driver = self._open(home, options, idmap)
        log.info("Init: %s driver at %s", self.driver.name, home)
        return {}

    def _d(self) -> Any:
        if self.driver is None:
            raise InvalidArgument("the plugin is not initialized (GraphDriver.Init first)")
        return self.driver

    # ----- JSON methods ----------------------------------------------------------------

    def capabilities(self, req: dict[str, Any]) -> dict[str, Any]:
        # Before Init: what every driver of this package does (tar-split is recorded on apply).
        exact = self.driver is None or self.driver.capabilities()["reproduces_exact_diffs"]
        return {"Capabilities": {"ReproducesExactDiffs": exact}}

    def create(self, req: dict[str, Any]) -> dict[str, Any]:
        self._d().create(_id(req), _str(req, "Parent") or None, _create_opts(req))
        return {}

    def create_rw(self, req: dict[str, Any]) -> dict[str, Any]:
        self._d().create_rw(_id(req), _str(req, "Parent") or None, _create_opts(req))
        return {}

    def remove(self, req: dict[str, Any]) -> dict[str, Any]:
        layer_id = _id(req)
        with contextlib.suppress(NotFound):  # as moby's drivers: removing nothing succeeds
            self._d().remove(layer_id)
        return {}

    def get(self, req: dict[str, Any]) -> dict[str, Any]:
        path = self._d().get(_id(req), _str(req, "MountLabel"))
        return {"Dir": str(path)}

    def put(self, req: dict[str, Any]) -> dict[str, Any]:
        self._d().put(_id(req))
        return {}

    def exists(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"Exists": bool(self._d().exists(_str(req, "ID")))}

    def status(self, req: dict[str, Any]) -> dict[str, Any]:
        d = self._d()
        return {"Status": [["Driver", d.name], *[[k, v] for k, v in d.status()]]}

    def get_metadata(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"Metadata": self._d().metadata(_id(req))}

    def cleanup(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.driver is not None:
            self.driver.cleanup()
        return {}

    def changes(self, req: dict[str, Any]) -> dict[str, Any]:
        changes = self._d().changes(_id(req), _str(req, "Parent") or None)
        return {"Changes": [{"Path": c.path, "Kind": int(c.kind)} for c in changes]}

    def diff_size(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"Size": int(self._d().diff_size(_id(req), _str(req, "Parent") or None))}

    # ----- streams -----------------------------------------------------------------------

    def apply_diff(self, layer_id: str, parent: str, body: BinaryIO) -> dict[str, Any]:
        size = self._d().apply_diff(layer_id, parent or None, body)
        return {"Size": int(size)}

    def diff_stream(self, req: dict[str, Any]) -> BinaryIO:
        """The layer's tar: the applied one byte for byte when its tar-split metadata allows,
        else a new one.  The ids and the parent are checked here, before any answer."""
        from .archive.export import stream_tar
        from .exactdiff import exact_available, write_exact_diff

        d = self._d()
        layer_id = _id(req)
        parent = _str(req, "Parent") or None
        d.record(layer_id)  # NotFound / InvalidArgument for the layer or the parent, before a 200
        if parent is not None:
            d.record(validate_id(parent, "parent id"))
        ok, why = exact_available(d, layer_id, parent)
        if ok:
            def exact(out_fd: int) -> None:
                write_exact_diff(d, layer_id, out_fd)
            return stream_tar(exact)
        log.info("Diff %s: not the applied tar (%s); writing a new one", layer_id, why)
        stream: BinaryIO = d.diff(layer_id, parent)
        return stream


# ----- request fields: the JSON types Go's encoding/json accepts (null is the zero value) -----


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _wrong_type(name: str, expected: str, value: object) -> InvalidArgument:
    return InvalidArgument(f"field {name}: expected {expected}, got {_json_type(value)}")


def _str(req: dict[str, Any], name: str) -> str:
    value = req.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    return value


def _str_list(req: dict[str, Any], name: str) -> list[str]:
    value = req.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong_type(name, "an array of strings", value)
    return value


def _str_map(req: dict[str, Any], name: str) -> dict[str, str]:
    value = req.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _wrong_type(name, "an object of strings", value)
    return value


def _id_maps(req: dict[str, Any], name: str) -> list[tuple[int, int, int]]:
    """``[{"ContainerID": int, "HostID": int, "Size": int}, ...]`` as (container, host, size)."""
    value = req.get(name)
    if value is None:
        return []
    keys = ("ContainerID", "HostID", "Size")
    expected = "an array of {ContainerID, HostID, Size} numbers"
    if not isinstance(value, list):
        raise _wrong_type(name, expected, value)
    out = []
    for m in value:
        if not isinstance(m, dict) or not all(type(m.get(k)) is int for k in keys):
            raise _wrong_type(name, expected, m if not isinstance(m, dict) else
                              next(m.get(k) for k in keys if type(m.get(k)) is not int))
        out.append((m["ContainerID"], m["HostID"], m["Size"]))
    return out


def _id(req: dict[str, Any]) -> str:
    value = _str(req, "ID")
    if not value:
        raise InvalidArgument("request without an ID")
    return value


def _create_opts(req: dict[str, Any]) -> CreateOpts:
    return CreateOpts(mount_label=_str(req, "MountLabel"), storage_opt=_str_map(req, "StorageOpt"))


def _idmap(uids: list[tuple[int, int, int]], gids: list[tuple[int, int, int]]) -> IDMap:
    if not uids and not gids:
        return IDENTITY

    def text(maps: list[tuple[int, int, int]]) -> str:
        return ",".join(f"{c}:{h}:{n}" for c, h, n in maps)

    return IDMap.parse(text(uids), text(gids))


_JSON_METHODS: dict[str, Callable[[Plugin, dict[str, Any]], dict[str, Any]]] = {
    "GraphDriver.Init": Plugin.init,
    "GraphDriver.Capabilities": Plugin.capabilities,
    "GraphDriver.Create": Plugin.create,
    "GraphDriver.CreateReadWrite": Plugin.create_rw,
    "GraphDriver.Remove": Plugin.remove,
    "GraphDriver.Get": Plugin.get,
    "GraphDriver.Put": Plugin.put,
    "GraphDriver.Exists": Plugin.exists,
    "GraphDriver.Status": Plugin.status,
    "GraphDriver.GetMetadata": Plugin.get_metadata,
    "GraphDriver.Cleanup": Plugin.cleanup,
    "GraphDriver.Changes": Plugin.changes,
    "GraphDriver.DiffSize": Plugin.diff_size,
}


# ----- HTTP ------------------------------------------------------------------------------------


def _read_small(body: ChunkedReader | LimitedReader) -> bytes:
    """A JSON request body, whole (at most 16 MiB)."""
    out = bytearray()
    buf = bytearray(65536)
    while True:
        n = body.readinto(buf)
        if not n:
            return bytes(out)
        out += buf[:n]
        if len(out) > _MAX_JSON:
            raise InvalidArgument("request body larger than 16 MiB")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PluginServer  # type: ignore[assignment]  # ours, not a socketserver

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by one that keeps the server's time limits
        limits = self.server.limits
        self.reader = DeadlineReader(self.connection, limits.body_timeout)
        self.rfile = io.BufferedReader(self.reader, 65536)

    def handle_one_request(self) -> None:
        # A request line and headers must arrive whole within the header timeout, counted from
        # the connection or from the end of the previous answer (an idle keep-alive connection).
        self.reader.expect_headers(self.server.limits.header_timeout)
        super().handle_one_request()

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s", format % args)

    def _body(self) -> ChunkedReader | LimitedReader:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            return ChunkedReader(self.rfile)  # type: ignore[arg-type]
        length = self.headers.get("Content-Length")
        try:
            n = int(length) if length else 0
        except ValueError as exc:
            raise InvalidArgument(f"bad Content-Length {length!r}") from exc
        return LimitedReader(self.rfile, max(n, 0))  # type: ignore[arg-type]

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error(self, exc: BaseException, method: str) -> None:
        if isinstance(exc, GraphDriverError):
            msg = str(exc)
        elif isinstance(exc, OSError):
            from .errors import from_oserror

            msg = str(from_oserror(exc, method))
        else:
            msg = f"{method}: internal error: {type(exc).__name__}: {exc}"
            log.exception("%s failed", method)
        log.info("%s: %s", method, msg)
        self._send_json(500, {"Err": msg})

    @staticmethod
    def _drain(body: ChunkedReader | LimitedReader) -> bool:
        """Read what is left of a body (so the client sees our answer); False if it broke."""
        try:
            buf = bytearray(_CHUNK)
            while body.readinto(buf):
                pass
            return True
        except (GraphDriverError, OSError):
            return False

    def do_POST(self) -> None:
        self.reader.expect_body(self.server.limits.body_timeout)
        url = urlsplit(self.path)
        method = url.path.lstrip("/")
        try:
            body = self._body()
        except GraphDriverError as exc:
            self.close_connection = True
            self._send_error(exc, method)
            return
        plugin = self.server.plugin
        if method == "GraphDriver.ApplyDiff":
            self._apply(plugin, url.query, body)
            return
        try:
            raw = _read_small(body)
            req = json.loads(raw) if raw.strip() else {}
            if not isinstance(req, dict):
                raise InvalidArgument("request body is not a JSON object")
        except (GraphDriverError, ValueError) as exc:
            self.close_connection = True
            err = exc if isinstance(exc, GraphDriverError) else InvalidArgument(
                f"request body is not JSON: {exc}")
            self._send_error(err, method)
            return
        try:
            if method == "Plugin.Activate":
                self._send_json(200, {"Implements": ["GraphDriver"]})
            elif method == "GraphDriver.Diff":
                self._diff(plugin, req)
            elif method in _JSON_METHODS:
                self._send_json(200, _JSON_METHODS[method](plugin, req))
            else:
                self.send_response(404)
                data = json.dumps({"Err": f"unknown method {method}"}).encode()
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            self._send_error(exc, method)

    def _apply(self, plugin: Plugin, query: str, body: ChunkedReader | LimitedReader) -> None:
        q = parse_qs(query, keep_blank_values=True)
        layer_id = (q.get("id") or [""])[0]
        parent = (q.get("parent") or [""])[0]
        try:
            if not layer_id:
                raise InvalidArgument("ApplyDiff without ?id=")
            result = plugin.apply_diff(layer_id, parent, body)  # type: ignore[arg-type]
        except Exception as exc:
            if not self._drain(body):
                self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_error(exc, "GraphDriver.ApplyDiff")
            return
        if not self._drain(body):
            self.close_connection = True
        self._send_json(200, result)

    def _diff(self, plugin: Plugin, req: dict[str, Any]) -> None:
        # Everything that can be known before the status line is: the ids, the parent, and the
        # first bytes of the tar (the layer opened and mounted, its metadata read).  A failure
        # there is a JSON error; only a failure later cuts the stream.
        stream = plugin.diff_stream(req)
        try:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            n = stream.readinto(view)  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            out = ChunkedWriter(self.wfile)  # type: ignore[arg-type]
            try:
                while n:
                    out.write(view[:n])
                    n = stream.readinto(view)  # type: ignore[attr-defined]
                out.finish()
            except Exception as exc:
                # Too late for a status: end the connection without the final chunk, so the
                # client sees a truncated body rather than a short tar.
                log.warning("Diff %s failed after %d bytes: %s", req.get("ID"), out.total, exc)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
        finally:
            with contextlib.suppress(Exception):
                stream.close()


class PluginServer(UnixServer):
    """The plugin's HTTP server on a unix socket: one thread per connection, bounded, and
    clients held to the time limits of ``serving.Limits``."""

    def __init__(self, socket_path: str | os.PathLike[str], plugin: Plugin,
                 limits: Limits | None = None) -> None:
        self.plugin = plugin
        super().__init__(socket_path, self._connection, limits)

    def _connection(self, conn: socket.socket) -> None:
        _Handler(conn, "", self)  # type: ignore[arg-type]


def default_socket(name: str) -> Path:
    """Where dockerd looks for a plugin called *name*."""
    return PLUGIN_DIR / f"{name}.sock"


def serve(socket_path: str | os.PathLike[str] | None, name: str = "graphdriver",
          driver_name: str | None = None, root: str | os.PathLike[str] | None = None,
          runroot: str | os.PathLike[str] | None = None,
          options: dict[str, str] | None = None,
          ready: Callable[[PluginServer], None] | None = None,
          limits: Limits | None = None) -> None:
    """Serve until SIGINT/SIGTERM; refuses a socket where a live server answers."""
    from .registry import names

    if name in _BUILTIN_DOCKER_DRIVERS:
        raise InvalidArgument(f"plugin name {name!r} is a built-in Docker driver: dockerd would "
                              "load its own; choose another (e.g. graphdriver)")
    if driver_name is not None and driver_name not in names():
        raise InvalidArgument(f"unknown driver {driver_name!r} (known: {', '.join(names())})")
    path = Path(socket_path) if socket_path else default_socket(name)
    plugin = Plugin(driver_name, root, runroot, options)
    server = PluginServer(path, plugin, limits)
    log.warning("serving the %s graphdriver plugin on %s", name, path)
    if ready is not None:
        ready(server)
    serve_until_signalled(server)  # the socket is removed on the way out, if still ours
    log.warning("stopped the %s plugin", name)


_BUILTIN_DOCKER_DRIVERS = frozenset({
    "aufs", "btrfs", "devicemapper", "fuse-overlayfs", "overlay", "overlay2", "vfs", "zfs",
    "windowsfilter", "lcow",
})
