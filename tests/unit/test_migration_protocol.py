"""The migration protocol's table: phases move forward only; a side restarting mid-way never
lets the guest run twice and, when it cannot tell, runs it nowhere."""

from __future__ import annotations

import pytest

from vmkit.model.migration import (
    SWITCHOVER_RESERVE_MS,
    Action,
    MigrationOptions,
    Phase,
    Side,
    may_start,
    memory_progress,
    next_phase,
    option_reasons,
    qemu_downtime_limit,
    recover,
)


def test_phases_only_move_forward() -> None:
    next_phase(Side.SOURCE, None, Phase.BEGIN)
    next_phase(Side.SOURCE, Phase.BEGIN, Phase.PERFORM)
    next_phase(Side.SOURCE, Phase.PERFORMED, Phase.CONFIRM)
    next_phase(Side.SOURCE, Phase.PERFORM, Phase.CONFIRM_CANCEL)
    next_phase(Side.DESTINATION, Phase.PREPARE, Phase.FINISH)
    with pytest.raises(ValueError, match="cannot follow"):
        next_phase(Side.SOURCE, Phase.PERFORMED, Phase.PERFORM)
    with pytest.raises(ValueError, match="cannot be cancelled"):
        next_phase(Side.SOURCE, Phase.CONFIRM, Phase.CONFIRM_CANCEL)
    with pytest.raises(ValueError, match="not a phase of the destination"):
        next_phase(Side.DESTINATION, Phase.PREPARE, Phase.PERFORM)


@pytest.mark.parametrize(("side", "phase", "owns", "running", "action"), [
    (Side.SOURCE, Phase.BEGIN, None, False, Action.FORGET),
    (Side.SOURCE, Phase.PERFORM, None, False, Action.CANCEL_AND_RESUME),
    (Side.SOURCE, Phase.PERFORMED, True, False, Action.KILL_SOURCE),
    (Side.SOURCE, Phase.PERFORMED, False, False, Action.RESUME),
    (Side.SOURCE, Phase.PERFORMED, None, False, Action.HOLD),
    (Side.SOURCE, Phase.CONFIRM, None, False, Action.KILL_SOURCE),
    (Side.SOURCE, Phase.CONFIRM_CANCEL, None, False, Action.RESUME),
    (Side.DESTINATION, Phase.PREPARE, None, False, Action.DESTROY_INCOMING),
    (Side.DESTINATION, Phase.FINISH, None, True, Action.KEEP),
    (Side.DESTINATION, Phase.FINISH, None, False, Action.DESTROY_INCOMING),
])
def test_what_a_restarting_side_does(side: Side, phase: Phase, owns: bool | None,
                                     running: bool, action: Action) -> None:
    decision = recover(side, phase, destination_owns=owns, destination_running=running)
    assert decision.action is action and decision.why


def test_the_guest_never_runs_on_both_sides() -> None:
    """For every combination, the source resumes only when the destination does not keep."""
    for phase in (Phase.BEGIN, Phase.PERFORM, Phase.PERFORMED, Phase.CONFIRM,
                  Phase.CONFIRM_CANCEL):
        for owns in (True, False, None):
            source = recover(Side.SOURCE, phase, destination_owns=owns).action
            source_runs = source in (Action.FORGET, Action.CANCEL_AND_RESUME, Action.RESUME)
            if source_runs:
                assert owns is not True or phase in (Phase.BEGIN, Phase.PERFORM,
                                                     Phase.CONFIRM_CANCEL)


def test_a_host_never_starts_a_vm_that_moved_on() -> None:
    assert may_start(3, None) and may_start(3, 3)
    assert not may_start(3, 4)


def test_a_query_migrate_answer_reads_as_progress() -> None:
    """QEMU's dirty rate is in pages/s; the progress says bytes/s."""
    info = {"status": "active", "expected-downtime": 37, "ram": {
        "transferred": 10 << 20, "remaining": 3 << 20, "total": 512 << 20,
        "dirty-pages-rate": 1000, "page-size": 4096}}
    got = memory_progress(info)
    assert (got.stage, got.transferred, got.remaining, got.total) == (
        "memory", 10 << 20, 3 << 20, 512 << 20)
    assert got.dirty_rate == 4096 * 1000 and got.expected_downtime_ms == 37
    assert memory_progress({"status": "setup"}).transferred == 0


@pytest.mark.parametrize(("options", "wrong"), [
    ({"storage": "nfs"}, "storage"), ({"downtime_ms": 0}, "downtime"),
    ({"downtime_ms": 5000}, "downtime"), ({"bandwidth": 1000}, "bandwidth")])
def test_move_options_out_of_range_are_refused(options: dict[str, object], wrong: str) -> None:
    with pytest.raises(ValueError, match=wrong):
        MigrationOptions(**options)  # type: ignore[arg-type]
    assert MigrationOptions().downtime_ms == 50


def test_post_copy_is_refused_where_userfaultfd_is_closed_to_the_vm() -> None:
    assert option_reasons(MigrationOptions(postcopy=True), postcopy_possible=True) == []
    assert "userfaultfd" in option_reasons(MigrationOptions(postcopy=True), False)[0]
    assert option_reasons(MigrationOptions(auto_converge=True), False) == []


@pytest.mark.parametrize(("target", "limit"), [(50, 50 - SWITCHOVER_RESERVE_MS), (1, 1),
                                               (20, 10), (2000, 2000 - SWITCHOVER_RESERVE_MS)])
def test_qemu_is_given_the_target_less_the_switch_overs_fixed_cost(target: int,
                                                                    limit: int) -> None:
    """QEMU sizes only its last pass by the limit: the stop, the mirror's end and the device
    state come on top, so the whole pause stays within what the user asked for."""
    assert qemu_downtime_limit(target) == limit
