"""The host service's pure parts: the restart decision, the event bus's slow-listener rule,
the operation state machine and cancel, and lifecycle actions from observed states."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vmkit.daemon.events import QUEUE_LIMIT, EventBus
from vmkit.daemon.operations import Registry
from vmkit.daemon.watcher import action_for
from vmkit.errors import Cancelled, InvalidValue, NotFound
from vmkit.model.restart import MAX_DELAY, RestartPolicy, backoff, decide, parse_mode
from vmkit.model.state import VmState


@pytest.mark.parametrize(("mode", "reason", "restart"), [
    ("no", "crash", False), ("on-failure", "crash", True), ("always", "crash", True),
    ("on-failure", "guest-shutdown", False), ("always", "guest-shutdown", True),
    ("always", "requested", False), ("on-failure", "requested", False),
    ("on-failure", "start-failed", True),
])
def test_restart_decision(mode: str, reason: str, restart: bool) -> None:
    decision = decide(RestartPolicy(mode=parse_mode(mode)), reason, 0)
    assert decision.restart is restart, decision
    assert decision.reason


def test_restarts_back_off_and_give_up() -> None:
    policy = RestartPolicy(mode="on-failure", max_restarts=3)
    delays = [decide(policy, "crash", n).delay for n in range(3)]
    assert delays == [1.0, 2.0, 4.0]
    assert backoff(30) == MAX_DELAY
    final = decide(policy, "crash", 3)
    assert not final.restart and "gave up after 3" in final.reason


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidValue, match="no, on-failure or always"):
        parse_mode("sometimes")


def test_a_slow_listener_is_dropped_not_skipped() -> None:
    async def scenario() -> tuple[int, bool, int]:
        bus = EventBus()
        slow = bus.listen(types=["lifecycle"])
        picky = bus.listen(types=["lifecycle"], vms=["b"])
        for n in range(QUEUE_LIMIT + 10):
            bus.lifecycle("started", "a", n=n)
        bus.lifecycle("started", "b")
        await asyncio.sleep(0.05)
        return slow.queue.qsize(), slow.dropped, picky.queue.qsize()

    size, dropped, picky = asyncio.run(scenario())
    assert dropped and size == QUEUE_LIMIT + 1  # what it got, then the end marker
    assert picky == 1  # the filter: only VM b's event


def test_operations_run_report_fail_and_cancel() -> None:
    bus = EventBus()
    seen: list[str] = []
    bus.hooks.append(lambda e: seen.append(e["metadata"]["operation"]["status"])
                     if e["type"] == "operation" else None)
    registry = Registry(bus, workers=2)
    ok = registry.submit("t.ok", "works", lambda op: 42)
    assert ok.wait_blocking(5) and ok.view().status == "success" and ok.result == 42
    assert seen[:3] == ["pending", "running", "success"]
    bad = registry.submit("t.bad", "fails", lambda op: (_ for _ in ()).throw(NotFound("gone")))
    assert bad.wait_blocking(5)
    assert bad.status == "failure" and bad.error == {
        "error_class": "NotFound", "error": "gone", "hint": None, "detail": None, "field": None,
        "error_code": 404}
    release = threading.Event()

    def long(op: object) -> None:
        for _ in range(500):
            op.report(stage="working")  # type: ignore[attr-defined]
            release.wait(0.01)

    slow = registry.submit("t.slow", "long", long, may_cancel=True)
    time.sleep(0.1)
    registry.cancel(slow)
    assert slow.wait_blocking(10)
    assert slow.status == "cancelled" and slow.error is not None
    assert slow.error["error_class"] == Cancelled.__name__
    # an operation that cannot be cancelled ignores the request
    stubborn = registry.submit("t.stubborn", "no cancel", lambda op: time.sleep(0.2) or 1)
    registry.cancel(stubborn)
    assert stubborn.wait_blocking(5) and stubborn.status == "success"
    registry.shutdown()


@pytest.mark.parametrize(("before", "after", "action"), [
    (None, VmState.DEFINED, "created"), (VmState.STOPPED, VmState.RUNNING, "started"),
    (VmState.PAUSED, VmState.RUNNING, "resumed"), (VmState.RUNNING, VmState.CRASHED, "crashed"),
    (VmState.STOPPING, VmState.STOPPED, "stopped"), (VmState.RUNNING, VmState.RUNNING, None),
])
def test_lifecycle_action_of_an_observed_change(before: VmState | None, after: VmState,
                                                action: str | None) -> None:
    assert action_for(before, after) == action
