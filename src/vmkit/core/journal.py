"""The journal file of one VM folder, and the test hook that kills the process at a step.

`Journal(folder).begin(op, **intent)` writes journal.json; `step(name, **more)` records a
completed step (fsynced: the next reader sees it) and then passes the fault point; `end()`
removes the file. Recovery rules live with each operation (vmkit.ops.snapshots, vmkit.ops.clones,
vmkit.ops.bundles), registered with `register_recovery`; the engine calls them when it
takes the VM's lock (the core never imports an operation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmkit.errors import InvalidState
from vmkit.model.journal import JournalEntry, OpKind
from vmkit.storage.hooks import FAULT_ENV, PAUSE_ENV, fault_point, pause_point
from vmkit.storage.layout import read_metadata, write_json_atomic

JOURNAL_FILE = "journal.json"


Rule = Callable[[Any, Any, JournalEntry], None]  # (held lock, VM, entry)
_RECOVERY: dict[str, Rule] = {}


def register_recovery(op: OpKind, rule: Rule) -> None:
    """An operation module names the rule that finishes or undoes it after a cut (the core
    calls it; the core never imports an operation)."""
    _RECOVERY[op] = rule


def recovery_rule(op: str) -> Rule:
    try:
        return _RECOVERY[op]
    except KeyError:
        raise InvalidState(f"no recovery rule for an interrupted {op!r}: vmkit's operations "
                           "are not loaded", hint="use the vmkit CLI or `import vmkit`") from None


class Journal:
    def __init__(self, folder: Path):
        self.path = folder / JOURNAL_FILE
        self.entry: JournalEntry | None = None

    def read(self) -> JournalEntry | None:
        try:
            return read_metadata(self.path, JournalEntry, f"the journal of {self.path.parent}")
        except FileNotFoundError:
            return None

    def begin(self, op: OpKind, **intent: Any) -> JournalEntry:
        existing = self.read()
        if existing is not None:
            raise InvalidState(f"an unfinished {existing.op} is recorded in {self.path}",
                               hint="run vmkit recover")
        self.entry = JournalEntry(op=op, started_at=time.time(), pid=os.getpid(),
                                  intent=intent)
        self._write()
        self.step("begun")
        return self.entry

    def step(self, step: str, /, **intent: Any) -> None:
        assert self.entry is not None
        self.entry = self.entry.with_step(step, **intent)
        self._write()
        fault_point(self.entry.op, step)

    def end(self) -> None:
        self.path.unlink(missing_ok=True)
        self.entry = None

    def _write(self) -> None:
        assert self.entry is not None
        write_json_atomic(self.path, self.entry.model_dump(mode="json"), mode=0o600)


__all__ = ["FAULT_ENV", "JOURNAL_FILE", "PAUSE_ENV", "Journal", "fault_point", "pause_point",
           "recovery_rule", "register_recovery"]
