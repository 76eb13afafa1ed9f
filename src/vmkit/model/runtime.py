"""What vmkit records about a VM's current run (state.json) and how an exit is classified."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from vmkit.model.state import VmState

Intent = Literal["stop", "kill"]
ExitReason = Literal["requested", "guest-shutdown", "crash", "start-failed"]


class ExitRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: float
    reason: ExitReason
    status: int | None = None
    description: str
    log_tail: str = ""


class RuntimeRecord(BaseModel):
    """The content of state.json: the last state vmkit recorded, and the live process if any."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: VmState = VmState.DEFINED
    pid: int | None = None
    start_ticks: int | None = None
    started_at: float | None = None
    accel: str | None = None
    accel_reason: str | None = None
    intent: Intent | None = None
    ssh_port: int | None = None  # 127.0.0.1 port forwarded to the guest's ssh server
    last_exit: ExitRecord | None = None


def classify_exit(intent: Intent | None, status: int | None) -> tuple[VmState, ExitReason]:
    """A gone QEMU: asked-for exits are `stopped`, a guest power-off too; anything else crashed."""
    if intent is not None:
        return VmState.STOPPED, "requested"
    if status == 0:
        return VmState.STOPPED, "guest-shutdown"
    return VmState.CRASHED, "crash"
