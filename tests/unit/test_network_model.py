"""Network definitions and NIC identities: pure checks with errors that say what to fix."""

from pathlib import Path

import pytest

from vmkit.errors import InvalidValue
from vmkit.model.network import (
    NetworkSpec,
    PortForward,
    bridge_name,
    check_no_overlap,
    free_subnet,
    next_address,
    nic_mac,
    parse_forward,
    parse_subnet,
    scope_of,
    tap_name,
)


def test_port_forwards() -> None:
    assert parse_forward("8080:80") == PortForward(proto="tcp", host_port=8080, guest_port=80)
    assert parse_forward("5353:53/udp").proto == "udp"
    for bad in ("8080", "0:80", "8080:70000", "a:b", "80:80/sctp"):
        with pytest.raises(InvalidValue, match="invalid port forward"):
            parse_forward(bad)


def test_subnets() -> None:
    assert str(parse_subnet("198.18.10.0/24")) == "198.18.10.0/24"
    with pytest.raises(InvalidValue, match="prefix must be"):
        parse_subnet("10.0.0.0/8")
    with pytest.raises(InvalidValue, match="not a private range"):
        parse_subnet("8.8.8.0/24")
    with pytest.raises(InvalidValue, match="invalid subnet"):
        parse_subnet("198.18.10.1/24")  # a host address, not the network's
    with pytest.raises(InvalidValue, match="overlaps network 'lan'"):
        check_no_overlap("198.18.10.128/25", {"lan": "198.18.10.0/24"})
    assert free_subnet(["198.18.0.0/24", "198.18.1.0/24"]) == "198.18.2.0/24"


def test_addresses_and_names() -> None:
    spec = NetworkSpec(name="lan", subnet="198.18.10.0/28", mode="nat", bridge="vmkbx")
    assert str(spec.gateway) == "198.18.10.1"
    assert next_address(spec, set()) == "198.18.10.10"
    assert next_address(spec, {"198.18.10.10", "198.18.10.11"}) == "198.18.10.12"
    with pytest.raises(InvalidValue, match="no free address"):
        next_address(spec, {f"198.18.10.{i}" for i in range(10, 15)})
    with pytest.raises(InvalidValue, match="reserved"):
        NetworkSpec(name="user", subnet="198.18.10.0/24", mode="nat", bridge="vmkbx")
    # interface names fit Linux's 15 characters and keep two homes apart
    one, two = scope_of("/var/lib/vmkit"), scope_of("/tmp/vmk-x")
    assert bridge_name(one, "lan") != bridge_name(two, "lan")
    assert len(bridge_name(one, "a" * 63)) <= 15 and len(tap_name("u" * 36, "m" * 17)) <= 15


def test_nic_macs_are_stable_per_vm_and_new_per_clone() -> None:
    assert nic_mac("uuid-1", 0) == nic_mac("uuid-1", 0)
    assert nic_mac("uuid-1", 0) != nic_mac("uuid-1", 1) != nic_mac("uuid-2", 1)
    assert nic_mac("uuid-1", 0).startswith("52:54:00:")


def test_without_root_networks_are_refused_with_the_user_mode_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmkit import Host
    from vmkit.errors import InvalidState

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    host = Host(tmp_path)
    with pytest.raises(InvalidState, match="needs root") as caught:
        host.create_network("lan")
    assert "--network user" in (caught.value.hint or "")
    assert host.networks() == []
