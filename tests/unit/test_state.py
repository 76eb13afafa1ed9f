import pytest

from vmkit.errors import InvalidState
from vmkit.model.runtime import classify_exit
from vmkit.model.state import ALLOWED, LIVE_STATES, Operation, VmState, check_transition


def test_every_state_has_a_row() -> None:
    assert set(ALLOWED) == set(VmState)


@pytest.mark.parametrize(("state", "operation"), [
    (VmState.DEFINED, Operation.START), (VmState.STOPPED, Operation.START),
    (VmState.CRASHED, Operation.START), (VmState.RUNNING, Operation.PAUSE),
    (VmState.PAUSED, Operation.RESUME), (VmState.RUNNING, Operation.STOP),
    (VmState.PAUSED, Operation.STOP), (VmState.RUNNING, Operation.EXEC),
    (VmState.STOPPING, Operation.KILL), (VmState.STOPPED, Operation.DELETE),
])
def test_allowed_transitions(state: VmState, operation: Operation) -> None:
    check_transition("web", state, operation)


@pytest.mark.parametrize(("state", "operation"), [
    (VmState.STOPPED, Operation.PAUSE), (VmState.DEFINED, Operation.STOP),
    (VmState.RUNNING, Operation.START), (VmState.PAUSED, Operation.PAUSE),
    (VmState.RUNNING, Operation.RESUME), (VmState.RUNNING, Operation.DELETE),
    (VmState.PAUSED, Operation.EXEC), (VmState.CRASHED, Operation.EXEC),
])
def test_refused_transitions_name_the_state(state: VmState, operation: Operation) -> None:
    with pytest.raises(InvalidState) as info:
        check_transition("web", state, operation)
    assert f"it is {state.value}" in info.value.message
    assert operation.value in info.value.message


def test_pause_of_a_stopped_vm_hints_at_start() -> None:
    with pytest.raises(InvalidState) as info:
        check_transition("web", VmState.STOPPED, Operation.PAUSE)
    assert info.value.hint == "start it first (vmkit start web)"


def test_live_states_allow_no_start() -> None:
    for state in LIVE_STATES:
        assert Operation.START not in ALLOWED[state]


def test_exit_classification() -> None:
    assert classify_exit("stop", 0) == (VmState.STOPPED, "requested")
    assert classify_exit("kill", 137) == (VmState.STOPPED, "requested")
    assert classify_exit(None, 0) == (VmState.STOPPED, "guest-shutdown")
    assert classify_exit(None, 137) == (VmState.CRASHED, "crash")
    assert classify_exit(None, None) == (VmState.CRASHED, "crash")
