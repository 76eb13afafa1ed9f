"""The supervisor: applies each VM's restart policy when its QEMU ends, and autostart.

What it remembers per VM (restarts in a row, in total, the last reason, and which exit it has
handled) is in daemon/restarts.json, so a daemon killed between a crash and its restart still
restarts the VM after it comes back, and never twice for one exit."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.errors import VmkitError
from vmkit.model.restart import STABLE_AFTER, decide
from vmkit.model.runtime import RuntimeRecord
from vmkit.model.state import LIVE_STATES, VmState

if TYPE_CHECKING:
    from vmkit.daemon.service import Service
    from vmkit.daemon.watcher import Seen
    from vmkit.host import VM


class Supervisor:
    def __init__(self, service: Service, state_file: Path):
        self.service = service
        self.path = state_file
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}
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

    def entry(self, name: str) -> dict[str, Any]:
        return self.state.setdefault(name, {"attempts": 0, "restarts": 0, "last_reason": None,
                                            "handled_exit": None})

    # -- an exit ---------------------------------------------------------------------------
    def on_exit(self, name: str, seen: Seen | None, record: RuntimeRecord) -> None:
        exit_record = record.last_exit
        if exit_record is None or record.state in LIVE_STATES:
            return
        bus = self.service.bus
        with self._lock:
            entry = self.entry(name)
            if entry["handled_exit"] == exit_record.at:
                return
            entry["handled_exit"] = exit_record.at
            if seen is not None and seen.started_at and \
                    exit_record.at - seen.started_at >= STABLE_AFTER:
                entry["attempts"] = 0  # the run that ended was healthy
            try:
                policy = self.service.host.get(name).config.restart
            except VmkitError:
                self._save()
                return
            decision = decide(policy, exit_record.reason, entry["attempts"])
            entry["last_reason"] = decision.reason
            self._save()
            if not decision.restart:
                if policy.mode != "no" and exit_record.reason != "requested":
                    bus.lifecycle("restart-gave-up", name, reason=decision.reason)
                return
            timer = threading.Timer(decision.delay, self._restart, (name, exit_record.at,
                                                                    decision.reason))
            timer.daemon = True
            if name in self._timers:
                self._timers[name].cancel()
            self._timers[name] = timer
        bus.lifecycle("restart-scheduled", name, delay=decision.delay, reason=decision.reason)
        timer.start()

    def _restart(self, name: str, exit_at: float, reason: str) -> None:
        with self._lock:
            self._timers.pop(name, None)
        try:
            vm = self.service.host.get(name)
            record = vm._observe(persist=False)
        except VmkitError:
            return
        if record.state in LIVE_STATES or record.last_exit is None or \
                record.last_exit.at != exit_at:
            return  # someone started or stopped it meanwhile: their decision stands

        def work(op: Any) -> None:
            vm.start()
            with self._lock:
                entry = self.entry(name)
                entry["attempts"] += 1
                entry["restarts"] += 1
                self._save()
            self.service.bus.lifecycle("restarted", name, reason=reason,
                                       attempt=self.entry(name)["attempts"],
                                       pid=vm.status().pid)

        self.service.operations.submit("vm.restart-policy", f"restart {name}: {reason}", work,
                                       vms=[name], requestor="restart-policy")

    def forget(self, name: str) -> None:
        with self._lock:
            timer = self._timers.pop(name, None)
            if timer is not None:
                timer.cancel()
            if self.state.pop(name, None) is not None:
                self._save()

    def user_changed(self, name: str) -> None:
        """A user started or stopped the VM: a pending restart is dropped, the count reset."""
        with self._lock:
            timer = self._timers.pop(name, None)
            if timer is not None:
                timer.cancel()
            entry = self.state.get(name)
            if entry is not None and entry["attempts"]:
                entry["attempts"] = 0
                self._save()

    # -- daemon start ----------------------------------------------------------------------
    def catch_up(self) -> None:
        """Exits that happened while no daemon ran (or before it handled them)."""
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
                        requestor="autostart")
                    started.append(vm.name)
        boot_file.write_text(boot_id + "\n")
        return started

    def stop(self) -> None:
        with self._lock:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(int(time.time() - time.monotonic()))


def _starter(vm: VM) -> Callable[[Any], None]:
    def work(op: Any) -> None:
        vm.start()
    return work
