"""What a VM is: its requested share (spec), its identity and its pinned virtual hardware.

`VmConfig` is the versioned content of vm.json. Everything here is pure data plus validation.
"""

from __future__ import annotations

import math
import random
import re
import uuid as uuidlib
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vmkit.errors import InvalidValue
from vmkit.model.cloudinit import CloudInit, instance_id_for
from vmkit.model.names import validate_name
from vmkit.model.network import Nic, nic_mac
from vmkit.model.restart import RestartPolicy
from vmkit.model.sizes import parse_count, parse_size

SCHEMA_VERSION = 1
ROOT_DISK_FILE = "disks/root.qcow2"
Accel = Literal["auto", "kvm", "tcg"]

# -- field checks -----------------------------------------------------------------------------
# Every field of vm.json is checked here, so a value from a bundle (or a hand-edited file) that
# reaches QEMU's options, the ssh argv or root's file operations has one accepted shape. Each
# refusal is an InvalidValue (exit 2) that names the field, the value and what is accepted.
FIRMWARES = frozenset({"qboot", "seabios", "microvm", "ovmf"})  # qemu/argv.py FIRMWARE_FILES
#: what a user asks for (--firmware) -> the firmware pinned in the hardware profile
FIRMWARE_CHOICES = {"bios": "seabios", "uefi": "ovmf"}
#: where the firmware may look for something to boot, in the order the user gives (--boot)
BOOT_DEVICES = ("disk", "cdrom", "network")
#: the VM's own UEFI variable store (a copy of OVMF's template made at creation)
NVRAM_FILE = "disks/nvram.fd"
#: swtpm's permanent state (the TPM's keys): in the VM's tpm/, carried by bundles
TPM_STATE_FILE = "tpm/tpm2-00.permall"
#: extra disks (vmkit disk add): one qcow2 file each, in the VM folder's own volumes/
VOLUMES_DIR = "volumes"
DISKS_LIMIT = 8  # extra disks per VM (each takes a PCIe root port)
DISK_NAME_LIMIT = 20  # a virtio disk's serial holds 20 bytes: the guest sees the whole name
DISPLAYS = ("none", "std")
CDROM_BUSES = ("none", "scsi", "sata")
DISK_BUSES = ("virtio", "sata")
NIC_MODELS = ("virtio-net-pci", "e1000e")
_CHOICES = {"disk_bus": DISK_BUSES, "nic_model": NIC_MODELS, "cdrom": CDROM_BUSES,
            "display": DISPLAYS}
#: --os-type: the devices a guest of that kind has drivers for without extra media (what
#: virt-install's OS defaults give); linux: virtio everything
OS_TYPES = ("linux", "windows", "other")
# vmgenid's guest buffer address reaches QEMU through the ACPI linker/loader's WRITE_POINTER
# command. qboot stops at that command (its loader knows ALLOCATE, ADD_POINTER, CHECKSUM and
# panics on anything else: the guest never boots, measured), so only SeaBIOS carries vmgenid.
VMGENID_FIRMWARES = frozenset({"seabios"})
# firmwares whose -kernel loader enters an ELF kernel at its PVH note (images/kernel.py; OVMF
# loads a bzImage's EFI stub only)
PVH_FIRMWARES = frozenset({"seabios", "qboot", "microvm"})
KNOWN_DEVICES = frozenset({
    "virtio-blk-pci", "virtio-serial-pci", "virtio-net-pci", "virtio-balloon-pci",
    "virtio-rng-pci", "isa-serial", "pcie-root-port", "pc-dimm", "virtserialport",
    "VGA", "ide-cd", "scsi-cd", "virtio-scsi-pci", "ide-hd", "e1000e", "tpm-crb",
})
MACHINE_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # no ',', '=' or spaces: one option
CPU_MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # e.g. Skylake-Client-v4
SSH_USER_PATTERN = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # never starts with '-' and has no '@'
UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
RELATIVE_PATH_PATTERN = re.compile(r"[A-Za-z0-9._/-]{1,255}")
DISK_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\.qcow2")
CMDLINE_LIMIT = 2048  # x86 Linux COMMAND_LINE_SIZE
PATH_LIMIT = 4096  # PATH_MAX
MAX_VCPUS = 4096  # the most QEMU's q35 accepts


