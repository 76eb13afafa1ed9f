"""Clones (full, linked, from a snapshot, instant) and bundles (export, checked import)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.integration.conftest import COUNTER, chain_is_sound, count, new_home, run_cli, sh
from tests.integration.hostile_bundles import ESCAPE_TARGET, forge_damaged
from vmkit import Host, InvalidState, InvalidValue, VmState
from vmkit.qemu import agent


def test_full_linked_and_snapshot_clones_have_new_identities(host: Host, home: Path) -> None:
    source = host.create("origin")
    source.start(wait=True)
    sh(source, "echo v1 > /root/f; sync")
    source.snapshot("v1")
    sh(source, "echo v2 > /root/f; sync")
    linked = source.clone("linked", linked=True)
    full = source.clone("full")
    old = source.clone("old", linked=True, from_snapshot="v1")
    assert (home / "vms/linked/disks/root.qcow2").stat().st_size < 1 << 20  # an overlay
    for clone, content in ((linked, "v2"), (full, "v2"), (old, "v1")):
        assert clone.config.uuid != source.config.uuid and clone.config.mac != source.config.mac
        clone.start(wait=True)
        assert sh(clone, "cat /root/f; hostname").split() == [content, clone.name]
    sh(linked, "echo changed-in-clone > /root/f; sync")
    assert sh(source, "cat /root/f") == "v2"  # clone writes never reach the source
    with pytest.raises(InvalidState, match="linked clones"):
        source.delete(force=True)
    linked.delete(force=True)
    old.delete(force=True)
    source.delete(force=True)  # a full clone does not depend on its source
    full.stop()
    full.start(wait=True)
    assert sh(full, "cat /root/f") == "v2"


def test_instant_clone_runs_from_the_sources_memory(host: Host, home: Path) -> None:
    source = host.create("busy", memory="256M")
    source.start(wait=True)
    sh(source, COUNTER)
    time.sleep(1)
    before = count(source)
    loop_pid = sh(source, "cat /run/counter.pid")
    started = time.monotonic()
    done = run_cli(home, "clone", "busy", "twin", "--live")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    twin = host.get("twin")
    assert twin.state is VmState.RUNNING and source.state is VmState.RUNNING
    value = count(twin)
    assert value >= before  # its memory came from the source: the counter went on from there
    assert "counter" in sh(twin, f"cat /proc/{loop_pid}/cmdline")  # the same process runs on
    assert sh(twin, "hostname") == "twin" and sh(source, "hostname") == "busy"
    twin_mac = sh(twin, "cat /sys/class/net/eth0/address")
    assert twin_mac == twin.config.mac != sh(source, "cat /sys/class/net/eth0/address")
    time.sleep(1)
    assert count(twin) > value and count(source) > 0
    print(f"instant clone via CLI: {elapsed:.2f}s")


def test_a_clone_that_cannot_take_its_identity_is_removed(host: Host, home: Path) -> None:
    """The source's guest has a reseed helper that fails: its instant clone, which runs the
    source's memory (the bind mount included), cannot be given its identity, and would run
    as the source's twin (hostname, MAC, RNG state): it is removed; the source runs on."""
    source = host.create("twinsrc", memory="256M")
    source.start(wait=True)
    sh(source, "printf '#!/bin/sh\\necho broken >&2; exit 1\\n' > /run/broken; "
               f"chmod +x /run/broken; mount -o bind /run/broken {agent.RESEED_HELPER}")
    done = run_cli(home, "clone", "twinsrc", "twin2", "--live")
    assert done.returncode == 1 and "the clone was removed" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert [vm.name for vm in host.vms()] == ["twinsrc"]
    assert not (home / "vms" / "twin2").exists()
    assert source.state is VmState.RUNNING and sh(source, "hostname") == "twinsrc"
    assert "clone-twin2" not in {s.name for s in source.snapshots()}  # no helper left either


def test_export_import_round_trip_with_snapshots(host: Host, home: Path,
                                                 image_home: Path) -> None:
    vm = host.create("travel", memory="256M")
    vm.start(wait=True)
    sh(vm, "echo at-snapshot > /root/f; sync; dd if=/dev/urandom of=/run/blob bs=1M count=8 "
           "2>/dev/null")
    blob = sh(vm, "sha256sum /run/blob")
    vm.snapshot("mem")
    sh(vm, "echo at-export > /root/f; sync")
    bundle = home / "travel.vmkit"
    done = run_cli(home, "export", "travel", str(bundle))  # a running VM: consistent point
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600  # disks and RAM: owner only
    assert vm.state is VmState.RUNNING and [s.name for s in vm.snapshots()] == ["mem"]
    with new_home(image_home) as elsewhere:
        other = Host(elsewhere)
        done = run_cli(elsewhere, "import", str(bundle))
        assert done.returncode == 0, done.stderr
        copy = other.get("travel")
        assert copy.config.uuid == vm.config.uuid
        assert copy.config.hardware == vm.config.hardware
        copy.start(wait=True)
        assert sh(copy, "cat /root/f") == "at-export"
        copy.restore("mem")
        assert sh(copy, "cat /root/f") == "at-snapshot" and sh(copy, "sha256sum /run/blob") == blob
        chain_is_sound(copy.folder.path)
        renamed = other.import_bundle(bundle, name="travel-copy")
        assert renamed.config.uuid != vm.config.uuid and renamed.config.mac != vm.config.mac


def test_tampered_truncated_and_malicious_bundles_are_refused(host: Host, home: Path,
                                                              tmp_path: Path) -> None:
    vm = host.create("sealed")
    bundle = tmp_path / "sealed.vmkit"
    vm.export(bundle)
    vm.delete()
    cases = forge_damaged(bundle, tmp_path)
    for path, message in cases:
        done = run_cli(home, "import", str(path))
        assert done.returncode == 2, (path, done.stderr)
        assert message in done.stderr, (path, done.stderr)
        with pytest.raises(InvalidValue):
            host.import_bundle(path, name="again")
    assert sorted(os.listdir(home / "vms")) == []  # nothing registered, nothing half-made
    assert not ESCAPE_TARGET.exists()
    host.import_bundle(bundle)  # the genuine bundle still imports
    assert host.get("sealed").state is VmState.DEFINED
