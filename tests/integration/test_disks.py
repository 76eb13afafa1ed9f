"""Extra disks (vmkit disk add|remove): hot-plugged into a running tiny guest and out again,
kept over a restart, left as they are by snapshots, carried by clones and bundles; what would
not match them (a memory snapshot, an instant clone, a live copy) is refused with a reason."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli, sh
from vmkit import Host
from vmkit.core.engine import VM
from vmkit.errors import AlreadyExists, InvalidState, InvalidValue, NotFound

# the block device whose serial is $1 (the tiny guest has no udev: no /dev/disk/by-id)
FIND = ("for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = {serial} ] && "
        "echo /dev/${{b##*/}}; done; true")


def _device(vm: VM, serial: str, timeout: float = 60) -> str:
    """The guest's device for disk `serial`, once the guest has found it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sh(vm, FIND.format(serial=serial))
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"the guest never saw disk {serial}")


def _gone(vm: VM, serial: str) -> bool:
    return sh(vm, FIND.format(serial=serial)) == ""


def _write(vm: VM, serial: str, text: str) -> None:
    sh(vm, f"printf '%-16s' {text} | dd of={_device(vm, serial)} bs=16 count=1 conv=fsync "
           "2>/dev/null")


def _read(vm: VM, serial: str) -> str:
    return sh(vm, f"dd if={_device(vm, serial)} bs=16 count=1 2>/dev/null").strip()


def test_a_disk_hot_plugged_into_a_running_vm_keeps_its_data_and_goes_away(
        host: Host, home: Path) -> None:
    vm = host.create("disky", memory="256M")
    vm.start(wait=True)
    vm.snapshot("plain")  # with memory: a machine without extra disks
    added = vm.add_disk("data", "64M")
    assert (added.name, added.size) == ("data", 64 << 20)
    device = _device(vm, "data")
    assert sh(vm, f"cat /sys/block/{device[5:]}/size") == str((64 << 20) // 512)
    _write(vm, "data", "first")
    assert _read(vm, "data") == "first"
    folder = home / "vms" / "disky"
    volume = folder / "volumes" / "data.qcow2"
    assert volume.is_file() and volume.stat().st_mode & 0o777 == 0o600
    assert [d.name for d in vm.disks()] == ["data"]
    # what cannot match a disk that snapshots leave alone is refused, naming the disk
    with pytest.raises(InvalidState, match=r"extra disks \(data\)"):
        vm.snapshot("with-memory")
    with pytest.raises(InvalidState, match=r"extra disks \(data\)"):
        vm.clone("copy", live=True)
    with pytest.raises(InvalidState, match=r"extra disks \(data\)"):
        vm.clone("copy")
    assert not (home / "vms" / "copy").exists()
    with pytest.raises(InvalidState, match="did not have"):
        vm.restore("plain")  # that machine would run without the disk vm.json names
    assert _read(vm, "data") == "first"
    # a disk-only snapshot and its restore leave the extra disk as it is (a volume of its own)
    vm.snapshot("before", disk_only=True)
    sh(vm, "echo root-later > /later; sync")
    _write(vm, "data", "second")
    vm.restore("before")  # a disk-only snapshot: the VM is left stopped
    vm.start(wait=True)
    assert sh(vm, "cat /later 2>/dev/null || echo none") == "none"
    assert _read(vm, "data") == "second"
    # over a cold restart the disk is there from the start, on its own port
    vm.stop()
    vm.start(wait=True)
    assert _read(vm, "data") == "second"
    # refusals leave everything as it was
    with pytest.raises(AlreadyExists):
        vm.add_disk("data", "1G")
    with pytest.raises(NotFound, match="its extra disks: data"):
        vm.remove_disk("nothere")
    with pytest.raises(InvalidValue):
        vm.add_disk("a-name-far-too-long-for-a-serial", "1G")
    with pytest.raises(InvalidValue):
        vm.add_disk("logs", "-1G")
    assert [d.name for d in vm.disks()] == ["data"]
    assert sorted(p.name for p in (folder / "volumes").iterdir()) == ["data.qcow2"]
    # a second one, hot, then both out: the guest lets go and the files go
    vm.add_disk("logs", "32M")
    _write(vm, "logs", "logged")
    vm.remove_disk("data")
    assert _gone(vm, "data") and _read(vm, "logs") == "logged"
    assert not volume.exists()
    vm.remove_disk("logs")
    assert _gone(vm, "logs")
    assert json.loads((folder / "vm.json").read_text())["disks"] == []
    assert list((folder / "volumes").iterdir()) == []
    # the machine still is the one that started with the disk: no memory snapshot of it until
    # the next start (its memory may hold what it cached of that disk)
    with pytest.raises(InvalidState, match=r"extra disks \(data\)"):
        vm.snapshot("with-memory")
    vm.stop()
    vm.start(wait=True)
    vm.snapshot("with-memory")
    vm.kill()


def test_clones_and_bundles_carry_extra_disks_and_the_cli_shows_them(
        host: Host, home: Path, tmp_path: Path) -> None:
    vm = host.create("source", memory="256M")
    added = run_cli(home, "disk", "add", "source", "data", "--size", "32M")
    assert added.returncode == 0, added.stderr
    assert "disk data" in added.stderr
    vm.start(wait=True)
    _write(vm, "data", "carried")
    listed = json.loads(run_cli(home, "disk", "list", "source", "--format", "json",
                                check=True).stdout)
    assert [(d["name"], d["size"]) for d in listed] == [("data", 32 << 20)]
    info = run_cli(home, "info", "source", check=True).stdout
    assert "extra disk" in info and "data" in info
    # a running VM is neither exported nor cloned with disks a guest is writing
    refused = run_cli(home, "export", "source", str(tmp_path / "live.vmkit"))
    assert refused.returncode == 2 and "stop it first" in refused.stderr, refused.stderr
    assert not (tmp_path / "live.vmkit").exists()
    vm.stop()
    clone = vm.clone("copy")
    clone.start(wait=True)
    assert _read(clone, "data") == "carried"
    _write(clone, "data", "clone-own")  # its own copy: the source's stays
    clone.kill()
    linked = vm.clone("linked", linked=True)  # shares the root disk's layers, not the volume
    copied = home / "vms" / "linked" / "volumes" / "data.qcow2"
    facts = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(copied)],
                                      capture_output=True, text=True, check=True).stdout)
    assert "backing-filename" not in facts and linked.disks()[0].size == 32 << 20
    bundle = tmp_path / "source.vmkit"
    vm.export(bundle)
    imported = host.import_bundle(bundle, name="imported")
    imported.start(wait=True)
    assert _read(imported, "data") == "carried"
    imported.kill()
    vm.start(wait=True)
    assert _read(vm, "data") == "carried"
    vm.kill()
    removed = run_cli(home, "disk", "remove", "source", "data")
    assert removed.returncode == 0, removed.stderr
    missing = run_cli(home, "disk", "remove", "source", "data")
    assert missing.returncode != 0 and "no disk named 'data'" in missing.stderr
    assert "Traceback" not in missing.stderr
