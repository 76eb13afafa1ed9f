"""The web dashboard's side of the host service: browser sessions and the dashboard's files.

A browser cannot send a bearer token on a page load or a websocket, so the dashboard logs in
once: POST /ui/session with an API token (`vmkit token create`) opens a session and names it in
a cookie (HttpOnly, Secure, SameSite=Strict). The session keeps the token's digest, so a revoked
token ends its sessions at the next request. Requests that change anything must also
carry the session's CSRF value in a header (a cross-site form cannot set headers), and a
websocket opened on a session must come from the daemon's own origin. The token itself never
goes back to the page.

The page is static files (web/static) and xterm.js from npm (web/node_modules), read through
the public API like any other client.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

COOKIE = "__Host-vmkit_session"  # __Host-: Secure, Path=/, no Domain
CSRF_HEADER = "x-vmkit-csrf"
IDLE_LIMIT = 8 * 3600.0  # a session unused this long is closed
SESSION_LIMIT = 1000  # the oldest session goes when a new one would exceed this
SAVE_USE_EVERY = 600.0  # seconds: how stale the saved last-use times may get
# reachable before logging in: the login page and what it loads
PUBLIC_BODY_LIMIT = 4096  # bytes: what an unauthenticated request may send (the login)
PUBLIC = frozenset({("GET", "/ui/login"), ("POST", "/ui/session"),
                    ("GET", "/ui/static/login.js"), ("GET", "/ui/static/style.css")})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    user: str
    token_digest: str  # the token's SHA-256: checked against tokens.json on every request
    csrf: str
    opened: float = field(default_factory=time.time)
    used: float = field(default_factory=time.time)


class Sessions:
    """Open browser sessions. Kept in sessions.json (root, 0600) by the SHA-256 of their id,
    so a browser stays logged in across a daemon restart (its console reconnects) while the
    file alone opens no session and holds no token."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._by_key: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._saved = 0.0
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            if path is not None and path.exists():
                for key, entry in json.loads(path.read_text()).items():
                    self._by_key[key] = Session(**entry)

    def open(self, user: str, token_digest: str) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        session = Session(user=user, token_digest=token_digest, csrf=secrets.token_urlsafe(32))
        with self._lock:
            if len(self._by_key) >= SESSION_LIMIT:
                oldest = min(self._by_key, key=lambda k: self._by_key[k].used)
                del self._by_key[oldest]
            self._by_key[_key(session_id)] = session
            self._save()
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        key = _key(session_id)
        with self._lock:
            session = self._by_key.get(key)
            if session is None:
                return None
            now = time.time()
            if now - session.used > IDLE_LIMIT:
                del self._by_key[key]
                self._save()
                return None
            session.used = now
            if now - self._saved > SAVE_USE_EVERY:
                self._save()
            return session

    def close(self, session_id: str | None) -> None:
        with self._lock:
            if self._by_key.pop(_key(session_id or ""), None) is not None:
                self._save()

    def _save(self) -> None:
        self._saved = time.time()
        if self.path is None:
            return
        data = {key: asdict(session) for key, session in self._by_key.items()}
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
            os.replace(tmp, self.path)


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def session_id(headers: dict[bytes, bytes]) -> str | None:
    """The session named by the request's cookie header. Parsed by hand: another site on the
    same host name (cookies ignore ports) may add cookies vmkit does not understand, which must
    not log the user out, or a second cookie of vmkit's name, which must not win: two of them
    are no session at all."""
    found: list[str] = []
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            found.append(value.strip())
    return found[0] if len(found) == 1 and found[0] else None


def csrf_ok(session: Session, headers: dict[bytes, bytes]) -> bool:
    sent = headers.get(CSRF_HEADER.encode(), b"")
    return bool(sent) and hmac.compare_digest(sent, session.csrf.encode())


def foreign_origin(headers: dict[bytes, bytes]) -> bool:
    """A request a browser sent from another site's page (CLI and SDK clients send no Origin):
    refused for any change and any websocket, whatever the credentials (a client certificate
    installed in a browser too)."""
    origin = headers.get(b"origin")
    return origin is not None and not same_origin(headers)


def same_origin(headers: dict[bytes, bytes]) -> bool:
    """A websocket on a session must come from a page of this daemon (no cross-site
    websocket hijacking: a browser sends the cookie whoever opens the socket)."""
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    return bool(origin) and bool(host) and origin == f"https://{host}"


def cookie_header(session_id: str, *, clear: bool = False) -> str:
    value = "" if clear else session_id
    expiry = "; Max-Age=0" if clear else ""
    return f"{COOKIE}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{expiry}"


def web_root() -> Path | None:
    """Where the dashboard's files are: $VMKIT_WEB, else web/ of the source tree."""
    configured = os.environ.get("VMKIT_WEB")
    root = Path(configured) if configured else Path(__file__).resolve().parents[3] / "web"
    return root if (root / "static" / "index.html").is_file() else None


class StaticPages(StaticFiles):
    """The dashboard's files, with the same security headers as its pages (no symlink out of
    the folder is followed: StaticFiles checks the real path)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response
