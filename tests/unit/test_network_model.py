"""Network definitions and NIC identities: pure checks with errors that say what to fix."""

from pathlib import Path

import pytest

from vmkit.errors import InvalidValue
from vmkit.model.network import (
    NetworkSpec,
    Nic,
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
    assert parse_forward("8080:80") == PortForward(proto="tcp", address="127.0.0.1",
                                                   host_port=8080, guest_port=80)
    assert parse_forward("5353:53/udp").proto == "udp"
    for bad in ("8080", "0:80", "8080:70000", "a:b", "80:80/sctp", "1:2:3:4", "8080:+80",
                " 8080:80"):
        with pytest.raises(InvalidValue, match="invalid port forward"):
            parse_forward(bad)


def test_port_forwards_bind_loopback_unless_an_address_is_given() -> None:
    assert parse_forward("8080:80").address == "127.0.0.1"
    every = parse_forward("0.0.0.0:8080:80/udp")
    assert (every.address, every.proto, every.everywhere) == ("0.0.0.0", "udp", True)
    assert parse_forward("198.18.1.5:8080:80").hostfwd == "tcp:198.18.1.5:8080-:80"
    assert parse_forward("8080:80").hostfwd == "tcp:127.0.0.1:8080-:80"
    for bad in ("localhost:8080:80", "::1:8080:80", "198.18.1.300:8080:80",
                "198.18.1.5,hostfwd=tcp::22-:22:8080:80", "1.2.3:8080:80"):
        with pytest.raises(InvalidValue, match="invalid port forward"):
            parse_forward(bad)
    # a vm.json from before addresses existed: its forwards now answer on 127.0.0.1 only
    old = PortForward.model_validate({"proto": "tcp", "host_port": 8080, "guest_port": 80})
    assert old.address == "127.0.0.1" and old.loopback
    a, b = parse_forward("127.0.0.1:8080:80"), parse_forward("198.18.1.5:8080:81")
    assert not a.overlaps(b) and a.overlaps(parse_forward("0.0.0.0:8080:22"))
    assert not a.overlaps(parse_forward("8080:80/udp"))


def test_nic_fields_are_validated_with_the_field_named() -> None:
    nic = Nic(network="lan", mac="52:54:00:AA:bb:01", address="198.18.10.10")
    assert nic.mac == "52:54:00:aa:bb:01"
    hostile: dict[str, list[object]] = {
        "mac": ['52:54:00:00:00:01"\n add rule inet vmkit input accept', "01:00:5e:00:00:01",
                "52:54:00:00:00", "ff:ff:ff:ff:ff:ff", 525400000001],
        "address": ["198.18.10.10 accept", "198.18.10.256", "::1"],
        "network": ["lan\"", "LAN", "-x"],
    }
    for field, values in hostile.items():
        for value in values:
            fields: dict[str, object] = {"network": "lan", "mac": "52:54:00:aa:bb:01",
                                         field: value}
            with pytest.raises(InvalidValue, match=f"invalid NIC {field}"):
                Nic.model_validate(fields)
    with pytest.raises(InvalidValue, match="invalid port forward address"):
        Nic.model_validate({"network": "user", "mac": "52:54:00:aa:bb:01", "forwards": [
            {"address": "0.0.0.0,hostfwd=tcp::22-:22", "host_port": 1, "guest_port": 1}]})
    for bridge in ('br0" accept', "br0 x", "a" * 16, ""):
        with pytest.raises(InvalidValue, match="invalid network bridge"):
            NetworkSpec(name="ext", mode="bridged", bridge=bridge)
    assert NetworkSpec(name="ext", mode="bridged", bridge="br-lan.10").bridge == "br-lan.10"


def test_proc_net_rows_name_the_sockets_that_hold_a_port() -> None:
    from vmkit.net.services import _claims, parse_proc_net

    tcp = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid "
           " timeout inode\n"
           "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0 "
           "       0 4242 1 0000000000000000 100 0 0 10 0\n")
    (row,) = parse_proc_net(tcp, v6=False)
    assert (str(row.address), row.port, row.state, row.inode) == ("127.0.0.1", 8080, "0A", 4242)
    tcp6 = ("  sl  local_address                         remote_address                        "
            "st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 "
            "0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0 100 0 0 10 0\n"
            "   1: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 "
            "0A 00000000:00000000 00:00000000 00000000     0        0 78 1 0 100 0 0 10 0\n")
    import ipaddress
    wild, mapped = parse_proc_net(tcp6, v6=True)
    assert (str(wild.address), wild.port) == ("::", 22)
    assert isinstance(mapped.address, ipaddress.IPv6Address)
    assert mapped.address.ipv4_mapped == ipaddress.IPv4Address("127.0.0.1")
    import ipaddress
    lo, other = ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv4Address("198.18.1.5")
    assert _claims(wild.address, other) and _claims(mapped.address, lo)
    assert not _claims(mapped.address, other)
    assert not _claims(ipaddress.IPv6Address("::1"), lo)
    assert _claims(row.address, ipaddress.IPv4Address("0.0.0.0"))


def test_a_port_in_use_is_refused_naming_its_holder() -> None:
    import os
    import socket

    from vmkit.net.services import check_port_free

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(InvalidValue) as caught:
            check_port_free("tcp", "127.0.0.1", port, what="port forward")
        assert f"127.0.0.1:{port}/tcp is in use by" in caught.value.message
        assert f"(pid {os.getpid()})" in caught.value.message
        with pytest.raises(InvalidValue, match="in use by"):
            check_port_free("tcp", "0.0.0.0", port, what="port forward")
        check_port_free("udp", "127.0.0.1", port, what="port forward")  # another protocol
    with pytest.raises(InvalidValue, match="not an address of this host"):
        check_port_free("tcp", "198.18.250.250", 8080, what="port forward")


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
