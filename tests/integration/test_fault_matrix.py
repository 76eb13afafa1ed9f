"""Issue 10: the fault matrix. The CLI is killed (SIGKILL, through the VMKIT_FAULT test hook) right
after every named step of every journalled operation; the next command must find a consistent
VM: listed sanely, the guest answering (not left paused), the disk chain sound, no orphan file,
process or cgroup, and the operation can be run again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import chain_is_sound, run_cli
from vmkit import Host
from vmkit.isolation import acl
from vmkit.model.journal import STEPS
from vmkit.model.network import scope_of


def _killed_at(home: Path, op: str, step: str, *args: str) -> None:
    env = {**os.environ, "VMKIT_HOME": str(home), "VMKIT_FAULT": f"{op}:{step}"}
    done = subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], env=env, text=True,
                          capture_output=True, timeout=300, check=False)
    assert done.returncode == -9, f"{op}:{step} was not reached: {done.returncode} {done.stderr}"


def _qemus(home: Path) -> set[str]:
    """VM names whose QEMU runs (by the folder in their argv)."""
    names = set()
    marker = f"{home}/vms/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0].decode()).startswith("qemu-system"):
            for arg in argv:
                text = arg.decode(errors="replace")
                if marker in text:
                    names.add(text.split(marker, 1)[1].split("/", 1)[0])
                    break
    return names


def _settled(host: Host, name: str) -> None:
    """Let the next command recover `name`; a start it adopted gets its guest agent up before
    the guest is asked anything (a QEMU killed right after its spawn is seconds from booted)."""
    vm = host.get(name)
    if vm.state.value == "running":
        vm.wait_ready(timeout=120)


def _consistent(host: Host, home: Path, running: set[str] | None = None
                ) -> dict[str, dict[str, object]]:
    """Check the whole home; `running`: VMs that must run (None: those listed as running
    must really run, not sit paused)."""
    listed = run_cli(home, "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    vms = {vm["name"]: vm for vm in json.loads(listed.stdout)}
    if running is None:
        running = {n for n, vm in vms.items() if vm["state"] == "running"}
    for name in vms:
        folder = home / "vms" / name
        assert not (folder / "journal.json").exists(), name
        info = json.loads(run_cli(home, "info", name, "--format", "json").stdout)
        assert info["state"] != "broken", info
        if name in running:
            assert info["state"] == "running" and info["qemu_status"] == "running", info
            assert host.get(name).exec(["true"]).exit_code == 0
        chain_is_sound(folder)
        for layer in (folder / "disks").glob("*.qcow2"):
            subprocess.run(["qemu-img", "check", "-U", "-q", "-f", "qcow2", str(layer)],
                           check=True, capture_output=True)
        tree = json.loads((folder / "snapshots.json").read_text()) \
            if (folder / "snapshots.json").exists() else {"nodes": {}, "active_layer": None}
        used = {n["layer"] for n in tree["nodes"].values()}
        used |= {n["memory"] for n in tree["nodes"].values() if n.get("memory")}
        used |= {tree.get("active_layer") or "disks/root.qcow2", "disks/root.qcow2"}
        backing = json.loads((folder / "vm.json").read_text()).get("backing_file") or "/"
        if not backing.startswith("/"):
            used.add(f"disks/{backing}")  # an imported VM's flattened base
        present = {f"disks/{p.name}" for p in (folder / "disks").glob("*.qcow2")}
        present |= {f"snapshots/{p.name}" for p in (folder / "snapshots").glob("*.state")}
        assert present <= used, f"orphans in {name}: {present - used}"
    assert _qemus(home) == {n for n, vm in vms.items() if vm["state"] in ("running", "paused")}
    if os.geteuid() == 0 and Path("/sys/fs/cgroup/memory/vmkit").is_dir():
        suffix = "." + scope_of(str(home))  # this home's VMs only
        groups = {p.name.removesuffix(suffix) for p in Path("/sys/fs/cgroup/memory/vmkit")
                  .iterdir() if p.is_dir() and p.name.endswith(suffix)}
        assert not groups - _qemus(home), f"cgroups without a QEMU: {groups - _qemus(home)}"
    return vms


@pytest.mark.parametrize("disk_only", [False, True], ids=["memory", "disk-only"])
def test_live_snapshot_killed_at_every_step(host: Host, home: Path, disk_only: bool) -> None:
    vm = host.create("snap")
    vm.start(wait=True)
    steps = [s for s in STEPS["snapshot"] if not (disk_only and s == "memory-saved")]
    extra = ["--disk-only"] if disk_only else []
    for index, step in enumerate(steps):
        _killed_at(home, "snapshot", step, "snapshot", "create", "snap", f"s{index}", *extra)
        _consistent(host, home, {"snap"})
        names = {s.name for s in vm.snapshots()}
        if f"s{index}" not in names:  # rolled back: the operation runs again
            assert run_cli(home, "snapshot", "create", "snap", f"s{index}", *extra).returncode == 0
    _consistent(host, home, {"snap"})
    assert {s.name for s in vm.snapshots()} == {f"s{i}" for i in range(len(steps))}


def test_restore_killed_at_every_step(host: Host, home: Path) -> None:
    vm = host.create("rest")
    vm.start(wait=True)
    vm.exec(["sh", "-c", "echo before > /root/mark; sync"])
    vm.snapshot("base")
    for step in STEPS["restore"]:
        vm.exec(["sh", "-c", "echo after > /root/mark; sync"])
        _killed_at(home, "restore", step, "snapshot", "restore", "rest", "base")
        vms = _consistent(host, home)
        assert vms["rest"]["state"] in ("running", "stopped", "crashed"), vms["rest"]
        restored = vms["rest"]["state"] == "running" and \
            vm.exec(["cat", "/root/mark"]).stdout.strip() == "before"
        if not restored:  # rolled back (the present kept) or not begun: it runs again
            again = run_cli(home, "snapshot", "restore", "rest", "base")
            assert again.returncode == 0, again.stderr
        _consistent(host, home, {"rest"})
        assert vm.exec(["cat", "/root/mark"]).stdout.strip() == "before"


def test_snapshot_delete_killed_at_every_step(host: Host, home: Path) -> None:
    vm = host.create("dele")
    vm.start(wait=True)
    for step in STEPS["delete-snapshot"]:
        vm.exec(["sh", "-c", f"echo {step} > /root/{step}; sync"])
        vm.snapshot(f"d-{step}", disk_only=True)
        _killed_at(home, "delete-snapshot", step, "snapshot", "delete", "dele", f"d-{step}")
        _consistent(host, home, {"dele"})
        if f"d-{step}" in {s.name for s in vm.snapshots()}:
            assert run_cli(home, "snapshot", "delete", "dele", f"d-{step}").returncode == 0
        assert vm.exec(["cat", f"/root/{step}"]).stdout.strip() == step
    _consistent(host, home, {"dele"})


def test_instant_clone_killed_at_every_step(host: Host, home: Path) -> None:
    source = host.create("orig")
    source.start(wait=True)
    for index, step in enumerate(STEPS["instant-clone"]):
        target = f"twin{index}"
        _killed_at(home, "instant-clone", step, "clone", "orig", target, "--live")
        vms = _consistent(host, home, {"orig"} | ({target} if (home / "vms" / target).exists()
                                                   else set()))
        if target in vms:
            assert vms[target]["state"] == "running"
            run_cli(home, "delete", target, "--force", check=True)
        else:  # rolled back: no clone, no helper snapshot left on the source
            assert not (home / "vms" / target).exists()
            assert f"clone-{target}" not in {s.name for s in source.snapshots()}
        again = run_cli(home, "clone", "orig", target + "b", "--live")
        assert again.returncode == 0, again.stderr
        run_cli(home, "delete", target + "b", "--force", check=True)
        # no clone's uid may read the source any more (a uid is given to the next VM), and
        # the source's migration settings are back: a memory snapshot's save, which a
        # leftover switch-over pause would hold at pre-switchover, goes through
        assert not _named_acl_users(source.folder.path), step
        saved = run_cli(home, "snapshot", "create", "orig", f"after-{index}")
        assert saved.returncode == 0, saved.stderr
        run_cli(home, "snapshot", "delete", "orig", f"after-{index}", check=True)
    _consistent(host, home, {"orig"})


def _named_acl_users(folder: Path) -> set[int]:
    """uids with an ACL entry of their own on a VM's folder, disks/ or a layer in it."""
    users: set[int] = set()
    for path in (folder, folder / "disks", *(folder / "disks").iterdir()):
        try:
            blob = os.getxattr(path, "system.posix_acl_access")
        except OSError:
            continue
        users |= {ident for tag, ident in acl.parse(blob) if tag == acl.USER}
    return users


