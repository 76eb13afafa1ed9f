"""What vmkit records about a VM's current run (state.json) and how an exit is classified."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vmkit.errors import InvalidValue
from vmkit.model.network import Nic
from vmkit.model.spec import VmConfig
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
    run: str | None = Field(default=None, description=(
        "which run ended: its QEMU's pid and start time (the same exit seen twice has one)"))

    @property
    def key(self) -> str:
        """What identifies this exit (its run; the time it was recorded for older records)."""
        return self.run or f"at:{self.at}"


_KEY = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_VALUE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HOTPLUG_LIMIT = 256


class HotplugStep(BaseModel):
    """One device added to a running QEMU (QMP object-add / device_add arguments): replayed as
    -object/-device when the same machine is rebuilt (restore, instant clone)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["object", "device"]
    args: dict[str, str | int]

    @model_validator(mode="after")
    def _safe(self) -> HotplugStep:
        for key, value in self.args.items():
            if not _KEY.fullmatch(key) or (isinstance(value, str) and not _VALUE.fullmatch(value)):
                raise InvalidValue(f"invalid hot-plug record {key}={str(value)[:40]!r}: keys "
                                   "and values must be plain words")
        kind = self.args.get("qom-type" if self.kind == "object" else "driver")
        allowed = kind == "memory-backend-ram" if self.kind == "object" else \
            kind == "pc-dimm" or (isinstance(kind, str) and kind.endswith("-x86_64-cpu"))
        if not allowed or not isinstance(self.args.get("id"), str):
            raise InvalidValue(f"invalid hot-plug record: {self.kind} {kind!r} is not one vmkit "
                               "hot-plugs (memory-backend-ram, pc-dimm, a CPU), or has no id")
        return self


class PluggedNic(BaseModel):
    """A NIC hot-plugged into a running QEMU, on root port `port` (hp<port>)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nic: Nic
    port: int = Field(ge=0, le=31)


class MachineRecord(BaseModel):
    """The machine a QEMU really is: the vm.json it was started from plus what was hot-plugged
    into it since. Every memory snapshot keeps the one it was taken from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: VmConfig
    hotplug: tuple[HotplugStep, ...] = Field(default=())
    nics: tuple[PluggedNic, ...] = Field(default=(), description="NICs hot-plugged since")
    rebuildable: bool = Field(default=True, description=(
        "False once a start-time NIC was unplugged: its port stays empty, which a start "
        "cannot reproduce"))

    @field_validator("hotplug")
    @classmethod
    def _bounded(cls, value: tuple[HotplugStep, ...]) -> tuple[HotplugStep, ...]:
        if len(value) > _HOTPLUG_LIMIT:
            raise InvalidValue(f"invalid machine record: {len(value)} hot-plug steps "
                               f"(at most {_HOTPLUG_LIMIT})")
        return value

    def plugged(self, step: HotplugStep) -> MachineRecord:
        return self.model_copy(update={"hotplug": (*self.hotplug, step)})

    @property
    def hot_added_memory(self) -> bool:
        return any(step.kind == "object" and
                   str(step.args.get("qom-type", "")).startswith("memory-backend")
                   for step in self.hotplug)


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
    machine: MachineRecord | None = None  # the running machine (None: not running)

    @property
    def copies_memory_live(self) -> bool:
        """Whether this running VM's memory may be copied while its guest runs (a live save,
        an instant clone, a live move). QEMU 10.0.2 under TCG aborts in its dirty tracking
        (tlb_reset_dirty_range_all: Assertion `block == qemu_get_ram_block(end - 1)') when
        the guest writes during a copy of a machine started with hot-added DIMMs (a restore, an
        instant clone of one): such a machine is copied with its guest paused."""
        return not (self.accel != "kvm" and self.machine is not None
                    and self.machine.hot_added_memory)


def classify_exit(intent: Intent | None, status: int | None) -> tuple[VmState, ExitReason]:
    """A gone QEMU: asked-for exits are `stopped`, a guest power-off too; anything else crashed."""
    if intent is not None:
        return VmState.STOPPED, "requested"
    if status == 0:
        return VmState.STOPPED, "guest-shutdown"
    return VmState.CRASHED, "crash"
