"""The operation journal, pure: what one multi-step operation on a VM intends and which of its
steps are done. The engine writes it (atomically, before and after every step) to
`journal.json` in the VM folder; whoever next holds the VM's lock finds an unfinished entry and
rolls it forward or back (vmkit.core.journal).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OpKind = Literal["start", "stop", "snapshot", "restore", "delete-snapshot", "clone",
                 "instant-clone", "export", "set", "nic-add", "nic-remove", "disk-add",
                 "disk-remove", "migrate-out", "migrate-in"]

#: The named steps of each operation, in order (the fault matrix kills the CLI at each one).
STEPS: dict[str, tuple[str, ...]] = {
    "start": ("begun", "reserved", "spawned", "ready"),
    "stop": ("begun", "stopping", "powerdown-sent"),
    "clone": ("begun", "snapshot-taken", "clone-published", "merged-back"),
    "set": ("begun", "reserved", "applied"),
    "nic-add": ("begun", "saved", "plugged"),
    "nic-remove": ("begun", "unplugged", "saved"),
    "disk-add": ("begun", "created", "saved", "plugged"),
    "disk-remove": ("begun", "unplugged"),
    # import builds a hidden folder published by one rename: no VM to journal in, only the
    # fault points (the hidden folder of a cut import is swept by the next listing)
    "import": ("extracted", "checked", "published"),
    "snapshot": ("begun", "paused", "overlay-created", "memory-saved", "switched",
                 "tree-saved"),
    "restore": ("begun", "stopped", "overlay-created", "started", "tree-saved"),
    "delete-snapshot": ("begun", "merged", "tree-saved"),
    # the clone's folder first (its overlay on the source's active layer), then the memory
    # sent while the source runs; at the switch-over (paused) its disk is frozen by a
    # snapshot whose steps (overlay-created, switched, tree-saved) are journalled here too
    "instant-clone": ("begun", "clone-published", "paused", "overlay-created", "switched",
                      "tree-saved", "clone-started", "source-resumed"),
    "export": ("begun", "snapshot-taken", "written", "published"),
    # a live move, source side: files sent, memory and disk in flight, source paused for
    # good, destination running; destination side: its folder exists, its guest runs
    "migrate-out": ("begun", "snapshot-taken", "prepared", "perform", "performed", "confirm"),
    "migrate-in": ("begun", "finish"),
}


class JournalEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    op: OpKind
    started_at: float
    pid: int = Field(description="the process that ran it (for messages only)")
    intent: dict[str, Any] = Field(default_factory=dict)
    steps: tuple[str, ...] = ()

    def done(self, step: str) -> bool:
        return step in self.steps

    def with_step(self, step: str, /, **intent: Any) -> JournalEntry:
        if step not in STEPS[self.op]:
            raise ValueError(f"unknown step {step!r} of {self.op}")
        return self.model_copy(update={"steps": (*self.steps, step),
                                       "intent": {**self.intent, **intent}})
