"""Moves between two hosts that share storage: a folder both see at the same path (here one
directory of this machine, root's, as an NFS export mounted at the same place would be). The
hosts are the two namespaces of multihost.py (198.18.79.0/30), each with its own VMKIT_HOME,
uid range and daemon. A VM created with `--shared POOL` keeps its folder in POOL/NAME; each
host registers it in its own VMKIT_HOME/vms/NAME (with its runtime: sockets, logs, journal),
and a move sends only memory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import new_home
from tests.integration.multihost import (
    Side,
    one_qemu_on,
    snapshots_on,
    two_hosts,
    uptime_on,
    vm_uuid_on,
    wait_for,
)

A_ADDRESS, B_ADDRESS = "198.18.79.1", "198.18.79.2"


@pytest.fixture(scope="module")
def hosts(debian_home: Path) -> Iterator[tuple[Side, Side]]:
    with contextlib.ExitStack() as stack:
        yield two_hosts(stack, lambda: stack.enter_context(new_home(debian_home)),
                        addresses=(A_ADDRESS, B_ADDRESS), uid_base=2_200_000, tag="vmks")


@pytest.fixture(scope="module")
def pool(hosts: tuple[Side, Side]) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="vmkit-pool-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)








def _registration(side: Side, vm: str) -> dict[str, object] | None:
    path = side.home / "vms" / vm / "shared.json"
    return json.loads(path.read_text()) if path.exists() else None




def _listed(side: Side) -> list[str]:
    return [vm["name"] for vm in json.loads(side.ok("list", "--format", "json"))]


def _layer_owners(folder: Path) -> set[int]:
    return {p.stat().st_uid for p in (folder / "disks").glob("*.qcow2")}




def test_a_shared_vm_moves_by_memory_only_there_and_back(hosts: tuple[Side, Side],
                                                         pool: Path) -> None:
    a, b = hosts
    a.ok("create", "roamer", "--memory", "192M", "--shared", str(pool))
    folder = pool / "roamer"
    try:
        vm_uuid = vm_uuid_on(a, "roamer")
        assert _registration(a, "roamer") == {"folder": str(folder), "generation": 0,
                                              "uuid": vm_uuid}
        config = json.loads((folder / "vm.json").read_text())
        assert config["backing_file"].startswith(f"{pool}/.images/tiny-"), \
            "the first layer stands on the pool's copy of the image, the same on every host"
        assert not (a.home / "vms/roamer/vm.json").exists()
        a.ok("start", "roamer", "--wait")
        assert "roamer" in _listed(a), "the daemon lists a VM on shared storage"
        a.exec("roamer", "echo kept > /root/before.txt; sync")
        a.ok("snapshot", "create", "roamer", "before")
        a.exec("roamer", "echo later > /root/after.txt; sync; "
                         "dd if=/dev/urandom of=/root/blob bs=64k count=64 2>/dev/null; sync")
        blob = a.exec("roamer", "sha256sum /root/blob").split()[0]
        boot_id = a.exec("roamer", "cat /proc/sys/kernel/random/boot_id").strip()
        up_before = uptime_on(a, "roamer")
        layers_before = sorted(p.name for p in (folder / "disks").iterdir())

        moved = json.loads(a.ok("migrate", "roamer", "b", "--format", "json"))
        assert moved["storage"] == "shared" and moved["files_bytes"] == 0, moved
        assert moved["live"] is True and "disk_mirror" not in moved["stages"], moved
        assert not a.has_vm("roamer") and b.has_vm("roamer")
        assert _registration(b, "roamer") == {"folder": str(folder), "generation": 1,
                                              "uuid": vm_uuid}
        assert "roamer" in _listed(b) and "roamer" not in _listed(a)
        assert json.loads((folder / "vm.json").read_text())["generation"] == 1
        # the same files, not a copy: no layer was added, none went to B's home
        assert sorted(p.name for p in (folder / "disks").iterdir()) == layers_before
        assert not (b.home / "vms/roamer/disks").exists()
        assert not list(folder.glob(".move-*")), "the move's nonce is removed"
        one_qemu_on(b, a, vm_uuid)
        b_uid = int(b.env["VMKIT_UID_RANGE"].split(":")[0])
        assert _layer_owners(folder) <= set(range(b_uid, b_uid + 1000)), \
            "the layers belong to the destination's uid for the VM now"
        assert b.exec("roamer", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
        assert uptime_on(b, "roamer") > up_before
        assert b.exec("roamer", "cat /root/before.txt /root/after.txt").split() == \
            ["kept", "later"]
        assert b.exec("roamer", "sha256sum /root/blob").split()[0] == blob
        assert snapshots_on(b, "roamer") == ["before"]
        # a snapshot taken on B lands in the shared folder too
        b.exec("roamer", "echo on-b > /root/b.txt; sync")
        b.ok("snapshot", "create", "roamer", "on-b")

        back = json.loads(b.ok("migrate", "roamer", "a", "--storage", "shared",
                               "--format", "json"))
        assert back["storage"] == "shared" and back["live"] is True
        assert a.has_vm("roamer") and not b.has_vm("roamer")
        assert _registration(a, "roamer") == {"folder": str(folder), "generation": 2,
                                              "uuid": vm_uuid}
        one_qemu_on(a, b, vm_uuid)
        assert a.exec("roamer", "cat /root/b.txt").strip() == "on-b"
        assert a.exec("roamer", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
        assert snapshots_on(a, "roamer") == ["before", "on-b"]
        # snapshots taken on either host restore after the moves
        a.ok("snapshot", "restore", "roamer", "before")
        assert a.exec("roamer", "cat /root/before.txt").strip() == "kept"
        assert "No such file" in a.exec("roamer", "ls /root/after.txt 2>&1 || true")
        a.ok("snapshot", "restore", "roamer", "on-b")
        assert a.exec("roamer", "cat /root/b.txt").strip() == "on-b"
        # a linked clone would lean on layers that move with the VM: refused, nothing made
        linked = a.cli("clone", "roamer", "leaning", "--linked")
        assert linked.returncode == 2 and "full clone" in linked.stderr, linked.stderr
        assert not a.has_vm("leaning")
        # a cold move of the stopped VM keeps the same guarantees
        a.ok("stop", "roamer")
        cold = json.loads(a.ok("move", "roamer", "b", "--format", "json"))
        assert cold["storage"] == "shared" and cold["live"] is False
        assert _registration(b, "roamer") == {"folder": str(folder), "generation": 3,
                                              "uuid": vm_uuid}
        assert _layer_owners(folder) == {0}, \
            "A's uid let go of the files (A may give it to another VM); B takes them at start"
        b.ok("start", "roamer", "--wait")
        assert b.exec("roamer", "cat /root/b.txt").strip() == "on-b"
        b.ok("delete", "roamer", "--force")
        assert not folder.exists(), "deleting the VM removes its shared folder"
    finally:
        for side in (a, b):
            if side.has_vm("roamer"):
                side.cli("delete", "roamer", "--force")
        shutil.rmtree(folder, ignore_errors=True)


DIRTY_LOOP = ("(i=0; while :; do dd if=/dev/urandom of=/mnt/ram/dirty bs=1M count=16 "
              "2>/dev/null; i=$((i+1)); echo $i >> /root/disk-ticks; sync; done) "
              ">/dev/null 2>&1 </dev/null & echo started")


def test_memory_and_disk_stay_intact_over_6_shared_moves(hosts: tuple[Side, Side],
                                                          pool: Path) -> None:
    """Known data in guest RAM and on its disk, checksummed after every move, while a loop
    keeps dirtying RAM and writing the disk the two hosts share, 6 moves: 0 mismatches, and the disk
    file the guest kept appending to is whole (its counter's every value, in order)."""
    a, b = hosts
    a.ok("create", "churn", "--memory", "192M", "--shared", str(pool))
    try:
        a.ok("start", "churn", "--wait")
        vm_uuid = vm_uuid_on(a, "churn")
        known = a.exec("churn", "mkdir -p /mnt/ram && mount -t tmpfs -o size=96m tmpfs /mnt/ram"
                                " && dd if=/dev/urandom of=/mnt/ram/known bs=1M count=32 "
                                "2>/dev/null && cp /mnt/ram/known /root/known && sync && "
                                "sha256sum /mnt/ram/known").split()[0]
        a.exec("churn", DIRTY_LOOP)
        sides, mismatches = [a, b], 0
        for move in range(6):
            here, there = sides[move % 2], sides[(move + 1) % 2]
            here.ok("migrate", "churn", there.name, "--auto-converge")
            got = there.exec("churn", "sha256sum /mnt/ram/known /root/known").split()
            mismatches += (got[0], got[2]) != (known, known)
            one_qemu_on(there, here, vm_uuid)
        assert mismatches == 0
        ticks = a.exec("churn", "sync; cat /root/disk-ticks").split()
        assert len(ticks) > 6, ticks
        assert ticks == [str(n) for n in range(1, len(ticks) + 1)], \
            "every line the guest appended to its disk across the moves is there, in order"
    finally:
        for side in (a, b):
            if side.has_vm("churn"):
                side.cli("delete", "churn", "--force")
        shutil.rmtree(pool / "churn", ignore_errors=True)


def test_shared_storage_refusals_change_nothing(hosts: tuple[Side, Side], pool: Path) -> None:
    a, b = hosts
    a.ok("create", "local-one", "--memory", "128M")
    try:
        refused = a.cli("move", "local-one", "b", "--storage", "shared")
        assert refused.returncode == 2, refused.stderr
        assert "not shared storage" in refused.stderr and "Traceback" not in refused.stderr
        assert a.has_vm("local-one") and not b.has_vm("local-one")
        # a folder that is not an absolute path, or not there, is refused before anything
        for bad in ("relative/pool", str(pool / "missing")):
            made = a.cli("create", "nowhere", "--shared", bad)
            assert made.returncode == 2 and "invalid shared storage" in made.stderr, made.stderr
            assert not a.has_vm("nowhere")
    finally:
        a.cli("delete", "local-one", "--force")


def test_a_failed_shared_move_gives_the_folder_back_to_the_source(hosts: tuple[Side, Side],
                                                                  pool: Path) -> None:
    """The destination's QEMU is killed mid-transfer: the source runs on, owns its files
    again (its uid), and B keeps no registration, runtime or process."""
    a, b = hosts
    a.ok("create", "stayer", "--memory", "192M", "--shared", str(pool))
    folder = pool / "stayer"
    try:
        a.ok("start", "stayer", "--wait")
        vm_uuid = vm_uuid_on(a, "stayer")
        a_owners = _layer_owners(folder)
        a.exec("stayer", "echo mine > /root/mark.txt; sync")
        boot_id = a.exec("stayer", "cat /proc/sys/kernel/random/boot_id").strip()
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        mover = threading.Thread(target=lambda: result.setdefault("done", a.cli(
            "migrate", "stayer", "b", "--bandwidth", "2M")))
        mover.start()
        try:
            wait_for(lambda: len(b.qemus(vm_uuid)) == 1, 120, "the incoming QEMU")
            time.sleep(2)
            os.kill(b.qemus(vm_uuid)[0], signal.SIGKILL)
        finally:
            mover.join(timeout=300)
        assert result["done"].returncode != 0
        wait_for(lambda: not b.has_vm("stayer") and not b.qemus(vm_uuid), 60,
                  "the destination to drop its registration")
        one_qemu_on(a, b, vm_uuid)
        assert folder.is_dir() and (folder / "vm.json").exists(), "the shared folder stays"
        assert json.loads((folder / "vm.json").read_text())["generation"] == 0
        assert _registration(a, "stayer") == {"folder": str(folder), "generation": 0,
                                              "uuid": vm_uuid}
        assert _layer_owners(folder) == a_owners, "the layers are the source VM's uid's again"
        assert a.exec("stayer", "cat /root/mark.txt").strip() == "mine"
        assert a.exec("stayer", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
        # and it still works as this host's: a snapshot opens a new layer in the folder
        a.ok("snapshot", "create", "stayer", "after-failure")
        a.exec("stayer", "echo still > /root/still.txt; sync")
        assert json.loads(a.ok("info", "stayer", "--format", "json"))["state"] == "running"
    finally:
        for side in (a, b):
            if side.has_vm("stayer"):
                side.cli("delete", "stayer", "--force")
        shutil.rmtree(folder, ignore_errors=True)


def test_a_shared_source_cut_after_the_transfer_never_runs_the_vm_again(
        hosts: tuple[Side, Side], pool: Path) -> None:
    """The source's daemon dies right after its QEMU sent everything (journal `performed`):
    the destination finishes on its own and writes the next generation into the folder. The
    restarted source settles and lets go; a registration of the old generation (a host that
    kept one) is refused a start, and deleting it there leaves the folder to its owner."""
    a, b = hosts
    a.ok("create", "once", "--memory", "192M", "--shared", str(pool))
    folder = pool / "once"
    try:
        a.ok("start", "once", "--wait")
        vm_uuid = vm_uuid_on(a, "once")
        a.exec("once", "echo here > /root/mark.txt; sync")
        stale = (a.home / "vms/once/shared.json").read_text()
        a.daemon.stop()
        a.daemon.start(env={**a.env, "VMKIT_FAULT": "migrate-out:performed"})
        try:
            cut = a.cli("migrate", "once", "b")
            assert cut.returncode != 0
            assert a.daemon.process is not None
            a.daemon.process.wait(timeout=30)
        finally:
            a.daemon.start(env=a.env)
        wait_for(lambda: not a.has_vm("once"), 60, "the source to let go")
        one_qemu_on(b, a, vm_uuid)
        assert b.exec("once", "cat /root/mark.txt").strip() == "here"
        assert json.loads((folder / "vm.json").read_text())["generation"] == 1
        # a host still registered at generation 0 (say, restored from a backup) never runs it
        (a.home / "vms/once").mkdir(mode=0o700)
        (a.home / "vms/once/shared.json").write_text(stale)
        config_before = (folder / "vm.json").read_bytes()
        tree_before = sorted(p.name for p in (folder / "disks").iterdir())
        # nothing this host does writes the folder: start, a snapshot, a new share, a clone
        for command in (("start", "once"), ("snapshot", "create", "once", "stale"),
                        ("set", "once", "--memory", "256M"), ("clone", "once", "copy-of")):
            refused = a.cli(*command)
            assert refused.returncode != 0, command
            assert "not this host's to start" in refused.stderr, (command, refused.stderr)
        assert (folder / "vm.json").read_bytes() == config_before
        assert sorted(p.name for p in (folder / "disks").iterdir()) == tree_before
        assert not a.has_vm("copy-of")
        one_qemu_on(b, a, vm_uuid)
        a.ok("delete", "once", "--force")
        assert (folder / "vm.json").exists(), "a stale registration's delete keeps the folder"
        assert b.exec("once", "cat /root/mark.txt").strip() == "here"
    finally:
        for side in (a, b):
            if side.has_vm("once"):
                side.cli("delete", "once", "--force")
        shutil.rmtree(folder, ignore_errors=True)


def test_a_shared_destination_cut_at_its_point_of_no_return_keeps_the_guest(
        hosts: tuple[Side, Side], pool: Path) -> None:
    """B's daemon dies right after journalling `finish` (before the new generation is in the
    folder and before `cont`): restarted, it keeps the arrival and resumes it; the source,
    asking all along, confirms. Never handed back: the guest could have written the disk."""
    a, b = hosts
    a.ok("create", "keeper", "--memory", "192M", "--shared", str(pool))
    folder = pool / "keeper"
    try:
        a.ok("start", "keeper", "--wait")
        vm_uuid = vm_uuid_on(a, "keeper")
        a.exec("keeper", "echo kept > /root/mark.txt; sync")
        boot_id = a.exec("keeper", "cat /proc/sys/kernel/random/boot_id").strip()
        b.daemon.stop()
        b.daemon.start(env={**b.env, "VMKIT_FAULT": "migrate-in:finish"})
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        mover = threading.Thread(target=lambda: result.setdefault("done", a.cli(
            "migrate", "keeper", "b", "--format", "json")))
        mover.start()
        try:
            assert b.daemon.process is not None
            b.daemon.process.wait(timeout=120)  # killed at the step, like a power cut
        finally:
            b.daemon.start(env=b.env)
            mover.join(timeout=300)
        done = result["done"]
        assert done.returncode == 0, done.stderr
        wait_for(lambda: not a.has_vm("keeper"), 60, "the source to let go")
        one_qemu_on(b, a, vm_uuid)
        assert json.loads((folder / "vm.json").read_text())["generation"] == 1
        assert json.loads(b.ok("info", "keeper", "--format", "json"))["state"] == "running"
        assert b.exec("keeper", "cat /root/mark.txt").strip() == "kept"
        assert b.exec("keeper", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
    finally:
        for side in (a, b):
            if side.has_vm("keeper"):
                side.cli("delete", "keeper", "--force")
        shutil.rmtree(folder, ignore_errors=True)


def test_a_shared_debian_guest_moves_there_and_back(hosts: tuple[Side, Side],
                                                     pool: Path) -> None:
    a, b = hosts
    a.ok("create", "deb", "--image", "debian-12", "--memory", "512M", "--disk", "4G",
         "--shared", str(pool))
    try:
        a.ok("start", "deb", "--wait", "--timeout", "300")
        a.exec("deb", "echo debian > /root/moved.txt; sync")
        boot_id = a.exec("deb", "cat /proc/sys/kernel/random/boot_id").strip()
        up = uptime_on(a, "deb")
        there = json.loads(a.ok("migrate", "deb", "b", "--format", "json"))
        assert there["live"] and there["storage"] == "shared" and not a.has_vm("deb")
        assert b.exec("deb", "cat /root/moved.txt").strip() == "debian"
        assert b.exec("deb", "cat /proc/1/comm").strip() == "systemd"
        b.ok("migrate", "deb", "a")
        assert a.exec("deb", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
        assert uptime_on(a, "deb") > up
    finally:
        for side in (a, b):
            side.cli("delete", "deb", "--force")
        shutil.rmtree(pool / "deb", ignore_errors=True)
