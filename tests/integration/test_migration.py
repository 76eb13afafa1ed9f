"""Live migration between two hosts: two network namespaces joined by a veth pair
(198.18.78.0/30), each with its own VMKIT_HOME, uid range and daemon. The CLI on host A moves
VMs to remote `b` (and back, from B to remote `a`); the stream is TLS with a key made for the
move, the disks are mirrored into the destination's NBD export (copy storage)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import new_home
from tests.integration.multihost import (
    Side,
    ip,
    one_qemu_on,
    snapshots_on,
    two_hosts,
    uptime_on,
    vm_uuid_on,
    wait_for,
)

A_ADDRESS, B_ADDRESS = "198.18.78.1", "198.18.78.2"


@pytest.fixture(scope="module")
def hosts(debian_home: Path) -> Iterator[tuple[Side, Side]]:
    with contextlib.ExitStack() as stack:
        # both images, linked into each host's home
        yield two_hosts(stack, lambda: stack.enter_context(new_home(debian_home)),
                        addresses=(A_ADDRESS, B_ADDRESS), uid_base=2_100_000, tag="vmkm")










def _layers_backing(side: Side, vm: str) -> set[str]:
    backing = set()
    for layer in (side.home / "vms" / vm / "disks").glob("*.qcow2"):
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(layer)], check=True,
            capture_output=True, text=True, timeout=60).stdout)
        backing.add(str(info.get("backing-filename", "")))
    return backing - {""}


def _on_own_image(side: Side, vm: str) -> bool:
    """The VM's layers stand on `side`'s own copy of the tiny image (the move left the base
    out: the destination has one with the same sha256), not on a base that travelled; and its
    kernel and initrd are links to `side`'s image files (they did not travel either)."""
    config = json.loads((side.home / "vms" / vm / "vm.json").read_text())
    image = json.loads((side.home / "images/tiny/image.json").read_text())
    base = str(side.home / "images/tiny" / image["root_disk"])
    # and the layers' own headers: every backing name outside the folder is this base
    outside = {name for name in _layers_backing(side, vm) if name.startswith("/")}
    # (the same bytes may be another image's: tiny and debian-12 share their kernel)
    image_files = {p.stat().st_ino for p in (side.home / "images").glob("*/*")}
    boot = list((side.home / "vms" / vm / "boot").iterdir())
    if not boot or any(p.stat().st_ino not in image_files for p in boot):
        return False
    return config["backing_file"] == base and outside == {base} \
        and config["base_image_sha256"] == image["sha256"] \
        and not (side.home / "vms" / vm / "disks/base.qcow2").exists()


