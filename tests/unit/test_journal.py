"""The operation journal: steps in order, atomic file, one entry at a time, the fault hook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmkit.core.journal import FAULT_ENV, JOURNAL_FILE, Journal
from vmkit.errors import BrokenVm, InvalidState
from vmkit.model.journal import STEPS, JournalEntry


def test_steps_are_recorded_and_end_removes_the_file(tmp_path: Path) -> None:
    log = Journal(tmp_path)
    log.begin("snapshot", name="s1", new_layer="disks/a.qcow2")
    log.step("paused", paused_by_us=True)
    entry = Journal(tmp_path).read()
    assert entry is not None and entry.steps == ("begun", "paused")
    assert entry.intent == {"name": "s1", "new_layer": "disks/a.qcow2", "paused_by_us": True}
    assert oct((tmp_path / JOURNAL_FILE).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(InvalidState, match="unfinished snapshot"):
        Journal(tmp_path).begin("export")
    log.end()
    assert Journal(tmp_path).read() is None


def test_unknown_steps_and_a_damaged_journal_are_refused(tmp_path: Path) -> None:
    entry = JournalEntry(op="restore", started_at=0, pid=1)
    with pytest.raises(ValueError, match="unknown step"):
        entry.with_step("teleported")
    (tmp_path / JOURNAL_FILE).write_text('{"op": "format-disk"}')
    with pytest.raises(BrokenVm, match="journal"):
        Journal(tmp_path).read()
    assert all(steps[0] == "begun" for op, steps in STEPS.items() if op != "import")


def test_the_fault_hook_kills_right_after_the_step(tmp_path: Path) -> None:
    script = ("import sys; from pathlib import Path; from vmkit.core.journal import Journal; "
              "j = Journal(Path(sys.argv[1])); j.begin('export'); j.step('snapshot-taken'); "
              "j.step('written'); print('survived')")
    env = {**os.environ, FAULT_ENV: "export:snapshot-taken"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == -9 and "survived" not in done.stdout
    entry = Journal(tmp_path).read()
    assert entry is not None and entry.steps == ("begun", "snapshot-taken")
