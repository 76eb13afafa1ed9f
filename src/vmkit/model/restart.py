"""Restart policy: what the host service does when a VM's QEMU ends without being asked to.

    no          never restart
    on-failure  restart after a crash (QEMU died: a signal, an error exit)
    always      restart after a crash and after the guest powered itself off

A stop or kill asked for by a user is never followed by a restart. Restarts back off
exponentially (1 s, 2 s, 4 s ... capped at MAX_DELAY) and stop after `max_restarts` in a row;
a run that lasted STABLE_AFTER seconds resets the count. Pure: the daemon's supervisor applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vmkit.errors import InvalidValue

RestartMode = Literal["no", "on-failure", "always"]
MODES: tuple[RestartMode, ...] = ("no", "on-failure", "always")
BASE_DELAY = 1.0
MAX_DELAY = 60.0
STABLE_AFTER = 120.0  # seconds of uptime after which a run counts as healthy


class RestartPolicy(BaseModel):
    """Stored in vm.json, so it travels with the VM (bundles, clones)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: RestartMode = "no"
    max_restarts: int = Field(default=5, ge=0, le=1000, description="in a row, then give up")
    autostart: bool = Field(default=False, description="start when the host service starts")


def parse_mode(value: str) -> RestartMode:
    for mode in MODES:
        if value == mode:
            return mode
    raise InvalidValue(f"invalid restart policy {value!r}", hint="use no, on-failure or always")


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay: float
    reason: str


def decide(policy: RestartPolicy, exit_reason: str, attempts: int) -> Decision:
    """Whether to restart a VM whose QEMU ended for `exit_reason` (a runtime ExitReason) after
    `attempts` restarts in a row, and after how long."""
    if exit_reason == "requested":
        return Decision(False, 0.0, "stopped by a user: never restarted")
    if policy.mode == "no":
        return Decision(False, 0.0, "restart policy is no")
    if exit_reason == "guest-shutdown" and policy.mode != "always":
        return Decision(False, 0.0, "the guest powered off and the policy is on-failure")
    if exit_reason not in ("crash", "guest-shutdown", "start-failed"):
        return Decision(False, 0.0, f"unknown exit reason {exit_reason!r}")
    if attempts >= policy.max_restarts:
        return Decision(False, 0.0, f"gave up after {attempts} restarts in a row "
                                    f"(max_restarts {policy.max_restarts})")
    return Decision(True, backoff(attempts), f"{exit_reason}: restart {attempts + 1} of "
                                             f"{policy.max_restarts}")


def backoff(attempts: int) -> float:
    return float(min(BASE_DELAY * (2 ** min(attempts, 16)), MAX_DELAY))


RESTARTS_FILE = "daemon/restarts.json"  # under VMKIT_HOME: the supervisor's record of each VM


def summary(entry: object) -> dict[str, object] | None:
    """What a VM's status shows of the supervisor's record (None when there is none)."""
    if not isinstance(entry, dict):
        return None
    return {key: entry.get(key) for key in ("attempts", "restarts", "last_reason")}
