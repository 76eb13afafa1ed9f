"""The host service's state: one Host, the operations, the event bus, the watcher, the
supervisor, the audit log and the credentials. The API (vmkit.daemon.api) is a thin layer on
top; everything here is usable from a test without HTTP."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkit.client.remote import MovePeer
from vmkit.daemon.auth import ClientCA, TokenStore
from vmkit.daemon.events import EventBus
from vmkit.daemon.history import History
from vmkit.daemon.migrations import Arrivals
from vmkit.daemon.operations import Registry
from vmkit.daemon.supervisor import Supervisor
from vmkit.daemon.watcher import Seen, Watcher
from vmkit.daemon.web import Sessions
from vmkit.errors import HostError, VmkitError
from vmkit.host import Host
from vmkit.model.restart import RESTARTS_FILE
from vmkit.model.runtime import RuntimeRecord
from vmkit.ops import migration
from vmkit.storage import statuscache


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
        return self.folder.parent / RESTARTS_FILE

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
        self.sessions = Sessions(self.paths.folder / "sessions.json")
        self.client_ca = ClientCA(self.paths.folder)
        self.statuses = StatusCache(self.host)
        self.history = History(self.host, self.statuses.listing)
        self.arrivals = Arrivals(self.host, self.paths.folder / "migrations", self.listeners)
        # a restarted source asks its destination how an interrupted move ended
        migration.peer_for_recovery = MovePeer
        # the watcher keeps the cache warm, so a request rarely reads a VM's files itself
        self.watcher.after_scan.append(lambda: self.statuses.refresh(self.statuses.stale()))
        self.operations.on_finished.append(lambda op: self.watcher.poke())
        self.operations.on_finished.append(self._audit_result)
        self.operations.on_forgotten.append(
            lambda op: (self.paths.spool / f"export-{op.id}.vmkit").unlink(missing_ok=True))
        self.bus.hooks.append(self._forget_deleted)
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
        for leftover in self.paths.spool.iterdir():  # uploads and exports of a previous run
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        with contextlib.suppress(VmkitError):  # doctor says why, the daemon runs on
            self.host.apply_policy()
        self.recovered = self.host.recover()  # journal: roll forward or back
        for name in self.recovered:
            self.bus.publish("operation-recovered", vm=name)
        self.watcher.start()
        self.history.start()
        self.supervisor.catch_up()
        self.supervisor.autostart(self.paths.autostart)

    def publish_info(self, socket_path: str | None, tcp: str | None, pidfile: str | None) -> None:
        data = {"pid": os.getpid(), "socket": socket_path, "tcp": tcp, "pidfile": pidfile,
                "started_at": self.started_at}
        tmp = self.paths.info.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.paths.info)

    def stop(self, grace: float = 0.0) -> None:
        """Stop watching; give running operations `grace` seconds (cancellable ones are
        cancelled at once)."""
        self.supervisor.stop()
        self.watcher.stop()
        self.history.stop()
        self.operations.shutdown()
        self.arrivals.shutdown()
        deadline = time.monotonic() + grace
        for op in self.operations.running():
            op.wait_blocking(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            self.paths.info.unlink()

    def _audit_result(self, op: Any) -> None:
        """How each operation a request started ended (the request's line says 202)."""
        self.audit.write(who=op.requestor, operation=op.id, kind=op.kind,
                         description=op.description, result=op.status,
                         error=(op.error or {}).get("error"))

    def _forget_deleted(self, event: dict[str, Any]) -> None:
        """A VM deleted by anyone (the CLI too): its restart record goes with it."""
        if event["type"] == "lifecycle" and event["metadata"].get("action") == "deleted":
            self.supervisor.forget(event["metadata"]["vm"])

    def _exited(self, name: str, seen: Seen | None, record: RuntimeRecord) -> None:
        self.supervisor.on_exit(name, seen, record)


class StatusCache:
    """`GET /1.0/vms` without re-reading every VM: each VM's status is kept with the identity
    (inode, size, mtime) of its vm.json and state.json, and computed again only when one of
    them changed. Liveness needs no /proc check here: the watcher sees a QEMU end through its
    pidfd at once and persists the exit, which changes state.json. Only `uptime` moves with
    the clock; it is recomputed on every answer."""

    def __init__(self, host: Host):
        self.host = host
        # name -> (files' identity, status, start time, QEMU's start ticks when live)
        self._entries: dict[str, tuple[tuple[int, ...], dict[str, Any], float | None,
                                       int | None]] = {}
        self._lock = threading.Lock()

    def _key(self, name: str) -> tuple[int, ...] | None:
        key = statuscache.vm_key(self.host.layout.root, name)
        return tuple(key) if key[:3] != [0, 0, 0] else None  # no vm.json: not a VM (yet)

    def stale(self) -> list[str]:
        """Names whose cached status is missing or out of date (cheap: stats only)."""
        names = sorted(entry for entry in os.listdir(self.host.layout.vms)
                       if not entry.startswith("."))
        with self._lock:
            for gone in set(self._entries) - set(names):
                del self._entries[gone]
            return [n for n in names
                    if (key := self._key(n)) is not None
                    and (n not in self._entries or self._entries[n][0] != key
                         or not self._still_running(self._entries[n]))]

    @staticmethod
    def _still_running(entry: tuple[tuple[int, ...], dict[str, Any], float | None,
                                    int | None]) -> bool:
        """A live VM's QEMU is the one the status was read with (its exit may not be saved
        yet when an operation holds the VM's lock)."""
        _key, dumped, _started, ticks = entry
        pid = dumped.get("pid")
        if dumped.get("state") not in statuscache.LIVE or not isinstance(pid, int):
            return True
        return ticks is not None and statuscache.start_ticks(pid) == ticks

    def refresh(self, names: list[str]) -> None:
        """Compute the statuses of `names` (file reads: run it off the event loop)."""
        for name in names:
            key = self._key(name)
            if key is None:
                continue
            try:
                status = self.host.get(name).status()
            except VmkitError:
                continue
            dumped = status.model_dump(mode="json")
            started = time.time() - status.uptime if status.uptime is not None else None
            ticks = statuscache.start_ticks(status.pid) if status.pid is not None else None
            with self._lock:
                # keyed on what was read before the status: a change during it misses next time
                self._entries[name] = (key, dumped, started, ticks)

    def one(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            return None
        _key, dumped, started, _ticks = entry
        return {**dumped, "uptime": time.time() - started} if started else dumped

    def listing(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            out = []
            for name in sorted(self._entries):
                _key, dumped, started, _ticks = self._entries[name]
                out.append({**dumped, "uptime": now - started} if started else dumped)
            return out
