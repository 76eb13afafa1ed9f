"""The migration protocol's table: phases move forward only; a side restarting mid-way never
lets the guest run twice and, when it cannot tell, runs it nowhere."""

from __future__ import annotations

import pytest

from vmkit.model.migration import (
    Action,
    Phase,
    Side,
    may_start,
    next_phase,
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
