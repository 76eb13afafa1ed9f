"""The jailer model: QEMU unprivileged, sandboxed, in its cgroup; a guest's excess stays in it."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

from tests.integration.conftest import run_cli, sh
from vmkit import Host, VmkitError, VmState


def _status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _open_files(pid: int) -> list[str]:
    """What a process has open; descriptors QEMU closes while we look are skipped."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return targets


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
    assert str(marker) not in _open_files(pid)
    folder = home / "vms/jailed"
    assert stat.S_IMODE(folder.stat().st_mode) == (0o710 if os.geteuid() == 0 else 0o700)
    assert stat.S_IMODE((folder / "run").stat().st_mode) == 0o700
    for sock in ("qmp.sock", "serial.sock", "agent.sock"):
        assert stat.S_IMODE((folder / "run" / sock).stat().st_mode) == 0o600
    report = run_cli(home, "doctor", "--format", "json")
    assert '"qemu_user": "one uid/gid per VM from' in report.stdout or os.geteuid() != 0


def test_a_guest_that_allocates_beyond_its_ram_is_contained(host: Host) -> None:
    hog = host.create("hog", memory="256M")
    calm = host.create("calm", memory="256M")
    for vm in (hog, calm):
        vm.start(wait=True)
    # four readers holding 100 MB buffers each: 400 MB in a 256 MiB guest (one allocation
    # that size would just be refused by the guest's overcommit heuristic)
    hog.exec(["sh", "-c", "(for i in 1 2 3 4; do dd if=/dev/zero of=/dev/null bs=100M count=20 "
                          "& done; wait) >/run/hog.out 2>&1 </dev/null &"])
    deadline = time.monotonic() + 300
    oom = ""
    while time.monotonic() < deadline and "out of memory" not in oom.lower():
        time.sleep(2)
        try:  # the guest's OOM killer may take the agent too; init respawns it
            oom = hog.exec(["sh", "-c", "dmesg | grep -i 'out of memory' | head -1"],
                           timeout=20).stdout
        except VmkitError:
            continue
    assert "out of memory" in oom.lower() and "(dd)" in oom  # the guest's own OOM killer
    assert hog.state is VmState.RUNNING and calm.state is VmState.RUNNING
    assert hog.status().pid is not None
    assert sh(calm, "echo fine") == "fine"
    sh(hog, "while pidof dd >/dev/null; do sleep 1; done")  # the survivors finish
    assert sh(hog, "grep -c 'records out' /run/hog.out || true") != "4"  # not all 4 ran


def test_a_normal_user_still_runs_vms_without_root_features(image_home: Path) -> None:
    """As a normal user: no cgroups, no user switch (doctor says so), and VMs still run."""
    import pwd
    import subprocess
    import sys
    import tempfile

    from vmkit.storage.layout import HomeLayout

    user = pwd.getpwnam("vmkit")
    root = Path(tempfile.mkdtemp(prefix="vmku-", dir="/tmp"))
    # copies, not the hard links link_image makes: the chown below would reach the shared
    # image's own files (it left every VM's kernel owned by the unprivileged account)
    shutil.copytree(HomeLayout(image_home).image("tiny"), HomeLayout(root).image("tiny"))
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
               "--inh-caps=-all", sys.executable, "-m", "vmkit.cli.main"]
    env = {**os.environ, "VMKIT_HOME": str(root), "HOME": str(root)}

    def vmkit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_user, *args], env=env, capture_output=True, text=True,
                              timeout=300, check=False)

    try:
        doctor = vmkit("doctor", "--format", "json")
        assert doctor.returncode == 0, doctor.stderr
        assert '"used": null' in doctor.stdout and "normal user" in doctor.stdout
        assert vmkit("create", "mine", "--start", "--wait").returncode == 0
        done = vmkit("exec", "mine", "--", "sh", "-c", "ip -4 addr show eth0 | grep -c inet")
        assert (done.returncode, done.stdout.strip()) == (0, "1")  # user-mode networking
        pid = int(vmkit("info", "mine", "--format", "json").stdout.split('"pid": ')[1]
                  .split(",")[0])
        assert _status_fields(pid)["Uid"].split()[0] == str(user.pw_uid)
        assert vmkit("stop", "mine").returncode == 0
    finally:
        vmkit("delete", "mine", "--force")
        subprocess.run(["rm", "-rf", str(root)], check=False)
