"""Admission control, bad input, locks, and a CLI killed in the middle of create."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from vmkit import AdmissionRefused, Host, VmState
from vmkit.model.resources import Policy


def _qemu_count(uuid: str) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") and uuid.encode() in argv:
                count += 1
    return count


def test_admission_refuses_an_over_allocating_start(host: Host, home: Path) -> None:
    first = host.create("first", cpus=2, memory="256M")
    second = host.create("second", cpus=1, memory="256M")
    ram = host.capacity().memory
    host.set_policy(Policy(memory_reserve=ram - (400 << 20), vcpu_ratio=4.0))
    first.start()
    with pytest.raises(AdmissionRefused) as info:
        second.start()
    assert "allocated 256M + asked 256M = 512M > limit 400M" in info.value.message
    done = run_cli(home, "start", "second")
    assert done.returncode == 2
    assert "limit 400M" in done.stderr
    assert second.state is VmState.DEFINED and _qemu_count(second.config.uuid) == 0

    cores = host.capacity().cores
    host.set_policy(Policy(vcpu_ratio=1.0))
    third = host.create("third", cpus=cores)
    with pytest.raises(AdmissionRefused, match=rf"vCPUs allocated 2 \+ asked {cores}"):
        third.start()
    host.set_policy(Policy())
    second.start()  # fits again under the default policy
    assert second.state is VmState.RUNNING


BAD_CREATES = [
    (["../x"], "invalid VM name '../x'"),
    (["a,b"], "invalid VM name 'a,b'"),
    (["a b"], "invalid VM name 'a b'"),
    (["$(id)"], "invalid VM name '$(id)'"),
    (["x" * 64], "too long"),
    (["ok", "--memory", "0"], "invalid memory '0'"),
    (["ok", "--memory", "-1G"], "invalid memory '-1G'"),
    (["ok", "--memory", "lots"], "invalid memory 'lots'"),
    (["ok", "--memory", "100T"], "more than the host can give"),
    (["ok", "--cpus", "0"], "invalid cpus '0'"),
    (["ok", "--cpus", "two"], "invalid cpus 'two'"),
    (["ok", "--cpus", "999"], "the host has"),
    (["ok", "--disk", "0"], "invalid disk '0'"),
    (["ok", "--disk", "1M"], "smaller than image"),
    (["ok", "--disk", "9000T"], "larger than the host's file system"),
    (["ok", "--image", "nope"], "unknown image 'nope'"),
    (["ok", "--image", "Bad/Image"], "invalid image name"),
    (["ok", "--accel", "warp"], "invalid accel 'warp'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_CREATES)
def test_bad_create_input_exits_2_and_creates_nothing(home: Path, args: list[str],
                                                      message: str) -> None:
    done = run_cli(home, "create", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert sorted(os.listdir(home / "vms")) == []


def test_operations_not_allowed_in_the_state_say_the_state(home: Path) -> None:
    assert run_cli(home, "create", "idle").returncode == 0
    for verb in ("pause", "resume", "stop", "kill"):
        done = run_cli(home, verb, "idle")
        assert done.returncode == 2
        assert f"cannot {verb} VM 'idle': it is defined" in done.stderr
    done = run_cli(home, "exec", "idle", "--", "true")
    assert done.returncode == 2 and "it is defined" in done.stderr
    done = run_cli(home, "start", "missing")
    assert done.returncode == 2 and "unknown VM 'missing'" in done.stderr
    done = run_cli(home, "create", "idle")
    assert done.returncode == 2 and "already exists" in done.stderr
    assert sorted(os.listdir(home / "vms")) == ["idle"]


def test_a_held_lock_makes_the_second_command_wait_then_fail(home: Path) -> None:
    assert run_cli(home, "create", "locked").returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from vmkit.storage.layout import file_lock\n"
         "with file_lock(Path(sys.argv[1]), timeout=5, what='x'):\n"
         "    print('held', flush=True); time.sleep(8)",
         str(home / "locks/vm-locked.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        done = run_cli(home, "--lock-timeout", "1.5", "start", "locked")
        assert time.monotonic() - started >= 1.5
        assert done.returncode == 1
        assert "VM 'locked' is busy" in done.stderr and f"pid {holder.pid}" in done.stderr
        assert Host(home).get("locked").state is VmState.DEFINED
    finally:
        holder.kill()
        holder.wait()


def test_two_concurrent_starts_are_serialised(home: Path) -> None:
    assert run_cli(home, "create", "racer").returncode == 0
    env = {**os.environ, "VMKIT_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "start", "racer"],
                              env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs)
    assert [code for code, _ in results] == [0, 2]
    assert "cannot start VM 'racer': it is running" in results[1][1]
    uuid = Host(home).get("racer").config.uuid
    assert _qemu_count(uuid) == 1


def test_cli_killed_during_create_leaves_a_consistent_listing(home: Path) -> None:
    env = {**os.environ, "VMKIT_HOME": str(home)}
    delays = [0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5]
    for index, delay in enumerate(delays):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmkit.cli.main", "create", f"k{index}", "--full-copy"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    listing = json.loads(run_cli(home, "list", "--format", "json", check=True).stdout)
    listed = {vm["name"] for vm in listing}
    on_disk = set(os.listdir(home / "vms"))
    assert on_disk == listed  # no half-created folder, hidden or not, survives a listing
    for name in listed:
        folder = home / "vms" / name
        kernel = json.loads((folder / "vm.json").read_text())["boot"]["kernel"]
        assert kernel in ("boot/vmlinux", "boot/vmlinuz")  # PVH, or the bzImage
        assert (folder / kernel).exists() and (folder / "state.json").exists()
        subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2",
                        str(folder / "disks/root.qcow2")], check=True)
    for index in range(len(delays)):
        if f"k{index}" not in listed:  # an interrupted create can simply be run again
            assert run_cli(home, "create", f"k{index}").returncode == 0
    assert len(json.loads(run_cli(home, "list", "--format", "json").stdout)) == len(delays)


def _wait_for_recorded_state(state_file: Path, state: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(state_file.read_text())["state"] == state:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.001)
    return False


def test_cli_killed_during_start_leaves_a_vm_that_can_be_handled(home: Path) -> None:
    env = {**os.environ, "VMKIT_HOME": str(home)}
    outcomes = set()
    for index, extra in enumerate([0.0, 0.005, 0.01, 0.02, 0.03, 0.05]):
        name = f"s{index}"
        assert run_cli(home, "create", name).returncode == 0
        proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "start", name],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill the CLI inside its start: after it recorded `starting`, before `running`
        assert _wait_for_recorded_state(home / "vms" / name / "state.json", "starting", 30)
        time.sleep(extra)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # a QEMU spawned just before the kill has started by now
        vm = Host(home).get(name)
        state = vm.state
        uuid = vm.config.uuid
        outcomes.add(state)
        if state is VmState.RUNNING:  # the QEMU it had spawned was found and adopted
            assert _qemu_count(uuid) == 1 and vm.status().pid is not None
            vm.kill()
        else:
            assert state is VmState.CRASHED, state
            last = vm.status().last_exit
            assert last is not None and last.reason == "start-failed"
        assert _qemu_count(uuid) == 0  # nothing left running that vmkit does not know of
        vm.start(wait=False)  # and the VM can be started again
        vm.kill()
        vm.delete()
    assert VmState.RUNNING in outcomes  # the adoption path really ran
