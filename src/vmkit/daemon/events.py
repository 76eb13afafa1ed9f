"""The event bus: lifecycle and operation events to websocket listeners.

Publishers are threads (the watcher, operation workers); listeners are asyncio queues. Each
listener has a bounded queue: one that falls behind is dropped (its socket closed), never
silently skipped, so a client that reconnects knows it must re-read the state."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

QUEUE_LIMIT = 1000
RECENT = 500  # kept for `GET /1.0/events/recent` and tests


@dataclass
class Listener:
    queue: asyncio.Queue[dict[str, Any] | None]
    loop: asyncio.AbstractEventLoop
    types: frozenset[str]
    vms: frozenset[str]
    dropped: bool = False

    def wants(self, event: dict[str, Any]) -> bool:
        if self.types and event["type"] not in self.types:
            return False
        return not self.vms or event["metadata"].get("vm") in self.vms


@dataclass
class EventBus:
    location: str = "local"
    _listeners: list[Listener] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    _serial: Iterator[int] = field(default_factory=itertools.count)
    hooks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)

    def publish(self, kind: str, **metadata: Any) -> dict[str, Any]:
        """Send an event to every listener that wants it; callable from any thread."""
        with self._lock:
            event = {"type": kind, "timestamp": time.time(), "serial": next(self._serial),
                     "location": self.location, "metadata": metadata}
            self._recent.append(event)
            listeners = list(self._listeners)
        for hook in self.hooks:
            hook(event)
        for listener in listeners:
            if listener.wants(event) and not listener.dropped:
                with contextlib.suppress(RuntimeError):  # its loop has closed
                    listener.loop.call_soon_threadsafe(self._deliver, listener, event)
        return event

    def lifecycle(self, action: str, vm: str, **context: Any) -> dict[str, Any]:
        return self.publish("lifecycle", action=action, vm=vm, **context)

    def _deliver(self, listener: Listener, event: dict[str, Any]) -> None:
        if listener.dropped:
            return
        if listener.queue.qsize() >= QUEUE_LIMIT:
            listener.dropped = True  # too slow: dropped, the websocket is closed
            listener.queue.put_nowait(None)
            return
        listener.queue.put_nowait(event)

    def listen(self, types: Iterable[str] = (), vms: Iterable[str] = ()) -> Listener:
        listener = Listener(asyncio.Queue(), asyncio.get_running_loop(),
                            frozenset(t for t in types if t), frozenset(v for v in vms if v))
        with self._lock:
            self._listeners.append(listener)
        return listener

    def forget(self, listener: Listener) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def recent(self, types: Iterable[str] = (), vms: Iterable[str] = ()) -> list[dict[str, Any]]:
        probe = Listener(asyncio.Queue(), None, frozenset(types), frozenset(vms))  # type: ignore[arg-type]
        with self._lock:
            return [e for e in self._recent if probe.wants(e)]