def test_live_there_and_back_keeps_guest_files_and_snapshots(hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    a.ok("create", "mover", "--memory", "192M")
    a.ok("start", "mover", "--wait")
    vm_uuid = vm_uuid_on(a, "mover")
    a.exec("mover", "echo kept > /root/before.txt; sync")
    a.ok("snapshot", "create", "mover", "before")
    a.exec("mover", "echo later > /root/after.txt; sync; "
                    "dd if=/dev/urandom of=/root/blob bs=64k count=64 2>/dev/null; sync")
    blob = a.exec("mover", "sha256sum /root/blob").split()[0]
    boot_id = a.exec("mover", "cat /proc/sys/kernel/random/boot_id").strip()
    up_before = uptime_on(a, "mover")

    check = a.cli("migrate", "mover", "b", "--check")
    assert check.returncode == 0, check.stderr
    moved = json.loads(a.ok("migrate", "mover", "b", "--format", "json"))
    assert moved["live"] is True and moved["name"] == "mover"
    assert isinstance(moved["downtime_ms"], int) and moved["downtime_ms"] < 2000
    assert not a.has_vm("mover") and b.has_vm("mover")
    one_qemu_on(b, a, vm_uuid)
    # the same running guest: same boot, its clock went on, its files and disk are intact
    assert b.exec("mover", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
    assert uptime_on(b, "mover") > up_before
    assert b.exec("mover", "cat /root/before.txt /root/after.txt").split() == ["kept", "later"]
    assert b.exec("mover", "sha256sum /root/blob").split()[0] == blob
    wait_for(lambda: snapshots_on(b, "mover") == ["before"], 60,
              "the snapshot tree, without the move's helper")
    assert _on_own_image(b, "mover")  # (its layers read once the helper's is merged away)
    info = json.loads(b.ok("info", "mover", "--format", "json"))
    assert info["state"] == "running" and info["uuid"] == vm_uuid
    # and back
    b.exec("mover", "echo on-b > /root/b.txt; sync")
    back = json.loads(b.ok("migrate", "mover", "a", "--format", "json"))
    assert back["live"] is True
    assert a.has_vm("mover") and not b.has_vm("mover")
    one_qemu_on(a, b, vm_uuid)
    wait_for(lambda: snapshots_on(a, "mover") == ["before"], 60,
              "the snapshot tree on A, without the move's helper")
    assert _on_own_image(a, "mover")
    assert a.exec("mover", "cat /root/b.txt").strip() == "on-b"
    assert a.exec("mover", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
    # a snapshot taken before the moves restores after them
    a.ok("snapshot", "restore", "mover", "before")
    assert a.exec("mover", "cat /root/before.txt").strip() == "kept"
    assert a.exec("mover", "ls /root/after.txt 2>&1 || true").find("No such file") >= 0
    a.ok("delete", "mover", "--force")


def test_cold_move_and_preflight_refusals_change_nothing(hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    a.ok("create", "sleeper", "--memory", "192M")
    b.ok("create", "sleeper", "--memory", "192M")  # the name is taken there
    refused = a.cli("move", "sleeper", "b")
    assert refused.returncode == 2, refused.stderr
    assert "already exists" in refused.stderr or "name" in refused.stderr
    checked = a.cli("move", "sleeper", "b", "--check", "--format", "json")
    assert checked.returncode == 2 and json.loads(checked.stdout)["reasons"]
    too_big = a.cli("migrate", "sleeper", "b", "--check")  # --check needs no running VM
    assert too_big.returncode == 2
    assert a.has_vm("sleeper") and b.has_vm("sleeper")
    assert not any(p.name.startswith(".creating") for p in (b.home / "vms").iterdir())
    # a running VM is not moved by `move`
    live = a.cli("migrate", "sleeper", "b", "--name", "sleeper2")
    assert live.returncode == 2 and "running or paused" in live.stderr
    moved = json.loads(a.ok("move", "sleeper", "b", "--name", "sleeper2", "--format", "json"))
    assert moved["live"] is False and not a.has_vm("sleeper") and b.has_vm("sleeper2")
    assert _on_own_image(b, "sleeper2")
    b.ok("start", "sleeper2", "--wait")
    assert b.exec("sleeper2", "echo up").strip() == "up"
    b.ok("delete", "sleeper2", "--force")
    b.ok("delete", "sleeper", "--force")


def test_a_uefi_vm_moves_live_with_its_variables(hosts: tuple[Side, Side], image_home: Path,
                                                tmp_path: Path) -> None:
    """A disk made elsewhere, booted through OVMF: a variable written before the move is read
    on the destination by the running guest and, after a cold boot there, from the
    destination's own NVRAM file -- which also keeps what the guest writes after the move."""
    from tests.integration.anyos_media import bootable_disk, efi_variable

    a, b = hosts
    disk = bootable_disk(image_home, tmp_path / "disk")
    a.ok("create", "efimover", "--from-disk", str(disk), "--firmware", "uefi",
         "--memory", "256M")
    efivars = "/sys/firmware/efi/efivars"
    prepare = ("for m in $(cat /etc/extra-modules); do insmod /lib/extra-modules/$m "
               "2>/dev/null || true; done; "
               f"mount -t efivarfs efivarfs {efivars} 2>/dev/null || true")

    def write(side: Side, name: str, value: str) -> None:
        side.exec("efimover", f"printf '\\007\\000\\000\\000{value}' > "
                              f"{efivars}/{efi_variable(name)}")

    def read(side: Side, name: str) -> str:
        return side.exec("efimover", f"tail -c 4 {efivars}/{efi_variable(name)} "
                                     "2>/dev/null || true").strip()

    a.ok("start", "efimover", "--wait")
    a.exec("efimover", prepare)
    write(a, "VmkitBefore", "gone")
    vm_uuid = vm_uuid_on(a, "efimover")
    moved = json.loads(a.ok("migrate", "efimover", "b", "--format", "json"))
    assert moved["live"] is True and b.has_vm("efimover") and not a.has_vm("efimover")
    one_qemu_on(b, a, vm_uuid)
    assert read(b, "VmkitBefore") == "gone"  # the running firmware's variables came along
    write(b, "VmkitAfter", "here")
    b.ok("stop", "efimover")
    nvram = (b.home / "vms" / "efimover" / "disks" / "nvram.fd").read_bytes()
    assert b"gone" in nvram and b"here" in nvram
    b.ok("start", "efimover", "--wait")  # a cold boot on B, from B's own variables file
    b.exec("efimover", prepare)
    assert (read(b, "VmkitBefore"), read(b, "VmkitAfter")) == ("gone", "here")
    b.ok("delete", "efimover", "--force")


def test_a_linked_clone_moves_with_its_base_flattened_there_and_back(
        hosts: tuple[Side, Side]) -> None:
    """A linked clone stands on its source's layer, which no other host has: its base travels
    flattened into the folder (disks/base.qcow2), and the clone no longer needs its source."""
    a, b = hosts
    a.ok("create", "origin", "--memory", "192M")
    a.ok("start", "origin", "--wait")
    a.exec("origin", "echo from-origin > /root/o.txt; sync")
    a.ok("stop", "origin")
    a.ok("clone", "origin", "leaf", "--linked")
    a.ok("start", "leaf", "--wait")
    a.exec("leaf", "echo from-leaf > /root/l.txt; sync")
    try:
        moved = json.loads(a.ok("migrate", "leaf", "b", "--format", "json"))
        assert moved["live"] is True and b.has_vm("leaf") and not a.has_vm("leaf")
        # the move's helper snapshot is merged away after it: its layer then goes
        wait_for(lambda: snapshots_on(b, "leaf") == [], 120, "the helper snapshot merged on B")
        assert b.exec("leaf", "cat /root/o.txt /root/l.txt").split() == ["from-origin",
                                                                        "from-leaf"]
        config = json.loads((b.home / "vms/leaf/vm.json").read_text())
        assert config["backing_file"] == "base.qcow2"
        assert (b.home / "vms/leaf/disks/base.qcow2").is_file()
        assert not any(name.startswith("/") for name in _layers_backing(b, "leaf")), \
            "no layer names a file of host A"
        a.ok("delete", "origin", "--force")  # the clone on B does not need it any more
        b.exec("leaf", "echo on-b > /root/b.txt; sync")
        back = json.loads(b.ok("migrate", "leaf", "a", "--format", "json"))  # the base travels
        assert back["live"] is True and a.has_vm("leaf") and not b.has_vm("leaf")
        wait_for(lambda: snapshots_on(a, "leaf") == [], 120, "the helper snapshot merged on A")
        a.ok("stop", "leaf")
        a.ok("start", "leaf", "--wait")  # a cold boot from the moved chain alone
        assert a.exec("leaf", "cat /root/o.txt /root/l.txt /root/b.txt").split() == [
            "from-origin", "from-leaf", "on-b"]
    finally:  # nothing left for the next test of this module's two hosts
        for side in (a, b):
            for vm in ("leaf", "origin"):
                if side.has_vm(vm):
                    side.cli("delete", vm, "--force")




@pytest.mark.parametrize("failure", ["destination-qemu-killed", "destination-daemon-killed",
                                     "cancel", "link-cut"])
def test_a_failed_move_leaves_the_source_running_and_nothing_there(
        hosts: tuple[Side, Side], failure: str) -> None:
    a, b = hosts
    a.ok("create", "stayer", "--memory", "192M")
    a.ok("start", "stayer", "--wait")
    vm_uuid = vm_uuid_on(a, "stayer")
    a.exec("stayer", "echo mine > /root/mark.txt; sync")
    boot_id = a.exec("stayer", "cat /proc/sys/kernel/random/boot_id").strip()
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    # slow enough to act in the middle: 192 MiB of guest at 2 MiB/s
    mover = threading.Thread(target=lambda: result.setdefault("done", a.cli(
        "migrate", "stayer", "b", "--bandwidth", "2M")))
    mover.start()
    try:
        wait_for(lambda: len(b.qemus(vm_uuid)) == 1, 120, "the incoming QEMU")
        time.sleep(2)
        if failure == "destination-qemu-killed":
            os.kill(b.qemus(vm_uuid)[0], signal.SIGKILL)
        elif failure == "destination-daemon-killed":
            b.daemon.kill()
            time.sleep(3)
            b.daemon.start(env=b.env)  # it rolls the arrival back; the source asks it
        elif failure == "cancel":
            with a.daemon.unix_http() as http:
                ops = http.get("/1.0/operations").json()["metadata"]
                running = [o for o in ops if o["kind"] == "vm.migrate"
                           and o["status"] == "running"]
                assert running, ops
                http.delete(f"/1.0/operations/{running[0]['id']}")
        else:
            ip("-n", a.namespace, "link", "set", a.veth, "down")
    finally:
        mover.join(timeout=300)
        if failure == "link-cut":
            ip("-n", a.namespace, "link", "set", a.veth, "up")
    try:
        done = result["done"]
        assert done.returncode != 0, done.stderr
        try:
            wait_for(lambda: not b.has_vm("stayer") and not b.qemus(vm_uuid), 60,
                      "the destination to drop the incoming VM")
        except AssertionError as exc:  # seen once in CI, under load: what was B doing?
            raise AssertionError(f"{exc}; the move said {done.stderr!r}; B's daemon log: "
                                 f"{_log_tail(b)}") from None
        one_qemu_on(a, b, vm_uuid)
        assert a.exec("stayer", "cat /root/mark.txt").strip() == "mine"
        assert a.exec("stayer", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
        info = json.loads(a.ok("info", "stayer", "--format", "json"))
        assert info["state"] == "running", (info, done.stderr)
        assert snapshots_on(a, "stayer") == [], "the helper snapshot was merged away"
        taps = subprocess.run(["ip", "-n", b.namespace, "-o", "link"], capture_output=True,
                              text=True).stdout
        assert "vmkt" not in taps
    finally:  # one failure is not three more (each case makes its own `stayer`)
        for side in (a, b):
            if side.has_vm("stayer"):
                side.cli("delete", "stayer", "--force")


def _log_tail(side: Side) -> str:
    try:
        return side.daemon.log.read_text()[-2000:]
    except OSError as exc:
        return f"unreadable: {exc}"


@pytest.mark.parametrize("step", ["perform", "performed", "confirm"])
def test_a_source_killed_mid_move_settles_with_the_destination(
        hosts: tuple[Side, Side], step: str) -> None:
    """The source's daemon dies right after a journal step (a power cut); restarted, it
    settles with the destination. Before the state was sent (perform) the arrival is aborted
    and the guest runs on here; once the source's QEMU sent it all (performed) the
    destination finishes on its own, and the source never runs the guest again."""
    a, b = hosts
    a.ok("create", "once", "--memory", "192M")
    a.ok("start", "once", "--wait")
    vm_uuid = vm_uuid_on(a, "once")
    a.exec("once", "echo here > /root/mark.txt; sync")
    a.daemon.stop()
    a.daemon.start(env={**a.env, "VMKIT_FAULT": f"migrate-out:{step}"})
    try:
        cut = a.cli("migrate", "once", "b")
        assert cut.returncode != 0
        assert a.daemon.process is not None
        a.daemon.process.wait(timeout=30)  # killed at the step, like a power cut
    finally:
        a.daemon.start(env=a.env)
    owner, other = (a, b) if step == "perform" else (b, a)
    wait_for(lambda: not other.has_vm("once"), 60, "the move to be settled")
    one_qemu_on(owner, other, vm_uuid)
    assert owner.exec("once", "cat /root/mark.txt").strip() == "here"
    assert json.loads(owner.ok("info", "once", "--format", "json"))["state"] == "running"
    wait_for(lambda: snapshots_on(owner, "once") == [], 60, "the helper snapshot merged away")
    owner.ok("delete", "once", "--force")


def _third_party(side: Side, port: int) -> str:
    """Connect to `port` on the side's address from its own namespace, send garbage, and say
    what came back (a refused stranger gets nothing, or a TLS alert)."""
    code = ("import socket,sys\n"
            f"s=socket.create_connection(('{side.daemon.listen.split(':')[0]}',{port}),5)\n"
            "s.sendall(b'\\x16\\x03\\x01garbage'*64)\ns.settimeout(3)\n"
            "try:\n  print(len(s.recv(100)))\nexcept Exception as e:\n  print(type(e).__name__)\n")
    return subprocess.run(["ip", "netns", "exec", side.namespace, "python3", "-c", code],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def _migration_ports(side: Side) -> list[int]:
    listening = subprocess.run(["ip", "netns", "exec", side.namespace, "ss", "-ltnH"],
                               capture_output=True, text=True, check=True).stdout
    ports = {int(line.split()[3].rsplit(":", 1)[1]) for line in listening.splitlines()
             if line.strip()}
    return sorted(ports - {8443})


def test_memory_stays_intact_over_20_moves_while_the_guest_dirties_it(
        hosts: tuple[Side, Side]) -> None:
    """QEMU migration-test style: known data in guest RAM is checksummed after every move
    while a loop keeps dirtying another region; a stranger knocking on the migration ports
    during the first move is refused and changes nothing."""
    a, b = hosts
    a.ok("create", "churn", "--memory", "192M")
    a.ok("start", "churn", "--wait")
    vm_uuid = vm_uuid_on(a, "churn")
    known = a.exec("churn", "mkdir -p /mnt/ram && mount -t tmpfs -o size=96m tmpfs /mnt/ram && "
                            "dd if=/dev/urandom of=/mnt/ram/known bs=1M count=32 2>/dev/null && "
                            "sha256sum /mnt/ram/known").split()[0]
    a.exec("churn", DIRTY_LOOP.format(mib=16))
    sides = [a, b]
    mismatches = 0
    # the first move is throttled so a stranger can try the ports while it runs
    first: dict[str, subprocess.CompletedProcess[str]] = {}
    mover = threading.Thread(target=lambda: first.setdefault("done", a.cli(
        "migrate", "churn", "b", "--bandwidth", "16M", "--auto-converge")))
    mover.start()
    try:
        wait_for(lambda: len(b.qemus(vm_uuid)) == 1, 120, "the incoming QEMU")
        wait_for(lambda: len(_migration_ports(b)) >= 1, 30, "the migration ports")
        answers = [_third_party(b, port) for port in _migration_ports(b)]
    finally:
        mover.join(timeout=600)
    assert first["done"].returncode == 0, first["done"].stderr
    assert answers, "a stranger found at least one migration port to try"
    for move in range(20):
        here, there = sides[(move + 1) % 2], sides[move % 2]
        if move:
            there.ok("migrate", "churn", here.name)
        got = here.exec("churn", "sha256sum /mnt/ram/known").split()[0]
        mismatches += got != known
        one_qemu_on(here, there, vm_uuid)
    assert mismatches == 0
    assert _still_dirtying(a if a.has_vm("churn") else b, "churn")
    (a if a.has_vm("churn") else b).ok("delete", "churn", "--force")


UFFD_SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")


DIRTY_LOOP = ("(i=0; while :; do dd if=/dev/urandom of=/mnt/ram/dirty bs=1M count={mib} "
              "2>/dev/null; i=$((i+1)); echo $i > /mnt/ram/count; done) "
              ">/dev/null 2>&1 </dev/null & echo started")


def _still_dirtying(side: Side, vm: str) -> bool:
    """The guest's dirtying loop goes on (its counter moves)."""
    before = int(side.exec(vm, "cat /mnt/ram/count").strip() or 0)
    time.sleep(4)
    return int(side.exec(vm, "cat /mnt/ram/count").strip() or 0) > before


@pytest.mark.parametrize("aid", ["--auto-converge", "--postcopy"])
def test_a_busy_guest_converges(hosts: tuple[Side, Side], aid: str) -> None:
    """The guest dirties memory (random data) faster than the 8 MiB/s the move may use:
    auto-converge throttles its vCPUs until the rest fits the downtime target; post-copy
    switches over and fetches the rest on demand (it needs userfaultfd for the VM's uid:
    refused by the pre-flight until the host allows it)."""
    a, b = hosts
    allowed = UFFD_SYSCTL.read_text()
    try:
        a.ok("create", "busy", "--memory", "192M")
        a.ok("start", "busy", "--wait")
        a.exec("busy", "mkdir -p /mnt/ram && mount -t tmpfs -o size=64m tmpfs /mnt/ram && "
               + DIRTY_LOOP.format(mib=32))
        if aid == "--postcopy":
            UFFD_SYSCTL.write_text("0")
            refused = a.cli("migrate", "busy", "b", "--postcopy", "--check")
            assert refused.returncode == 2 and "userfaultfd" in refused.stderr
            UFFD_SYSCTL.write_text("1")
        moved = json.loads(a.ok("migrate", "busy", "b", "--bandwidth", "8M", aid,
                                "--format", "json", timeout=900))
        assert moved["live"] and moved["dirty_syncs"] >= 2
        if aid == "--postcopy":
            assert moved["postcopy"] is True, moved
        assert _still_dirtying(b, "busy")
    finally:
        UFFD_SYSCTL.write_text(allowed)
        for side in (a, b):
            side.cli("delete", "busy", "--force")


def test_preflight_lists_every_reason_and_changes_nothing(hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    from vmkit.host import Host
    from vmkit.model.resources import Policy

    a.ok("network", "create", "only-a", "--subnet", "198.18.80.0/24")
    try:
        a.ok("create", "picky", "--memory", "192M", "--network", "only-a")
        config_file = a.home / "vms" / "picky" / "vm.json"
        config = json.loads(config_file.read_text())
        config["hardware"]["machine"] = "pc-q35-99.0"  # newer than any QEMU here
        config["hardware"]["cpu_model"] = "Skylake-Server"  # features TCG cannot give
        config_file.write_text(json.dumps(config))
        before = config_file.read_bytes()
        Host(b.home).set_policy(Policy(memory_ratio=0.001))
        try:
            checked = a.cli("move", "picky", "b", "--check", "--format", "json")
            assert checked.returncode == 2, checked.stderr
            reasons = json.loads(checked.stdout)["reasons"]
            text = " ".join(reasons)
            for expected in ("machine type pc-q35-99.0", "CPU model Skylake-Server",
                             "network 'only-a'"):
                assert expected in text, reasons
            refused = a.cli("move", "picky", "b")
            assert refused.returncode == 2 and "cannot move" in refused.stderr
            # a running VM needs its memory there
            a.ok("create", "roomy", "--memory", "192M")
            a.ok("start", "roomy")
            full = a.cli("migrate", "roomy", "b")
            assert full.returncode == 2 and "not enough memory" in full.stderr, full.stderr
            assert a.has_vm("roomy") and not b.has_vm("roomy")
            assert json.loads(a.ok("info", "roomy", "--format", "json"))["state"] == "running"
            a.ok("delete", "roomy", "--force")
        finally:
            Host(b.home).set_policy(Policy())
        assert config_file.read_bytes() == before and not b.has_vm("picky")
        assert not any(p.name.startswith(".") for p in (b.home / "vms").iterdir())
        a.ok("delete", "picky", "--force")
    finally:
        a.cli("network", "delete", "only-a")


ECHO_CLIENT = """
import json, os, socket, sys, time
stop = sys.argv[1]
s = socket.create_connection(("198.18.79.50", 5000), 10)
s.settimeout(15)
count, gaps, last = 0, [], time.monotonic()
while not os.path.exists(stop):
    msg = f"{count}\\n".encode()
    s.sendall(msg)
    got = b""
    while not got.endswith(b"\\n"):
        chunk = s.recv(100)
        if not chunk:
            raise SystemExit("the stream was closed")
        got += chunk
    if got != msg:
        raise SystemExit(f"echo {got!r} != {msg!r}")
    now = time.monotonic()
    gaps.append(now - last)
    last, count = now, count + 1
    time.sleep(0.02)
print(json.dumps({"count": count, "max_gap": max(gaps)}))
"""


@pytest.fixture
def shared_lan(hosts: tuple[Side, Side]) -> Iterator[str]:
    """One L2 segment (198.18.79.0/24): a switch namespace bridging host A's and host B's
    `lanbr` and a client namespace at .1; vmkit network `lan` bridged onto lanbr on both."""
    a, b = hosts
    tag = uuid.uuid4().hex[:6]
    switch, client = f"vmk-sw-{tag}", f"vmk-cl-{tag}"
    with contextlib.ExitStack() as stack:
        for ns in (switch, client):
            ip("netns", "add", ns)
            stack.callback(subprocess.run, ["ip", "netns", "del", ns], capture_output=True,
                           check=False)
        ip("-n", switch, "link", "add", "sw", "type", "bridge")
        ip("-n", switch, "link", "set", "sw", "up")
        for index, (ns, side) in enumerate(((a.namespace, a), (b.namespace, b),
                                            (client, None))):
            inner, outer = f"vmkl{tag}{index}", f"vmks{tag}{index}"
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            ip("link", "set", outer, "netns", switch)
            ip("-n", switch, "link", "set", outer, "master", "sw", "up")
            ip("link", "set", inner, "netns", ns)
            if side is None:
                ip("-n", ns, "addr", "add", "198.18.79.1/24", "dev", inner)
                ip("-n", ns, "link", "set", "lo", "up")
            else:
                ip("-n", ns, "link", "add", "lanbr", "type", "bridge")
                stack.callback(subprocess.run, ["ip", "-n", ns, "link", "del", "lanbr"],
                               capture_output=True, check=False)
                ip("-n", ns, "link", "set", inner, "master", "lanbr")
                ip("-n", ns, "link", "set", "lanbr", "up")
            ip("-n", ns, "link", "set", inner, "up")
        for side in (a, b):
            side.ok("network", "create", "lan", "--bridged", "--parent", "lanbr")
            stack.callback(side.cli, "network", "delete", "lan")
        yield client


def test_network_identity_and_an_open_tcp_stream_survive_the_move(
        hosts: tuple[Side, Side], shared_lan: str) -> None:
    a, b = hosts
    a.ok("create", "web", "--memory", "192M", "--network", "lan")
    a.ok("start", "web", "--wait")
    try:
        mac = json.loads(a.ok("info", "web", "--format", "json"))["nics"][0]["mac"]
        a.exec("web", "n=$(ls /sys/class/net | grep -v '^lo$' | head -1); "
                      "ip addr add 198.18.79.50/24 dev $n; ip link set $n up; "
                      "(while :; do nc -l -p 5000 -e cat; done) >/dev/null 2>&1 </dev/null & "
                      "echo up")
        stop = Path(tempfile.mkdtemp(prefix="vmk-stream-")) / "stop"
        stream = subprocess.Popen(["ip", "netns", "exec", shared_lan, "python3", "-c",
                                   ECHO_CLIENT, str(stop)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3)
            assert stream.poll() is None, stream.communicate()
            a.ok("migrate", "web", "b")
            time.sleep(3)  # it keeps flowing on the destination
            stop.touch()
            out, err = stream.communicate(timeout=60)
        finally:
            if stream.poll() is None:
                stream.kill()
            stop.unlink(missing_ok=True)
            stop.parent.rmdir()
        assert stream.returncode == 0, err
        result = json.loads(out)
        assert result["count"] > 50 and result["max_gap"] < 10, result
        info = json.loads(b.ok("info", "web", "--format", "json"))
        assert info["nics"][0]["mac"] == mac
        shown = b.exec("web", "ip -o addr; cat /sys/class/net/*/address")
        assert "198.18.79.50/24" in shown and mac in shown
    finally:
        for side in (a, b):
            side.cli("delete", "web", "--force")


@pytest.mark.slow
def test_a_debian_guest_moves_there_and_back(hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    a.ok("create", "deb", "--image", "debian-12", "--memory", "512M", "--disk", "4G")
    try:
        a.ok("start", "deb", "--wait", "--timeout", "300")
        a.exec("deb", "echo debian > /root/moved.txt; sync")
        boot_id = a.exec("deb", "cat /proc/sys/kernel/random/boot_id").strip()
        up = uptime_on(a, "deb")
        there = json.loads(a.ok("migrate", "deb", "b", "--format", "json"))
        assert there["live"] and not a.has_vm("deb")
        assert b.exec("deb", "cat /root/moved.txt").strip() == "debian"
        assert b.exec("deb", "cat /proc/1/comm").strip() == "systemd"
        b.ok("migrate", "deb", "a")
        assert a.exec("deb", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
        assert uptime_on(a, "deb") > up
    finally:
        for side in (a, b):
            side.cli("delete", "deb", "--force")
