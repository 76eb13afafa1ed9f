"""The supervisor: applies each VM's restart policy when its QEMU ends, and autostart.

An exit is identified by the run that ended (its QEMU's pid and start time), so the same exit
seen twice — by the watcher, a scan, `catch_up` after a daemon restart — is handled once.
What it remembers per VM is in VMKIT_HOME/daemon/restarts.json: restarts in a row and in
total, the last decision's reason, the exit handled last and the exit whose restart is pending.
A pending restart survives a daemon killed during its backoff (catch_up schedules it again).
The restart itself starts the VM only if its last exit is still that one, checked under the
VM's lock: a user who started or stopped it meanwhile always has the last word. A restart that
fails counts as an attempt and the policy decides again (back off, or give up)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.errors import VmkitError
from vmkit.model.restart import STABLE_AFTER, decide, summary
from vmkit.model.runtime import RuntimeRecord
from vmkit.model.state import LIVE_STATES, VmState

if TYPE_CHECKING:
    from vmkit.daemon.service import Service
    from vmkit.daemon.watcher import Seen
    from vmkit.host import VM

WORKERS = 2  # restarts and autostarts never wait behind users' long operations


class Supervisor:
    def __init__(self, service: Service, state_file: Path):
        self.service = service
        self.path = state_file
        self._lock = threading.RLock()
        self._timers: dict[str, threading.Timer] = {}
        self._inflight: set[str] = set()  # restarts due, their start not yet done
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="vmkit-restart")
        self.state: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)

    def _entry(self, name: str) -> dict[str, Any]:
        return self.state.setdefault(name, {"attempts": 0, "restarts": 0, "last_reason": None,
                                            "handled_exit": None, "pending_exit": None})

    def summary(self, name: str) -> dict[str, object] | None:
        with self._lock:
            return summary(self.state.get(name))

    def restarts(self, name: str) -> int:
        with self._lock:
            return int((self.state.get(name) or {}).get("restarts", 0))

    # -- an exit ---------------------------------------------------------------------------
    def on_exit(self, name: str, seen: Seen | None, record: RuntimeRecord) -> None:
        exit_record = record.last_exit
        if exit_record is None or record.state in LIVE_STATES:
            return
        key = exit_record.key
        with self._lock:
            entry = self._entry(name)
            if entry.get("pending_exit") == key and (name in self._timers or
                                                     name in self._inflight):
                return  # already scheduled or starting
            if entry.get("handled_exit") == key:
                return
            if seen is not None and seen.started_at and \
                    exit_record.at - seen.started_at >= STABLE_AFTER:
                entry["attempts"] = 0  # the run that ended was healthy
            self._decide(name, key, exit_record.reason)

    def _decide(self, name: str, key: str, reason: str) -> None:
        """Apply the policy to exit `key` of `name` (under the lock)."""
        entry = self._entry(name)
        try:
            policy = self.service.host.get(name).config.restart
        except VmkitError:
            return
        decision = decide(policy, reason, entry["attempts"])
        entry["last_reason"] = decision.reason
        if not decision.restart:
            entry["handled_exit"], entry["pending_exit"] = key, None
            self._save()
            if policy.mode != "no" and reason != "requested":
                self.service.bus.lifecycle("restart-gave-up", name, reason=decision.reason)
            return
        entry["pending_exit"] = key
        self._save()
        timer = threading.Timer(decision.delay, self._due, (name, key, decision.reason))
        timer.daemon = True
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = timer
        timer.start()
        self.service.bus.lifecycle("restart-scheduled", name, delay=decision.delay,
                                   reason=decision.reason)

    def _due(self, name: str, key: str, reason: str) -> None:
        with self._lock:
            self._timers.pop(name, None)
            self._inflight.add(name)
        self.service.operations.submit("vm.restart-policy", f"restart {name}: {reason}",
                                       self._restarter(name, key, reason), vms=[name],
                                       requestor="restart-policy", pool=self.pool)

    def _restarter(self, name: str, key: str, reason: str) -> Callable[[Any], None]:
        def work(op: Any) -> None:
            try:
                self._start(name, key, reason)
            finally:
                with self._lock:
                    self._inflight.discard(name)

        return work

    def _start(self, name: str, key: str, reason: str) -> None:
        """Start the VM for exit `key`; a failed start counts and the policy decides again."""
        try:
            vm = self.service.host.get(name)
            vm.start_after_exit(key)
        except VmkitError as exc:
            with self._lock:
                entry = self._entry(name)
                if entry.get("pending_exit") != key:
                    raise
                try:
                    current = self.service.host.get(name)._observe(persist=False)
                except VmkitError:
                    raise exc from None
                latest = current.last_exit
                entry["pending_exit"], entry["handled_exit"] = None, key
                if current.state in LIVE_STATES or latest is None or (
                        latest.key != key and latest.reason != "start-failed"):
                    self._save()  # someone else acted on the VM: their decision stands
                    raise
                # the start failed (refused, or QEMU did not come up): an attempt; the policy
                # decides again on what the VM's last exit is now
                entry["attempts"] += 1
                self._decide(name, latest.key, latest.reason)
            raise
        with self._lock:
            entry = self._entry(name)
            entry["attempts"] += 1
            entry["restarts"] += 1
            entry["handled_exit"], entry["pending_exit"] = key, None
            self._save()
            attempt = entry["attempts"]
        self.service.bus.lifecycle("restarted", name, reason=reason, attempt=attempt,
                                   pid=vm.status().pid)

    def forget(self, name: str) -> None:
        with self._lock:
            timer = self._timers.pop(name, None)
            if timer is not None:
                timer.cancel()
            if self.state.pop(name, None) is not None:
                self._save()

    def user_changed(self, name: str) -> None:
        """A user started or stopped the VM: a pending restart is dropped (the restart would
        also refuse: its exit is no longer the last), the count of attempts reset."""
        with self._lock:
            timer = self._timers.pop(name, None)
            if timer is not None:
                timer.cancel()
            entry = self.state.get(name)
            if entry is not None and (entry["attempts"] or entry.get("pending_exit")):
                entry["attempts"] = 0
                entry["pending_exit"] = None
                self._save()

    # -- daemon start ----------------------------------------------------------------------
    def catch_up(self) -> None:
        """Exits that happened while no daemon ran, or whose restart was pending when it was
        killed: handled now."""
        for vm in self.service.host.vms():
            with contextlib.suppress(VmkitError):
                record = vm._observe(persist=True)
                if record.state in (VmState.CRASHED, VmState.STOPPED):
                    self.on_exit(vm.name, None, record)

    def autostart(self, boot_file: Path) -> list[str]:
        """Start every VM with autostart once per host boot (a daemon restarted after a crash
        does not start again a VM its user stopped)."""
        boot_id = _boot_id()
        with contextlib.suppress(FileNotFoundError):
            if boot_file.read_text().strip() == boot_id:
                return []
        started = []
        for vm in self.service.host.vms():
            with contextlib.suppress(VmkitError):
                if vm.config.restart.autostart and vm.state not in LIVE_STATES:
                    self.service.operations.submit(
                        "vm.autostart", f"autostart {vm.name}", _starter(vm), vms=[vm.name],
                        requestor="autostart", pool=self.pool)
                    started.append(vm.name)
        boot_file.write_text(boot_id + "\n")
        return started

    def stop(self) -> None:
        with self._lock:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _starter(vm: VM) -> Callable[[Any], None]:
    def work(op: Any) -> None:
        vm.start()
    return work


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(int(time.time() - time.monotonic()))
