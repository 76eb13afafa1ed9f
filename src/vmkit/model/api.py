"""The host service's API vocabulary: request bodies, the operation object and the envelopes
(Incus's shape). Shared by the daemon (vmkit.daemon) and its clients (vmkit.client), so both
sides validate the same models and the OpenAPI document describes exactly these."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from vmkit.model.restart import RestartMode

API_VERSION = "1.0"
T = TypeVar("T")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRequest(_Request):
    name: str = Field(max_length=63)
    image: str = Field(default="tiny", max_length=63)
    cpus: int | str = 1
    memory: int | str = "256M"
    disk: int | str | None = Field(default=None, description=(
        "default 2G; a foreign disk keeps its own size unless this is larger"))
    full_copy: bool = False
    accel: str = Field(default="auto", max_length=8)
    start: bool = False
    wait: bool = False
    timeout: float = Field(default=180.0, gt=0, le=3600)
    max_cpus: int | str | None = None
    max_memory: int | str | None = None
    hostname: str | None = Field(default=None, max_length=253)
    ssh_keys: list[str] = Field(default_factory=list, max_length=64,
                                description="public key lines (not file names)")
    user_data: str | None = Field(default=None, max_length=1 << 20)
    networks: list[str] = Field(default_factory=list, max_length=16)
    ports: list[str] = Field(default_factory=list, max_length=64)
    restart: RestartMode = "no"
    autostart: bool = False
    cpu_model: str = Field(default="qemu64", max_length=64)
    firmware: Literal["bios", "uefi"] | None = None
    boot: str | None = Field(default=None, max_length=32, description="e.g. disk,cdrom")
    display: Literal["none", "std"] | None = None
    os_type: Literal["linux", "windows", "other"] = "linux"
    secure_boot: bool = False
    shared: str | None = Field(default=None, max_length=4096, description=(
        "a folder on shared storage (the same path on every host) for the VM's folder "
        "(accepted from root on the unix socket only)"))
    from_disk: str | None = Field(default=None, max_length=4096, description=(
        "a disk image path on the daemon's host (accepted from root on the unix socket only)"))
    iso: str | None = Field(default=None, max_length=4096, description=(
        "an ISO path on the daemon's host (accepted from root on the unix socket only)"))


class MediaRequest(_Request):
    path: str = Field(min_length=1, max_length=4096, description="an ISO on the daemon's host")


StateAction = Literal["start", "stop", "kill", "restart", "pause", "resume"]


class StateRequest(_Request):
    action: StateAction
    timeout: float | None = Field(default=None, gt=0, le=3600,
                                  description="stop: seconds before kill; start: --wait time")
    wait: bool = Field(default=False, description="start/restart: until the agent answers")


class SetRequest(_Request):
    cpus: int | str | None = None
    memory: int | str | None = None
    max_cpus: int | str | None = None
    max_memory: int | str | None = None
    disk_size: int | str | None = None
    cpu_weight: int | str | None = None
    cpu_limit: float | str | None = None
    disk_iops: int | str | None = None
    disk_bps: int | str | None = None
    restart: RestartMode | None = None
    max_restarts: int | None = Field(default=None, ge=0, le=1000)
    autostart: bool | None = None


class LoginRequest(_Request):
    token: str = Field(min_length=1, max_length=256)


class SnapshotRequest(_Request):
    name: str = Field(max_length=63)
    disk_only: bool = False


class CloneRequest(_Request):
    target: str = Field(max_length=63)
    linked: bool = False
    from_snapshot: str | None = Field(default=None, max_length=63)
    live: bool = False


class ExecRequest(_Request):
    argv: list[str] = Field(min_length=1, max_length=4096)
    stdin: str | None = Field(default=None, description="base64", max_length=64 << 20)
    timeout: float = Field(default=60.0, gt=0, le=86400)


class NicRequest(_Request):
    network: str = Field(max_length=63)
    ports: list[str] = Field(default_factory=list, max_length=64)


class DiskRequest(_Request):
    name: str = Field(max_length=63)
    size: str | int = Field(description="e.g. 10G, or bytes")


class NetworkRequest(_Request):
    name: str = Field(max_length=63)
    subnet: str | None = Field(default=None, max_length=64)
    mode: str = Field(default="nat", max_length=16)
    parent: str | None = Field(default=None, max_length=15)


class ImageBuildRequest(_Request):
    name: str = Field(max_length=63)
    force: bool = False
    packages: list[str] = Field(default_factory=list, max_length=256)


class OperationView(BaseModel):
    id: str
    kind: str
    description: str
    status: str
    status_code: int
    created_at: float
    updated_at: float
    resources: dict[str, list[str]]
    progress: dict[str, Any]
    may_cancel: bool
    result: Any = None
    error: dict[str, Any] | None = None
    requestor: str = ""


class ErrorBody(BaseModel):
    type: Literal["error"] = "error"
    error: str
    error_code: int
    error_class: str
    hint: str | None = None
    detail: str | None = None
    field: str | None = Field(default=None, description="the request field that was wrong")


class Sync(BaseModel, Generic[T]):
    type: Literal["sync"] = "sync"
    status: str = "Success"
    status_code: int = 200
    metadata: T


class Async(BaseModel):
    type: Literal["async"] = "async"
    status: str = "Operation created"
    status_code: int = 100
    operation: str
    metadata: OperationView


class ServerInfo(BaseModel):
    api_version: str = API_VERSION
    server: str = "vmkit"
    version: str
    home: str
    auth: Literal["trusted"] = "trusted"
    auth_method: str
    requestor: str
    listeners: list[str]


class TokenInfo(BaseModel):
    name: str
    created_at: float
    prefix: str = Field(description="first characters of the token, to tell tokens apart")


class Destination(_Request):
    """Where a VM moves: the destination daemon's URL, its pinned certificate and a token
    (the CLI reads them from its remotes; the source daemon talks to it with them)."""

    url: str = Field(max_length=2048, pattern=r"^https://")
    server_cert: str = Field(max_length=65536, description="PEM of the destination's certificate")
    token: str | None = Field(default=None, max_length=512)


class MigrateRequest(_Request):
    destination: Destination
    storage: Literal["auto", "shared", "copy"] = "auto"
    bandwidth: int | None = Field(default=None, ge=1 << 20, description="bytes/s")
    downtime_ms: int = Field(default=50, ge=1, le=2000)
    auto_converge: bool = False
    postcopy: bool = False
    name: str | None = Field(default=None, max_length=63)
    check: bool = Field(default=False, description="pre-flight only: the reasons, nothing moved")


class SharedStorageRequest(_Request):
    folder: str = Field(min_length=2, max_length=4096)
    nonce: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]+$")


class SharedPrepareRequest(SharedStorageRequest):
    name: str = Field(min_length=1, max_length=63)
    generation: int = Field(ge=1)
    live: bool = False


class IncomingRequest(_Request):
    key: str = Field(min_length=32, max_length=128, pattern=r"^[0-9a-f]+$")
    machine: dict[str, Any] | None = None
    paused: bool = False
    postcopy: bool = False
