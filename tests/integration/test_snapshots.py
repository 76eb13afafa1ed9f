"""Snapshots on real tiny guests: disk and memory restored exactly, a real tree, deletes merge."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.integration.conftest import COUNTER, chain_is_sound, count, run_cli, sh
from vmkit import VM, Host, VmState


def test_live_snapshot_restores_disk_ram_and_processes(host: Host) -> None:
    vm = host.create("snap", memory="256M")
    vm.start(wait=True)
    sh(vm, "head -c 1000000 /dev/urandom > /root/data; sync")
    sh(vm, "dd if=/dev/urandom of=/run/blob bs=1M count=64 2>/dev/null")
    disk_sum = sh(vm, "sha256sum /root/data")
    ram_sum = sh(vm, "sha256sum /run/blob")  # /run is tmpfs: this lives only in guest RAM
    sh(vm, COUNTER)
    time.sleep(1)
    before = count(vm)
    info = vm.snapshot("before-upgrade")
    after = count(vm)
    assert info.with_memory and info.taken_in == "running" and info.current
    assert vm.state is VmState.RUNNING  # the VM kept running
    sh(vm, "head -c 1000000 /dev/urandom > /root/data; sync; "
           "dd if=/dev/urandom of=/run/blob bs=1M count=64 2>/dev/null")
    assert sh(vm, "sha256sum /root/data") != disk_sum
    time.sleep(4)
    later = count(vm)
    for _ in range(2):  # restorable any number of times
        vm.restore("before-upgrade")
        assert vm.state is VmState.RUNNING
        resumed = count(vm)
        # the counter continues from its value at the snapshot, not from where it had got to
        assert before <= resumed < after + (later - after) // 2, (before, after, resumed, later)
        assert sh(vm, "sha256sum /root/data") == disk_sum
        assert sh(vm, "sha256sum /run/blob") == ram_sum
        time.sleep(1)
        assert count(vm) > resumed  # and it runs on
    chain_is_sound(vm.folder.path)


def test_tree_branches_and_deleting_the_middle_keeps_the_rest(host: Host, home: Path) -> None:
    vm = host.create("tree")
    vm.start(wait=True)
    sh(vm, "echo one > /root/f; sync")
    vm.snapshot("s1")
    sh(vm, "echo two > /root/f; sync")
    vm.snapshot("s2")
    vm.restore("s1")
    assert sh(vm, "cat /root/f") == "one"
    sh(vm, "echo three > /root/f; sync")
    vm.snapshot("s3")  # a branch: s2 and s3 are both children of s1
    tree = {s.name: s for s in vm.snapshots()}
    assert tree["s2"].parent == "s1" and tree["s3"].parent == "s1"
    assert tree["s3"].current and not tree["s2"].current
    listing = json.loads(run_cli(home, "snapshot", "list", "tree", "--format", "json").stdout)
    assert [(r["name"], r["depth"]) for r in listing] == [("s1", 0), ("s2", 1), ("s3", 1)]
    human = run_cli(home, "snapshot", "list", "tree").stdout
    assert "<- current" in human

    s1_layer = home / "vms/tree" / json.loads(
        (home / "vms/tree/snapshots.json").read_text())["nodes"]["s1"]["layer"]
    vm.delete_snapshot("s1")  # the middle node, while its branch runs on top of it
    assert not s1_layer.exists()
    assert {s.name: s.parent for s in vm.snapshots()} == {"s2": None, "s3": None}
    chain_is_sound(vm.folder.path)
    vm.restore("s2")
    assert sh(vm, "cat /root/f") == "two"
    vm.restore("s3")
    assert sh(vm, "cat /root/f") == "three"
    vm.delete_snapshot("s3")  # the current node: the running disk absorbs it
    assert sh(vm, "cat /root/f") == "three"
    vm.stop()
    vm.start(wait=True)
    assert sh(vm, "cat /root/f") == "three"
    chain_is_sound(vm.folder.path)


def test_disk_only_snapshots_of_running_and_stopped_vms(host: Host, home: Path) -> None:
    vm = host.create("disky")
    vm.start(wait=True)
    sh(vm, "echo quiet > /root/f")
    done = run_cli(home, "snapshot", "create", "disky", "d1", "--disk-only")
    assert done.returncode == 0, done.stderr
    info = next(s for s in vm.snapshots() if s.name == "d1")
    assert not info.with_memory and info.quiesced is True  # frozen through the agent
    sh(vm, "echo later > /root/f; sync")
    vm.restore("d1")  # a disk-only snapshot is a powered-off state
    assert vm.state is VmState.STOPPED
    vm.snapshot("d2")  # of a stopped VM: disk only
    assert not next(s for s in vm.snapshots() if s.name == "d2").with_memory
    vm.start(wait=True)
    assert sh(vm, "cat /root/f") == "quiet"
    assert run_cli(home, "snapshot", "create", "disky", "d1").returncode == 2  # exists
    assert run_cli(home, "snapshot", "restore", "disky", "nope").returncode == 2
    assert run_cli(home, "snapshot", "create", "disky", "Bad_Name").returncode == 2


DIRTY = ("(i=0; while :; do dd if=/dev/urandom of=/run/dirty bs=1M count=16 2>/dev/null; "
         "i=$((i+1)); echo $i > /run/rounds; done) >/dev/null 2>&1 </dev/null &")


def _busy_guest(host: Host, name: str) -> tuple[VM, str]:
    """A running 256 MiB guest with 48 MiB of known RAM-resident data (its sha256 returned)
    and a loop rewriting RAM."""
    vm = host.create(name, memory="256M")
    vm.start(wait=True)
    sh(vm, "dd if=/dev/urandom of=/run/known bs=1M count=48 2>/dev/null")
    known = sh(vm, "sha256sum /run/known")
    sh(vm, DIRTY)
    time.sleep(2)
    return vm, known


def _rounds_pass(vm: VM, since: int, within: float = 20.0) -> bool:
    """Whether the guest's dirtying loop counts past `since` within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if count(vm, "/run/rounds") > since:
            return True
        time.sleep(0.5)
    return False


