"""The jailer model: QEMU unprivileged, sandboxed, in its cgroup; a guest's excess stays in it."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from tests.integration.conftest import run_cli, sh
from vmkit import Host, VmkitError, VmState


def _status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_qemu_runs_unprivileged_sandboxed_and_fenced(host: Host, home: Path) -> None:
    vm = host.create("jailed")
    marker = home / "inheritable-marker"
    leaked = os.open(marker, os.O_CREAT | os.O_RDWR)
    os.set_inheritable(leaked, True)  # a descriptor QEMU must not get
    try:
        vm.start(wait=True)
    finally:
        os.close(leaked)
    pid = vm.status().pid
    assert pid is not None
    fields = _status_fields(pid)
    if os.geteuid() == 0:
        assert fields["Uid"].split()[0] != "0" and fields["Gid"].split()[0] != "0"
        assert fields["Groups"] == ""
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        assert "/vmkit/jailed" in cgroups
    assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == "1"
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert sorted(e.split(b"=")[0] for e in environ if e) == [b"LC_ALL", b"PATH", b"PWD"]
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert str(marker) not in targets
    folder = home / "vms/jailed"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "run").stat().st_mode) == 0o700
    for sock in ("qmp.sock", "serial.sock", "agent.sock"):
        assert stat.S_IMODE((folder / "run" / sock).stat().st_mode) == 0o600
    report = run_cli(home, "doctor", "--format", "json")
    assert '"qemu_user": "vmkit"' in report.stdout or os.geteuid() != 0


def test_a_guest_that_allocates_beyond_its_ram_is_contained(host: Host) -> None:
    hog = host.create("hog", memory="256M")
    calm = host.create("calm", memory="256M")
    for vm in (hog, calm):
        vm.start(wait=True)
    hog.exec(["sh", "-c", "(x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived) "
                          ">/run/hog.out 2>&1 </dev/null &"])
    deadline = time.monotonic() + 120
    oom = ""
    while time.monotonic() < deadline and "out of memory" not in oom.lower():
        time.sleep(2)
        try:  # the guest's OOM killer may take the agent too; init respawns it
            oom = hog.exec(["sh", "-c", "dmesg | grep -i 'out of memory' | head -1"],
                           timeout=20).stdout
        except VmkitError:
            continue
    assert "out of memory" in oom.lower()  # the guest's own OOM killer dealt with it
    assert hog.state is VmState.RUNNING and calm.state is VmState.RUNNING
    assert hog.status().pid is not None
    assert sh(calm, "echo fine") == "fine"
    assert "survived" not in sh(hog, "cat /run/hog.out || true")
