"""The switch-over happens once: `migrate-continue` only wakes QEMU's migration thread, so
`query-migrate` may still say pre-switchover for a while; the disk mirror, already ended,
must not be ended again (that was `Block job ... not found` on a busy host)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmkit.errors import OperationTimeout
from vmkit.qemu import migrate as qm


class ScriptedMigration:
    """Answers query-migrate from a list of statuses (the last one repeats)."""

    def __init__(self, statuses: list[str]) -> None:
        self.statuses = statuses
        self.sent: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.sent.append(command)
        if command == "query-migrate":
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return {"status": status, "ram": {"transferred": 1, "remaining": 0}}
        return {}

    @contextlib.contextmanager
    def listening(self, *names: str) -> Iterator[object]:
        yield object()

    def next_event(self, listener: object, timeout: float) -> dict[str, Any] | None:
        time.sleep(min(timeout, 0.001))  # no events: each wait ends by its timeout
        return None


def _watch(qmp: ScriptedMigration, stall: float = 5) -> list[int]:
    switched: list[int] = []
    qm.watch_memory(qmp, timeout=30, stall=stall, postcopy=False,  # type: ignore[arg-type]
                    report=lambda _: None, at_switchover=lambda: switched.append(1))
    return switched


def test_a_slow_leaving_pre_switchover_ends_the_mirror_and_continues_once() -> None:
    qmp = ScriptedMigration(["active", "pre-switchover", "pre-switchover", "pre-switchover",
                             "device", "completed"])
    assert _watch(qmp) == [1]
    assert qmp.sent.count("migrate-continue") == 1


def test_a_switch_over_that_never_goes_on_is_cancelled() -> None:
    qmp = ScriptedMigration(["pre-switchover"])
    with pytest.raises(OperationTimeout, match="switch-over"):
        _watch(qmp, stall=0.05)
    assert qmp.sent.count("migrate-continue") == 1 and "migrate_cancel" in qmp.sent
