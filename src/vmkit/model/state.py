"""The VM state machine: states, operations, and the table of which operation each state allows.

    defined ──start──▶ starting ──▶ running ⇄ paused
                          │            │  (pause/resume)
                          ▼            ▼
                       crashed     stopping ──▶ stopped ──start──▶ starting
    Any live state can end in `crashed` when QEMU exits without being asked to.
"""

from __future__ import annotations

from enum import StrEnum

from vmkit.errors import InvalidState


class VmState(StrEnum):
    DEFINED = "defined"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    BROKEN = "broken"  # its folder's metadata cannot be read: only delete --force


class Operation(StrEnum):
    START = "start"
    STOP = "stop"
    KILL = "kill"
    RESTART = "restart"
    PAUSE = "pause"
    RESUME = "resume"
    DELETE = "delete"
    EXEC = "exec"
    CONSOLE = "console"


#: States in which a QEMU process exists (and holds its share of the host).
LIVE_STATES = frozenset({VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.STOPPING})

_OFF = frozenset({Operation.START, Operation.DELETE})
ALLOWED: dict[VmState, frozenset[Operation]] = {
    VmState.DEFINED: _OFF,
    VmState.STOPPED: _OFF,
    VmState.CRASHED: _OFF,
    VmState.STARTING: frozenset({Operation.KILL}),
    VmState.RUNNING: frozenset({
        Operation.STOP, Operation.KILL, Operation.RESTART, Operation.PAUSE,
        Operation.EXEC, Operation.CONSOLE,
    }),
    VmState.PAUSED: frozenset({
        Operation.STOP, Operation.KILL, Operation.RESTART, Operation.RESUME, Operation.CONSOLE,
    }),
    VmState.STOPPING: frozenset({Operation.KILL, Operation.CONSOLE}),
    VmState.BROKEN: frozenset(),
}

#: The state an operation leads to once it has succeeded.
RESULT: dict[Operation, VmState] = {
    Operation.START: VmState.RUNNING,
    Operation.STOP: VmState.STOPPED,
    Operation.KILL: VmState.STOPPED,
    Operation.RESTART: VmState.RUNNING,
    Operation.PAUSE: VmState.PAUSED,
    Operation.RESUME: VmState.RUNNING,
}


def allowed(state: VmState, operation: Operation) -> bool:
    return operation in ALLOWED[state]


def check_transition(name: str, state: VmState, operation: Operation) -> None:
    """Raise InvalidState (naming the state and what it allows) unless `operation` is allowed."""
    if allowed(state, operation):
        return
    options = ", ".join(sorted(op.value for op in ALLOWED[state])) or "nothing"
    hint = None
    if operation is Operation.DELETE and state in LIVE_STATES:
        hint = f"stop it first (vmkit stop {name}) or use --force"
    elif operation in (Operation.EXEC, Operation.PAUSE, Operation.STOP) and state in (
        VmState.DEFINED, VmState.STOPPED, VmState.CRASHED
    ):
        hint = f"start it first (vmkit start {name})"
    raise InvalidState(
        f"cannot {operation.value} VM {name!r}: it is {state.value} "
        f"(a {state.value} VM allows: {options})",
        hint=hint,
    )
