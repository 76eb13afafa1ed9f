"""Boot benchmark: vmkit create + start + guest-ready vs bare qemu-system-x86_64, same argv.

Runs alternate (vmkit, QEMU, vmkit, ...) so drift in the machine's speed hits both alike. The
bare run does what a QEMU user does by hand: a qcow2 overlay on the same image, the same argv,
and the same guest-agent readiness check. Also reports the RSS of an idle 256 MiB tiny guest.
The last line printed is one JSON object: vmkit_s, qemu_s, ratio (vmkit/qemu), and the RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import bare_boot, drop, median, rss_mib, scratch_host


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--idle", type=float, default=15.0,
                        help="seconds a guest idles before its RSS is read")
    args = parser.parse_args()
    host = scratch_host()
    vmkit_times: list[float] = []
    qemu_times: list[float] = []
    try:
        accel = host.accel().accel
        for run in range(args.runs):
            start = time.monotonic()
            vm = host.create(f"bv{run}", memory="256M")
            vm.start(wait=True)
            vmkit_times.append(time.monotonic() - start)
            vm.kill()
            vm.delete()

            twin = host.create(f"bq{run}", memory="256M")
            elapsed = bare_boot(host, twin.name, twin.argv(accel)).agent_s
            qemu_times.append(elapsed)
            twin.delete()
            print(f"run {run}: vmkit {vmkit_times[-1]:.2f}s  qemu {qemu_times[-1]:.2f}s",
                  flush=True)

        vm = host.create("rss-vmkit", memory="256M")
        vm.start(wait=True)
        time.sleep(args.idle)
        pid = vm.status().pid
        assert pid is not None
        rss_vmkit = rss_mib(pid)
        vm.kill()
        twin = host.create("rss-qemu", memory="256M")
        rss_qemu = bare_boot(host, twin.name, twin.argv(accel), keep=args.idle).rss_mib
    finally:
        drop(host)
    result = {
        "benchmark": "boot", "accel": accel, "runs": args.runs, "machine": "q35+qboot",
        "vmkit_s": round(median(vmkit_times), 3), "qemu_s": round(median(qemu_times), 3),
        "ratio": round(median(vmkit_times) / median(qemu_times), 3),
        "vmkit_runs_s": [round(t, 3) for t in vmkit_times],
        "qemu_runs_s": [round(t, 3) for t in qemu_times],
        "idle_rss_mib_256m_guest": {"vmkit": round(rss_vmkit, 1),
                                    "qemu": round(rss_qemu or 0.0, 1)},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
