"""A snapshot's pause is read off QEMU's own STOP and RESUME event stamps (host clock), so it
covers everything between them — also what vmkit does while the guest waits."""

from __future__ import annotations

from typing import Any

from vmkit.qemu.blockops import pause_of


class Recorded:
    """The events a listener kept, handed out as QmpConnection.next_event does."""

    def __init__(self, events: list[dict[str, Any]]):
        self.events = list(events)

    def next_event(self, listener: object, timeout: float) -> dict[str, Any] | None:
        return self.events.pop(0) if self.events else None


def event(name: str, seconds: int, microseconds: int) -> dict[str, Any]:
    return {"event": name, "timestamp": {"seconds": seconds, "microseconds": microseconds}}


def test_the_pause_is_resume_minus_stop() -> None:
    qmp = Recorded([event("STOP", 1000, 900_000), event("RESUME", 1001, 22_500)])
    assert round(pause_of(object(), qmp), 3) == 122.5  # type: ignore[arg-type]


def test_the_first_stop_and_the_last_resume_count() -> None:
    qmp = Recorded([event("STOP", 5, 0), event("STOP", 5, 10_000), event("RESUME", 5, 30_000),
                    event("RESUME", 5, 40_000)])
    assert round(pause_of(object(), qmp), 3) == 40.0  # type: ignore[arg-type]


def test_without_both_stamps_there_is_no_figure() -> None:
    assert pause_of(object(), Recorded([event("STOP", 5, 0)])) is None  # type: ignore[arg-type]
    assert pause_of(object(), Recorded([event("RESUME", 5, 0)])) is None  # type: ignore[arg-type]
    backwards = Recorded([event("STOP", 6, 0), event("RESUME", 5, 0)])
    assert pause_of(object(), backwards) is None  # type: ignore[arg-type]
