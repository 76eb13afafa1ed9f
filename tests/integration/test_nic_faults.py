"""Issue 10, on a vmkit network inside a namespace this module creates: `nic add` / `nic remove`
killed at every step leave vm.json saying what QEMU really has; and a memory snapshot taken
after a NIC was hot-added restores (and instant-clones) onto that same machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import new_home
from tests.integration.test_networks import Lab
from vmkit.model.journal import STEPS

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


@pytest.fixture(scope="module")
def lab(image_home: Path) -> Iterator[Lab]:
    ns = f"vmk-nicf-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True,
                       capture_output=True, timeout=30)
        with new_home(image_home) as home:
            lab = Lab(ns, ns, home)
            try:
                lab.ok("network", "create", "lan", "--subnet", "198.18.60.0/24", "--isolated")
                lab.ok("create", "n", "--start", "--wait")
                yield lab
            finally:
                lab.wipe()  # linked clones first, then the VMs they lean on, then the network
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def _killed(lab: Lab, op: str, step: str, *args: str) -> None:
    env = {**os.environ, "VMKIT_HOME": str(lab.home), "VMKIT_FAULT": f"{op}:{step}"}
    done = subprocess.run(["ip", "netns", "exec", lab.ns, sys.executable, "-m",
                           "vmkit.cli.main", *args], env=env, text=True, capture_output=True,
                          timeout=180, check=False)
    assert done.returncode == -signal.SIGKILL, f"{op}:{step}: {done.returncode} {done.stderr}"


def _nics_configured(lab: Lab) -> list[str]:
    info = json.loads(lab.ok("info", "n", "--format", "json"))
    assert info["state"] == "running" and info["qemu_status"] == "running", info
    assert not (lab.home / "vms/n/journal.json").exists()
    return [nic["network"] for nic in info["nics"]]


def _guest_nics(lab: Lab) -> int:
    return int(lab.sh("n", "ls /sys/class/net | grep -vc lo"))


def test_nic_add_and_remove_killed_at_every_step(lab: Lab) -> None:
    base = _guest_nics(lab)
    for step in STEPS["nic-add"]:
        _killed(lab, "nic-add", step, "nic", "add", "n", "--network", "lan")
        configured = _nics_configured(lab)  # the next command finished or undid it
        if "lan" in configured:
            assert _guest_nics(lab) == base + 1
            lab.ok("nic", "remove", "n", "lan")
        assert _guest_nics(lab) == base
        lab.ok("nic", "add", "n", "--network", "lan")  # runs again
        assert _guest_nics(lab) == base + 1
        lab.ok("nic", "remove", "n", "lan")
    lab.ok("nic", "add", "n", "--network", "lan")
    for step in STEPS["nic-remove"]:
        _killed(lab, "nic-remove", step, "nic", "remove", "n", "lan")
        configured = _nics_configured(lab)
        assert ("lan" in configured) == (_guest_nics(lab) == base + 1)
        if "lan" not in configured:
            lab.ok("nic", "add", "n", "--network", "lan")


def test_a_snapshot_after_nic_add_restores_and_clones_that_machine(lab: Lab) -> None:
    if "lan" not in _nics_configured(lab):
        lab.ok("nic", "add", "n", "--network", "lan")
    lab.sh("n", "head -c 2000000 /dev/urandom > /run/blob")
    want = lab.sh("n", "sha256sum /run/blob")
    nics = _guest_nics(lab)
    lab.ok("snapshot", "create", "n", "withnic")
    lab.sh("n", "rm /run/blob")
    lab.ok("snapshot", "restore", "n", "withnic")
    assert lab.sh("n", "sha256sum /run/blob") == want and _guest_nics(lab) == nics
    lab.ok("clone", "n", "n2", "--live")
    assert lab.sh("n2", "sha256sum /run/blob").split()[0] == want.split()[0]
    assert int(lab.sh("n2", "ls /sys/class/net | grep -vc lo")) == nics
