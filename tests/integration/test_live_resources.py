"""Live resources on real tiny guests: hot-add, balloon, disk grow, I/O throttle, cgroup shares
and caps, and what `info`/`top` report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli, sh
from vmkit import VM, AdmissionRefused, Host
from vmkit.model.resources import Policy

BURN = "sh -c 'while :; do :; done' >/dev/null 2>&1 </dev/null &"


def _wait_for(check, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return bool(check())


def _mem_total_kib(vm: VM) -> int:
    return int(sh(vm, "awk '/MemTotal/ {print $2}' /proc/meminfo"))


def test_hot_add_cpus_and_memory_balloon_and_disk_grow(host: Host, home: Path) -> None:
    vm = host.create("elastic", cpus=1, memory="256M", max_cpus=3, max_memory="1G")
    vm.start(wait=True)
    assert sh(vm, "nproc") == "1"
    done = run_cli(home, "set", "elastic", "--cpus", "3")
    assert done.returncode == 0, done.stderr
    assert _wait_for(lambda: sh(vm, "nproc") == "3")  # online in the guest, no udev needed

    before = _mem_total_kib(vm)
    vm.set(memory="512M")
    assert _wait_for(lambda: _mem_total_kib(vm) - before >= 0.9 * 256 * 1024)
    grown = _mem_total_kib(vm)
    vm.set(memory="384M")  # shrink through the balloon
    assert _wait_for(lambda: _mem_total_kib(vm) <= grown - 100 * 1024)

    def balloon_reached() -> bool:  # the guest gives pages back in steps, QEMU reports each
        usage = vm.status(query_qemu=True).usage
        return usage is not None and usage.memory_actual <= 400 << 20

    assert _wait_for(balloon_reached)
    usage = vm.status(query_qemu=True).usage
    assert usage is not None and usage.vcpus == 3
    assert usage.memory_plugged == 512 << 20 and usage.memory_actual <= 400 << 20

    sectors = int(sh(vm, "cat /sys/block/vda/size"))
    vm.set(disk_size="3G")
    assert _wait_for(lambda: int(sh(vm, "cat /sys/block/vda/size")) == 3 * 2 * 1024 * 1024)
    assert sectors == 2 * 2 * 1024 * 1024

    result = vm.set(cpus=5)  # beyond the maxima: saved for the next boot, and said so
    assert any("applies at restart" in line for line in result.at_restart)
    config = json.loads((home / "vms/elastic/vm.json").read_text())["spec"]
    assert (config["cpus"], config["max_cpus"], config["memory"]) == (5, 5, 384 << 20)
    vm.stop()
    vm.start(wait=True)
    assert sh(vm, "nproc") == "5"


def test_live_changes_obey_admission_and_bad_values_change_nothing(host: Host) -> None:
    vm = host.create("greedy", memory="256M", max_memory="1G")
    neighbour = host.create("neighbour", memory="256M")
    vm.start()
    neighbour.start()
    ram = host.capacity().memory
    host.set_policy(Policy(memory_reserve=ram - (600 << 20)))
    with pytest.raises(AdmissionRefused, match=r"allocated 256M \+ asked 512M = 768M > limit 600M"):
        vm.set(memory="512M")
    host.set_policy(Policy())
    before = vm.config.spec
    for bad in ({"cpus": "0"}, {"memory": "lots"}, {"cpu_limit": "abc"},
                {"cpu_weight": "20000"}, {"disk_size": "1G"}):
        with pytest.raises(Exception) as info:
            vm.set(**bad)
        assert getattr(info.value, "exit_code", None) == 2
    assert host.get("greedy").config.spec == before


def test_io_throttle_is_measured_in_the_guest(host: Host) -> None:
    vm = host.create("throttled", disk="2G")
    vm.start(wait=True)
    # the guest's first-boot growth of its file system (resize2fs, at nice 19) reads and writes
    # the disk too: measured from when it is done
    sh(vm, "for i in $(seq 60); do pidof resize2fs >/dev/null || exit 0; sleep 1; done; exit 1")
    vm.set(disk_iops=200)
    script = ("s=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/vda of=/dev/null bs=4k count=1200 "
              "skip=4096 iflag=direct 2>/dev/null; e=$(cut -d' ' -f1 /proc/uptime); "
              "echo \"$s $e\"")
    start, end = map(float, sh(vm, script).split())
    rate = 1200 / (end - start)
    assert 200 * 0.8 <= rate <= 200 * 1.2, rate
    vm.set(disk_iops="none")
    start, end = map(float, sh(vm, script.replace("skip=4096", "skip=8192")).split())
    assert 1200 / (end - start) > 300  # the limit is gone


def _pin_to_core0(pid: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {0})


def _cpu_ns(host: Host, name: str) -> int:
    assert host.cgroups is not None
    return host.cgroups.usage(name).cpu_ns


def test_cpu_weights_share_a_core_two_to_one(host: Host) -> None:
    heavy = host.create("heavy")
    light = host.create("light")
    for vm in (heavy, light):
        vm.start(wait=True)
        sh(vm, BURN)
    heavy.set(cpu_weight=200)
    light.set(cpu_weight=100)
    for vm in (heavy, light):
        pid = vm.status().pid
        assert pid is not None
        _pin_to_core0(pid)
    time.sleep(2)
    a0, b0 = _cpu_ns(host, "heavy"), _cpu_ns(host, "light")
    time.sleep(10)
    a1, b1 = _cpu_ns(host, "heavy"), _cpu_ns(host, "light")
    ratio = (a1 - a0) / (b1 - b0)
    assert 1.8 <= ratio <= 2.2, ratio


def test_cpu_limit_caps_host_cpu_time(host: Host, home: Path) -> None:
    vm = host.create("capped", cpus=2)
    vm.start(wait=True)
    sh(vm, BURN)
    sh(vm, BURN)
    assert run_cli(home, "set", "capped", "--cpu-limit", "25%").returncode == 0
    time.sleep(1)
    before = _cpu_ns(host, "capped")
    time.sleep(10)
    used = (_cpu_ns(host, "capped") - before) / 10e9
    assert used <= 0.27, used
    top = json.loads(run_cli(home, "top", "--format", "json", "--interval", "1").stdout)
    assert top[0]["name"] == "capped" and top[0]["cpu_percent"] <= 35
