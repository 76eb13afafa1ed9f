"""The last minutes of what each VM uses, for the dashboard's graphs.

Prometheus metrics are counters read at scrape time; a browser wants rates over time without a
Prometheus server. A sampler thread reads every running VM's counters every INTERVAL seconds
(the same readings as the metrics: /proc, QMP, the taps) and keeps the rates of the last KEEP
samples in memory. Nothing is written to disk: after a daemon restart the graphs start empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.model.network import USER_NETWORK, tap_name
from vmkit.model.state import VmState
from vmkit.model.views import VmStatus

if TYPE_CHECKING:
    from vmkit.host import Host

log = logging.getLogger(__name__)

INTERVAL = 2.0
KEEP = 300  # 10 minutes


@dataclass(frozen=True)
class TapCounters:
    """One tap's counters, from the guest's side (a tap's rx is what the guest sent)."""

    network: str
    sent_bytes: int
    received_bytes: int
    sent_packets: int
    received_packets: int


def tap_counters(status: VmStatus) -> Iterator[TapCounters]:
    for nic in status.nics:
        if nic.network == USER_NETWORK:
            continue  # user-mode NICs have no counters
        stats = Path("/sys/class/net") / tap_name(status.uuid, nic.mac) / "statistics"
        with contextlib.suppress(OSError, ValueError):
            yield TapCounters(nic.network, int((stats / "rx_bytes").read_text()),
                              int((stats / "tx_bytes").read_text()),
                              int((stats / "rx_packets").read_text()),
                              int((stats / "tx_packets").read_text()))


@dataclass(frozen=True)
class Reading:
    """Cumulative counters of one VM at one moment."""

    time: float
    cpu_seconds: float
    rss: int
    guest_memory: int
    disk_read: int
    disk_written: int
    net_received: int
    net_sent: int


def rates(before: Reading, after: Reading) -> dict[str, Any]:
    """One graph point from two readings; a counter that went back (the VM restarted) counts
    as zero, never as a negative rate."""
    span = max(1e-3, after.time - before.time)

    def per_second(old: float, new: float) -> float:
        return max(0.0, new - old) / span

    return {"time": round(after.time, 3),
            "cpu_percent": round(100 * per_second(before.cpu_seconds, after.cpu_seconds), 2),
            "memory_bytes": after.rss, "guest_memory_bytes": after.guest_memory,
            "disk_read_bps": round(per_second(before.disk_read, after.disk_read), 1),
            "disk_write_bps": round(per_second(before.disk_written, after.disk_written), 1),
            "net_rx_bps": round(per_second(before.net_received, after.net_received), 1),
            "net_tx_bps": round(per_second(before.net_sent, after.net_sent), 1)}


def host_point(at: float, points: list[dict[str, Any]]) -> dict[str, Any]:
    """The host's totals at one sampling: the sum over the VMs sampled then."""
    return {"time": round(at, 3),
            "cpu_percent": round(sum(p["cpu_percent"] for p in points), 2),
            "memory_bytes": sum(p["memory_bytes"] for p in points), "running": len(points)}


class History:
    """The sampler thread and what it kept."""

    def __init__(self, host: Host, statuses: Callable[[], list[dict[str, Any]]],
                 interval: float = INTERVAL, keep: int = KEEP):
        self.host = host
        self.statuses = statuses  # the daemon's status cache: no VM's files read again here
        self.interval = interval
        self.keep = keep
        self._last: dict[str, Reading] = {}
        self._failing: set[str] = set()
        self._vms: dict[str, deque[dict[str, Any]]] = {}
        self._host: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmkit-history", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def vm(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._vms.get(name, ()))

    def totals(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._host)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a bad moment never ends the sampling
                self.sample()

    def sample(self) -> None:
        at = time.time()
        points: dict[str, dict[str, Any]] = {}
        readings: dict[str, Reading] = {}
        for listed in self.statuses():
            if listed.get("state") not in (VmState.RUNNING.value, VmState.PAUSED.value):
                continue
            name = str(listed["name"])
            try:
                status = VmStatus.model_validate(listed)
                reading = _read(self.host.get(name), status)
                if reading is None:
                    continue
                readings[name] = reading
                before = self._last.get(name)
                if before is not None:
                    points[name] = rates(before, reading)
            except Exception as exc:  # one VM's bad moment never costs the others' graphs
                if name not in self._failing:
                    self._failing.add(name)
                    log.warning("history: cannot sample %s: %r", name, exc)
            else:
                self._failing.discard(name)
        with self._lock:
            self._last = readings
            for name, point in points.items():
                self._vms.setdefault(name, deque(maxlen=self.keep)).append(point)
            for name in set(self._vms) - set(readings):
                if not os.path.exists(self.host.layout.vm(name).path):
                    del self._vms[name]  # a deleted VM takes its graphs along
            self._host.append(host_point(at, list(points.values())))


def _read(vm: Any, status: VmStatus) -> Reading | None:
    usage = vm.usage()
    if usage is None:
        return None
    taps = list(tap_counters(status))
    return Reading(time=time.time(), cpu_seconds=usage.cpu_seconds, rss=usage.rss,
                   guest_memory=usage.memory_actual, disk_read=usage.disk_read,
                   disk_written=usage.disk_written,
                   net_received=sum(t.received_bytes for t in taps),
                   net_sent=sum(t.sent_bytes for t in taps))
