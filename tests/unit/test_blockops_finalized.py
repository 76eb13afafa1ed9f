"""A save's `completed` comes from QEMU's migration thread a moment before its main loop
leaves finish-migrate; a `cont` sent in between is refused ("Migration is not finalized
yet", seen in CI on a live snapshot), so wait_migration returns only once the run state moved."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmkit.errors import OperationTimeout, QemuError
from vmkit.qemu import blockops


class FinalizingQemu:
    """Says `completed` at once, and finish-migrate for the first `lag` query-status calls."""

    def __init__(self, lag: int, status: str = "completed") -> None:
        self.lag = lag
        self.status = status
        self.sent: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.sent.append(command)
        if command == "query-migrate":
            return {"status": self.status, "downtime": 12}
        if command == "query-status":
            if self.lag > 0:
                self.lag -= 1
                return {"status": "finish-migrate", "running": False}
            return {"status": "postmigrate", "running": False}
        return {}

    @contextlib.contextmanager
    def listening(self, *names: str) -> Iterator[object]:
        yield object()

    def next_event(self, listener: object, timeout: float) -> dict[str, Any] | None:
        return None


def test_a_completed_save_is_returned_only_after_qemu_left_finish_migrate() -> None:
    qemu = FinalizingQemu(lag=3)
    info = blockops.wait_migration(qemu, 5, "saving memory")  # type: ignore[arg-type]
    assert info["status"] == "completed"
    assert qemu.sent.count("query-status") == 4 and qemu.lag == 0


def test_a_failed_save_is_raised_only_after_qemu_left_finish_migrate() -> None:
    """The caller resumes the guest on the way out: that `cont` must not be refused."""
    qemu = FinalizingQemu(lag=2, status="failed")
    with pytest.raises(QemuError, match="saving memory failed"):
        blockops.wait_migration(qemu, 5, "saving memory")  # type: ignore[arg-type]
    assert qemu.lag == 0


def test_a_cancelled_migration_is_settled_only_after_qemu_left_finish_migrate() -> None:
    qemu = FinalizingQemu(lag=2, status="cancelled")
    blockops.cancel_migration(qemu)  # type: ignore[arg-type]
    assert qemu.lag == 0


def test_a_save_qemu_never_finalizes_ends_in_a_timeout_not_a_hang() -> None:
    qemu = FinalizingQemu(lag=10**9)
    started = time.monotonic()
    with pytest.raises(OperationTimeout, match="not finalized"):
        blockops.until_finalized(qemu, "saving memory", grace=0.2)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
