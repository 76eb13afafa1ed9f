"""Partitioning arithmetic: host capacity, the overcommit policy, and the admission decision."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from vmkit.errors import AdmissionRefused, InvalidValue
from vmkit.model.sizes import format_size


class HostCapacity(BaseModel):
    model_config = ConfigDict(frozen=True)

    cores: int = Field(ge=1)
    memory: int = Field(gt=0, description="bytes of RAM")


# TCG's translated-code cache (QEMU's tb-size). QEMU's default is 1 GiB, filled as code runs and
# kept: a tiny guest's boot and idle life leave ~72 MiB of it. Capped, a full cache starts
# again, so too small a cap costs boot time (measured, TCG, bench/density.py):
#   tiny, 128 MiB: 32M 3.45 s (vs 3.49 s) and 46 MiB less host memory; 16M 5.2 s; 8M 13.5 s
#   debian-12, 512 MiB: 128M 35-36 s (vs 33-41 s); 64M 44.5 s; 32M 63-70 s
# so "auto" gives a VM a quarter of its memory, within [32 MiB, 1 GiB].
TCG_CACHE_MIN = 8 << 20
TCG_CACHE_MAX = 2 << 30
TCG_CACHE_AUTO = (32 << 20, 1 << 30)


def tcg_cache_for(policy: Policy, memory: int) -> int | None:
    """Bytes of translated code a TCG VM with `memory` bytes of boot RAM keeps; None: QEMU's
    own default."""
    if policy.tcg_cache == "qemu":
        return None
    if policy.tcg_cache == "auto":
        low, high = TCG_CACHE_AUTO
        return min(high, max(low, memory // 4 >> 20 << 20))
    return policy.tcg_cache


class Policy(BaseModel):
    """How far the host may be promised beyond its hardware (defaults as in the issue)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vcpu_ratio: float = Field(default=4.0, gt=0)
    memory_ratio: float = Field(default=1.0, gt=0)
    memory_reserve: int = Field(default=1 << 30, ge=0, description="bytes kept for the host")
    ksm: bool | None = Field(default=None, description=(
        "kernel same-page merging across VMs: on, off, or None to leave the host's setting"))
    tcg_cache: Annotated[int, Field(ge=TCG_CACHE_MIN, le=TCG_CACHE_MAX)] | Literal[
        "auto", "qemu"] = Field(default="auto", description=(
            "bytes of translated code each TCG VM keeps (QEMU's tb-size; full, it starts "
            "again); auto: a quarter of the VM's memory within 32 MiB..1 GiB; qemu: QEMU's "
            "own default (1 GiB)"))


class Allocation(BaseModel):
    model_config = ConfigDict(frozen=True)

    cpus: int = 0
    memory: int = 0


def vcpu_limit(capacity: HostCapacity, policy: Policy) -> int:
    return int(capacity.cores * policy.vcpu_ratio)


def memory_limit(capacity: HostCapacity, policy: Policy) -> int:
    return max(0, int((capacity.memory - policy.memory_reserve) * policy.memory_ratio))


def check_fits_host(name: str, cpus: int, memory: int, capacity: HostCapacity,
                    policy: Policy) -> None:
    """A single VM may not be larger than the whole host could ever give it."""
    cpu_cap = vcpu_limit(capacity, policy)
    if cpus > cpu_cap:
        raise InvalidValue(
            f"invalid cpus {cpus} for VM {name!r}: the host has {capacity.cores} cores and "
            f"allows {cpu_cap} vCPUs (x{policy.vcpu_ratio})",
            hint=f"use --cpus between 1 and {cpu_cap}",
        )
    limit = memory_limit(capacity, policy)
    if memory > limit:
        raise InvalidValue(
            f"invalid memory {format_size(memory)} for VM {name!r}: more than the host can give "
            f"({format_size(limit)} = RAM {format_size(capacity.memory)} minus reserve "
            f"{format_size(policy.memory_reserve)}, x{policy.memory_ratio})",
            hint=f"use --memory {format_size(limit)} or less",
        )


def admit(name: str, ask: Allocation, allocated: Allocation, capacity: HostCapacity,
          policy: Policy) -> None:
    """Refuse a start that would push the host past its policy, saying by how much."""
    cpu_cap = vcpu_limit(capacity, policy)
    if allocated.cpus + ask.cpus > cpu_cap:
        raise AdmissionRefused(
            f"cannot start VM {name!r}: vCPUs allocated {allocated.cpus} + asked {ask.cpus} "
            f"= {allocated.cpus + ask.cpus} > limit {cpu_cap} "
            f"({capacity.cores} cores x{policy.vcpu_ratio})",
            hint="stop another VM or give this one fewer vCPUs",
        )
    mem_cap = memory_limit(capacity, policy)
    if allocated.memory + ask.memory > mem_cap:
        raise AdmissionRefused(
            f"cannot start VM {name!r}: memory allocated {format_size(allocated.memory)} + asked "
            f"{format_size(ask.memory)} = {format_size(allocated.memory + ask.memory)} > limit "
            f"{format_size(mem_cap)} (RAM {format_size(capacity.memory)} minus reserve "
            f"{format_size(policy.memory_reserve)}, x{policy.memory_ratio})",
            hint="stop another VM or give this one less memory",
        )