def shown(value: object, limit: int = 80) -> str:
    """A value as it appears in an error message: repr (control characters visible), cut."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid(field: str, value: object, accepted: str) -> InvalidValue:
    return InvalidValue(f"invalid {field} {shown(value)}: expected {accepted}")


def check_pattern(field: str, value: str, pattern: re.Pattern[str], accepted: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise invalid(field, value, accepted)
    return value


def check_relative_path(field: str, value: str, *, under: str | None = None,
                        suffix: str = "") -> str:
    """A path inside the VM folder: relative, only [A-Za-z0-9._/-], no '.', '..' or empty
    component; optionally in folder `under` and ending with `suffix`."""
    accepted = ("a relative path inside the VM folder of A-Z a-z 0-9 . _ / - "
                "(no '..', not absolute)")
    if under is not None:
        accepted += f", in {under}/"
    if suffix:
        accepted += f", ending in {suffix}"
    if not isinstance(value, str) or not RELATIVE_PATH_PATTERN.fullmatch(value):
        raise invalid(field, value, accepted)
    parts = value.split("/")
    if any(part in ("", ".", "..") for part in parts) or \
            (under is not None and (len(parts) != 2 or parts[0] != under)) or \
            not parts[-1].endswith(suffix) or parts[-1] == suffix:
        raise invalid(field, value, accepted)
    return value


def check_absolute_path(field: str, value: str) -> str:
    """An absolute host path: no control characters, no '..' component, at most PATH_MAX."""
    accepted = "an absolute path without control characters or '..' components"
    if not isinstance(value, str) or not value.startswith("/") or len(value) > PATH_LIMIT or \
            not value.isprintable() or ".." in value.split("/"):
        raise invalid(field, value, accepted)
    return value


def check_mac(field: str, value: str) -> str:
    """A unicast MAC (not all zeros) in lower-case hex colon form."""
    accepted = "a unicast MAC in lower-case hex colon form, e.g. 52:54:00:12:34:56"
    check_pattern(field, value, MAC_PATTERN, accepted)
    if int(value[:2], 16) & 1 or value == "00:00:00:00:00:00":
        raise invalid(field, value, accepted)
    return value


class Limits(BaseModel):
    """Shares and caps that can change while the VM runs (cgroups, I/O throttling)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_weight: int = Field(default=100, ge=1, le=10000, description="share under contention")
    cpu_limit: float | None = Field(default=None, gt=0, le=100 * MAX_VCPUS,
                                    description="percent of one host core")
    disk_iops: int | None = Field(default=None, gt=0, le=1 << 40)
    disk_bps: int | None = Field(default=None, gt=0, le=1 << 60)
    pids: int = Field(default=512, ge=32, le=1 << 22,  # the kernel's PID_MAX_LIMIT
                      description="tasks in the VM's cgroup (QEMU threads)")

    @field_validator("cpu_limit")
    @classmethod
    def _cpu_limit(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise invalid("spec.limits.cpu_limit", value, "a finite percentage")
        return value


class VmSpec(BaseModel):
    """The share a user asked for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    image: str | None = Field(description="the vmkit image it was made from; None for a VM "
                              "made from a foreign disk or installed from media")
    cpus: int = Field(ge=1, le=MAX_VCPUS)
    memory: int = Field(gt=0, le=1 << 52, description="bytes")
    disk: int = Field(gt=0, le=1 << 60, description="bytes of the VM's disk (virtual size)")
    full_copy: bool = False
    accel: Accel = "auto"
    max_cpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS,
                                 description="room to hot-add vCPUs")
    max_memory: int | None = Field(default=None, gt=0, le=1 << 52,
                                   description="room to hot-add memory")
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
    def _image(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, kind="image name")


def make_spec(
    name: str, image: str | None, cpus: int | str, memory: int | str, disk: int | str,
    *, full_copy: bool = False, accel: str = "auto",
) -> VmSpec:
    """Build a spec from user input, with errors that name the field and the value."""
    validate_name(name)
    if image is not None:
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
    display: str = Field(default="none", description=(
        "none (serial console only) or std: a VGA device shown over VNC on a unix socket"))
    disk_bus: str = Field(default="virtio", description=(
        "virtio (virtio-blk) or sata (q35's AHCI: an OS without virtio drivers)"))
    nic_model: str = Field(default="virtio-net-pci", description=(
        "virtio-net-pci, or e1000e for an OS without virtio drivers"))
    rtc_localtime: bool = Field(default=False, strict=True, description=(
        "the real-time clock in the host's local time (what Windows expects)"))
    tpm: bool = Field(default=False, strict=True, description=(
        "a TPM 2.0 (tpm-crb) backed by a swtpm process of the VM's own, state in tpm/"))
    secure_boot: bool = Field(default=False, strict=True, description=(
        "UEFI Secure Boot (OVMF's SMM build, Microsoft's keys enrolled): only signed boot "
        "loaders start"))
    cdrom: str = Field(default="none", description=(
        "the CD-ROM drive: none, scsi (on virtio-scsi: what a Linux kernel without AHCI, "
        "like Debian's cloud kernel, sees) or sata (q35's AHCI: what every OS has a driver "
        "for); SeaBIOS and OVMF boot from both"))
    hotplug_ports: int = Field(default=0, ge=0, le=16, description=(
        "empty PCIe root ports for NIC hot-plug (q35); 0 for VMs made before they existed"))
    vmgenid: bool = Field(default=False, strict=True, description=(
        "a VM generation ID device (QEMU's vmgenid, guid=auto): each restore or incoming "
        "migration shows the guest a new id, so a kernel with the driver reseeds its RNG; "
        "False for VMs made before it existed (their machine stays the same)"))

    @field_validator("machine")
    @classmethod
    def _machine(cls, value: str) -> str:
        return check_pattern("hardware.machine", value, MACHINE_PATTERN,
                             "a QEMU machine type such as pc-q35-10.0: 1-64 characters "
                             "a-z 0-9 . _ -, starting with a letter or digit")

    @field_validator("cpu_model")
    @classmethod
    def _cpu_model(cls, value: str) -> str:
        return check_pattern("hardware.cpu_model", value, CPU_MODEL_PATTERN,
                             "a QEMU CPU model such as qemu64: 1-64 characters A-Z a-z 0-9 "
                             ". _ -, starting with a letter or digit (no extra options)")

    @field_validator("firmware")
    @classmethod
    def _firmware(cls, value: str) -> str:
        if value not in FIRMWARES:
            raise invalid("hardware.firmware", value, "one of " + ", ".join(sorted(FIRMWARES)))
        return value

    @field_validator("disk_bus", "nic_model", "cdrom", "display")
    @classmethod
    def _choice(cls, value: str, info: ValidationInfo) -> str:
        choices = _CHOICES[str(info.field_name)]
        if value not in choices:
            raise invalid(f"hardware.{info.field_name}", value, "one of " + ", ".join(choices))
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for device in value:
            if device not in KNOWN_DEVICES:
                raise invalid("hardware.devices", device,
                              "device names from " + ", ".join(sorted(KNOWN_DEVICES)))
        if len(value) > len(KNOWN_DEVICES) * 4:
            raise invalid("hardware.devices", value, f"at most {len(KNOWN_DEVICES) * 4} names")
        return value

    @model_validator(mode="after")
    def _secure_boot_firmware(self) -> HardwareProfile:
        if self.secure_boot and self.firmware != "ovmf":
            raise invalid("hardware.secure_boot", self.secure_boot,
                          "false with firmware " + repr(self.firmware) + " (Secure Boot is "
                          "UEFI's: --firmware uefi)")
        return self

    @model_validator(mode="after")
    def _vmgenid_firmware(self) -> HardwareProfile:
        if self.vmgenid and self.firmware not in VMGENID_FIRMWARES:
            raise invalid("hardware.vmgenid", self.vmgenid,
                          "false with firmware " + repr(self.firmware) + " (a vmgenid device "
                          "needs firmware " + ", ".join(sorted(VMGENID_FIRMWARES)) + ")")
        return self


class BootConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kernel: str = Field(description="file name inside the VM folder")
    initrd: str
    cmdline: str

    @field_validator("kernel", "initrd")
    @classmethod
    def _file(cls, value: str, info: ValidationInfo) -> str:
        return check_relative_path(f"boot.{info.field_name}", value)

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, value: str) -> str:
        if len(value) > CMDLINE_LIMIT or not all(" " <= ch <= "~" for ch in value):
            raise invalid("boot.cmdline", value, f"printable ASCII (no control characters), "
                                                 f"at most {CMDLINE_LIMIT} characters")
        return value


class ExtraDisk(BaseModel):
    """A disk besides the root disk: its own qcow2 file (volumes/NAME.qcow2), a virtio disk in
    the guest whose serial is its name (/dev/disk/by-id/virtio-NAME). Independent of the
    snapshot tree, as an Incus custom volume is: a snapshot and its restore leave it as it is;
    clones, bundles and cold moves carry it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    size: int = Field(description="bytes (virtual size), 1 to 2^60")

    @field_validator("size")
    @classmethod
    def _size(cls, value: int) -> int:
        if not 0 < value <= 1 << 60:
            raise invalid("disk size", value, "1 byte to 1 EiB")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        validate_name(value, kind="disk name")
        if len(value) > DISK_NAME_LIMIT:
            raise InvalidValue(f"invalid disk name {value!r}: too long ({DISK_NAME_LIMIT} "
                               "characters at most: the guest reads it as the disk's serial)",
                               hint="pick a shorter name, e.g. data or logs")
        return value

    @property
    def file(self) -> str:
        return f"{VOLUMES_DIR}/{self.name}.qcow2"


def disk_names(*configs: VmConfig | None) -> str:
    """The extra disks of these configs (a VM's vm.json, the machine its QEMU started as), by
    name: "" when none has one."""
    names = dict.fromkeys(d.name for c in configs if c is not None for d in c.disks)
    return ", ".join(names)


class VmConfig(BaseModel):
    """The content of vm.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    uuid: str
    mac: str
    created_at: float
    spec: VmSpec
    hardware: HardwareProfile
    boot: BootConfig | None = Field(default=None, description=(
        "direct kernel boot (vmkit's images); None: the firmware boots from boot_order"))
    boot_order: tuple[str, ...] = Field(default=("disk",), description=(
        "where the firmware looks for something to boot, first to last"))
    media: str | None = Field(default=None, description=(
        "the ISO in the CD-ROM drive: a host path, opened read-only by vmkit and handed to "
        "QEMU as a descriptor; referenced, never copied"))
    disk_file: str = ROOT_DISK_FILE
    backing_file: str | None = Field(default=None, description="base image disk of an overlay")
    base_image_sha256: str | None = None
    cloud_init: CloudInit | None = Field(default=None, description="NoCloud seed inputs")
    ssh_user: str | None = Field(default=None, description="login of `vmkit ssh`; None: no sshd")
    ssh_identity: str | None = Field(default=None, description="host private key for vmkit ssh")
    nics: tuple[Nic, ...] = Field(default=(), description="none: one restricted user-mode NIC")
    disks: tuple[ExtraDisk, ...] = Field(default=(), description=(
        "extra disks besides the root disk, in the order the guest sees them"))
    restart: RestartPolicy = Field(default_factory=RestartPolicy,
                                   description="what the host service does when QEMU ends")
    generation: int = Field(default=0, ge=0, description="ownership generation: each move "
                            "to another host adds one (model/migration.may_start)")

    @field_validator("schema_version")
    @classmethod
    def _schema_version(cls, value: int) -> int:
        if not 1 <= value <= SCHEMA_VERSION:
            raise invalid("schema_version", value, f"1 to {SCHEMA_VERSION} (this vmkit's)")
        return value

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return check_pattern("uuid", value, UUID_PATTERN,
                             "a UUID in lower-case canonical form (8-4-4-4-12 hex digits)")

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        return check_mac("mac", value)

    @field_validator("created_at")
    @classmethod
    def _created_at(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise invalid("created_at", value, "a time in seconds since 1970")
        return value

    @field_validator("boot_order")
    @classmethod
    def _boot_order(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_boot_order(value)

    @field_validator("media")
    @classmethod
    def _media(cls, value: str | None) -> str | None:
        return None if value is None else check_absolute_path("media", value)

    @field_validator("disks")
    @classmethod
    def _disks(cls, value: tuple[ExtraDisk, ...]) -> tuple[ExtraDisk, ...]:
        names = [disk.name for disk in value]
        if len(names) > DISKS_LIMIT:
            raise invalid("disks", f"{len(names)} disks", f"at most {DISKS_LIMIT} extra disks")
        if len(set(names)) != len(names):
            raise invalid("disks", ", ".join(names), "each disk name once")
        return value

    @model_validator(mode="after")
    def _media_needs_drive(self) -> VmConfig:
        if self.media is not None and self.hardware.cdrom == "none":
            raise invalid("media", self.media, "none: the VM has no CD-ROM drive")
        if self.boot is None and self.hardware.firmware not in FIRMWARE_CHOICES.values():
            raise invalid("hardware.firmware", self.hardware.firmware,
                          "seabios or ovmf for a VM that boots from its disk or media "
                          "(qboot and microvm boot a kernel only)")
        return self

    @field_validator("disk_file")
    @classmethod
    def _disk_file(cls, value: str) -> str:
        return check_relative_path("disk_file", value, suffix=".qcow2")

    @field_validator("backing_file")
    @classmethod
    def _backing_file(cls, value: str | None) -> str | None:
        """An absolute path (the image's base disk, a linked clone's source layer) or a file
        name in the VM's own disks/ folder (a bundle's flattened base)."""
        if value is None:
            return None
        if value.startswith("/"):
            return check_absolute_path("backing_file", value)
        return check_pattern("backing_file", value, DISK_NAME_PATTERN,
                             "an absolute path, or a .qcow2 file name in disks/")

    @field_validator("base_image_sha256")
    @classmethod
    def _base_image_sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_pattern("base_image_sha256", value, SHA256_PATTERN,
                             "64 lower-case hex digits")

    @field_validator("ssh_user")
    @classmethod
    def _ssh_user(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_pattern("ssh_user", value, SSH_USER_PATTERN,
                             "a login name: 1-32 characters a-z 0-9 _ -, starting with a "
                             "letter or _")

    @field_validator("ssh_identity")
    @classmethod
    def _ssh_identity(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_absolute_path("ssh_identity", value)


def check_boot_order(order: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    accepted = ("1 to 3 of " + ", ".join(BOOT_DEVICES) + ", each once, e.g. disk,cdrom")
    if not order or len(order) > len(BOOT_DEVICES) or len(set(order)) != len(order) or \
            any(device not in BOOT_DEVICES for device in order):
        raise invalid("boot order", ",".join(map(str, order)), accepted)
    return tuple(order)


def parse_boot_order(text: str) -> tuple[str, ...]:
    return check_boot_order([part.strip() for part in text.split(",") if part.strip()])


def os_type_hardware(os_type: str) -> dict[str, object]:
    """The HardwareProfile fields an OS type implies (each can be overridden by its option)."""
    if os_type == "windows":
        return {"cdrom": "sata", "disk_bus": "sata", "nic_model": "e1000e",
                "rtc_localtime": True, "tpm": True, "firmware": "ovmf"}
    if os_type == "other":
        return {"cdrom": "sata", "disk_bus": "sata", "nic_model": "e1000e"}
    return {"cdrom": "scsi"}


def parse_firmware(choice: str) -> str:
    """--firmware bios|uefi -> the pinned firmware (seabios, ovmf)."""
    if choice not in FIRMWARE_CHOICES:
        raise InvalidValue(f"invalid firmware {choice!r}",
                           hint="use --firmware bios (SeaBIOS) or --firmware uefi (OVMF)")
    return FIRMWARE_CHOICES[choice]


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
        "nics": nics, "generation": 0,
        "spec": config.spec.model_copy(update={"name": name}),
        "boot": None if config.boot is None else config.boot.model_copy(
            update={"cmdline": with_hostname(config.boot.cmdline, name)}),
    })
