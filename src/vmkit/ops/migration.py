"""Moving a VM between hosts, first part: what a destination offers and whether a VM fits it.

`capabilities(host)` is the destination's side (GET /1.0/host/capabilities): its QEMU's
machine types and CPU models under its accelerator, and the room it has. `check(vm, caps)` is
the source's side: every reason the VM cannot move there (model/hardware.preflight), computed
before anything is touched."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from vmkit.core import networks as net_core
from vmkit.images import catalog
from vmkit.model.hardware import HostCapabilities, preflight
from vmkit.model.resources import memory_limit, vcpu_limit
from vmkit.model.spec import KNOWN_DEVICES
from vmkit.model.state import LIVE_STATES
from vmkit.qemu import hostinfo

if TYPE_CHECKING:
    from vmkit.core.engine import VM, Host


def capabilities(host: Host) -> HostCapabilities:
    accel = host.accel().accel
    machines, cpu_models = hostinfo.probe_capabilities(accel)
    capacity, policy = host.capacity(), host.policy()
    allocated = host.allocated()
    version = ".".join(map(str, hostinfo.qemu_version()))
    return HostCapabilities(
        qemu_version=version, accel=accel,
        machines=machines, cpu_models=cpu_models,
        devices=tuple(sorted(KNOWN_DEVICES)),
        vms=tuple(vm.name for vm in host.vms(include_broken=True)),
        networks={net.name: net.subnet or "" for net in net_core.definitions(host)},
        images={image.name: image.sha256 for image in catalog.list_images(host.layout)},
        memory_room=max(0, memory_limit(capacity, policy) - allocated.memory),
        vcpu_room=max(0, vcpu_limit(capacity, policy) - allocated.cpus),
        disk_free=shutil.disk_usage(host.layout.root).free)


def folder_bytes(vm: VM) -> int:
    """What the VM's folder takes on disk (allocated blocks: sparse layers count as written)."""
    total = 0
    for root, _dirs, files in os.walk(vm.folder.path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def check(vm: VM, caps: HostCapabilities, *, name: str | None = None) -> list[str]:
    """Every reason `vm` cannot move to the host described by `caps` (empty: it can)."""
    return preflight(vm.config, caps, name=name or vm.name, disk_bytes=folder_bytes(vm),
                     running=vm.state in LIVE_STATES)
