"""`make run`: partition this host like a small server and show it.

Three VMs with different vCPU/memory shares boot side by side, `vmkit list` is printed, one
command runs in each guest, then everything is stopped and deleted (DEMO_KEEP=1 keeps them).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from vmkit import Host, NotFound

SHARES = [("demo-web", 1, "256M"), ("demo-db", 2, "512M"), ("demo-files", 1, "384M")]


def vmkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], check=True)


def main() -> int:
    host = Host()
    keep = os.environ.get("DEMO_KEEP") == "1"
    for name, _, _ in SHARES:
        with contextlib.suppress(NotFound):
            host.get(name).delete(force=True)
    started = time.monotonic()
    vms = [host.create(name, cpus=cpus, memory=memory, disk="1G") for name, cpus, memory in SHARES]
    for vm in vms:
        vm.start()
    with ThreadPoolExecutor(len(vms)) as pool:
        list(pool.map(lambda vm: vm.wait_ready(), vms))
    print(f"\n{len(vms)} VMs booted side by side in {time.monotonic() - started:.1f}s\n")
    vmkit("list")
    print()
    for vm in vms:
        result = vm.exec(["sh", "-c", "echo $(hostname): $(nproc) vCPU, "
                          "$(free -m | awk '/Mem:/ {print $2}') MiB, $(uname -r)"])
        print(f"  vmkit exec {vm.name} -> {result.stdout.strip()}")
    print()
    if keep:
        print("DEMO_KEEP=1: the VMs keep running; vmkit list / vmkit delete --force NAME")
        return 0
    for vm in vms:
        vm.stop()
        vm.delete()
    print("stopped and deleted the demo VMs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
