import pytest

from vmkit.errors import AdmissionRefused, InvalidValue
from vmkit.model.resources import (
    Allocation,
    HostCapacity,
    Policy,
    admit,
    check_fits_host,
    memory_limit,
    tcg_cache_for,
    vcpu_limit,
)

CAP = HostCapacity(cores=2, memory=8 << 30)


def test_default_policy_limits() -> None:
    assert vcpu_limit(CAP, Policy()) == 8
    assert memory_limit(CAP, Policy()) == 7 << 30


def test_admission_accepts_up_to_the_limit() -> None:
    admit("a", Allocation(cpus=2, memory=1 << 30), Allocation(cpus=6, memory=6 << 30), CAP,
          Policy())


def test_admission_refuses_memory_and_says_the_numbers() -> None:
    with pytest.raises(AdmissionRefused) as info:
        admit("db", Allocation(cpus=1, memory=2 << 30), Allocation(cpus=1, memory=6 << 30), CAP,
              Policy())
    message = info.value.message
    assert "allocated 6G" in message and "asked 2G" in message and "limit 7G" in message


def test_admission_refuses_vcpus() -> None:
    with pytest.raises(AdmissionRefused, match=r"allocated 7 \+ asked 2 = 9 > limit 8"):
        admit("db", Allocation(cpus=2, memory=1), Allocation(cpus=7, memory=0), CAP, Policy())


def test_policy_ratio_applies() -> None:
    policy = Policy(vcpu_ratio=1.0, memory_ratio=0.5, memory_reserve=0)
    assert vcpu_limit(CAP, policy) == 2
    assert memory_limit(CAP, policy) == 4 << 30


def test_single_vm_larger_than_host_is_invalid() -> None:
    with pytest.raises(InvalidValue, match="the host has 2 cores and allows 8 vCPUs"):
        check_fits_host("big", 9, 1 << 30, CAP, Policy())
    check_fits_host("overcommitted", 3, 1 << 30, CAP, Policy())  # 3 vCPUs on 2 cores is fine
    with pytest.raises(InvalidValue, match="more than the host can give"):
        check_fits_host("big", 1, 8 << 30, CAP, Policy())


@pytest.mark.parametrize("setting, memory, cache", [
    ("auto", 128 << 20, 32 << 20),  # the floor: a tiny guest boots as fast with it
    ("auto", 256 << 20, 64 << 20),
    ("auto", 512 << 20, 128 << 20),  # debian-12: as fast as QEMU's 1 GiB
    ("auto", 1000 << 20, 250 << 20),  # whole MiB
    ("auto", 64 << 30, 1 << 30),  # the ceiling
    ("qemu", 512 << 20, None),
    (48 << 20, 8 << 30, 48 << 20),
])
def test_the_tcg_cache_of_a_vm(setting: int | str, memory: int, cache: int | None) -> None:
    assert tcg_cache_for(Policy(tcg_cache=setting), memory) == cache


@pytest.mark.parametrize("bad", [1 << 20, 4 << 30, "big", -1])
def test_a_tcg_cache_out_of_range_is_refused(bad: int | str) -> None:
    with pytest.raises(ValueError):
        Policy(tcg_cache=bad)
