"""The migration protocol as data: phases, who runs the guest in each, and what a side that
restarts in the middle of one does (libvirt's v3 table, adapted; see docs/architecture.md).

    source:       begin → perform → performed → confirm          (guest ends on the destination)
                                              ↘ confirm-cancel   (guest stays on the source)
    destination:  prepare → finish

Rules that make failure safe: the destination's vCPUs start only in finish, after the source's
stopped for good (performed: QEMU completed, source paused); the source is killed only once
the destination owns the VM. Ownership is a generation number both sides record: a side that
comes back acts on its journal's phase and, where that is not enough, on who owns the
generation now; when it cannot tell, it never runs the guest."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Side(StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


class Phase(StrEnum):
    BEGIN = "begin"
    PERFORM = "perform"
    PERFORMED = "performed"
    CONFIRM = "confirm"
    CONFIRM_CANCEL = "confirm-cancel"
    PREPARE = "prepare"
    FINISH = "finish"


ORDER: dict[Side, tuple[Phase, ...]] = {
    Side.SOURCE: (Phase.BEGIN, Phase.PERFORM, Phase.PERFORMED, Phase.CONFIRM),
    Side.DESTINATION: (Phase.PREPARE, Phase.FINISH),
}


class Action(StrEnum):
    FORGET = "forget"                  # nothing happened yet: end the job
    CANCEL_AND_RESUME = "cancel-and-resume"  # migrate-cancel; resume the source if we paused it
    RESUME = "resume"                  # the source keeps the guest
    KILL_SOURCE = "kill-source"        # the destination owns it: stop the source for good
    HOLD = "hold"                      # cannot tell who owns it: stay paused, run nothing
    DESTROY_INCOMING = "destroy-incoming"  # kill the incoming QEMU, remove what prepare made
    KEEP = "keep"                      # the destination runs the guest and owns it


@dataclass(frozen=True)
class Recovery:
    action: Action
    why: str


def next_phase(side: Side, current: Phase | None, wanted: Phase) -> None:
    """Phases only move forward (confirm-cancel may follow any source phase but confirm)."""
    order = ORDER[side]
    if side is Side.SOURCE and wanted is Phase.CONFIRM_CANCEL:
        if current is Phase.CONFIRM:
            raise ValueError("a confirmed migration cannot be cancelled")
        return
    if wanted not in order:
        raise ValueError(f"{wanted} is not a phase of the {side}")
    if current is not None and (current not in order or order.index(wanted)
                                <= order.index(current)):
        raise ValueError(f"migration phase {wanted} cannot follow {current} on the {side}")


def recover(side: Side, phase: Phase, *, destination_owns: bool | None,
            destination_running: bool = False) -> Recovery:
    """What a side restarting in `phase` does. `destination_owns`: whether the destination
    now holds the VM's newer generation (None: it cannot be asked)."""
    if side is Side.SOURCE:
        if phase is Phase.BEGIN:
            return Recovery(Action.FORGET, "nothing was sent: the source kept running")
        if phase is Phase.PERFORM:
            return Recovery(Action.CANCEL_AND_RESUME,
                            "the transfer was cut: the source keeps the guest")
        if phase is Phase.CONFIRM_CANCEL:
            return Recovery(Action.RESUME, "the migration was cancelled: the source resumes")
        if phase is Phase.CONFIRM:
            return Recovery(Action.KILL_SOURCE, "the destination owns the VM: finish stopping")
        # PERFORMED: everything was sent and the source is paused; only the destination knows
        if destination_owns is True:
            return Recovery(Action.KILL_SOURCE, "the destination finished: it owns the VM")
        if destination_owns is False:
            return Recovery(Action.RESUME, "the destination did not finish: the source resumes")
        return Recovery(Action.HOLD, "the destination cannot be asked whether it finished: "
                                     "the source stays paused and is never started")
    if phase is Phase.PREPARE:
        return Recovery(Action.DESTROY_INCOMING, "the guest never ran here: undo the prepare")
    if phase is Phase.FINISH and destination_running:
        return Recovery(Action.KEEP, "the guest runs here and this side owns the VM")
    return Recovery(Action.DESTROY_INCOMING,
                    "finish did not complete: the source still owns the VM")


