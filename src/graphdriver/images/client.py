"""The registry client: OCI distribution spec v1.1 / Docker Registry HTTP API v2 over httpx.

Owns the wire: the /v2/ ping and scheme choice (HTTPS, plain HTTP only for loopback or
``--insecure``), TLS trust (system store + ``/etc/docker/certs.d`` and ``/etc/containers/certs.d``),
basic and bearer-token auth from ``WWW-Authenticate`` (one token per scope, reused until it
expires), retries with back-off that honour ``Retry-After`` on 429/5xx, blob reads that resume with
a Range request and verify digest and size, and uploads (HEAD skip, cross-repository mount,
chunked PATCH or one monolithic PUT).  Imports only ``errors`` and this package's ``auth``,
``manifest`` and ``mediatypes``; never a driver or the metadata store.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin

import httpx

from ..errors import InvalidArchive, NotFound, RegistryError, Unauthorized
from . import mediatypes as mt
from .auth import Credentials
from .manifest import Descriptor, DigestCheck, check_digest, sha256_digest

log = logging.getLogger("graphdriver.images")

CERT_DIRS = (Path("/etc/docker/certs.d"), Path("/etc/containers/certs.d"))
MAX_MANIFEST = 4 << 20  # what distribution accepts
MAX_CONFIG = 32 << 20
CHUNK = 1 << 20
UPLOAD_CHUNK = 32 << 20
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"|(\w+)=([^\s,]+)')


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.find("]")]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _proxy_configured() -> bool:
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(os.environ.get(n) or os.environ.get(n.lower()) for n in names)


def tls_context(host: str, cert_dirs: tuple[Path, ...] = CERT_DIRS) -> ssl.SSLContext:
    """The system trust store plus the host's ``ca.crt`` (and ``*.crt``), client cert pairs."""
    ctx = ssl.create_default_context()
    for base in cert_dirs:
        d = base / host
        if not d.is_dir():
            continue
        for crt in sorted(d.glob("*.crt")):
            ctx.load_verify_locations(cafile=str(crt))
        for cert in sorted(d.glob("*.cert")):
            key = cert.with_suffix(".key")
            if key.exists():
                ctx.load_cert_chain(str(cert), str(key))
    return ctx


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _CHALLENGE_RE.finditer(rest):
        key = m.group(1) or m.group(3)
        params[key.lower()] = m.group(2) if m.group(1) else m.group(4)
    return scheme.lower(), params


def retry_after(resp: httpx.Response, attempt: int, base: float) -> float:
    value = resp.headers.get("Retry-After", "")
    if value.isdigit():
        return min(float(value), 60.0)
    return float(base * (2 ** attempt))


