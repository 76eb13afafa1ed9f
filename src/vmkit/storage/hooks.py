"""Test hooks that cut or stretch an operation at a named step (environment variables, read at
the step): VMKIT_FAULT=OP:STEP kills the process right after STEP, like a power cut;
VMKIT_PAUSE=OP:STEP:SECONDS holds still there, to make a race certain instead of lucky."""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "VMKIT_FAULT"
PAUSE_ENV = "VMKIT_PAUSE"


def fault_point(op: str, step: str) -> None:
    """Die like a power cut right after `step` of `op` when the test hook asks for it."""
    if os.environ.get(FAULT_ENV) == f"{op}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(op: str, step: str) -> None:
    """Hold still at `step` of `op` when the test hook asks for it (race tests)."""
    wanted = os.environ.get(PAUSE_ENV, "")
    prefix = f"{op}:{step}:"
    if wanted.startswith(prefix):
        time.sleep(min(30.0, float(wanted[len(prefix):] or 0)))
