"""A loopback HTTP proxy in front of the real test registry that answers chosen requests with a
fault (429 with Retry-After, 503, 403, a manifest that is not JSON) and forwards everything else,
request by request, so the client meets each failure as it would from a real server."""

from __future__ import annotations

import http.client
import http.server
import re
import threading
from dataclasses import dataclass, field


@dataclass
class Fault:
    method: str
    path: str  # a regex searched in the request path
    status: int
    times: int = 1  # how many matching requests get the fault (-1: all)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hits: int = 0


class FaultProxy:
    def __init__(self, upstream_port: int, faults: list[Fault]) -> None:
        self.upstream_port = upstream_port
        self.faults = faults
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and re.search(f.path, path) and \
                        (f.times < 0 or f.hits < f.times):
                    f.hits += 1
                    return f
        return None

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        fault = self._fault_for(req.command, req.path)
        if fault is not None:
            req.send_response(fault.status)
            for k, v in fault.headers.items():
                req.send_header(k, v)
            req.send_header("Content-Length", str(len(fault.body)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(fault.body)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in req.headers.items()
                       if k.lower() not in ("host", "connection", "transfer-encoding")}
            headers["Host"] = f"127.0.0.1:{self.upstream_port}"
            conn.request(req.command, req.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            req.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() in ("content-length", "connection", "transfer-encoding"):
                    continue
                if k.lower() == "location":
                    v = v.replace(f"127.0.0.1:{self.upstream_port}", self.host)
                req.send_header(k, v)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(data)
        finally:
            conn.close()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
