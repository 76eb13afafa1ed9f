"""Density benchmark: 30 idle tiny VMs of 128 MiB started in parallel, with and without each
of what saves host memory (issue 14's comparison point: host memory per VM at N=30):

- the TCG translation cache (host policy tcg_cache: "auto" gives a 128 MiB VM 32 MiB; "qemu"
  is QEMU's own 1 GiB, kept as it fills),
- free page reporting in 128 KiB blocks (the tiny image sets page_reporting_order 5 at boot;
  the kernel's own 9 reports 2 MiB blocks only while 64 MiB are free: never in these VMs),
- KSM (host policy ksm), with how long merging took and ksmd's CPU time.

Each configuration: the time until every guest agent answers (what it costs at boot), the QEMU
RSS per VM after the guests settle (median, min, max), and the host memory they take together
(MemAvailable before/after, the figure that counts KSM's savings). Prints one JSON object per
configuration and a summary with the ratio to the "none" row. `--count` and `--only` pick less.
The scratch host's policy allows 32 vCPUs per core: idle guests are the point here.
"""

from __future__ import annotations

import argparse
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
from vmkit import VM
from vmkit.core import ksm
from vmkit.model.resources import Policy
from vmkit.storage.layout import write_json_atomic

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


# name: (tcg_cache policy, guest page_reporting_order, KSM on)
CONFIGS: dict[str, tuple[str, int, bool]] = {
    "none": ("qemu", 9, False),
    "tcg_cache": ("auto", 9, False),
    "page_reporting": ("qemu", 5, False),
    "ksm": ("qemu", 9, True),
    "defaults": ("auto", 5, False),  # a new vmkit host (KSM is the admin's choice)
    "all": ("auto", 5, True),
}


def _reporting_order(vm: VM, order: int) -> None:
    """The guest's page_reporting_order for this bench run (the tiny image reads it from the
    kernel command line; its default is 5)."""
    config = vm.config
    assert config.boot is not None
    boot = config.boot.model_copy(
        update={"cmdline": f"{config.boot.cmdline} vmkit.page_reporting_order={order}"})
    write_json_atomic(vm.folder.config_file, config.model_copy(update={"boot": boot})
                      .model_dump(mode="json"))


def run(count: int, name: str) -> dict[str, object]:
    tcg_cache, reporting, merge = CONFIGS[name]
    host = scratch_host()
    host.set_policy(Policy(vcpu_ratio=32.0, ksm=merge, tcg_cache=tcg_cache))
    if not merge and ksm.read().available:
        ksm.switch(False)
    try:
        vms = [host.create(f"d{i}", memory="128M", max_memory="128M", max_cpus=1, disk="1G")
               for i in range(count)]
        for vm in vms:
            _reporting_order(vm, reporting)
        before = mem_available_mib()
        start = time.monotonic()
        for vm in vms:
            host.get(vm.name).start()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda vm: vm.wait_ready(timeout=900), vms))
        boot_s = time.monotonic() - start
        time.sleep(SETTLE_S)
        ksmd_before = ksmd_cpu_seconds()
        merge_s = wait_for_merging(MERGE_TIMEOUT_S) if merge else 0.0
        ksmd_cpu = ksmd_cpu_seconds() - ksmd_before
        rss = []
        for vm in vms:
            pid = host.get(vm.name).status().pid
            assert pid is not None
            rss.append(rss_mib(pid))
        used = before - mem_available_mib()
        saved = ksm.read().saved_bytes / (1 << 20) if merge else 0.0
        return {"config": name, "vms": count, "memory_per_vm": "128M",
                "tcg_cache": tcg_cache, "page_reporting_order": reporting, "ksm": merge,
                "ksm_saved_mib": round(saved, 1), "ksm_merge_s": round(merge_s, 1),
                "ksmd_cpu_s": round(ksmd_cpu, 1), "parallel_start_to_all_ready_s":
                round(boot_s, 1), "rss_mib_median": round(statistics.median(rss), 1),
                "rss_mib_min": round(min(rss), 1), "rss_mib_max": round(max(rss), 1),
                "host_memory_used_mib": round(used, 1),
                "host_memory_per_vm_mib": round(used / count, 1)}
    finally:
        drop(host)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    results = []
    was_running = ksm.read().running
    try:
        for name in args.only:
            if CONFIGS[name][2] and not ksm.read().available:
                print(json.dumps({"skipped": name, "why": "no KSM in this kernel"}), flush=True)
                continue
            if mem_available_mib() < args.count * 300 + 2048:
                print(json.dumps({"skipped": name, "why": "not enough free memory"}),
                      flush=True)
                continue
            result = run(args.count, name)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        with contextlib.suppress(Exception):
            ksm.switch(was_running)  # the host's own setting back
    base = next((r for r in results if r["config"] == "none"), None)
    summary = {str(r["config"]): {
        "host_memory_per_vm_mib": r["host_memory_per_vm_mib"],
        "rss_mib_median": r["rss_mib_median"],
        "parallel_start_to_all_ready_s": r["parallel_start_to_all_ready_s"],
        **({"ratio_to_none": round(float(r["host_memory_per_vm_mib"]) /  # type: ignore[arg-type]
                                   float(base["host_memory_per_vm_mib"]), 2)}  # type: ignore[arg-type]
           if base else {})} for r in results}
    print(json.dumps({"benchmark": "density", "vms": args.count, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
