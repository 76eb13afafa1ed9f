"""Who may talk to the host service, and how they prove it.

- Unix socket: the kernel says who the peer is (SO_PEERCRED). Root, the daemon's own user and
  members of the socket's group are let in; anyone else is disconnected before a byte is read.
- TCP: TLS only. A client proves itself with a bearer token (created with `vmkit token create`,
  stored as a SHA-256 hash, revocable) or with a client certificate issued by this daemon's
  client CA (`vmkit trust issue`) and not revoked. No route answers an unauthenticated peer.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.errors import AlreadyExists, InvalidValue, NotFound
from vmkit.model.api import TokenInfo
from vmkit.model.names import validate_name

TOKEN_PREFIX = "vmk_"


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of one connection."""

    transport: str  # "unix" or "tls"
    uid: int | None = None
    pid: int | None = None
    address: str | None = None
    cert_fingerprint: str | None = None
    allowed: bool = False

    def describe(self) -> str:
        if self.transport == "unix":
            return f"unix:uid={self.uid},pid={self.pid}"
        cert = f",cert={self.cert_fingerprint[:16]}" if self.cert_fingerprint else ""
        return f"tls:{self.address}{cert}"


# -- the unix socket's peer ------------------------------------------------------------------
def unix_peer(sock: socket.socket, group: int | None) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    allowed = uid in (0, os.geteuid()) or (group is not None and group in _groups(pid, gid))
    return Peer("unix", uid=uid, pid=pid, allowed=allowed)


def _groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    groups |= {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return groups


# -- tokens ------------------------------------------------------------------------------------
def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """tokens.json (root, 0600): name → SHA-256 of the token; the token itself is shown once."""

    def __init__(self, path: Path):
        self.path = path

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def create(self, name: str) -> str:
        validate_name(name, kind="token name")
        data = self._load()
        if name in data:
            raise AlreadyExists(f"a token named {name!r} exists",
                                hint=f"revoke it first (vmkit token revoke {name}) or pick "
                                     "another name")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        data[name] = {"sha256": digest(token), "created_at": time.time(),
                      "prefix": token[:10]}
        self._save(data)
        return token

    def revoke(self, name: str) -> None:
        data = self._load()
        if name not in data:
            raise NotFound(f"unknown token {name!r} (tokens: {', '.join(data) or 'none'})",
                           hint="see vmkit token list")
        del data[name]
        self._save(data)

    def list(self) -> list[TokenInfo]:
        return [TokenInfo(name=n, created_at=v.get("created_at", 0.0), prefix=v.get("prefix", ""))
                for n, v in sorted(self._load().items())]

    def check(self, token: str) -> str | None:
        """The name of the token, or None: compared in constant time, read fresh each time so
        a revocation takes effect on the next request."""
        return self.check_digest(digest(token))

    def check_digest(self, token_digest: str) -> str | None:
        """The same by the token's SHA-256 (what a browser session keeps instead of it)."""
        found = None
        for name, entry in self._load().items():
            if hmac.compare_digest(str(entry.get("sha256", "")), token_digest):
                found = name
        return found


# -- certificates ----------------------------------------------------------------------------
def fingerprint_pem(pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _key_and_name(common_name: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    return key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def ensure_server_cert(cert: Path, key_path: Path, addresses: list[str]) -> str:
    """The daemon's TLS certificate, generated at first start (self-signed, ECDSA P-256, for
    this host's name and the listen addresses); returns its SHA-256 fingerprint."""
    if cert.exists() and key_path.exists():
        return fingerprint_pem(cert.read_bytes())
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key, name = _key_and_name(f"vmkit@{socket.gethostname()}")
    alt: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    for address in {"127.0.0.1", *addresses}:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            alt.append(x509.DNSName(address))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(key, hashes.SHA256()))
    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(key_path, _pem_key(key))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return fingerprint_pem(cert.read_bytes())


class ClientCA:
    """This daemon's CA for client certificates: `issue` makes a key and a certificate a remote
    client presents; `revoke` refuses one from then on (checked per request)."""

    def __init__(self, folder: Path):
        self.cert = folder / "client-ca.crt"
        self.key = folder / "client-ca.key"
        self.revoked = folder / "revoked-certs.json"
        self.issued = folder / "issued-certs.json"

    def ensure(self) -> Path:
        if self.cert.exists() and self.key.exists():
            return self.cert
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        key, name = _key_and_name(f"vmkit client CA@{socket.gethostname()}")
        now = datetime.datetime.now(datetime.UTC)
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .sign(key, hashes.SHA256()))
        self.cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(self.key, _pem_key(key))
        self.cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        return self.cert

    def issue(self, name: str) -> tuple[bytes, bytes, str]:
        """(certificate PEM, key PEM, fingerprint) of a new client certificate named `name`."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        validate_name(name, kind="client name")
        issued = self._read(self.issued)
        if name in issued:
            raise AlreadyExists(f"a client certificate named {name!r} was issued",
                                hint=f"revoke it first (vmkit trust revoke {name})")
        self.ensure()
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        ca = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key, subject = _key_and_name(name)
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        pem = cert.public_bytes(serialization.Encoding.PEM)
        fingerprint = fingerprint_pem(pem)
        issued[name] = fingerprint
        self._write(self.issued, issued)
        return pem, _pem_key(key), fingerprint

    def revoke(self, name: str) -> None:
        issued = self._read(self.issued)
        if name not in issued:
            raise NotFound(f"no client certificate named {name!r} "
                           f"(issued: {', '.join(issued) or 'none'})")
        revoked = self._read(self.revoked)
        revoked[name] = issued.pop(name)
        self._write(self.revoked, revoked)
        self._write(self.issued, issued)

    def name_of(self, fingerprint: str) -> str | None:
        """The client a verified certificate belongs to, None when revoked or unknown."""
        for name, known in self._read(self.issued).items():
            if hmac.compare_digest(known, fingerprint):
                return name
        return None

    def list(self) -> dict[str, str]:
        return self._read(self.issued)

    @staticmethod
    def _read(path: Path) -> dict[str, str]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    @staticmethod
    def _write(path: Path, data: dict[str, str]) -> None:
        tmp = path.with_suffix(".tmp")
        _write_private(tmp, json.dumps(data, indent=1).encode())
        os.replace(tmp, path)


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check_listen(address: str) -> tuple[str, int]:
    """HOST:PORT of the TCP listener."""
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
        ipaddress.ip_address(host.strip("[]"))
    except ValueError as exc:
        raise InvalidValue(f"invalid listen address {address!r}",
                           hint="use IP:PORT, e.g. 198.18.0.1:8443") from exc
    if not 0 < number < 65536:
        raise InvalidValue(f"invalid port in listen address {address!r}")
    return host.strip("[]"), number
