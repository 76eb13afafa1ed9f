"""The host service's state: one Host, the operations, the event bus, the watcher, the
supervisor, the audit log and the credentials. The API (vmkit.daemon.api) is a thin layer on
top; everything here is usable from a test without HTTP."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkit.daemon.auth import ClientCA, TokenStore
from vmkit.daemon.events import EventBus
from vmkit.daemon.operations import Registry
from vmkit.daemon.supervisor import Supervisor
from vmkit.daemon.watcher import Seen, Watcher
from vmkit.errors import HostError
from vmkit.host import Host
from vmkit.model.runtime import RuntimeRecord


@dataclass(frozen=True)
class DaemonPaths:
    """The daemon's own files, under VMKIT_HOME/daemon (root, 0700)."""

    folder: Path

    @property
    def lock(self) -> Path:
        return self.folder / "daemon.lock"

    @property
    def info(self) -> Path:
        """Where the CLI finds the running daemon of this VMKIT_HOME (socket, pid)."""
        return self.folder / "daemon.json"

    @property
    def tokens(self) -> Path:
        return self.folder / "tokens.json"

    @property
    def audit(self) -> Path:
        return self.folder / "audit.log"

    @property
    def restarts(self) -> Path:
        return self.folder / "restarts.json"

    @property
    def autostart(self) -> Path:
        return self.folder / "autostart.boot"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def spool(self) -> Path:
        """Bundles and files in transit (uploads, exports to download)."""
        return self.folder / "spool"


def paths_for(host: Host) -> DaemonPaths:
    return DaemonPaths(host.layout.root / "daemon")


class AuditLog:
    """One JSON line per mutating request: who, what, when, the result."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def write(self, **entry: Any) -> None:
        line = json.dumps({"at": time.time(), **entry}, sort_keys=True) + "\n"
        with self._lock, contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


@dataclass
class Service:
    host: Host
    paths: DaemonPaths
    bus: EventBus = field(default_factory=EventBus)
    listeners: list[str] = field(default_factory=list)
    group: int | None = None

    def __post_init__(self) -> None:
        self.paths.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.paths.spool.mkdir(exist_ok=True, mode=0o700)
        self.operations = Registry(self.bus)
        self.supervisor = Supervisor(self, self.paths.restarts)
        self.watcher = Watcher(self.host, self.bus, self._exited)
        self.audit = AuditLog(self.paths.audit)
        self.tokens = TokenStore(self.paths.tokens)
        self.client_ca = ClientCA(self.paths.folder)
        self.operations.on_finished.append(lambda op: self.watcher.poke())
        self._lock_fd: int | None = None
        self.started_at = time.time()
        self.recovered: list[str] = []

    def acquire(self) -> None:
        """One daemon per VMKIT_HOME (an exclusive lock held for the daemon's life)."""
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise HostError(f"another vmkit daemon serves {self.host.layout.root}",
                            hint="stop it first (vmkit daemon --stop) or use another "
                                 "VMKIT_HOME") from exc
        self._lock_fd = fd

    def start(self) -> None:
        """Adopt what runs, finish what a killed daemon (or CLI) left half-done, then watch."""
        self.recovered = self.host.recover()  # journal: roll forward or back
        for name in self.recovered:
            self.bus.publish("operation-recovered", vm=name)
        self.watcher.start()
        self.supervisor.catch_up()
        self.supervisor.autostart(self.paths.autostart)

    def publish_info(self, socket_path: str | None, tcp: str | None, pidfile: str | None) -> None:
        data = {"pid": os.getpid(), "socket": socket_path, "tcp": tcp, "pidfile": pidfile,
                "started_at": self.started_at}
        tmp = self.paths.info.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.paths.info)

    def stop(self) -> None:
        self.supervisor.stop()
        self.watcher.stop()
        self.operations.shutdown()
        with contextlib.suppress(FileNotFoundError):
            self.paths.info.unlink()

    def _exited(self, name: str, seen: Seen, record: RuntimeRecord) -> None:
        self.supervisor.on_exit(name, seen, record)
