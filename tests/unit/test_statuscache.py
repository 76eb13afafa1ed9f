"""The status memo of `vmkit list`: reused only while nothing it was made from has moved."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmkit.storage import statuscache


def _vm(home: Path, name: str, state: str = "defined", pid: int | None = None) -> dict[str, object]:
    folder = home / "vms" / name
    folder.mkdir(parents=True)
    (folder / "vm.json").write_text(json.dumps({"name": name}))
    (folder / "state.json").write_text(json.dumps({"state": state, "pid": pid}))
    return {"name": name, "state": state, "pid": pid, "uptime": 5.0 if pid else None}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "vms").mkdir()
    return tmp_path


def _remember(home: Path, statuses: list[dict[str, object]]) -> None:
    keys = {str(s["name"]): statuscache.vm_key(home, str(s["name"])) for s in statuses}
    statuscache.write(home, keys, statuses)


def test_a_listing_is_reused_while_nothing_moved(home: Path) -> None:
    statuses = [_vm(home, "a"), _vm(home, "b", "running", os.getpid())]
    _remember(home, statuses)
    fresh = statuscache.read_fresh(home)
    assert fresh is not None and [s["name"] for s in fresh] == ["a", "b"]
    assert isinstance(fresh[1]["uptime"], float) and fresh[1]["uptime"] >= 5.0


@pytest.mark.parametrize("change", [
    "state-rewritten", "config-rewritten", "new-vm", "vm-gone", "journal", "half-created",
    "restarts", "qemu-gone"])
def test_any_change_sends_the_listing_back_to_the_engine(home: Path, change: str) -> None:
    statuses = [_vm(home, "a"), _vm(home, "b", "running", os.getpid())]
    _remember(home, statuses)
    folder = home / "vms" / "a"
    if change == "state-rewritten":
        tmp = folder / "state.new"
        tmp.write_text(json.dumps({"state": "stopped"}))
        os.replace(tmp, folder / "state.json")
    elif change == "config-rewritten":
        (folder / "vm.json").write_text(json.dumps({"name": "a", "cpus": 2}))
    elif change == "new-vm":
        _vm(home, "c")
    elif change == "vm-gone":
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    elif change == "journal":
        (folder / "journal.json").write_text("{}")
    elif change == "half-created":
        (home / "vms" / ".creating-d-1234").mkdir()
    elif change == "restarts":
        (home / "daemon").mkdir()
        (home / "daemon" / "restarts.json").write_text("{}")
    elif change == "qemu-gone":
        cache = json.loads((home / statuscache.FILE).read_text())
        cache["entries"]["b"]["ticks"] += 1  # as if pid were now another process
        (home / statuscache.FILE).write_text(json.dumps(cache))
    assert statuscache.read_fresh(home) is None


def test_a_damaged_or_foreign_memo_is_ignored(home: Path) -> None:
    _remember(home, [_vm(home, "a")])
    path = home / statuscache.FILE
    path.write_text("{not json")
    assert statuscache.read_fresh(home) is None
    path.write_text(json.dumps({"version": 999, "entries": {}}))
    assert statuscache.read_fresh(home) is None
