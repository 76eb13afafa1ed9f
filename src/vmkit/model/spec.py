"""What a VM is: its requested share (spec), its identity and its pinned virtual hardware.

`VmConfig` is the versioned content of vm.json. Everything here is pure data plus validation.
"""

from __future__ import annotations

import random
import uuid as uuidlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmkit.errors import InvalidValue
from vmkit.model.cloudinit import CloudInit, instance_id_for
from vmkit.model.names import validate_name
from vmkit.model.network import Nic, nic_mac
from vmkit.model.sizes import parse_count, parse_size

SCHEMA_VERSION = 1
ROOT_DISK_FILE = "disks/root.qcow2"
Accel = Literal["auto", "kvm", "tcg"]


class Limits(BaseModel):
    """Shares and caps that can change while the VM runs (cgroups, I/O throttling)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_weight: int = Field(default=100, ge=1, le=10000, description="share under contention")
    cpu_limit: float | None = Field(default=None, gt=0, description="percent of one host core")
    disk_iops: int | None = Field(default=None, gt=0)
    disk_bps: int | None = Field(default=None, gt=0)
    pids: int = Field(default=512, ge=32, description="tasks in the VM's cgroup (QEMU threads)")


class VmSpec(BaseModel):
    """The share a user asked for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    image: str
    cpus: int = Field(ge=1)
    memory: int = Field(gt=0, description="bytes")
    disk: int = Field(gt=0, description="bytes of the VM's disk (virtual size)")
    full_copy: bool = False
    accel: Accel = "auto"
    max_cpus: int | None = Field(default=None, ge=1, description="room to hot-add vCPUs")
    max_memory: int | None = Field(default=None, gt=0, description="room to hot-add memory")
    limits: Limits = Limits()

    @property
    def cpu_ceiling(self) -> int:
        return max(self.cpus, self.max_cpus or self.cpus)

    @property
    def memory_ceiling(self) -> int:
        return max(self.memory, self.max_memory or self.memory)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return validate_name(value, kind="image name")


def make_spec(
    name: str, image: str, cpus: int | str, memory: int | str, disk: int | str,
    *, full_copy: bool = False, accel: str = "auto",
) -> VmSpec:
    """Build a spec from user input, with errors that name the field and the value."""
    validate_name(name)
    validate_name(image, kind="image name")
    cpu_count = parse_count(cpus, "cpus")
    if accel not in ("auto", "kvm", "tcg"):
        raise InvalidValue(f"invalid accel {accel!r}", hint="use auto, kvm or tcg")
    return VmSpec(
        name=name, image=image, cpus=cpu_count,
        memory=parse_size(memory, field="memory", default_unit="M"),
        disk=parse_size(disk, field="disk", default_unit="G"),
        full_copy=full_copy, accel=accel,
    )


class HardwareProfile(BaseModel):
    """Virtual hardware pinned at creation, so the VM sees the same machine on any host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    machine: str = Field(description="versioned machine type, e.g. pc-q35-10.0")
    cpu_model: str = "qemu64"
    firmware: str = "qboot"
    devices: tuple[str, ...] = (
        "virtio-blk-pci", "virtio-serial-pci", "virtio-net-pci", "virtio-balloon-pci",
        "virtio-rng-pci", "isa-serial",
    )
    hotplug_ports: int = Field(default=0, ge=0, le=16, description=(
        "empty PCIe root ports for NIC hot-plug (q35); 0 for VMs made before they existed"))


class BootConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel: str = Field(description="file name inside the VM folder")
    initrd: str
    cmdline: str


class VmConfig(BaseModel):
    """The content of vm.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    uuid: str
    mac: str
    created_at: float
    spec: VmSpec
    hardware: HardwareProfile
    boot: BootConfig
    disk_file: str = ROOT_DISK_FILE
    backing_file: str | None = Field(default=None, description="base image disk of an overlay")
    base_image_sha256: str | None = None
    cloud_init: CloudInit | None = Field(default=None, description="NoCloud seed inputs")
    ssh_user: str | None = Field(default=None, description="login of `vmkit ssh`; None: no sshd")
    ssh_identity: str | None = Field(default=None, description="host private key for vmkit ssh")
    nics: tuple[Nic, ...] = Field(default=(), description="none: one restricted user-mode NIC")


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def new_mac(rng: random.Random | None = None) -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 prefix."""
    r = rng or random.SystemRandom()
    return "52:54:00:" + ":".join(f"{r.randrange(256):02x}" for _ in range(3))


def with_hostname(cmdline: str, hostname: str) -> str:
    """The guest kernel command line with `vmkit.hostname=` set to `hostname` (and only once)."""
    words = [w for w in cmdline.split() if not w.startswith("vmkit.hostname=")]
    return " ".join([*words, f"vmkit.hostname={hostname}"])


def hostname_in(cmdline: str) -> str | None:
    """The `vmkit.hostname=` a kernel command line carries, if any."""
    for word in cmdline.split():
        if word.startswith("vmkit.hostname="):
            return word.split("=", 1)[1]
    return None


def as_new_machine(config: VmConfig, name: str, *, created_at: float) -> VmConfig:
    """A copy of a VM's config under `name` with an identity of its own: uuid, MAC, hostname
    and cloud-init instance-id (so cloud-init re-identifies it on its next boot)."""
    vm_uuid = new_uuid()
    seed = config.cloud_init
    if seed is not None:
        seed = seed.model_copy(update={"instance_id": instance_id_for(vm_uuid), "hostname": name})
    nics = tuple(nic.model_copy(update={"mac": nic_mac(vm_uuid, index), "address": None})
                 for index, nic in enumerate(config.nics))  # addresses: given at the next start
    return config.model_copy(update={
        "uuid": vm_uuid, "mac": new_mac(), "created_at": created_at, "cloud_init": seed,
        "nics": nics,
        "spec": config.spec.model_copy(update={"name": name}),
        "boot": config.boot.model_copy(update={"cmdline": with_hostname(config.boot.cmdline,
                                                                        name)}),
    })