def test_export_killed_at_every_step(host: Host, home: Path, tmp_path: Path) -> None:
    vm = host.create("expo")
    vm.start(wait=True)
    for step in STEPS["export"]:
        bundle = tmp_path / f"{step}.vmkit"
        _killed_at(home, "export", step, "export", "expo", str(bundle))
        _consistent(host, home, {"expo"})
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        assert not list((home / "cache").glob("export-*"))
        assert not [s.name for s in vm.snapshots() if s.name.startswith("export-")]
        frozen = vm.exec(["sh", "-c", "echo ok > /root/unfrozen && cat /root/unfrozen"])
        assert frozen.stdout.strip() == "ok"  # the guest's disk takes writes: thawed
        if bundle.exists():  # published: complete and checked
            assert run_cli(home, "import", str(bundle), "--name", f"back-{step}").returncode == 0
            run_cli(home, "delete", f"back-{step}", check=True)
            bundle.unlink()
        done = run_cli(home, "export", "expo", str(bundle))
        assert done.returncode == 0, done.stderr
        bundle.unlink()


def test_start_and_stop_killed_at_every_step(host: Host, home: Path) -> None:
    vm = host.create("life")
    for step in STEPS["start"]:
        if vm.state.value == "running":
            run_cli(home, "kill", "life", check=True)
        _killed_at(home, "start", step, "start", "life")
        _settled(host, "life")
        vms = _consistent(host, home)
        assert vms["life"]["state"] in ("running", "stopped", "crashed", "defined"), vms
        if vms["life"]["state"] != "running":
            run_cli(home, "start", "life", check=True)
        vm.wait_ready(timeout=120)
        _consistent(host, home, {"life"})
    for step in STEPS["stop"]:
        if vm.state.value != "running":
            run_cli(home, "start", "life", "--wait", check=True)
        _killed_at(home, "stop", step, "stop", "life", "--timeout", "30")
        vms = _consistent(host, home)
        assert vms["life"]["state"] == "stopped", vms["life"]  # finished, not half-done


