"""Create, start, exec, stop, restart, delete real tiny guests; the VM folder and its state."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from vmkit import Host, InvalidState, VmState


def test_lifecycle_and_a_file_that_survives_stop_start(host: Host, home: Path) -> None:
    vm = host.create("web", cpus=2, memory="512M", disk="2G")
    folder = home / "vms" / "web"
    config = json.loads((folder / "vm.json").read_text())
    assert config["schema_version"] == 1
    assert config["hardware"]["machine"].startswith("pc-q35-")
    assert config["hardware"]["cpu_model"] == "qemu64"
    assert config["mac"].startswith("52:54:00:") and len(config["uuid"]) == 36
    disk = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "qcow2", str(folder / "disks/root.qcow2")],
        capture_output=True, text=True, check=True).stdout)
    assert disk["virtual-size"] == 2 << 30
    assert disk["backing-filename"] == config["backing_file"]
    assert vm.state is VmState.DEFINED

    vm.start(wait=True)
    assert stat.S_IMODE(os.stat(folder / "run").st_mode) == 0o700
    for sock in ("qmp.sock", "serial.sock", "agent.sock"):
        assert stat.S_IMODE(os.stat(folder / "run" / sock).st_mode) == 0o600
    status = vm.status()
    assert status.state is VmState.RUNNING and status.pid is not None
    assert config["uuid"] in Path(f"/proc/{status.pid}/cmdline").read_text()

    facts = vm.exec(["sh", "-c", "nproc; awk '/MemTotal/ {print $2}' /proc/meminfo; hostname"])
    cpus, mem_kib, hostname = facts.stdout.split()
    assert int(cpus) == 2
    assert 400 * 1024 < int(mem_kib) <= 512 * 1024
    assert hostname == "web"
    failing = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (failing.exit_code, failing.stdout, failing.stderr) == (7, "out\n", "err\n")

    vm.exec(["sh", "-c", "echo payload-4711 > /root/keep && sync"])
    vm.stop()
    assert vm.state is VmState.STOPPED
    last = vm.status().last_exit
    assert last is not None and last.reason == "requested" and "killed" not in last.description
    assert "reboot: Power down" in (folder / "logs/serial.log").read_text(errors="replace")
    assert not (folder / "run" / "qmp.sock").exists()

    vm.start(wait=True)
    assert vm.exec(["cat", "/root/keep"]).stdout == "payload-4711\n"
    vm.restart(wait=True)
    assert vm.exec(["cat", "/root/keep"]).stdout == "payload-4711\n"
    with pytest.raises(InvalidState, match="it is running"):
        vm.delete()
    vm.stop()
    vm.delete()
    assert not folder.exists()
    assert host.vms() == []


def test_full_copy_is_independent_and_disk_grows_to_size(host: Host, home: Path) -> None:
    done = run_cli(home, "create", "files", "--full-copy", "--disk", "3G", "--start", "--wait")
    assert done.returncode == 0, done.stderr
    disk = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2",
         str(home / "vms/files/disks/root.qcow2")], capture_output=True, text=True,
        check=True).stdout)
    assert "backing-filename" not in disk
    vm = host.get("files")
    deadline = time.monotonic() + 60
    size_kib = 0
    while time.monotonic() < deadline:
        size_kib = int(vm.exec(["sh", "-c", "df -k / | awk 'NR==2 {print $2}'"]).stdout)
        if size_kib > 2_500_000:
            break
        time.sleep(1)
    assert size_kib > 2_500_000  # the guest grew its file system to the 3G disk (niced)
    # the uncompressed kernel through its PVH entry: the kernel fills in the boot parameters
    # itself (protocol 2.12); booted as a bzImage it reports its own header's 2.15
    assert vm.config.boot is not None and vm.config.boot.kernel == "boot/vmlinux"
    assert vm.exec(["cat", "/sys/kernel/boot_params/version"]).stdout.strip() == "0x020c"
    # the host policy's TCG cache reaches QEMU (auto: a quarter of 256 MiB)
    pid = vm.status().pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-accel") + 1] == b"tcg,thread=multi,tb-size=64"
    # the guest reports freed memory in 128 KiB blocks (Linux 6.1 itself: 2 MiB, never here)
    assert vm.exec(["cat", "/sys/module/page_reporting/parameters/page_reporting_order"]
                   ).stdout.strip() == "5"


def test_guest_poweroff_is_a_stop_not_a_crash(host: Host) -> None:
    vm = host.create("quitter")
    vm.start(wait=True)
    vm.exec(["sh", "-c", "(sleep 1; poweroff) >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 60
    while vm.state is not VmState.STOPPED and time.monotonic() < deadline:
        time.sleep(0.2)
    status = vm.status()
    assert status.state is VmState.STOPPED
    assert status.last_exit is not None and status.last_exit.reason == "guest-shutdown"


def test_stop_kills_a_guest_that_ignores_acpi(host: Host) -> None:
    vm = host.create("stubborn")
    vm.start(wait=True)
    vm.exec(["killall", "acpid"])
    started = time.monotonic()
    vm.stop(timeout=3)
    assert time.monotonic() - started < 20
    status = vm.status()
    assert status.state is VmState.STOPPED
    assert status.last_exit is not None
    assert "did not power off within 3s; killed" in status.last_exit.description


def test_vm_outlives_the_cli_and_is_rediscovered(home: Path) -> None:
    assert run_cli(home, "create", "detached", "--start", "--wait").returncode == 0
    # the CLI process has exited; a fresh engine finds the running VM through its pidfile
    fresh = Host(home)
    status = fresh.get("detached").status()
    assert status.state is VmState.RUNNING
    assert Path(f"/proc/{status.pid}/cmdline").exists()
    listing = json.loads(run_cli(home, "list", "--format", "json").stdout)
    assert [(v["name"], v["state"], v["pid"]) for v in listing] == [
        ("detached", "running", status.pid)]
    assert fresh.get("detached").exec(["true"]).exit_code == 0
    assert run_cli(home, "stop", "detached").returncode == 0
    assert fresh.get("detached").state is VmState.STOPPED


def test_a_recycled_pid_is_not_taken_for_the_vm(host: Host, home: Path) -> None:
    vm = host.create("ghost")
    state_file = home / "vms/ghost/state.json"
    record = json.loads(state_file.read_text())
    ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    # pretend the VM runs as this very test process: right pid, alive, but not the VM's QEMU
    record.update(state="running", pid=os.getpid(), start_ticks=ticks, started_at=time.time())
    state_file.write_text(json.dumps(record))
    assert vm.state is VmState.CRASHED
    assert vm.status().pid is None
