import pytest

from vmkit.errors import AdmissionRefused, InvalidValue
from vmkit.model.resources import (
    Allocation,
    HostCapacity,
    Policy,
    admit,
    check_fits_host,
    memory_limit,
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
