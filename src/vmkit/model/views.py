"""What front ends show: the answers of the engine's operations (VM status, snapshot rows,
networks, images, exec results, set results). Pure models shared by the SDK, the CLI, the
daemon's API and its remote clients, so a remote client needs none of the engine to read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vmkit.model.network import NetworkMode, Nic
from vmkit.model.restart import RestartPolicy
from vmkit.model.runtime import ExitRecord
from vmkit.model.spec import ExtraDisk, Limits
from vmkit.model.state import VmState

IMAGE_SCHEMA_VERSION = 1


class Usage(BaseModel):
    """Live use of a running VM, read from /proc, its cgroup and QMP (no helper process)."""

    model_config = ConfigDict(frozen=True)

    cpu_seconds: float
    cpu_percent_avg: float = Field(description="since start, percent of one host core")
    rss: int
    cgroup_memory: int | None
    vcpus: int
    memory_plugged: int = Field(description="boot RAM + hot-added DIMMs")
    memory_actual: int = Field(description="what the guest has after the balloon")
    disk_read: int
    disk_written: int
    disk_read_ops: int = 0
    disk_write_ops: int = 0


class VmStatus(BaseModel):
    """What `list` and `info` show; the keys are the stable JSON of `--format json`."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: VmState
    cpus: int
    memory: int
    disk: int
    image: str | None
    uuid: str
    mac: str
    pid: int | None
    uptime: float | None
    accel: str | None
    accel_reason: str | None
    isolation_note: str | None
    machine: str
    cpu_model: str
    folder: str
    disk_mode: str
    firmware: str | None = Field(default=None, description="seabios, ovmf, qboot...")
    boot: str | None = Field(default=None, description=(
        "kernel (direct kernel boot) or the firmware's boot order, e.g. disk,cdrom"))
    media: str | None = Field(default=None, description="the ISO in the CD-ROM drive")
    display: str | None = Field(default=None, description="none, or std: a screen (VNC)")
    vnc_socket: str | None = Field(default=None, description=(
        "the graphical console's VNC unix socket while the VM runs (display std)"))
    last_exit: ExitRecord | None
    qemu_status: str | None = None
    max_cpus: int
    max_memory: int
    limits: Limits
    usage: Usage | None = None
    guest: dict[str, Any] | None = Field(default=None, description="what the guest agent says")
    hostname: str | None = None
    ssh: str | None = Field(default=None, description="user@host:port while running")
    nics: list[Nic] = Field(default_factory=list, description="none: one restricted user NIC")
    disks: list[ExtraDisk] = Field(default_factory=list, description=(
        "extra disks besides the root disk (vmkit disk add)"))
    broken: str | None = Field(default=None, description="why the metadata cannot be read")
    restart_policy: RestartPolicy | None = Field(default=None, description=(
        "what the daemon does when QEMU ends"))
    restarts: dict[str, Any] | None = Field(default=None, description=(
        "the daemon's record: restarts in a row and in total, the last decision's reason"))


class DiskInfo(BaseModel):
    """One extra disk as `vmkit disk list` shows it."""

    model_config = ConfigDict(frozen=True)

    name: str
    size: int = Field(description="virtual size, bytes")
    used: int = Field(description="bytes its file takes on the host")
    file: str = Field(description="its file in the VM folder")


class SnapshotInfo(BaseModel):
    """One row of `snapshot list`."""

    model_config = ConfigDict(frozen=True)

    name: str
    parent: str | None
    depth: int
    created_at: float
    with_memory: bool
    taken_in: str
    quiesced: bool | None
    disk_bytes: int
    memory_bytes: int
    current: bool
    paused_ms: float | None = None


class NetworkInfo(BaseModel):
    """What `network list` and `network info` show."""

    model_config = ConfigDict(frozen=True)

    name: str
    subnet: str
    mode: NetworkMode
    gateway: str
    bridge: str
    up: bool
    dnsmasq: bool
    attached: list[dict[str, Any]]


class ImageInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = IMAGE_SCHEMA_VERSION
    name: str
    os: str
    kernel_version: str
    kernel: str = "vmlinuz"
    # the same kernel as an ELF with a PVH entry point (images/kernel.py); new VMs boot it
    pvh_kernel: str | None = None
    initrd: str = "initrd.img"
    root_disk: str
    cmdline: str
    recipe_hash: str
    sha256: str
    size: int
    virtual_size: int
    built_at: float
    packages: dict[str, str]
    cloud_init: bool = False  # reads a NoCloud seed (hostname, ssh keys, user-data)
    ssh_user: str | None = None  # runs an ssh server; the login keys are given to
    build_seconds: float | None = None
    suites: list[str] = Field(default_factory=list, description=(
        "the Debian suites it was built from (e.g. bookworm, bookworm-updates, "
        "bookworm-security)"))
    newer_packages: list[str] | None = Field(default=None, description=(
        "packages this host's apt has newer versions of (a rebuild updates them); None: not "
        "checked"))


@dataclass(frozen=True)
class ExecResult:
    """What a command run in the guest produced."""

    exit_code: int | None
    stdout: str
    stderr: str
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class SetResult:
    now: list[str] = field(default_factory=list)
    at_restart: list[str] = field(default_factory=list)
