"""The destination's side of moves, as the daemon keeps them: one `Incoming` per arriving VM
(ops/migration.py), found by the migration's id, and a record of each one's state in
VMKIT_HOME/daemon/migrations/ID.json — written before the guest is resumed ("finishing") and
after ("finished" / "aborted") — so a source can settle with this host even after this daemon
restarted (model/migration.recover needs that answer)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from vmkit.core.journal import JOURNAL_FILE
from vmkit.errors import InvalidValue, NotFound
from vmkit.host import Host
from vmkit.ops import migration
from vmkit.ops.migration import Incoming
from vmkit.storage.layout import write_json_atomic

#: a prepared arrival whose QEMU nobody started is rolled back after this long (a started one
#: is watched: it rolls back when its stream breaks)
ABANDONED_AFTER = 600.0
#: outcome records are kept this long (a source asks within minutes)
RECORDS_KEPT = 7 * 86400.0


class Arrivals:
    def __init__(self, host: Host, folder: Path, listeners: list[str]):
        self.host = host
        self.folder = folder
        self.listeners = listeners
        self._sessions: dict[str, Incoming] = {}
        self._lock = threading.Lock()
        folder.mkdir(mode=0o700, exist_ok=True)
        self._prune()

    def listen_address(self) -> str:
        """The address the migration ports bind to: the daemon's own TLS listener's."""
        for listener in self.listeners:
            if listener.startswith("https://"):
                host = listener[len("https://"):].rsplit(":", 1)[0]
                return host.strip("[]")
        raise InvalidValue("this daemon does not listen on TCP, so no VM can move here",
                           hint="start it with --listen IP:PORT")

    def receive(self, bundle: Path, *, name: str, generation: int, live: bool,
                helper: str | None, progress: Any = None) -> dict[str, Any]:
        self.listen_address()  # refuse before importing anything
        mid = uuidlib.uuid4().hex
        from vmkit.ops import bundles

        vm = migration.receive(self.host, bundle, name=name, generation=generation,
                               migration=mid, helper=helper, unpack=bundles.import_bundle,
                               progress=progress)
        return self._open(mid, vm, live=live, helper=helper)

    def _open(self, mid: str, vm: Any, *, live: bool, helper: str | None) -> dict[str, Any]:
        session = Incoming(vm, mid, helper=helper,
                           on_end=lambda state: self._ended(mid, state, vm.name),
                           before_resume=lambda: self._record(mid, "finishing", vm.name))
        with self._lock:
            self._sessions[mid] = session
        self._record(mid, "prepared", vm.name)
        timer = threading.Timer(ABANDONED_AFTER, self._expire, args=(mid,))
        timer.daemon = True
        timer.start()
        return {"id": mid, "name": vm.name, "live": live}

    def receive_shared(self, *, folder: str, nonce: str, name: str, generation: int,
                       live: bool) -> dict[str, Any]:
        """A VM on shared storage this host sees: registered, nothing copied."""
        self.listen_address()
        mid = uuidlib.uuid4().hex
        vm = migration.receive_shared(self.host, folder=folder, nonce=nonce, name=name,
                                      generation=generation, migration=mid)
        return self._open(mid, vm, live=live, helper=None)

    def session(self, mid: str) -> Incoming:
        with self._lock:
            found = self._sessions.get(mid)
        if found is None:
            raise NotFound(f"no migration {mid!r} in progress here")
        return found

    def start(self, mid: str, *, key: str, source: str | None, machine: dict[str, Any] | None,
              paused: bool, postcopy: bool) -> dict[str, Any]:
        return self.session(mid).start(key=key, listen=self.listen_address(), source=source,
                                       machine=machine, paused=paused, postcopy=postcopy)

    def finish(self, mid: str) -> dict[str, Any]:
        """The guest runs here (it may have finished on its own at completion): its status."""
        try:
            return self.session(mid).finish()
        except NotFound:
            if self._settled(mid) != "finished":
                raise
        data = self._read(mid) or {}
        return self.host.get(str(data.get("vm"))).status().model_dump(mode="json")

    def settle(self, mid: str) -> str:
        """Abort unless the guest runs here: what this host did ("aborted", "finishing",
        "finished")."""
        try:
            session = self.session(mid)
        except NotFound:
            return self._settled(mid)
        return session.settle()

    def outcome(self, mid: str) -> dict[str, Any]:
        data = self._read(mid)
        if data is None:
            raise NotFound(f"no migration {mid!r} here")
        return {**data, "state": self._settled(mid) if mid not in self._sessions
                else data["state"]}

    def _settled(self, mid: str) -> str:
        """Without a session (this daemon restarted): its journal recovery kept the VM
        (finished) or removed it (aborted); an unknown id never arrived."""
        data = self._read(mid)
        if data is None or data.get("state") in ("prepared", "aborted"):
            return "aborted"
        if data.get("state") == "finished":
            return "finished"
        name = str(data.get("vm", ""))
        folder = self.host.layout.vms / name  # its runtime (a VM on shared storage too)
        if not name or not folder.exists():
            return "aborted"
        if (folder / JOURNAL_FILE).exists():  # its recovery decides, now nothing holds it
            with contextlib.suppress(Exception), \
                    self.host._vm_lock(name, timeout=5, not_held=True):
                pass
        if not folder.exists():
            return "aborted"
        return "finishing" if (folder / JOURNAL_FILE).exists() else "finished"

    def _read(self, mid: str) -> dict[str, Any] | None:
        if not mid.isalnum():
            return None
        try:
            data = json.loads((self.folder / f"{mid}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _record(self, mid: str, state: str, vm: str) -> None:
        write_json_atomic(self.folder / f"{mid}.json", {
            "id": mid, "state": state, "vm": vm, "at": time.time()})

    def _ended(self, mid: str, state: str, vm: str) -> None:
        self._record(mid, state, vm)
        with self._lock:
            self._sessions.pop(mid, None)

    def _expire(self, mid: str) -> None:
        with contextlib.suppress(Exception):
            session = self.session(mid)
            if session.state == "prepared":
                session.settle()

    def _prune(self) -> None:
        cutoff = time.time() - RECORDS_KEPT
        for record in self.folder.glob("*.json"):
            with contextlib.suppress(OSError):
                if record.stat().st_mtime < cutoff:
                    record.unlink()

    def shutdown(self) -> None:
        """A daemon stopping rolls back what has not begun finishing (the sources resume)."""
        with self._lock:
            pending = list(self._sessions.values())
        for session in pending:
            with contextlib.suppress(Exception):
                session.settle()
