"""Density benchmark: N idle tiny VMs of 128 MiB started in parallel (N = 10, 20, ...).

For each N: the time until every guest agent answers, the QEMU RSS per VM after the guests
settle (median, min, max), and the host memory they take together (MemAvailable before/after).
Stops at the largest N the host's free memory allows. Prints one JSON object per N and a summary.
The scratch host's policy allows 32 vCPUs per core: idle guests are the point here.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import drop, rss_mib, scratch_host
from vmkit.model.resources import Policy

SETTLE_S = 20.0


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable")


def run(count: int) -> dict[str, object]:
    host = scratch_host()
    host.set_policy(Policy(vcpu_ratio=32.0))
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
        rss = []
        for vm in vms:
            pid = vm.status().pid
            assert pid is not None
            rss.append(rss_mib(pid))
        used = before - mem_available_mib()
        return {"vms": count, "memory_per_vm": "128M", "parallel_start_to_all_ready_s":
                round(boot_s, 1), "rss_mib_median": round(statistics.median(rss), 1),
                "rss_mib_min": round(min(rss), 1), "rss_mib_max": round(max(rss), 1),
                "host_memory_used_mib": round(used, 1),
                "host_memory_per_vm_mib": round(used / count, 1)}
    finally:
        drop(host)


def main() -> int:
    results = []
    count = 10
    while count <= 40:
        if mem_available_mib() < count * 250 + 2048:
            break
        result = run(count)
        print(json.dumps(result), flush=True)
        results.append(result)
        count += 10
        if result["parallel_start_to_all_ready_s"] > 240:  # type: ignore[operator]
            break
    print(json.dumps({"benchmark": "density", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
