"""The host report (`vmkit doctor`): what this host offers vmkit and why it cannot run VMs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from vmkit.core import ksm
from vmkit.core.engine import Host, _cgroup_version
from vmkit.errors import (
    HostError,
)
from vmkit.images import catalog
from vmkit.isolation import cgroups as cgroups_mod
from vmkit.isolation import jail, uids
from vmkit.model.resources import (
    memory_limit,
    vcpu_limit,
)
from vmkit.qemu import hostinfo
from vmkit.qemu.argv import FIRMWARE_FILES, LaunchOptions


def report(host: Host) -> dict[str, Any]:
    """A report of what this host offers vmkit; `ok` is False when vmkit cannot run VMs."""
    report: dict[str, Any] = {"ok": True, "problems": []}
    path = hostinfo.qemu_path()
    report["qemu"] = {"path": path, "version": None, "supported": False,
                      "minimum": ".".join(map(str, hostinfo.MIN_QEMU))}
    if path is None:
        report["ok"] = False
        report["problems"].append({"message": f"{hostinfo.QEMU_BINARY} is not installed",
                                   "hint": hostinfo.INSTALL_HINT})
    else:
        version = hostinfo.qemu_version()
        report["qemu"]["version"] = ".".join(map(str, version))
        try:
            hostinfo.require_supported_qemu()
            report["qemu"]["supported"] = True
        except HostError as exc:
            report["ok"] = False
            report["problems"].append({"message": exc.message, "hint": exc.hint})
        report["qemu"]["q35"] = hostinfo.machine_aliases().get("q35")
    report["qemu_img"] = shutil.which("qemu-img")
    if report["qemu_img"] is None:
        report["ok"] = False
        report["problems"].append({"message": "qemu-img is not installed",
                                   "hint": "apt-get install qemu-utils (make run does it)"})
    report["qboot"] = Path("/usr/share/qemu/qboot.rom").exists()
    seabios = Path(LaunchOptions.seabios_dir) / FIRMWARE_FILES["seabios"]
    report["seabios"] = seabios.exists()  # new VMs boot it (vmgenid needs its ACPI loader)
    if not report["seabios"]:
        report["ok"] = False
        report["problems"].append({"message": f"SeaBIOS ({seabios}) is not installed",
                                   "hint": "apt-get install seabios (make run does it)"})
    memory_merging = ksm.read()
    wanted = host.policy().ksm
    report["ksm"] = {**memory_merging.as_dict(), "policy": wanted}
    if wanted is not None and memory_merging.available and memory_merging.running != wanted:
        report["problems"].append({
            "message": f"KSM is {'off' if wanted else 'on'} but the policy says "
                       f"{'on' if wanted else 'off'} (the host rebooted?)",
            "hint": "vmkit daemon applies it at start; or vmkit host set --ksm "
                    f"{'on' if wanted else 'off'}"})
    if path is not None:
        decision = host.accel()
        report["accelerator"] = {"chosen": decision.accel, "reason": decision.reason,
                                 "isolation_note": decision.isolation_note,
                                 "facts": decision.facts.model_dump()}
    driver = host.cgroups
    root = os.geteuid() == 0
    uid_range = uids.configured_range()
    report["isolation"] = {
        "qemu_user": (f"one uid/gid per VM from {uid_range.base}.."
                      f"{uid_range.base + uid_range.count - 1}") if root else None,
        "uid_registry": str(uids.registry_dir()) if root else None,
        "sandbox": jail.SANDBOX,
        "note": None if root else jail.why_not()}
    report["cgroup"] = {"mounted": _cgroup_version(),
                        "used": driver.version if driver else None,
                        "note": None if driver else cgroups_mod.why_not()}
    usage = shutil.disk_usage(host.layout.root)
    report["disk"] = {"home": str(host.layout.root), "free": usage.free, "total": usage.total}
    cap, pol = host.capacity(), host.policy()
    alloc = host.allocated()
    report["capacity"] = {"cores": cap.cores, "memory": cap.memory,
                          "vcpu_limit": vcpu_limit(cap, pol),
                          "memory_limit": memory_limit(cap, pol),
                          "allocated_cpus": alloc.cpus, "allocated_memory": alloc.memory,
                          "policy": pol.model_dump()}
    report["images"] = [i.name for i in catalog.list_images(host.layout)]
    return report
