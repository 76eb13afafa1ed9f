"""The daemons the CLI knows: `vmkit remote add NAME https://HOST:PORT` pins the server's
certificate (its fingerprint is shown and must be accepted) and keeps the credentials, in
~/.config/vmkit (VMKIT_CONFIG_DIR), 0600. And how the CLI finds this host's own daemon."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import ssl
from pathlib import Path
from typing import Any

from vmkit.client.remote import RemoteHost, connect
from vmkit.errors import AlreadyExists, HostError, InvalidValue, NotFound
from vmkit.model.names import validate_name


def config_dir() -> Path:
    env = os.environ.get("VMKIT_CONFIG_DIR")
    return Path(env).expanduser() if env else Path.home() / ".config" / "vmkit"


def _file() -> Path:
    return config_dir() / "remotes.json"


def load() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidValue(f"cannot read {_file()}: {exc}",
                           hint="fix or remove the file, then vmkit remote add again") from exc
    return data if isinstance(data, dict) else {}


def _save(data: dict[str, dict[str, Any]]) -> None:
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / ".remotes.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=1)
    os.replace(tmp, _file())


def server_certificate(url: str) -> tuple[str, str]:
    """(PEM, SHA-256 fingerprint) of the certificate the server at `url` presents."""
    if not url.startswith("https://"):
        raise InvalidValue(f"invalid remote URL {url!r}", hint="use https://HOST:PORT")
    hostport = url[len("https://"):].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidValue(f"invalid remote URL {url!r}: no port", hint="use https://HOST:PORT")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=10)
    except (OSError, ssl.SSLError) as exc:
        raise HostError(f"cannot fetch the certificate of {url}: {exc}",
                        hint="is the daemon listening there (vmkit daemon --listen)?") from exc
    return pem, hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def add(name: str, url: str, *, pem: str, token: str | None,
        client_cert: tuple[str, str] | None) -> None:
    validate_name(name, kind="remote name")
    data = load()
    if name in data:
        raise AlreadyExists(f"a remote named {name!r} exists",
                            hint=f"vmkit remote remove {name} first")
    folder = config_dir() / "servercerts"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_file = folder / f"{name}.crt"
    cert_file.write_text(pem)
    entry: dict[str, Any] = {"url": url, "server_cert": str(cert_file), "token": token}
    if client_cert:
        entry["client_cert"] = list(client_cert)
    data[name] = entry
    _save(data)


def remove(name: str) -> None:
    data = load()
    if name not in data:
        raise NotFound(f"unknown remote {name!r} (remotes: {', '.join(data) or 'none'})")
    del data[name]
    _save(data)
    with contextlib.suppress(FileNotFoundError):
        (config_dir() / "servercerts" / f"{name}.crt").unlink()


def open_remote(name: str) -> RemoteHost:
    data = load()
    entry = data.get(name)
    if entry is None:
        raise NotFound(f"unknown remote {name!r} (remotes: {', '.join(data) or 'none'})",
                       hint="vmkit remote add NAME https://HOST:PORT --token TOKEN")
    client = entry.get("client_cert")
    return connect(entry["url"], token=entry.get("token"), server_cert=entry.get("server_cert"),
                   client_cert=(client[0], client[1]) if client else None)


def credentials(name: str) -> dict[str, Any]:
    """What a daemon needs to reach remote `name` itself (a move's destination): its URL, its
    pinned certificate (PEM) and its token."""
    data = load()
    entry = data.get(name)
    if entry is None:
        raise NotFound(f"unknown remote {name!r} (remotes: {', '.join(data) or 'none'})",
                       hint="vmkit remote add NAME https://HOST:PORT --token TOKEN")
    if not entry.get("token"):
        raise InvalidValue(f"remote {name!r} has no token: a move's source daemon "
                           "authenticates with one", hint=f"vmkit remote remove {name}; then "
                           "add it again with --token")
    return {"url": entry["url"], "server_cert": Path(entry["server_cert"]).read_text(),
            "token": entry["token"]}
