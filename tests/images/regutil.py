"""Test helpers of the image store: a private Debian ``docker-registry`` on 127.0.0.1 (own config,
own storage, free port, stopped by PID), a bearer-token server on loopback, and images made by
independent tools (umoci, skopeo) with private paths."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """One docker-registry process; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, workdir: Path, auth: dict[str, Any] | None = None,
                 extra_yaml: str = "") -> None:
        need("docker-registry")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        auth_yaml = ""
        if auth is not None:
            auth_yaml = "auth:\n" + "".join(
                f"  {kind}:\n" + "".join(f"    {k}: {v}\n" for k, v in opts.items())
                for kind, opts in auth.items())
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.dir / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: graphdriver-test\n" + auth_yaml
            + extra_yaml)
        self.log = open(self.dir / "registry.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited: "
                                   + (self.dir / "registry.log").read_text()[-500:])
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def blob_path(self, digest: str) -> Path:
        hexd = digest.partition(":")[2]
        return (self.dir / "storage/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data")

    def tags(self, repo: str) -> list[str]:
        with urllib.request.urlopen(f"http://{self.host}/v2/{repo}/tags/list") as resp:
            return list(json.load(resp)["tags"])


class Tools:
    """skopeo and umoci with private paths: never /var/lib/containers."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy = self.dir / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.auth_file = self.dir / "auth.json"
        self.auth_file.write_text('{"auths": {}}')

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["REGISTRY_AUTH_FILE"] = str(self.auth_file)
        env["TMPDIR"] = str(self.dir / "tmp")
        env["HOME"] = str(self.dir)
        env["XDG_RUNTIME_DIR"] = str(self.dir / "tmp")
        return env

    def skopeo(self, *args: str) -> str:
        need("skopeo")
        cmd = ["skopeo", "--policy", str(self.policy), "--tmpdir", str(self.dir / "tmp"), *args]
        proc = subprocess.run(cmd, capture_output=True, env=self.env(), check=False)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: {proc.stderr.decode()[-800:]}")
        return proc.stdout.decode()

    def copy(self, src: str, dst: str, *extra: str) -> None:
        self.skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false", "-q",
                    *extra, src, dst)

    def umoci(self, *args: str) -> str:
        need("umoci")
        proc = subprocess.run(["umoci", *args], capture_output=True, env=self.env(), check=False)
        if proc.returncode != 0:
            raise AssertionError(f"umoci {' '.join(args)}: {proc.stderr.decode()[-800:]}")
        return proc.stdout.decode()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def umoci_image(tools: Tools, layout: Path, tag: str, layers: list[dict[str, bytes]],
                base: str | None = None) -> None:
    """An OCI layout image made by umoci: each dict of files becomes one layer (unpack, write,
    repack).  (``umoci insert`` here writes tars without their end padding, which every tar
    reader refuses, so it is not used.)"""
    if not (layout / "index.json").exists():
        tools.umoci("init", "--layout", str(layout))
    if base is None:
        tools.umoci("new", "--image", f"{layout}:{tag}")
    else:
        tools.umoci("tag", "--image", f"{layout}:{base}", tag)
    for i, files in enumerate(layers):
        bundle = tools.dir / f"bundle-{tag}-{i}"
        shutil.rmtree(bundle, ignore_errors=True)
        tools.umoci("unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle))
        write_tree(bundle / "rootfs", files)
        tools.umoci("repack", "--image", f"{layout}:{tag}", str(bundle))
        shutil.rmtree(bundle)


def push_layout(tools: Tools, layout: Path, tag: str, registry: Registry, repo: str) -> str:
    ref = f"{registry.host}/{repo}:{tag}"
    tools.copy(f"oci:{layout}:{tag}", f"docker://{ref}")
    return ref


def umoci_tree(tools: Tools, layout: Path, tag: str, dest: Path) -> Path:
    """The reference root filesystem: ``umoci unpack --rootless``."""
    bundle = dest
    shutil.rmtree(bundle, ignore_errors=True)
    tools.umoci("unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle))
    return bundle / "rootfs"


def gz_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip'd layer tar made with the standard library, and its diffID."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    plain = raw.getvalue()
    return gzip.compress(plain, mtime=0), "sha256:" + hashlib.sha256(plain).hexdigest()


class TokenServer:
    """A bearer-token server on loopback, as the registry's ``auth: token`` expects: RS256 JWTs
    signed with a key made here (``cryptography``), the certificate in the registry's bundle."""

    def __init__(self, workdir: Path, users: dict[str, str], service: str = "test-registry",
                 issuer: str = "graphdriver-test") -> None:
        crypto = pytest.importorskip("cryptography")
        del crypto
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "graphdriver-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .sign(self.key, hashes.SHA256()))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = workdir / "token.crt"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.users = users
        self.service = service
        self.issuer = issuer
        self.requests: list[dict[str, list[str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def auth_config(self) -> dict[str, Any]:
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.bundle)}}

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlparse

        query = parse_qs(urlparse(req.path).query)
        self.requests.append(query)
        user = None
        header = req.headers.get("Authorization", "")
        if header.startswith("Basic "):
            u, _, p = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(u) != p:
                req.send_response(401)
                req.end_headers()
                return
            user = u
        access = []
        for scope in query.get("scope", []):
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                granted = actions.split(",") if user else []
                access.append({"type": kind, "name": name, "actions": granted})
        token = self.sign({"iss": self.issuer, "sub": user or "", "aud": self.service,
                           "exp": int(time.time()) + 300, "nbf": int(time.time()) - 10,
                           "iat": int(time.time()), "jti": os.urandom(8).hex(),
                           "access": access})
        body = json.dumps({"token": token, "expires_in": 300}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64(sig)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class TcpProxy:
    """A loopback TCP proxy in front of *target_port*: requests go up as they come, and what the
    server sends back goes through :meth:`downstream` (a subclass cuts or paces it)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump_up() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    upstream.sendall(data)
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if not self.downstream(client, data, sent):
                    break
                sent += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
            upstream.close()

    def downstream(self, client: socket.socket, data: bytes, sent: int) -> bool:
        """Forward *data* (the connection has sent *sent* bytes before it); False cuts it."""
        client.sendall(data)
        return True

    def stop(self) -> None:
        self._stop = True
        self.sock.close()


class CuttingProxy(TcpProxy):
    """Cuts the first blob download of more than *cut_after* bytes once, mid-body, so the
    client must resume (Range)."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.cut_after = cut_after
        self.cuts = 0
        super().__init__(target_port)

    def downstream(self, client: socket.socket, data: bytes, sent: int) -> bool:
        if self.cuts == 0 and sent + len(data) > self.cut_after:
            self.cuts += 1
            client.sendall(data[: self.cut_after - sent])
            return False
        client.sendall(data)
        return True


class PacedProxy(TcpProxy):
    """Forwards the server's answers at no more than *rate* bytes a second (all connections
    together), so that a transfer is still going when a test acts on it; ``forwarded`` counts
    the bytes sent so far."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.rate = rate
        self.forwarded = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        super().__init__(target_port)

    def downstream(self, client: socket.socket, data: bytes, sent: int) -> bool:
        client.sendall(data)
        with self._lock:
            self.forwarded += len(data)
            due = self._start + self.forwarded / self.rate
        time.sleep(max(0.0, due - time.monotonic()))
        return True


def htpasswd_auth(workdir: Path, user: str, password: str) -> dict[str, Any]:
    """The registry's ``auth: htpasswd`` section for one user (bcrypt, apache2-utils)."""
    need("htpasswd")
    path = workdir / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(path), user, password], check=True,
                   capture_output=True)
    return {"htpasswd": {"realm": "graphdriver-test", "path": str(path)}}


@contextlib.contextmanager
def registry_running(workdir: Path, auth: dict[str, Any] | None = None,
                     extra_yaml: str = "") -> Iterator[Registry]:
    reg = Registry(workdir, auth, extra_yaml)
    try:
        yield reg
    finally:
        reg.stop()
