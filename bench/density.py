"""Density benchmark: N idle tiny VMs of 128 MiB started in parallel (N = 10, 20, ...).

For each N: the time until every guest agent answers, the QEMU RSS per VM after the guests
settle (median, min, max), and the host memory they take together (MemAvailable before/after).
Stops at the largest N the host's free memory allows. Then N = 30 again with KSM on (the host
policy `vmkit host set --ksm on`): the memory it saves, how long merging took and the CPU time
of ksmd. Prints one JSON object per run and a summary.
The scratch host's policy allows 32 vCPUs per core: idle guests are the point here.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import drop, rss_mib, scratch_host
from vmkit.core import ksm
from vmkit.model.resources import Policy

SETTLE_S = 20.0
MERGE_TIMEOUT_S = 300.0


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable")


def ksmd_cpu_seconds() -> float:
    """CPU time of the kernel's KSM thread so far (what merging costs)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            if "(ksmd)" in text:
                fields = text.rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def wait_for_merging(timeout: float) -> float:
    """Until KSM has gone over all mergeable memory twice (what it can merge is merged)."""
    start = time.monotonic()
    first = ksm.read().full_scans
    while time.monotonic() - start < timeout and ksm.read().full_scans < first + 2:
        time.sleep(2)
    return time.monotonic() - start


def run(count: int, *, merge: bool = False) -> dict[str, object]:
    host = scratch_host()
    host.set_policy(Policy(vcpu_ratio=32.0, ksm=merge))
    try:
        vms = [host.create(f"d{i}", memory="128M", max_memory="128M", max_cpus=1, disk="1G")
               for i in range(count)]
        before = mem_available_mib()
        start = time.monotonic()
        for vm in vms:
            vm.start()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda vm: vm.wait_ready(timeout=600), vms))
        boot_s = time.monotonic() - start
        time.sleep(SETTLE_S)
        ksmd_before = ksmd_cpu_seconds()
        merge_s = wait_for_merging(MERGE_TIMEOUT_S) if merge else 0.0
        ksmd_cpu = ksmd_cpu_seconds() - ksmd_before
        rss = []
        for vm in vms:
            pid = vm.status().pid
            assert pid is not None
            rss.append(rss_mib(pid))
        used = before - mem_available_mib()
        saved = ksm.read().saved_bytes / (1 << 20) if merge else 0.0
        return {"vms": count, "ksm": merge, "memory_per_vm": "128M",
                "ksm_saved_mib": round(saved, 1), "ksm_merge_s": round(merge_s, 1),
                "ksmd_cpu_s": round(ksmd_cpu, 1), "parallel_start_to_all_ready_s":
                round(boot_s, 1), "rss_mib_median": round(statistics.median(rss), 1),
                "rss_mib_min": round(min(rss), 1), "rss_mib_max": round(max(rss), 1),
                "host_memory_used_mib": round(used, 1),
                "host_memory_per_vm_mib": round(used / count, 1)}
    finally:
        drop(host)


def main() -> int:
    """N = 10, 20, 30 without KSM, then N = 30 with it (the issue's comparison point)."""
    results = []
    was_running = ksm.read().running
    try:
        for count, merge in ((10, False), (20, False), (30, False), (30, True)):
            if merge and not ksm.read().available:
                print(json.dumps({"skipped": "ksm", "why": "not in this kernel"}), flush=True)
                continue
            if mem_available_mib() < count * 250 + 2048:
                break
            result = run(count, merge=merge)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        with contextlib.suppress(Exception):
            ksm.switch(was_running)  # the host's own setting back
    print(json.dumps({"benchmark": "density", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