@pytest.mark.parametrize("linked", [False, True], ids=["full", "linked"])
def test_clone_of_a_running_vm_killed_at_every_step(host: Host, home: Path,
                                                    linked: bool) -> None:
    source = host.create("src")
    source.start(wait=True)
    source.exec(["sh", "-c", "echo mine > /root/mark; sync"])
    extra = ["--linked"] if linked else []
    for index, step in enumerate(STEPS["clone"]):
        target = f"cl{index}"
        _killed_at(home, "clone", step, "clone", "src", target, *extra)
        vms = _consistent(host, home, {"src"})
        helpers = {s.name for s in source.snapshots()}
        if target in vms:
            assert (f"clone-{target}" in helpers) == linked  # a full clone merged it back
            run_cli(home, "start", target, "--wait", check=True)
            assert host.get(target).exec(["cat", "/root/mark"]).stdout.strip() == "mine"
            run_cli(home, "delete", target, "--force", check=True)
        else:
            assert f"clone-{target}" not in helpers
        again = run_cli(home, "clone", "src", f"{target}b", *extra)
        assert again.returncode == 0, again.stderr
        run_cli(home, "delete", f"{target}b", "--force", check=True)
    _consistent(host, home, {"src"})


def test_live_set_killed_at_every_step(host: Host, home: Path) -> None:
    vm = host.create("grow", memory="256M", max_memory="1G", cpus=1, max_cpus=2)
    vm.start(wait=True)
    for index, step in enumerate(STEPS["set"]):
        want = 256 + 128 * (index + 1)
        _killed_at(home, "set", step, "set", "grow", "--memory", f"{want}M")
        _consistent(host, home, {"grow"})
        spec = json.loads((home / "vms/grow/vm.json").read_text())["spec"]
        machine = json.loads((home / "vms/grow/state.json").read_text())["machine"]
        plugged = machine["config"]["spec"]["memory"] + sum(
            step["args"]["size"] for step in machine["hotplug"] if step["kind"] == "object")
        assert spec["memory"] == plugged, (step, spec["memory"], plugged)  # vm.json is true
        again = run_cli(home, "set", "grow", "--memory", f"{want}M")
        assert again.returncode == 0, again.stderr
    _consistent(host, home, {"grow"})


