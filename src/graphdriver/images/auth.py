"""Registry credentials: ``--creds``, then ``$REGISTRY_AUTH_FILE`` (containers' auth.json), then
``$DOCKER_CONFIG/config.json`` / ``~/.docker/config.json`` (``auths``, ``credHelpers``,
``credsStore``); anonymous otherwise.

Owns where credentials come from; imports only ``errors`` and ``reference``.  Never logs a secret.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GraphDriverError, InvalidArgument
from .reference import DEFAULT_DOMAIN

#: Docker stores Docker Hub's credentials under this key
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def parse_creds(text: str) -> Credentials:
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise InvalidArgument("--creds must be USER:PASSWORD")
    return Credentials(user, password)


def _keys_for(domain: str, repository: str) -> list[str]:
    """The auth-file keys that may name this registry, most specific first."""
    if domain == DEFAULT_DOMAIN:
        hosts = [DOCKER_HUB_AUTH_KEY, "docker.io", "index.docker.io", "registry-1.docker.io",
                 "https://index.docker.io/v1", "https://registry-1.docker.io"]
    else:
        hosts = [domain, f"https://{domain}", f"http://{domain}", f"https://{domain}/v2/",
                 f"https://{domain}/v1/"]
    keys = []
    parts = repository.split("/")
    for i in range(len(parts), 0, -1):  # containers' auth.json allows host/namespace/repo keys
        keys.append(f"{domain}/{'/'.join(parts[:i])}")
    return keys + hosts


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise GraphDriverError(f"reading credentials from {path}: {exc}") from exc
    return obj if isinstance(obj, dict) else None


def _from_auths(auths: Any, keys: list[str], where: Path) -> Credentials | None:
    if not isinstance(auths, dict):
        return None
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as exc:
                raise GraphDriverError(f"{where}: malformed 'auth' for {key}") from exc
            return Credentials(user, password)
        if entry.get("username"):
            return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


def _from_helper(helper: str, server: str) -> Credentials | None:
    """``docker-credential-HELPER get`` with the server URL on stdin (Docker's protocol)."""
    try:
        proc = subprocess.run([f"docker-credential-{helper}", "get"], input=server.encode(),
                              capture_output=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise GraphDriverError(f"credential helper docker-credential-{helper} is not "
                               "installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise GraphDriverError(f"credential helper docker-credential-{helper} timed out") from exc
    if proc.returncode != 0:
        if b"credentials not found" in proc.stdout + proc.stderr:
            return None
        msg = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        raise GraphDriverError(f"credential helper docker-credential-{helper} failed: "
                               f"{msg[0] if msg else proc.returncode}")
    try:
        obj = json.loads(proc.stdout)
        return Credentials(str(obj["Username"]), str(obj["Secret"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise GraphDriverError(f"credential helper docker-credential-{helper} answered "
                               "something that is not its JSON") from exc


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def lookup(domain: str, repository: str, given: Credentials | None = None) -> Credentials | None:
    """The credentials for *domain*/*repository*, in the documented order."""
    if given is not None:
        return given
    keys = _keys_for(domain, repository)
    auth_file = os.environ.get("REGISTRY_AUTH_FILE")
    if auth_file:
        path = Path(auth_file)
        obj = _read_json(path)
        if obj is not None:
            found = _from_auths(obj.get("auths"), keys, path)
            if found is not None:
                return found
    path = docker_config_path()
    obj = _read_json(path)
    if obj is None:
        return None
    server = DOCKER_HUB_AUTH_KEY if domain == DEFAULT_DOMAIN else domain
    helpers = obj.get("credHelpers")
    if isinstance(helpers, dict) and isinstance(helpers.get(server), str):
        return _from_helper(helpers[server], server)
    found = _from_auths(obj.get("auths"), keys, path)
    if found is not None:
        return found
    store = obj.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, server)
    return None
