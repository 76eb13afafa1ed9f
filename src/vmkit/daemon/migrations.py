"""The destination's side of moves, as the daemon keeps them: one `Incoming` per arriving VM
(ops/migration.py), found by the migration's id, and a small record of each one's outcome in
VMKIT_HOME/daemon/migrations/ so a source can still ask "did you finish?" after this daemon
restarted (model/migration.recover needs that answer)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from vmkit.errors import InvalidValue, NotFound
from vmkit.host import Host
from vmkit.ops import migration
from vmkit.ops.migration import Incoming
from vmkit.storage.layout import write_json_atomic

#: a prepared destination nobody finishes is rolled back after this long
ABANDONED_AFTER = 600.0


class Arrivals:
    def __init__(self, host: Host, folder: Path, listeners: list[str]):
        self.host = host
        self.folder = folder
        self.listeners = listeners
        self._sessions: dict[str, Incoming] = {}
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        folder.mkdir(mode=0o700, exist_ok=True)

    def listen_address(self) -> str:
        """The address the migration ports bind to: the daemon's own TLS listener's."""
        for listener in self.listeners:
            if listener.startswith("https://"):
                host = listener[len("https://"):].rsplit(":", 1)[0]
                return host.strip("[]")
        raise InvalidValue("this daemon does not listen on TCP, so no VM can move here",
                           hint="start it with --listen IP:PORT")

    def receive(self, bundle: Path, *, name: str, generation: int, live: bool,
                progress: Any = None) -> dict[str, Any]:
        self.listen_address()  # refuse before importing anything
        mid = uuidlib.uuid4().hex
        from vmkit.ops import bundles

        vm = migration.receive(self.host, bundle, name=name, generation=generation,
                               migration=mid, unpack=bundles.import_bundle, progress=progress)
        session = Incoming(vm, mid)
        with self._lock:
            self._sessions[mid] = session
            self._names[mid] = vm.name
        self._record(mid, "prepared", vm)
        timer = threading.Timer(ABANDONED_AFTER, self._expire, args=(mid,))
        timer.daemon = True
        timer.start()
        return {"id": mid, "name": vm.name, "live": live}

    def session(self, mid: str) -> Incoming:
        with self._lock:
            found = self._sessions.get(mid)
        if found is None:
            raise NotFound(f"no migration {mid!r} in progress here")
        return found

    def start(self, mid: str, *, key: str, machine: dict[str, Any] | None, paused: bool,
              postcopy: bool) -> dict[str, Any]:
        return self.session(mid).start(key=key, listen=self.listen_address(),
                                       machine=machine, paused=paused, postcopy=postcopy)

    def finish(self, mid: str) -> dict[str, Any]:
        session = self.session(mid)
        status = session.finish()
        self._record(mid, "finished", session.vm)
        self._drop(mid)
        return status

    def abort(self, mid: str) -> None:
        try:
            session = self.session(mid)
        except NotFound:
            return
        session.abort()
        self._record(mid, "aborted", session.vm)
        self._drop(mid)

    def outcome(self, mid: str) -> dict[str, Any]:
        if not mid.isalnum():
            raise NotFound(f"no migration {mid!r}")
        try:
            data: dict[str, Any] = json.loads((self.folder / f"{mid}.json").read_text())
        except (OSError, ValueError):
            raise NotFound(f"no migration {mid!r} here") from None
        return data

    def _record(self, mid: str, state: str, vm: Any) -> None:
        write_json_atomic(self.folder / f"{mid}.json", {
            "id": mid, "state": state, "vm": vm.name, "at": time.time()})

    def _drop(self, mid: str) -> None:
        with self._lock:
            self._sessions.pop(mid, None)
            self._names.pop(mid, None)

    def _expire(self, mid: str) -> None:
        with contextlib.suppress(Exception):
            session = self.session(mid)
            if not session.finished:
                self.abort(mid)

    def shutdown(self) -> None:
        """A daemon stopping aborts what has not finished (the sources roll back)."""
        with self._lock:
            pending = list(self._sessions)
        for mid in pending:
            with contextlib.suppress(Exception):
                self.abort(mid)