def test_a_live_snapshot_of_a_guest_dirtying_memory_pauses_it_briefly_and_restores_exactly(
        host: Host) -> None:
    """The memory is saved while the guest runs (QEMU re-sends what it dirties) and the guest
    stops only for the last pass: RAM-resident data checksums the same after a restore, and
    the guest's own loop runs on from the snapshot."""
    vm, known = _busy_guest(host, "busy")
    started = time.monotonic()
    info = vm.snapshot("busy-point")
    wall_ms = 1000 * (time.monotonic() - started)
    assert info.with_memory and info.taken_in == "running"
    assert info.paused_ms is not None and 0 < info.paused_ms < wall_ms / 2, (info, wall_ms)
    sh(vm, "dd if=/dev/urandom of=/run/known bs=1M count=48 2>/dev/null")
    assert sh(vm, "sha256sum /run/known") != known
    time.sleep(3)
    later = count(vm, "/run/rounds")
    vm.restore("busy-point")
    resumed = count(vm, "/run/rounds")
    assert resumed < later  # back to the snapshot's moment, and the loop runs from there
    assert sh(vm, "sha256sum /run/known") == known
    time.sleep(3)
    assert count(vm, "/run/rounds") > resumed  # the dirtying loop lives on
    listed = {s.name: s for s in vm.snapshots()}
    assert listed["busy-point"].paused_ms == info.paused_ms
    chain_is_sound(vm.folder.path)


def test_an_instant_clone_of_a_guest_dirtying_memory_pauses_it_briefly_and_copies_exactly(
        host: Host) -> None:
    """The memory goes to the clone while the source runs (QEMU re-sends what it dirties); the
    source stops only for the last pass and its disk switch: the clone's RAM-resident data
    checksums the same, and both guests' loops run on."""
    vm, known = _busy_guest(host, "busyc")
    before = count(vm, "/run/rounds")
    started = time.monotonic()
    clone = vm.clone("busyc2", live=True)
    wall_ms = 1000 * (time.monotonic() - started)
    helper = {s.name: s for s in vm.snapshots()}["clone-busyc2"]
    # the pause is QEMU's figure from the vCPUs' stop to the end, plus vmkit's `cont`
    assert helper.paused_ms is not None and 0 < helper.paused_ms < wall_ms / 2, (helper,
                                                                                 wall_ms)
    assert sh(clone, "sha256sum /run/known") == known
    assert sh(vm, "sha256sum /run/known") == known
    copied = count(clone, "/run/rounds")
    assert copied >= before  # the clone starts where the source was at the switch-over
    # each guest's loop is measured against its own count: the two share 2 host cores, so
    # either may run ahead of the other
    source_after = count(vm, "/run/rounds")
    assert _rounds_pass(clone, copied)  # the copied loop runs in the clone
    assert _rounds_pass(vm, source_after)  # and the source's own goes on
    assert sh(clone, "hostname") == "busyc2"
    chain_is_sound(vm.folder.path)
    chain_is_sound(clone.folder.path)
    clone.kill()
    clone.delete()
