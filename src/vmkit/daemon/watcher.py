"""The watcher: sees each VM's QEMU end the moment it ends, and what direct CLI use changed.

Each live VM's QEMU is watched through a pidfd (pidfd_open works on any process, not only
children, so QEMUs the daemon did not start — before its own restart, or by the CLI — are
watched the same way). A pidfd becomes readable when its process exits: the VM is observed
then (exit classified, state persisted) and a `crashed` or `stopped` event is sent at once.
A scan every SCAN_INTERVAL seconds finds VMs created, started, deleted or changed by anything
else (the CLI on this host uses the same folders and locks)."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from vmkit.core.engine import Host
from vmkit.daemon.events import EventBus
from vmkit.errors import VmkitError
from vmkit.model.runtime import RuntimeRecord
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.qemu import process

SCAN_INTERVAL = 1.0


@dataclass
class Seen:
    uuid: str
    state: VmState
    pid: int | None
    started_at: float | None
    pidfd: int | None = None


#: lifecycle action for a state newly observed (from → to)
def action_for(before: VmState | None, after: VmState) -> str | None:
    if before is None:
        return "created"
    if before == after:
        return None
    if after is VmState.RUNNING:
        return "resumed" if before is VmState.PAUSED else "started"
    return {VmState.PAUSED: "paused", VmState.STOPPED: "stopped", VmState.CRASHED: "crashed",
            VmState.STARTING: "starting", VmState.STOPPING: "stopping",
            VmState.BROKEN: "broken", VmState.DEFINED: "defined"}.get(after)


class Watcher:
    def __init__(self, host: Host, bus: EventBus,
                 on_exit: Callable[[str, Seen | None, RuntimeRecord], None]):
        self.host = host
        self.bus = bus
        self.on_exit = on_exit
        self.seen: dict[str, Seen] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="vmkit-watcher", daemon=True)
        self.scans = 0
        self.after_scan: list[Callable[[], None]] = []

    def start(self) -> None:
        self.scan(announce=False)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)

    def poke(self) -> None:
        """Scan now (after an API operation changed something)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        next_scan = time.monotonic() + SCAN_INTERVAL
        while not self._stop.is_set():
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                by_fd = {s.pidfd: name for name, s in self.seen.items() if s.pidfd is not None}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            timeout = max(0.0, next_scan - time.monotonic())
            try:
                events = poller.poll(timeout * 1000)
            except InterruptedError:
                continue
            scan_now = False
            for fd, _mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                    scan_now = True
                elif fd in by_fd:
                    self._guarded(self._exited, by_fd[fd])
            if scan_now or time.monotonic() >= next_scan:
                self._guarded(self.scan)
                next_scan = time.monotonic() + SCAN_INTERVAL

    def _guarded(self, work: Callable[..., None], *args: object) -> None:
        try:
            work(*args)
        except Exception:  # the watcher must outlive any one VM's surprise
            traceback.print_exc()

    # -- observing -------------------------------------------------------------------------
    def scan(self, *, announce: bool = True) -> None:
        """Compare every VM folder with what was seen last; announce the differences."""
        self.scans += 1
        names = set()
        with contextlib.suppress(FileNotFoundError):
            names = {entry for entry in os.listdir(self.host.layout.vms)
                     if not entry.startswith(".")
                     and self.host._is_vm_folder(self.host.layout.vms / entry)}
        with self._lock:
            for name in sorted(set(self.seen) - names):
                gone = self.seen.pop(name)
                self._close(gone)
                if announce:
                    self.bus.lifecycle("deleted", name, uuid=gone.uuid)
            for name in sorted(names):
                self._observe(name, announce=announce)
        for hook in self.after_scan:
            hook()

    def _observe(self, name: str, *, announce: bool) -> None:
        vm = self.host.vm_class(self.host, name)
        try:
            reason = vm.broken_reason()
            uuid = vm.config.uuid if reason is None else ""
            record = vm._record() if reason is None else RuntimeRecord()
        except (VmkitError, OSError, ValueError):
            return  # half-written or being deleted: next scan
        state = VmState.BROKEN if reason is not None else record.state
        before = self.seen.get(name)
        if before is not None and before.uuid != uuid:  # deleted and re-created between scans
            self._close(before)
            if announce:
                self.bus.lifecycle("deleted", name, uuid=before.uuid)
            before = None
        if state in LIVE_STATES and record.pid is not None and record.start_ticks is not None:
            identity = process.ProcessIdentity(record.pid, record.start_ticks)
            if before is None or before.pid != record.pid or before.pidfd is None:
                try:
                    pidfd = _pidfd(identity, uuid)
                except WatchFailed:
                    # watched at the next scan; until then the scan sees its exit
                    self.seen[name] = Seen(uuid, state, record.pid, record.started_at)
                    return
                if pidfd is None:  # recorded as live, already gone: observe the exit
                    seen = Seen(uuid, state, record.pid, record.started_at)
                    self.seen[name] = seen
                    if before is None and announce:
                        self.bus.lifecycle("created", name, uuid=uuid)
                    self._exited(name)
                    return
                if before is not None:
                    self._close(before)
                seen = Seen(uuid, state, record.pid, record.started_at, pidfd)
            else:
                seen = Seen(uuid, state, record.pid, record.started_at, before.pidfd)
        else:
            if before is not None:
                self._close(before)
            seen = Seen(uuid, state, None, None)
        self.seen[name] = seen
        if announce:
            action = action_for(before.state if before else None, state)
            if action == "created" and state not in (VmState.DEFINED, VmState.STOPPED):
                self.bus.lifecycle("created", name, uuid=uuid)
                action = action_for(VmState.DEFINED, state)
            if action is not None:
                self._announce(name, action, record)
            if action in ("crashed", "stopped"):  # saved by someone else before a pidfd saw it
                self.on_exit(name, before, record)

    def _exited(self, name: str) -> None:
        """A watched QEMU ended: observe it now (classifies the exit), announce, tell the
        supervisor."""
        with self._lock:
            seen = self.seen.get(name)
            if seen is None:
                return
            self._close(seen)
            vm = self.host.vm_class(self.host, name)
            try:
                status = vm.status()  # observes: reads the exit status, persists when free
            except (VmkitError, OSError):
                return
            record = vm._record()
            if record.state in LIVE_STATES and record.pid not in (None, seen.pid):
                self._observe(name, announce=True)  # already started again (by the CLI)
                return
            final = record if record.state not in LIVE_STATES else RuntimeRecord(
                state=status.state, last_exit=status.last_exit)
            self.seen[name] = Seen(seen.uuid, final.state, None, None)
            self._announce(name, action_for(seen.state, final.state) or "stopped", final)
        self.on_exit(name, seen, final)

    def _announce(self, name: str, action: str, record: RuntimeRecord) -> None:
        context: dict[str, object] = {"state": record.state.value}
        if action in ("stopped", "crashed") and record.last_exit is not None:
            context.update(reason=record.last_exit.reason, status=record.last_exit.status,
                           description=record.last_exit.description)
        if action in ("started", "resumed") and record.pid is not None:
            context["pid"] = record.pid
        self.bus.lifecycle(action, name, **context)

    @staticmethod
    def _close(seen: Seen) -> None:
        if seen.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(seen.pidfd)
            seen.pidfd = None


class WatchFailed(Exception):
    """No pidfd could be had for a live QEMU (out of descriptors or memory): retried at the
    next scan; the VM is not taken for gone."""


def _pidfd(identity: process.ProcessIdentity, vm_uuid: str) -> int | None:
    """A pidfd on the VM's QEMU; None when it is gone. The identity is checked after the pidfd
    is open, so a recycled pid cannot be watched in its place."""
    try:
        fd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return None
    except OSError as exc:
        raise WatchFailed(str(exc)) from exc
    if not process.is_alive(identity, vm_uuid):
        os.close(fd)
        return None
    return fd
