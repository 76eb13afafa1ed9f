"""Operations: long work answered at once with a handle (Incus's shape).

    pending (105) → running (103) → success (200) | failure (400)
                        └→ cancelling (104) → cancelled (401)

Each operation runs one call of vmkit.ops in a worker thread (never on the event loop); its
progress is published as `operation` events; cancel sets a flag the work checks between steps
(only operations that report progress can be cancelled). Operations live in memory: after a
restart of the daemon the engine's journal, not this table, finishes or rolls back what a
killed worker left half-done. Finished operations are kept for KEEP_FINISHED seconds."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vmkit.daemon.events import EventBus
from vmkit.errors import Cancelled, VmkitError, http_status_for
from vmkit.model.api import OperationView

WORKERS = 16
KEEP_FINISHED = 300.0
PROGRESS_EVERY = 0.25  # seconds between two progress events of one operation

STATUS_CODE = {"pending": 105, "running": 103, "success": 200, "failure": 400,
               "cancelling": 104, "cancelled": 401}
FINAL = frozenset({"success", "failure", "cancelled"})


class Operation:
    def __init__(self, registry: Registry, kind: str, description: str, *,
                 vms: list[str], may_cancel: bool, requestor: str):
        self.id = str(uuid.uuid4())
        self.kind = kind
        self.description = description
        self.vms = vms
        self.may_cancel = may_cancel
        self.requestor = requestor
        self.status = "pending"
        self.created_at = self.updated_at = time.time()
        self.progress: dict[str, Any] = {}
        self.result: Any = None
        self.error: dict[str, Any] | None = None
        self.cancel_requested = threading.Event()
        self._done = threading.Event()
        self._registry = registry
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._last_progress = 0.0
        self._state_lock = threading.Lock()

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def view(self) -> OperationView:
        return OperationView(
            id=self.id, kind=self.kind, description=self.description, status=self.status,
            status_code=STATUS_CODE[self.status], created_at=self.created_at,
            updated_at=self.updated_at, resources={"vms": [f"/1.0/vms/{n}" for n in self.vms]},
            progress=dict(self.progress), may_cancel=self.may_cancel and not self.final,
            result=self.result, error=self.error, requestor=self.requestor)

    # -- called from the worker ----------------------------------------------------------
    def report(self, *, stage: str | None = None, done: int | None = None,
               total: int | None = None) -> None:
        """Progress from the work; raises Cancelled when a cancel was asked for."""
        if self.cancel_requested.is_set():
            raise Cancelled(f"operation {self.kind} cancelled at the user's request")
        if stage is not None:
            self.progress["stage"] = stage
        if done is not None:
            self.progress["done"] = done
        if total is not None:
            self.progress["total"] = total
            if total:
                self.progress["percent"] = round(100 * (done or 0) / total, 1)
        now = time.time()
        self.updated_at = now
        if now - self._last_progress >= PROGRESS_EVERY:
            self._last_progress = now
            self._registry.bus.publish("operation", **self._event())

    def bytes_progress(self, stage: str) -> Callable[[int, int], None]:
        return lambda done, total: self.report(stage=stage, done=done, total=total)

    def stage_progress(self) -> Callable[[str], None]:
        return lambda message: self.report(stage=message)

    def _event(self) -> dict[str, Any]:
        view = self.view().model_dump(mode="json")
        return {"operation": view, "vm": self.vms[0] if self.vms else None}

    def _set(self, status: str, *, unless_final: bool = False) -> bool:
        """Move to `status` (a final status is never left); False when nothing changed."""
        with self._state_lock:
            if self.final or (unless_final and self.status == status):
                return False
            self.status = status
            self.updated_at = time.time()
        self._announce()
        return True

    def _announce(self) -> None:
        self._registry.bus.publish("operation", **self._event())
        if self.final:
            self._done.set()
            for loop, event in list(self._waiters):
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(event.set)

    # -- waiting ---------------------------------------------------------------------------
    def wait_blocking(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    async def wait(self, timeout: float) -> bool:
        if self.final:
            return True
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        self._waiters.append(waiter)
        try:
            if self.final:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            return self.final
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)


class Registry:
    def __init__(self, bus: EventBus, *, workers: int = WORKERS):
        self.bus = bus
        self._ops: dict[str, Operation] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmkit-op")
        self.on_finished: list[Callable[[Operation], None]] = []
        self.on_forgotten: list[Callable[[Operation], None]] = []

    def submit(self, kind: str, description: str, work: Callable[[Operation], Any], *,
               vms: list[str] | None = None, may_cancel: bool = False,
               requestor: str = "", pool: ThreadPoolExecutor | None = None) -> Operation:
        op = Operation(self, kind, description, vms=vms or [], may_cancel=may_cancel,
                       requestor=requestor)
        with self._lock:
            self._forget_old()
            self._ops[op.id] = op
        self.bus.publish("operation", **op._event())
        (pool or self._pool).submit(self._run, op, work)
        return op

    def _run(self, op: Operation, work: Callable[[Operation], Any]) -> None:
        op._set("running")
        try:
            op.result = work(op)
        except Cancelled as exc:
            op.error = error_body(exc)
            op._set("cancelled")
        except VmkitError as exc:
            op.error = error_body(exc)
            op._set("failure")
        except Exception as exc:  # a bug: reported on the operation, logged with its trace
            op.error = {"error_class": "VmkitError", "error": f"internal error: {exc!r}",
                        "error_code": 500, "hint": "see the daemon's log"}
            traceback.print_exc()
            op._set("failure")
        else:
            op.progress.pop("stage", None) if op.progress.get("stage") == "" else None
            op._set("success")
        for hook in self.on_finished:
            with contextlib.suppress(Exception):
                hook(op)

    def get(self, op_id: str) -> Operation | None:
        with self._lock:
            return self._ops.get(op_id)

    def all(self) -> list[Operation]:
        with self._lock:
            self._forget_old()
            return sorted(self._ops.values(), key=lambda o: o.created_at)

    def cancel(self, op: Operation) -> None:
        if op.final or not op.may_cancel:
            return
        op.cancel_requested.set()
        if op.status == "running":
            op._set("cancelling", unless_final=True)

    def running(self) -> list[Operation]:
        return [op for op in self.all() if not op.final]

    def _forget_old(self) -> None:
        limit = time.time() - KEEP_FINISHED
        for op_id in [i for i, o in self._ops.items() if o.final and o.updated_at < limit]:
            op = self._ops.pop(op_id)
            for hook in self.on_forgotten:
                with contextlib.suppress(Exception):
                    hook(op)

    def shutdown(self) -> None:
        for op in self.running():
            self.cancel(op)
        self._pool.shutdown(wait=False, cancel_futures=True)


def error_body(exc: VmkitError) -> dict[str, Any]:
    """An error as the API shows it (an operation's error, a websocket's error message)."""
    return {"error_class": type(exc).__name__, "error": exc.message, "hint": exc.hint,
            "detail": exc.detail, "field": exc.field, "error_code": http_status_for(exc)}
