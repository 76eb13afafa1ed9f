"""Issue 9: a hostile guest (or a QEMU it took over) against the host and its VM neighbours.

Each VM's QEMU has a uid of its own; as that uid (setpriv here plays the escaped QEMU) nothing
of another VM, of the image store or of what root trusts can be opened or written, and what it
can write (its run/ folder) never steers a later root operation.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli, sh
from vmkit import Host, VmState

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="per-VM uids need root")


def _qemu_ids(host: Host, name: str) -> tuple[int, int]:
    pid = host.get(name).status().pid
    assert pid is not None
    info = os.stat(f"/proc/{pid}")
    return info.st_uid, info.st_gid


def _as(uid: int, gid: int, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script as a VM's uid, the way an escaped QEMU would be."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           "--no-new-privs", "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, check=False)


def _denied(uid: int, gid: int, script: str) -> None:
    done = _as(uid, gid, script)
    assert done.returncode != 0, f"{script!r} succeeded as uid {uid}: {done.stdout}"
    assert "denied" in done.stderr.lower() or "not permitted" in done.stderr.lower(), done.stderr


def test_cp_out_of_a_guest_never_makes_a_setuid_or_writable_file(host: Host, home: Path,
                                                                   tmp_path: Path) -> None:
    vm = host.create("suid")
    vm.start(wait=True)
    sh(vm, "echo payload > /tmp/x && chmod 6777 /tmp/x && chmod 1777 /tmp && ls -l /tmp/x")
    done = run_cli(home, "cp", "suid:/tmp/x", str(tmp_path) + "/")
    assert done.returncode == 0, done.stderr
    copied = tmp_path / "x"
    assert copied.read_text() == "payload\n"
    mode = stat.S_IMODE(copied.stat().st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0, oct(mode)
    assert mode & (stat.S_IWGRP | stat.S_IWOTH) == 0, oct(mode)
    assert mode == 0o755  # what is left of 6777
    assert copied.stat().st_uid == os.geteuid()


@root_only
def test_a_vm_uid_reaches_nothing_of_its_neighbour_the_store_or_roots_metadata(
        host: Host, home: Path) -> None:
    a = host.create("vma")
    b = host.create("vmb")
    for vm in (a, b):
        vm.start(wait=True)
    b.snapshot("bsnap")  # a memory state of B's
    a.snapshot("asnap")
    uid_a, gid_a = _qemu_ids(host, "vma")
    uid_b, gid_b = _qemu_ids(host, "vmb")
    assert uid_a != uid_b and gid_a != gid_b and 0 not in (uid_a, uid_b)
    assert uid_a == gid_a

    vms = home / "vms"
    b_disk = vms / "vmb" / b.active_layer()
    for target in (b_disk, vms / "vmb/disks/root.qcow2", vms / "vmb/snapshots/bsnap.state",
                   vms / "vmb/run/qmp.sock", vms / "vmb/vm.json", vms / "vmb/state.json"):
        _denied(uid_a, gid_a, f"cat '{target}' > /dev/null")
    _denied(uid_a, gid_a, f"ls '{vms / 'vmb'}'")
    # the image store: readable (QEMU reads base disks) but not writable
    image_dir = home / "images/tiny"
    base = next(image_dir.glob("root-*.qcow2"))
    _denied(uid_a, gid_a, f"echo x >> '{base}'")
    _denied(uid_a, gid_a, f"echo x > '{image_dir}/planted'")
    _denied(uid_a, gid_a, f"echo x >> '{image_dir}/vmlinuz'")
    # what root trusts in A's own folder
    folder = vms / "vma"
    for name in ("vm.json", "state.json", "snapshots.json"):
        _denied(uid_a, gid_a, f"echo x >> '{folder / name}'")
    _denied(uid_a, gid_a, f"cat '{folder / 'snapshots/asnap.state'}' > /dev/null")
    for sub in ("", "disks", "snapshots", "logs", "boot"):
        _denied(uid_a, gid_a, f"ln -s /etc/shadow '{folder / sub / 'planted'}'")
    # A's uid may write its own disk layer (that is its job) and nothing else
    assert _as(uid_a, gid_a, f"test -w '{folder / a.active_layer()}'").returncode == 0
    assert b.state is VmState.RUNNING


@root_only
def test_what_a_vm_uid_plants_in_run_steers_no_root_operation(host: Host, home: Path) -> None:
    a = host.create("pa")
    b = host.create("pb")
    for vm in (a, b):
        vm.start(wait=True)
    uid_a, gid_a = _qemu_ids(host, "pa")
    bait = home / "bait"
    bait.write_text("root's file\n")
    os.chmod(bait, 0o600)
    run = home / "vms/pa/run"
    b_run = home / "vms/pb/run"
    # the escaped QEMU of A points its sockets at B's and leaves symlinks to root's file
    script = "; ".join([
        f"ln -sf '{b_run / 'qmp.sock'}' '{run / 'qmp.sock'}'",
        f"ln -sf '{b_run / 'agent.sock'}' '{run / 'agent.sock'}'",
        f"ln -sf '{bait}' '{run / 'seed.iso'}'",
        f"ln -sf '{bait}' '{run / 'exit-status'}'",
        f"ln -sf '{bait}' '{run / 'qemu.pid'}'",
        f"ln -sf '{bait}' '{run / 'incoming.sock'}'",
    ])
    done = _as(uid_a, gid_a, script)
    assert done.returncode == 0, done.stderr
    # vmkit must not drive B through A's run/ (the peer is not A's uid)
    paused = run_cli(home, "pause", "pa")
    assert paused.returncode != 0 and "refusing the socket" in paused.stderr, paused.stderr
    assert "Traceback" not in paused.stderr
    assert b.exec(["true"]).exit_code == 0
    assert host.get("pb").status(query_qemu=True).qemu_status == "running"
    # root's later operations on A: none follows what was planted
    for args in (("snapshot", "create", "pa", "s1", "--disk-only"),
                 ("stop", "pa", "--timeout", "1"), ("start", "pa"), ("kill", "pa"),
                 ("clone", "pa", "pa-copy"), ("export", "pa", str(home / "pa.vmkit")),
                 ("snapshot", "restore", "pa", "s1"), ("snapshot", "delete", "pa", "s1"),
                 ("delete", "pa", "--force")):
        done = run_cli(home, *args, timeout=300)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        assert bait.read_text() == "root's file\n", args
        assert stat.S_IMODE(bait.stat().st_mode) == 0o600 and bait.stat().st_uid == 0, args
    assert b.state is VmState.RUNNING and b.exec(["true"]).exit_code == 0
