"""Issue 10: locks that mean something. Live grows are admitted under the host lock (a test hook
holds the first one right after its admission, so the race is certain, not lucky)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vmkit import Host
from vmkit.model.resources import Policy

MIB = 1 << 20


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_two_live_grows_racing_at_the_limit_one_is_refused(host: Host, home: Path) -> None:
    vms = [host.create(name, memory="256M", max_memory="1G") for name in ("ga", "gb")]
    for vm in vms:
        vm.start(wait=True)
    limit = 640 * MIB  # both running (512 MiB) + one 128 MiB DIMM, not two
    host.set_policy(Policy(memory_reserve=_mem_total() - limit))
    env = {**os.environ, "VMKIT_HOME": str(home), "VMKIT_PAUSE": "set:admitted:3"}
    racers = [subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "set", vm.name,
                                "--memory", "384M"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for vm in vms]
    outcomes = [(racer.wait(timeout=120), racer.stderr.read() if racer.stderr else "")
                for racer in racers]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, err in outcomes if code == 2)
    assert "Traceback" not in refused and "memory" in refused.lower()
    assert host.allocated().memory <= limit
    plugged = sorted(host.get(vm.name).status().memory for vm in vms)
    assert plugged == [256 * MIB, 384 * MIB]