def may_start(local_generation: int, owner_generation: int | None) -> bool:
    """A host may start its copy of a VM only when no other host owns a newer generation
    (None: no other host claims it)."""
    return owner_generation is None or owner_generation <= local_generation


# -- what a user asks for, and what a running migration reports -------------------------
STORAGE_CHOICES = ("auto", "shared", "copy")
DEFAULT_DOWNTIME_MS = 50
MAX_DOWNTIME_MS = 2000  # Proxmox doubles from 100 ms; beyond 2 s the guest would notice


#: What a live move's switch-over costs besides the last pass of memory QEMU sizes by its
#: downtime limit: the vCPUs' stop (the disks drained and flushed), the disk mirror's last
#: writes and vmkit's answer at pre-switchover, the device state. 15-25 ms here
#: (bench/migrate.py: QEMU's downtime against its limit, and switchover_ms).
SWITCHOVER_RESERVE_MS = 20


def qemu_downtime_limit(target_ms: int) -> int:
    """The limit QEMU is given for a pause of at most `target_ms` in all: QEMU estimates only
    its last pass over memory against it, so the switch-over's fixed costs are kept out of
    it; never below half the target, or a busy guest would hardly converge."""
    return max(1, target_ms // 2, target_ms - SWITCHOVER_RESERVE_MS)


@dataclass(frozen=True)
class MigrationOptions:
    """`vmkit migrate` / `vmkit move` options. `bandwidth` in bytes/s (None: unthrottled);
    `downtime_ms` is the longest pause asked for at the switch-over (qemu_downtime_limit)."""

    storage: str = "auto"
    bandwidth: int | None = None
    downtime_ms: int = DEFAULT_DOWNTIME_MS
    auto_converge: bool = False
    postcopy: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_CHOICES:
            raise ValueError(f"storage {self.storage!r} is not one of "
                             f"{', '.join(STORAGE_CHOICES)}")
        if not 1 <= self.downtime_ms <= MAX_DOWNTIME_MS:
            raise ValueError(f"downtime {self.downtime_ms} ms is not between 1 and "
                             f"{MAX_DOWNTIME_MS} ms")
        if self.bandwidth is not None and self.bandwidth < 1 << 20:
            raise ValueError(f"bandwidth {self.bandwidth} B/s is below 1 MiB/s")


@dataclass(frozen=True)
class Progress:
    """One reading of a migration: bytes sent and left, the guest's dirty rate, QEMU's
    expected pause; `stage` says which part runs (files, disk, memory, finishing)."""

    stage: str
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    dirty_rate: int = 0  # bytes/s the guest dirties
    expected_downtime_ms: int | None = None
    status: str = ""


def option_reasons(options: MigrationOptions, postcopy_possible: bool) -> list[str]:
    """What the destination cannot do of what the user asked for (besides the VM's fit)."""
    if options.postcopy and not postcopy_possible:
        return ["post-copy needs userfaultfd for the VM's QEMU on the destination (sysctl "
                "vm.unprivileged_userfaultfd=1 there, a trade-off: see the threat model), or "
                "move with --auto-converge instead"]
    return []


def memory_progress(info: dict[str, object]) -> Progress:
    """A `query-migrate` answer as a Progress (QEMU's dirty-pages-rate is in pages/s)."""
    ram = info.get("ram")
    ram = ram if isinstance(ram, dict) else {}
    page = int(ram.get("page-size", 4096) or 4096)
    expected = info.get("expected-downtime")
    return Progress(stage="memory", transferred=int(ram.get("transferred", 0) or 0),
                    remaining=int(ram.get("remaining", 0) or 0),
                    total=int(ram.get("total", 0) or 0),
                    dirty_rate=int(ram.get("dirty-pages-rate", 0) or 0) * page,
                    expected_downtime_ms=int(expected) if isinstance(expected, int) else None,
                    status=str(info.get("status", "")))
