"""Live migration between two hosts: two network namespaces joined by a veth pair
(198.18.78.0/30), each with its own VMKIT_HOME, uid range and daemon. The CLI on host A moves
VMs to remote `b` (and back, from B to remote `a`); the stream is TLS with a key made for the
move, the disks are mirrored into the destination's NBD export (copy storage)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import new_home
from tests.integration.daemon_harness import Daemon, cli, qemu_count

A_ADDRESS, B_ADDRESS = "198.18.78.1", "198.18.78.2"


@dataclass
class Side:
    name: str
    home: Path
    namespace: str
    daemon: Daemon
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return cli(self.home, *args, env=self.env, prefix=self.daemon.prefix, timeout=timeout)

    def ok(self, *args: str, timeout: float = 600) -> str:
        done = self.cli(*args, timeout=timeout)
        assert done.returncode == 0, f"vmkit {' '.join(args)}: {done.stderr}"
        return done.stdout

    def exec(self, vm: str, script: str) -> str:
        return self.ok("exec", vm, "--", "sh", "-c", script)

    def has_vm(self, vm: str) -> bool:
        return (self.home / "vms" / vm).exists()

    def qemus(self, vm_uuid: str) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if vm_uuid.encode() in cmdline and str(self.home).encode() in cmdline \
                        and cmdline.startswith(b"qemu-system"):
                    found.append(int(entry))
        return found


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


@pytest.fixture(scope="module")
def hosts(image_home: Path) -> Iterator[tuple[Side, Side]]:
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"vmk-mig-a-{tag}", f"vmk-mig-b-{tag}"
    veth_a, veth_b = f"vmkm{tag}a", f"vmkm{tag}b"
    stack = contextlib.ExitStack()
    with stack:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            stack.callback(subprocess.run, ["ip", "netns", "del", ns], capture_output=True,
                           check=False)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _ip("link", "set", veth_a, "netns", ns_a)
        _ip("link", "set", veth_b, "netns", ns_b)
        for ns, veth, address in ((ns_a, veth_a, A_ADDRESS), (ns_b, veth_b, B_ADDRESS)):
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        sides = []
        for index, (name, ns, address) in enumerate((("a", ns_a, A_ADDRESS),
                                                     ("b", ns_b, B_ADDRESS))):
            home = stack.enter_context(new_home(image_home))
            config = Path(tempfile.mkdtemp(prefix=f"vmk-cfg-{name}-"))
            stack.callback(subprocess.run, ["rm", "-rf", str(config)], check=False)
            registry = Path(tempfile.mkdtemp(prefix=f"vmk-uids-{name}-"))
            stack.callback(subprocess.run, ["rm", "-rf", str(registry)], check=False)
            env = {"VMKIT_CONFIG_DIR": str(config), "VMKIT_UID_REGISTRY": str(registry),
                   "VMKIT_UID_RANGE": f"{2_100_000 + index * 1000}:1000"}
            daemon = Daemon(home, listen=f"{address}:8443",
                            prefix=("ip", "netns", "exec", ns))
            daemon.start(env=env)
            stack.callback(daemon.stop)
            sides.append(Side(name, home, ns, daemon, env))
            # a stale VM folder left by a failed test is deleted through the right registry
            stack.callback(cli, home, "delete", "--all", "--force", env=env)
        a, b = sides
        for here, there in ((a, b), (b, a)):
            here.ok("remote", "add", there.name, there.daemon.url, "--token",
                    there.daemon.token, "--accept-fingerprint",
                    _fingerprint(there.daemon.server_cert))
        yield a, b


def _uuid(side: Side, vm: str) -> str:
    return str(json.loads(side.ok("info", vm, "--format", "json"))["uuid"])


def _uptime(side: Side, vm: str) -> float:
    return float(side.exec(vm, "cut -d' ' -f1 /proc/uptime").split()[0])


def _one_qemu_on(side: Side, other: Side, vm_uuid: str) -> None:
    assert len(side.qemus(vm_uuid)) == 1, "the VM's QEMU runs once on its owner"
    assert other.qemus(vm_uuid) == [], "no QEMU of the VM is left on the other host"
    assert qemu_count(vm_uuid) == 1


def test_live_there_and_back_keeps_guest_files_and_snapshots(hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    a.ok("create", "mover", "--memory", "192M")
    a.ok("start", "mover", "--wait")
    vm_uuid = _uuid(a, "mover")
    a.exec("mover", "echo kept > /root/before.txt; sync")
    a.ok("snapshot", "create", "mover", "before")
    a.exec("mover", "echo later > /root/after.txt; sync; "
                    "dd if=/dev/urandom of=/root/blob bs=64k count=64 2>/dev/null; sync")
    blob = a.exec("mover", "sha256sum /root/blob").split()[0]
    boot_id = a.exec("mover", "cat /proc/sys/kernel/random/boot_id").strip()
    up_before = _uptime(a, "mover")

    check = a.cli("migrate", "mover", "b", "--check")
    assert check.returncode == 0, check.stderr
    moved = json.loads(a.ok("migrate", "mover", "b", "--format", "json"))
    assert moved["live"] is True and moved["name"] == "mover"
    assert isinstance(moved["downtime_ms"], int) and moved["downtime_ms"] < 2000
    assert not a.has_vm("mover") and b.has_vm("mover")
    _one_qemu_on(b, a, vm_uuid)
    # the same running guest: same boot, its clock went on, its files and disk are intact
    assert b.exec("mover", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
    assert _uptime(b, "mover") > up_before
    assert b.exec("mover", "cat /root/before.txt /root/after.txt").split() == ["kept", "later"]
    assert b.exec("mover", "sha256sum /root/blob").split()[0] == blob
    snaps = json.loads(b.ok("snapshot", "list", "mover", "--format", "json"))
    assert [s["name"] for s in snaps] == ["before"], "the snapshot tree moved, no helper left"
    info = json.loads(b.ok("info", "mover", "--format", "json"))
    assert info["state"] == "running" and info["uuid"] == vm_uuid
    # and back
    b.exec("mover", "echo on-b > /root/b.txt; sync")
    back = json.loads(b.ok("migrate", "mover", "a", "--format", "json"))
    assert back["live"] is True
    assert a.has_vm("mover") and not b.has_vm("mover")
    _one_qemu_on(a, b, vm_uuid)
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
    b.ok("start", "sleeper2", "--wait")
    assert b.exec("sleeper2", "echo up").strip() == "up"
    b.ok("delete", "sleeper2", "--force")
    b.ok("delete", "sleeper", "--force")


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("failure", ["destination-qemu-killed", "cancel", "link-cut"])
def test_a_failed_move_leaves_the_source_running_and_nothing_there(
        hosts: tuple[Side, Side], failure: str) -> None:
    a, b = hosts
    a.ok("create", "stayer", "--memory", "192M")
    a.ok("start", "stayer", "--wait")
    vm_uuid = _uuid(a, "stayer")
    a.exec("stayer", "echo mine > /root/mark.txt; sync")
    boot_id = a.exec("stayer", "cat /proc/sys/kernel/random/boot_id").strip()
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    # slow enough to act in the middle: 192 MiB of guest at 2 MiB/s
    mover = threading.Thread(target=lambda: result.setdefault("done", a.cli(
        "migrate", "stayer", "b", "--bandwidth", "2M")))
    mover.start()
    try:
        _wait_for(lambda: len(b.qemus(vm_uuid)) == 1, 120, "the incoming QEMU")
        time.sleep(2)
        if failure == "destination-qemu-killed":
            os.kill(b.qemus(vm_uuid)[0], signal.SIGKILL)
        elif failure == "cancel":
            with a.daemon.unix_http() as http:
                ops = http.get("/1.0/operations").json()["metadata"]
                running = [o for o in ops if o["kind"] == "vm.migrate"
                           and o["status"] == "running"]
                assert running, ops
                http.delete(f"/1.0/operations/{running[0]['id']}")
        else:
            _ip("-n", a.namespace, "link", "set", f"vmkm{a.namespace[-6:]}a", "down")
    finally:
        mover.join(timeout=300)
        if failure == "link-cut":
            _ip("-n", a.namespace, "link", "set", f"vmkm{a.namespace[-6:]}a", "up")
    done = result["done"]
    assert done.returncode != 0, done.stderr
    _wait_for(lambda: not b.has_vm("stayer") and not b.qemus(vm_uuid), 60,
              "the destination to drop the incoming VM")
    _one_qemu_on(a, b, vm_uuid)
    assert a.exec("stayer", "cat /root/mark.txt").strip() == "mine"
    assert a.exec("stayer", "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
    info = json.loads(a.ok("info", "stayer", "--format", "json"))
    assert info["state"] == "running"
    snaps = json.loads(a.ok("snapshot", "list", "stayer", "--format", "json"))
    assert snaps == [], "the helper snapshot was merged away"
    taps = subprocess.run(["ip", "-n", b.namespace, "-o", "link"], capture_output=True,
                          text=True).stdout
    assert "vmkt" not in taps
    a.ok("delete", "stayer", "--force")


def test_a_source_killed_after_the_destination_finished_never_runs_the_vm_again(
        hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    a.ok("create", "once", "--memory", "192M")
    a.ok("start", "once", "--wait")
    vm_uuid = _uuid(a, "once")
    a.daemon.stop()
    a.daemon.start(env={**a.env, "VMKIT_FAULT": "migrate-out:confirm"})
    try:
        cut = a.cli("migrate", "once", "b")
        assert cut.returncode != 0
        assert a.daemon.process is not None
        a.daemon.process.wait(timeout=30)  # killed at the step, like a power cut
    finally:
        a.daemon.start(env=a.env)
    _wait_for(lambda: not a.has_vm("once"), 60, "the restarted source to finish confirm")
    _one_qemu_on(b, a, vm_uuid)
    assert b.exec("once", "echo alive").strip() == "alive"
    b.ok("delete", "once", "--force")
