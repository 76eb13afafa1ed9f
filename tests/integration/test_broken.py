"""Issue 10: one unreadable folder is one broken VM, never a host that cannot be managed; a
start that fails says QEMU's own reason."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import run_cli
from vmkit import Host


def test_corrupt_metadata_makes_a_broken_vm_not_a_broken_host(host: Host, home: Path) -> None:
    for name in ("bad-config", "bad-state", "bad-tree", "fine"):
        host.create(name)
    vms = home / "vms"
    (vms / "bad-config/vm.json").write_text("{ not json")
    (vms / "bad-state/state.json").write_text(json.dumps({"state": "levitating"}))
    (vms / "bad-tree/snapshots.json").write_text(json.dumps({"nodes": {"x": {"name": 5}}}))

    listed = run_cli(home, "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    states = {vm["name"]: vm for vm in json.loads(listed.stdout)}
    assert set(states) == {"bad-config", "bad-state", "bad-tree", "fine"}
    for name, file in (("bad-config", "vm.json"), ("bad-state", "state.json"),
                       ("bad-tree", "snapshots.json")):
        assert states[name]["state"] == "broken"
        assert file in states[name]["broken"]
    assert states["fine"]["state"] == "defined" and states["fine"]["broken"] is None
    table = run_cli(home, "list")
    assert table.returncode == 0 and "broken" in table.stdout

    info = run_cli(home, "info", "bad-state", "--format", "json")
    assert info.returncode == 0 and json.loads(info.stdout)["state"] == "broken"
    created = run_cli(home, "create", "another", "--start")
    assert created.returncode == 0, created.stderr
    for args in (("start", "bad-config"), ("snapshot", "create", "bad-tree", "s"),
                 ("delete", "bad-state")):
        done = run_cli(home, *args)
        assert done.returncode in (1, 2) and "broken" in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    for name in ("bad-config", "bad-state", "bad-tree"):
        done = run_cli(home, "delete", name, "--force")
        assert done.returncode == 0, done.stderr
        assert not (vms / name).exists()
    names = {vm["name"] for vm in json.loads(run_cli(home, "list", "--format", "json").stdout)}
    assert names == {"fine", "another"}


def test_a_start_that_fails_in_qemu_says_qemus_reason(host: Host, home: Path) -> None:
    vm = host.create("damaged")
    disk = home / "vms/damaged/disks/root.qcow2"
    with open(disk, "r+b") as handle:
        handle.write(b"\0" * 512)  # the qcow2 header is gone
    done = run_cli(home, "start", "damaged")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    first = done.stderr.splitlines()[0]
    assert "qcow2" in first.lower() or "image" in first.lower(), done.stderr
    status = json.loads(run_cli(home, "info", "damaged", "--format", "json").stdout)
    assert status["state"] == "crashed"
    assert status["last_exit"]["reason"] == "start-failed"
    assert "qcow2" in status["last_exit"]["log_tail"].lower()
    assert vm.status().pid is None