def test_import_killed_at_every_step(host: Host, home: Path, tmp_path: Path) -> None:
    vm = host.create("orig-b")
    bundle = tmp_path / "b.vmkit"
    run_cli(home, "export", "orig-b", str(bundle), check=True)
    for step in STEPS["import"]:
        _killed_at(home, "import", step, "import", str(bundle), "--name", "imp")
        vms = _consistent(host, home)
        assert not [p for p in (home / "vms").iterdir() if p.name.startswith(".")]
        if "imp" in vms:
            run_cli(home, "delete", "imp", check=True)
        done = run_cli(home, "import", str(bundle), "--name", "imp")
        assert done.returncode == 0, done.stderr
        # a recovery (and its sweep of files nothing names) must keep the imported base
        _killed_at(home, "start", "spawned", "start", "imp")
        _settled(host, "imp")
        _consistent(host, home)
        if host.get("imp").state.value != "running":
            run_cli(home, "start", "imp", check=True)
        host.get("imp").wait_ready(timeout=120)
        run_cli(home, "delete", "imp", "--force", check=True)
    assert vm.state.value == "defined"


def test_disk_add_and_remove_killed_at_every_step(host: Host, home: Path) -> None:
    """A hot-plug cut anywhere: the disk is either there in full (vm.json, file, QEMU's
    device) or not at all, and the command runs again."""
    vm = host.create("plug", memory="256M")
    vm.start(wait=True)
    folder = home / "vms" / "plug"

    def agree() -> list[str]:
        _consistent(host, home, {"plug"})
        named = [d["name"] for d in json.loads((folder / "vm.json").read_text())["disks"]]
        files = sorted(p.stem for p in (folder / "volumes").glob("*.qcow2"))
        assert files == sorted(named), (named, files)
        deadline = time.monotonic() + 30  # the guest takes in a hot-plug on its own time
        while True:
            plugged = vm.exec(["sh", "-c", "for s in /sys/block/vd*/serial; do "
                                           "cat $s 2>/dev/null; echo; done"]).stdout
            if sorted(plugged.split()) == sorted(named) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(plugged.split()) == sorted(named), (named, plugged)
        return named

    for index, step in enumerate(STEPS["disk-add"]):
        disk = f"d{index}"
        _killed_at(home, "disk-add", step, "disk", "add", "plug", disk, "--size", "16M")
        if disk not in agree():
            assert run_cli(home, "disk", "add", "plug", disk, "--size", "16M").returncode == 0
    for step in STEPS["disk-remove"]:
        disk = agree()[0]
        _killed_at(home, "disk-remove", step, "disk", "remove", "plug", disk)
        if disk in agree():
            assert run_cli(home, "disk", "remove", "plug", disk).returncode == 0
    assert len(agree()) == len(STEPS["disk-add"]) - len(STEPS["disk-remove"])
