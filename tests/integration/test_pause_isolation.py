"""Pause stops guest progress; one VM's crash leaves the others running."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.integration.conftest import COUNTER, count, run_cli
from vmkit import Host, VmState
from vmkit.qemu.qmp import qmp_execute


def test_pause_freezes_the_guest_and_resume_continues(host: Host, home: Path) -> None:
    vm = host.create("counter")
    vm.start(wait=True)
    vm.exec(["sh", "-c", COUNTER])
    time.sleep(1)
    # the running rate first
    a, t0 = count(vm), time.monotonic()
    time.sleep(3)
    b, t1 = count(vm), time.monotonic()
    rate = (b - a) / (t1 - t0)
    assert rate > 1
    vm.pause()
    assert vm.state is VmState.PAUSED
    assert qmp_execute(home / "vms/counter/run/qmp.sock", "query-status")["status"] == "paused"
    time.sleep(4)
    vm.resume()
    c = count(vm)
    # 4 s paused: the counter advanced by far less than 4 s worth (only the exec round trips ran)
    assert c - b < rate * 2.0, (a, b, c, rate)
    time.sleep(2)
    d = count(vm)
    assert d - c > rate * 0.5  # and it runs again after resume


def test_kill9_of_one_vm_leaves_the_other_answering(host: Host, home: Path) -> None:
    victim = host.create("victim")
    bystander = host.create("bystander")
    victim.start()
    bystander.start()
    victim.wait_ready()
    bystander.wait_ready()
    pid = victim.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim.state is not VmState.CRASHED and time.monotonic() < deadline:
        time.sleep(0.1)
    status = victim.status()
    assert status.state is VmState.CRASHED
    assert status.last_exit is not None and "killed by SIGKILL" in status.last_exit.description
    assert status.last_exit.log_tail  # the tail of the QEMU log is recorded
    assert bystander.exec(["echo", "still-here"]).stdout == "still-here\n"
    assert bystander.state is VmState.RUNNING
    info = run_cli(home, "info", "victim")
    assert "crashed" in info.stdout and "SIGKILL" in info.stdout
    victim.start(wait=True)  # a crashed VM can be started again
    assert victim.exec(["true"]).exit_code == 0
