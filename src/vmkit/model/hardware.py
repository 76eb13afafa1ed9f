"""Hardware independence, checked: can this VM's pinned virtual hardware run on that host?

A host describes what its QEMU offers (`HostCapabilities`: machine types, CPU models with the
features its accelerator cannot give, devices) and what it has room for. `preflight` compares a
VM's config with them and lists every reason to refuse — never only the first — so a move is
either possible or explained before anything is touched. `cpu_baseline` picks the newest CPU
model every given host runs, so a VM created with it can move among them. Pure: the capability
records come from QMP (query-machines, query-cpu-definitions) on each host."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from vmkit.model.network import USER_NETWORK
from vmkit.model.sizes import format_size
from vmkit.model.spec import VmConfig

#: x86 CPU models from oldest to newest within each vendor line; a baseline is the newest one
#: every host can run. The generic models (qemu64, kvm64) run everywhere and are the floor.
CPU_GENERATIONS: tuple[tuple[str, ...], ...] = (
    ("qemu64", "kvm64"),
    ("Conroe", "Penryn", "Nehalem", "Westmere", "SandyBridge", "IvyBridge", "Haswell",
     "Broadwell", "Skylake-Client", "Skylake-Server", "Cascadelake-Server", "Cooperlake",
     "Icelake-Server", "SapphireRapids", "GraniteRapids"),
    ("Opteron_G1", "Opteron_G2", "Opteron_G3", "Opteron_G4", "Opteron_G5", "EPYC", "EPYC-Rome",
     "EPYC-Milan", "EPYC-Genoa"),
)
_MACHINE_VERSION = re.compile(r"^pc-(q35|i440fx)-(\d+)\.(\d+)$")


class HostCapabilities(BaseModel):
    """What a host's QEMU and accelerator offer, and what room it has (a daemon answers it at
    GET /1.0/host/capabilities)."""

    model_config = ConfigDict(frozen=True)

    qemu_version: str
    accel: str
    machines: tuple[str, ...] = Field(description="versioned machine types QEMU offers")
    cpu_models: dict[str, tuple[str, ...]] = Field(description=(
        "CPU model -> the features this host cannot give it (empty: usable)"))
    devices: tuple[str, ...] = ()
    vms: tuple[str, ...] = ()
    networks: dict[str, str] = Field(default_factory=dict, description="name -> subnet")
    images: dict[str, str] = Field(default_factory=dict, description="name -> sha256")
    boot_files: tuple[str, ...] = Field(default=(), description=(
        "sha256 of the images' kernels and initrds here (a moving VM's equal ones stay home)"))
    memory_room: int = Field(description="memory the policy still lets a new VM have")
    vcpu_room: int = Field(description="vCPUs the policy still lets a new VM have")
    disk_free: int = Field(description="free bytes where the VM's folder would go")
    firmwares: tuple[str, ...] = Field(default=("qboot", "seabios"), description=(
        "the firmwares installed on this host (ovmf: UEFI)"))
    postcopy: bool = Field(default=False, description=(
        "whether a VM's QEMU may use userfaultfd here (post-copy migration)"))
    uid_range: tuple[int, int] | None = Field(default=None, description=(
        "the uids this host's VMs run as (base, count); None: vmkit is not root there"))


def machine_version(machine: str) -> tuple[int, int] | None:
    match = _MACHINE_VERSION.fullmatch(machine)
    return (int(match.group(2)), int(match.group(3))) if match else None


def _newest_like(machine: str, offered: Iterable[str]) -> str | None:
    match = _MACHINE_VERSION.fullmatch(machine)
    if match is None:
        return None
    family = [m for m in offered if (v := _MACHINE_VERSION.fullmatch(m))
              and v.group(1) == match.group(1)]
    return max(family, key=lambda m: machine_version(m) or (0, 0), default=None)


def preflight_disks(config: VmConfig) -> list[str]:
    """Why a running VM cannot move live because of its extra disks (empty: it can)."""
    if not config.disks:
        return []
    return [f"it has extra disks ({', '.join(d.name for d in config.disks)}): a live move "
            "carries the root disk only; stop it and use vmkit move"]


def preflight(config: VmConfig, caps: HostCapabilities, *, name: str, disk_bytes: int,
              running: bool, shared: bool = False) -> list[str]:
    """Every reason the destination described by `caps` cannot take this VM under `name`
    (`shared`: it would run the VM from the same folder on shared storage)."""
    reasons: list[str] = []
    hardware = config.hardware
    if name in caps.vms:
        reasons.append(f"a VM named {name!r} exists on the destination (use --name)")
    if hardware.machine not in caps.machines:
        newest = _newest_like(hardware.machine, caps.machines)
        older = newest is not None and (machine_version(newest) or (0, 0)) < (
            machine_version(hardware.machine) or (0, 0))
        reasons.append(
            f"machine type {hardware.machine} is not offered by the destination's QEMU "
            f"{caps.qemu_version}" + (f" (its newest is {newest}: older than the VM's)" if older
                                      else f" (it offers {newest})" if newest else ""))
    missing = caps.cpu_models.get(hardware.cpu_model)
    if missing is None:
        reasons.append(f"CPU model {hardware.cpu_model} is unknown to the destination's QEMU")
    elif missing:
        reasons.append(f"CPU model {hardware.cpu_model} lacks features on the destination "
                       f"({caps.accel}): {', '.join(sorted(missing))}")
    if caps.devices:
        absent = sorted(set(hardware.devices) - set(caps.devices))
        if absent:
            reasons.append(f"devices missing on the destination: {', '.join(absent)}")
    spec = config.spec
    if running and spec.memory_ceiling > caps.memory_room:
        reasons.append(f"not enough memory on the destination: the VM may use "
                       f"{format_size(spec.memory_ceiling)}, the policy leaves "
                       f"{format_size(caps.memory_room)}")
    if running and spec.cpus > caps.vcpu_room:
        reasons.append(f"not enough vCPUs on the destination: the VM has {spec.cpus}, the "
                       f"policy leaves {caps.vcpu_room}")
    if disk_bytes > caps.disk_free:
        reasons.append(f"not enough disk on the destination: the VM's files take "
                       f"{format_size(disk_bytes)}, {format_size(caps.disk_free)} are free")
    if running:
        reasons += preflight_disks(config)
    if shared and hardware.tpm:
        reasons.append("it has a TPM: its state cannot be handed between two hosts' swtpm on "
                       "shared storage yet (use --storage copy)")
    if config.media is not None:
        reasons.append(f"installation media {config.media} is in the CD-ROM drive: a file of "
                       f"this host (eject it first: vmkit media eject {name})")
    if config.hardware.firmware == "ovmf" and "ovmf" not in caps.firmwares:
        reasons.append("the destination has no UEFI firmware (apt-get install ovmf there)")
    for nic in config.nics:
        if nic.network == USER_NETWORK:
            continue
        if nic.network not in caps.networks:
            reasons.append(f"network {nic.network!r} does not exist on the destination "
                           "(create it there with the same subnet)")
    return reasons


def usable_models(cpu_models: Mapping[str, Iterable[str]]) -> set[str]:
    return {model for model, missing in cpu_models.items() if not list(missing)}


def cpu_baseline(hosts: Iterable[Mapping[str, Iterable[str]]]) -> str:
    """The newest CPU model (by CPU_GENERATIONS) that every host can run with all its
    features; qemu64 when no named generation is common to all."""
    common: set[str] | None = None
    for models in hosts:
        usable = usable_models(models)
        common = usable if common is None else common & usable
    if not common:
        return "qemu64"
    best: tuple[int, str] | None = None
    for line in CPU_GENERATIONS[1:]:
        for rank, model in enumerate(line):
            if model in common and (best is None or rank > best[0]):
                best = (rank, model)
    return best[1] if best else "qemu64"