class RegistryClient:
    """One registry host.  Thread-safe: pulls fetch several blobs at once through one client."""

    def __init__(self, host: str, *, creds: Credentials | None = None, insecure: bool = False,
                 retries: int = 4, backoff: float = 0.5, timeout: float = 60.0,
                 cert_dirs: tuple[Path, ...] = CERT_DIRS) -> None:
        self.host = host
        self.creds = creds
        self.insecure = insecure
        self.retries = retries
        self.backoff = backoff
        verify: ssl.SSLContext | bool = tls_context(host, cert_dirs)
        if insecure:
            verify = False
        # httpx reads proxies (and more) from the environment only when asked: building those
        # transports costs ~0.15 s, so it is asked only when a proxy variable is set.
        self.http = httpx.Client(verify=verify, timeout=httpx.Timeout(timeout, connect=15.0),
                                 follow_redirects=True, trust_env=_proxy_configured(),
                                 headers={"User-Agent": "graphdriver/0.1"},
                                 limits=httpx.Limits(max_connections=16))
        self._base: str | None = None
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}
        self._challenge: tuple[str, dict[str, str]] | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- scheme and auth -------------------------------------------------------------------

    @property
    def plain_http_allowed(self) -> bool:
        return self.insecure or is_loopback(self.host)

    def base_url(self) -> str:
        """``https://host``, or ``http://`` where allowed and HTTPS does not answer; pinged once."""
        with self._lock:
            if self._base is not None:
                return self._base
        schemes = ["https", "http"] if self.plain_http_allowed else ["https"]
        last: Exception | None = None
        for scheme in schemes:
            url = f"{scheme}://{self.host}"
            try:
                # HTTPS that may be refused is tried once: a plain-HTTP registry answers its
                # handshake with garbage, and retrying that only wastes seconds.
                once = scheme == "https" and len(schemes) > 1
                resp = self._send_retrying("GET", f"{url}/v2/", {}, once=once)
            except RegistryError as exc:
                last = exc
                continue
            if resp.status_code == 401:
                self._challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            elif resp.status_code >= 400 and resp.status_code != 404:
                raise RegistryError(f"{self.host}: /v2/ answered {resp.status_code}")
            with self._lock:
                self._base = url
            return url
        raise RegistryError(f"registry {self.host} is unreachable: {last}")

    def _token(self, scope: str) -> str | None:
        """A bearer token for *scope* (cached until it expires) or None for basic/anonymous."""
        if self._challenge is None:
            return None
        scheme, params = self._challenge
        if scheme != "bearer":
            return None
        with self._lock:
            cached = self._tokens.get(scope)
            if cached and cached[1] > time.monotonic():
                return cached[0]
        realm = params.get("realm")
        if not realm:
            raise Unauthorized(f"{self.host}: bearer challenge without a realm")
        query = {"scope": scope.split(" ")} if scope else {}
        if params.get("service"):
            query["service"] = [params["service"]]
        pairs = [(k, v) for k, vs in query.items() for v in vs]
        auth = (self.creds.username, self.creds.password) if self.creds else None
        url = realm + ("&" if "?" in realm else "?") + urlencode(pairs)
        try:
            resp = self.http.get(url, auth=auth)
        except httpx.HTTPError as exc:
            raise RegistryError(f"token server {realm}: {exc}") from exc
        if resp.status_code in (401, 403):
            raise Unauthorized(f"{self.host}: the token server refused the credentials "
                               f"({resp.status_code})")
        if resp.status_code != 200:
            raise RegistryError(f"token server {realm} answered {resp.status_code}")
        try:
            obj = resp.json()
            token = str(obj.get("token") or obj.get("access_token"))
            expires = float(obj.get("expires_in") or 60)
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"token server {realm} answered something that is not "
                                "a token") from exc
        with self._lock:
            self._tokens[scope] = (token, time.monotonic() + max(expires - 10, 5))
        return token

    def _auth_headers(self, scope: str) -> dict[str, str]:
        if self._challenge is None:
            return {}
        scheme, _ = self._challenge
        if scheme == "basic":
            if self.creds is None:
                return {}
            raw = f"{self.creds.username}:{self.creds.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        token = self._token(scope)
        return {"Authorization": f"Bearer {token}"} if token else {}

    # ----- requests ------------------------------------------------------------------------

    def _send_retrying(self, method: str, url: str, headers: dict[str, str],
                       content: bytes | Iterator[bytes] | None = None,
                       stream: bool = False, once: bool = False) -> httpx.Response:
        """One request with retries on connection errors, 429 and 5xx (Retry-After honoured).

        A body given as an iterator cannot be re-sent: such a request is tried once.
        """
        attempts = 1 if once or isinstance(content, Iterator) else self.retries + 1
        for attempt in range(attempts):
            try:
                req = self.http.build_request(method, url, headers=headers, content=content)
                resp = self.http.send(req, stream=stream)
            except httpx.HTTPError as exc:
                if attempt + 1 >= attempts:
                    raise RegistryError(f"{method} {url}: {exc or type(exc).__name__}") from exc
                time.sleep(self.backoff * (2 ** attempt))
                continue
            if resp.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                delay = retry_after(resp, attempt, self.backoff)
                resp.close()
                log.debug("%s %s: %s, retrying in %.1fs", method, url, resp.status_code, delay)
                time.sleep(delay)
                continue
            return resp
        raise AssertionError("unreachable")

    def request(self, method: str, path_or_url: str, scope: str, *,
                headers: dict[str, str] | None = None,
                content: bytes | Iterator[bytes] | None = None,
                stream: bool = False, ok: tuple[int, ...] = (200,),
                what: str = "") -> httpx.Response:
        """A request to the registry with auth; any status outside *ok* is one clear error."""
        url = path_or_url if "://" in path_or_url else self.base_url() + path_or_url
        hdrs = dict(headers or {})
        hdrs.update(self._auth_headers(scope))
        resp = self._send_retrying(method, url, hdrs, content, stream)
        if resp.status_code == 401 and not isinstance(content, Iterator):
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            if challenge:
                self._challenge = parse_challenge(challenge)
                with self._lock:
                    self._tokens.pop(scope, None)
                hdrs.update(self._auth_headers(scope))
                resp = self._send_retrying(method, url, hdrs, content, stream)
        if resp.status_code in ok:
            return resp
        raise self._error(resp, what or f"{method} {path_or_url}")

    def _error(self, resp: httpx.Response, what: str) -> Exception:
        code = resp.status_code
        detail = ""
        try:
            if not resp.is_stream_consumed:
                resp.read()
            errs = resp.json().get("errors") or []
            if errs:
                detail = ": " + "; ".join(f"{e.get('code')} {e.get('message', '')}".strip()
                                          for e in errs[:2])
        except (ValueError, AttributeError, httpx.HTTPError):
            pass
        finally:
            resp.close()
        msg = f"{self.host}: {what}: {code} {resp.reason_phrase}{detail}"
        if code in (401, 403):
            hint = "" if self.creds else " (no credentials: use --creds or log in)"
            return Unauthorized(msg + hint)
        if code == 404:
            return NotFound(msg)
        return RegistryError(msg)

    # ----- reading -------------------------------------------------------------------------

    @staticmethod
    def scope(repo: str, actions: str = "pull") -> str:
        return f"repository:{repo}:{actions}"

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, content type, digest) of a manifest; a digest reference is verified."""
        resp = self.request("GET", f"/v2/{repo}/manifests/{ref}", self.scope(repo),
                            headers={"Accept": mt.MANIFEST_ACCEPT}, stream=True,
                            what=f"manifest {repo}:{ref}")
        try:
            data = _read_limited(resp, MAX_MANIFEST, f"manifest {repo}:{ref}")
        finally:
            resp.close()
        if ref.startswith(("sha256:", "sha512:")):
            check_digest(data, ref, f"manifest {repo}@{ref}")
            digest = ref
        else:
            digest = sha256_digest(data)
            header = resp.headers.get("Docker-Content-Digest")
            if header and header.startswith("sha256:") and header != digest:
                raise InvalidArchive(f"manifest {repo}:{ref}: digest mismatch (registry says "
                                     f"{header}, content is {digest})")
        return data, resp.headers.get("Content-Type", ""), digest

    def get_small_blob(self, repo: str, desc: Descriptor, limit: int = MAX_CONFIG) -> bytes:
        """A config (or another small blob) read whole and verified."""
        if desc.size > limit:
            raise InvalidArchive(f"blob {desc.digest} is {desc.size} bytes, more than {limit}")
        with self.open_blob(repo, desc) as blob:
            return blob.read()

    def open_blob(self, repo: str, desc: Descriptor) -> BlobReader:
        return BlobReader(self, repo, desc)

    def blob_exists(self, repo: str, digest: str, scope: str | None = None) -> bool:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}",
                            scope or self.scope(repo, "pull,push"), ok=(200, 404),
                            what=f"checking blob {digest}")
        resp.close()
        return resp.status_code == 200

    # ----- writing -------------------------------------------------------------------------

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; False when the registry offers an upload instead."""
        scope = f"{self.scope(repo, 'pull,push')} {self.scope(from_repo, 'pull')}"
        query = urlencode({"mount": digest, "from": from_repo})
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/?{query}", scope,
                            ok=(201, 202), what=f"mounting {digest} from {from_repo}")
        resp.close()
        if resp.status_code == 202:
            self._cancel(resp, repo)
        return resp.status_code == 201

    def _cancel(self, resp: httpx.Response, repo: str) -> None:
        location = resp.headers.get("Location")
        if location:
            url = urljoin(str(resp.url), location)
            with _quiet():
                self.request("DELETE", url, self.scope(repo, "pull,push"),
                             ok=(200, 202, 204, 404), what="cancelling an upload").close()

    def upload_blob(self, repo: str, stream: BinaryIO, digest: str | None = None,
                    size: int | None = None) -> tuple[str, int]:
        """Upload a blob; returns (digest, size).

        With digest and size known (a config, a kept blob) the blob goes in one monolithic PUT;
        otherwise it is sent in PATCH chunks while its digest is computed, then closed with PUT.
        """
        scope = self.scope(repo, "pull,push")
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope, ok=(202,),
                            what="starting an upload")
        resp.close()
        location = urljoin(str(resp.url), resp.headers.get("Location", ""))
        if digest is not None and size is not None and size <= UPLOAD_CHUNK:
            data = stream.read()
            check_digest(data, digest, "upload")
            resp = self.request("PUT", _with_query(location, {"digest": digest}), scope,
                                headers={"Content-Type": "application/octet-stream"},
                                content=data, ok=(201,), what=f"uploading {digest}")
            resp.close()
            return digest, len(data)
        h = hashlib.sha256()
        offset = 0
        while True:
            chunk = stream.read(UPLOAD_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            resp = self.request("PATCH", location, scope, content=chunk, ok=(202,),
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Range": f"{offset}-{offset + len(chunk) - 1}"},
                                what="uploading a chunk")
            resp.close()
            location = urljoin(str(resp.url), resp.headers.get("Location", location))
            offset += len(chunk)
        got = "sha256:" + h.hexdigest()
        if digest is not None and got != digest:
            self._cancel(resp, repo)
            raise InvalidArchive(f"upload: digest mismatch (expected {digest}, got {got})")
        resp = self.request("PUT", _with_query(location, {"digest": got}), scope, ok=(201,),
                            what=f"closing the upload of {got}")
        resp.close()
        return got, offset

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        resp = self.request("PUT", f"/v2/{repo}/manifests/{ref}", self.scope(repo, "pull,push"),
                            headers={"Content-Type": media_type}, content=data, ok=(201,),
                            what=f"pushing the manifest of {repo}:{ref}")
        resp.close()
        return sha256_digest(data)


def _with_query(url: str, params: dict[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


class _quiet:
    """Best-effort clean-up: a failure of a cancel is not the user's error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, RegistryError)


def _read_limited(resp: httpx.Response, limit: int, what: str) -> bytes:
    out = bytearray()
    try:
        for chunk in resp.iter_raw(CHUNK):
            out += chunk
            if len(out) > limit:
                raise InvalidArchive(f"{what}: larger than {limit} bytes")
    except httpx.HTTPError as exc:
        raise RegistryError(f"{what}: {exc}") from exc
    return bytes(out)


class BlobReader(io.RawIOBase):
    """A blob's bytes as a stream: digest and size verified at the end, resumed with a Range
    request when the connection drops (at most ``client.retries`` times).

    A foreign layer (``urls``) is read from its URL without registry credentials.
    """

    def __init__(self, client: RegistryClient, repo: str, desc: Descriptor) -> None:
        super().__init__()
        self.client = client
        self.repo = repo
        self.desc = desc
        self._check = DigestCheck(desc.digest, desc.size, f"blob {desc.digest}")
        self.offset = 0
        self._resp: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = b""
        self._resumes = 0
        self._verified = False
        #: called with the bytes read so far (progress display)
        self.on_bytes: Callable[[int], None] | None = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        if self.desc.urls:
            resp = self._open_foreign(headers)
        else:
            resp = self.client.request("GET", f"/v2/{self.repo}/blobs/{self.desc.digest}",
                                       self.client.scope(self.repo), headers=headers,
                                       stream=True, ok=(200, 206),
                                       what=f"blob {self.desc.digest}")
        skip = self.offset if (self.offset and resp.status_code == 200) else 0
        self._resp = resp
        self._chunks = resp.iter_raw(CHUNK)
        while skip:  # no Range support: read up to where we were
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            cut = min(skip, len(chunk))
            skip -= cut
            self._pending = chunk[cut:]

    def _open_foreign(self, headers: dict[str, str]) -> httpx.Response:
        last: Exception | None = None
        for url in self.desc.urls:
            if not url.startswith(("https://", "http://")):
                continue
            try:
                resp = self.client._send_retrying("GET", url, headers, stream=True)
            except RegistryError as exc:
                last = exc
                continue
            if resp.status_code in (200, 206):
                return resp
            resp.close()
            last = RegistryError(f"{url}: {resp.status_code}")
        raise RegistryError(f"foreign layer {self.desc.digest}: no URL answered ({last})")

    def _next_chunk(self) -> bytes:
        while True:
            if self._pending:
                chunk, self._pending = self._pending, b""
                return chunk
            if self._chunks is None:
                self._open()
                continue
            try:
                return next(self._chunks, b"")
            except httpx.HTTPError as exc:
                self._drop()
                if self._resumes >= self.client.retries or self.offset >= self.desc.size:
                    raise RegistryError(f"blob {self.desc.digest}: {exc or type(exc).__name__}"
                                        f" after {self.offset} of {self.desc.size} bytes") from exc
                self._resumes += 1
                log.info("blob %s cut at %d bytes; resuming", self.desc.digest, self.offset)

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp = None
        self._chunks = None

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._verified or not len(view):
            return 0
        chunk = self._next_chunk()
        if not chunk:
            self._finish()
            return 0
        if len(chunk) > len(view):
            chunk, self._pending = chunk[:len(view)], chunk[len(view):]
        n = len(chunk)
        try:
            self._check.update(chunk)
        except InvalidArchive:
            self._drop()
            raise
        view[:n] = chunk
        self.offset += n
        if self.on_bytes is not None:
            self.on_bytes(self.offset)
        return n

    def _finish(self) -> None:
        self._drop()
        self._check.finish()
        self._verified = True

    def drain_and_verify(self) -> None:
        """Read what is left and check digest and size (the layer's commit waits for this)."""
        sink = bytearray(CHUNK)
        while not self._verified:
            if self.readinto(sink) == 0 and not self._verified:
                self._finish()

    @property
    def verified(self) -> bool:
        return self._verified

    def close(self) -> None:
        self._drop()
        super().close()

