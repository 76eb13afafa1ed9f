"""Golden tests: dnsmasq and nftables configuration rendered for fixed networks.

Regenerate after an intended change with: VMKIT_UPDATE_GOLDEN=1 pytest tests/golden
"""

import os
from pathlib import Path

import pytest

from vmkit.errors import InvalidValue
from vmkit.model.network import (
    Attachment,
    NetworkSpec,
    PortForward,
    render_dhcp_hosts,
    render_dnsmasq,
    render_names,
    render_nftables,
)

HERE = Path(__file__).parent
LAN = NetworkSpec(name="lan", subnet="198.18.10.0/24", mode="nat", bridge="vmkb0000000001")
BACKEND = NetworkSpec(name="backend", subnet="198.18.20.0/24", mode="isolated",
                      bridge="vmkb0000000002")
WEB = Attachment(vm="web", tap="vmkt0123456789a", mac="52:54:00:aa:bb:01",
                 address="198.18.10.10", forwards=(
                     PortForward(host_port=8080, guest_port=80),  # 127.0.0.1 by default
                     PortForward(proto="udp", address="0.0.0.0", host_port=5353, guest_port=53),
                     PortForward(address="198.19.0.1", host_port=8443, guest_port=443)))
DB = Attachment(vm="db", tap="vmkt0123456789b", mac="52:54:00:aa:bb:02", address="198.18.10.11")
DB2 = Attachment(vm="db", tap="vmkt0123456789c", mac="52:54:00:aa:bb:03",
                 address="198.18.20.10")


def _check(name: str, text: str) -> None:
    golden = HERE / name
    if os.environ.get("VMKIT_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


def test_dnsmasq_nat_and_isolated() -> None:
    _check("dnsmasq_lan.conf", render_dnsmasq(LAN, "/var/lib/vmkit/networks/lan", upstream=True))
    isolated = render_dnsmasq(BACKEND, "/var/lib/vmkit/networks/backend", upstream=True)
    _check("dnsmasq_backend.conf", isolated)
    assert "no-resolv" in isolated and "dhcp-option=option:router\n" in isolated


def test_fixed_leases_and_names() -> None:
    assert render_dhcp_hosts([WEB, DB]) == ("52:54:00:aa:bb:01,198.18.10.10,web\n"
                                            "52:54:00:aa:bb:02,198.18.10.11,db\n")
    assert render_names(LAN, [DB, WEB]).splitlines() == [
        "198.18.10.1 gateway", "198.18.10.10 web", "198.18.10.11 db"]


def test_nftables_ruleset() -> None:
    ruleset = render_nftables([(BACKEND, [DB2]), (LAN, [WEB, DB])], table="vmkit_0123abcd")
    _check("nftables.nft", ruleset)
    # only vmkit's own tables are replaced
    tables = {line.split("{")[0].strip() for line in ruleset.splitlines()
              if line.startswith(("table", "delete table"))}
    assert tables == {"table inet vmkit_0123abcd", "delete table inet vmkit_0123abcd",
                      "table bridge vmkit_0123abcd", "delete table bridge vmkit_0123abcd"}
    assert "ip saddr 198.18.10.0/24 oifname != \"vmkb" in ruleset  # NAT for lan only
    assert "ip saddr 198.18.20.0/24" not in ruleset  # backend: no way out


def test_without_networks_the_tables_go() -> None:
    assert render_nftables([], table="vmkit_x").splitlines() == [
        "table inet vmkit_x", "delete table inet vmkit_x", "table bridge vmkit_x",
        "delete table bridge vmkit_x"]


def test_bridged_network_gets_only_mac_checks_and_no_routing() -> None:
    ext = NetworkSpec(name="ext", mode="bridged", bridge="br0")
    nic = Attachment(vm="web", tap="vmkt000000000ee", mac="52:54:00:aa:bb:0e", address=None)
    ruleset = render_nftables([(LAN, [DB]), (ext, [nic])], table="vmkit_t")
    assert '"br0"' not in ruleset  # the host's bridge is never named in a rule
    assert 'iifname "vmkt000000000ee" ether saddr != 52:54:00:aa:bb:0e drop' in ruleset
    assert 'iifname "vmkt000000000ee" ether type ip ip saddr' not in ruleset  # the LAN's job
    assert ruleset.count("masquerade") == 1  # lan's only


def test_forwards_answer_only_where_asked_and_never_to_a_vmkit_bridge() -> None:
    ruleset = render_nftables([(BACKEND, [DB2]), (LAN, [WEB, DB])], table="vmkit_t")
    pre = ruleset.split("chain prerouting {")[1].split("}\n  chain")[0]
    out = ruleset.split("chain output {")[1].split("}\n  chain")[0]
    ours = '{ "vmkb0000000001", "vmkb0000000002" }'
    # from outside: the chosen address, never a 127.x arriving on an interface, never a bridge
    assert "tcp dport 8080" not in pre  # a loopback forward is not reachable from outside
    assert f"iifname != {ours} ip daddr 198.19.0.1 fib daddr type local tcp dport 8443" in pre
    assert f"iifname != {ours} ip daddr != 127.0.0.0/8 fib daddr type local udp dport 5353" \
        in pre
    assert all(f"iifname != {ours}" in line for line in pre.splitlines() if "dnat" in line)
    # from the host itself: 127.0.0.1:8080 reaches web
    assert "ip daddr 127.0.0.1 fib daddr type local tcp dport 8080 dnat ip to 198.18.10.10:80" \
        in out
    # the forward chain lets DNATed traffic in only when it did not come from a vmkit bridge
    fwd = [line for line in ruleset.splitlines() if "ct status dnat accept" in line]
    assert fwd and all(line.strip().startswith(f"iifname != {ours}") for line in fwd)
    # guests never reach the host's loopback (route_localnet is on for replies)
    assert f"iifname {ours} ip daddr 127.0.0.0/8 ct state != {{ established, related }} drop" \
        in ruleset


def test_taps_send_no_dhcp_offers_no_ipv6_no_router_adverts() -> None:
    ruleset = render_nftables([(LAN, [DB])], table="vmkit_t")
    tap = 'iifname "vmkt0123456789b"'
    for rule in ("ether type != { ip, arp } counter drop",  # IPv6 (RA, NDP, DHCPv6), VLANs
                 "ether type ip udp sport 67 counter drop",
                 "ether type ip udp dport 68 counter drop"):
        assert f"{tap} {rule}" in ruleset
    ext = NetworkSpec(name="ext", mode="bridged", bridge="br0")
    nic = Attachment(vm="web", tap="vmkt000000000ee", mac="52:54:00:aa:bb:0e", address=None)
    bridged = render_nftables([(ext, [nic])], table="vmkit_t")
    assert ('iifname "vmkt000000000ee" ether type ip6 icmpv6 type { nd-router-advert, '
            'nd-redirect } counter drop') in bridged
    assert 'iifname "vmkt000000000ee" ether type ip udp sport 67 counter drop' in bridged


HOSTILE_MAC = '52:54:00:00:00:01 drop\n add rule inet vmkit_t input accept #'


def test_a_hostile_value_cannot_add_a_rule() -> None:
    from vmkit.model.network import Nic
    with pytest.raises(InvalidValue, match="invalid NIC mac"):
        Nic(network="lan", mac=HOSTILE_MAC)
    with pytest.raises(InvalidValue, match="invalid NIC mac"):
        Attachment(vm="web", tap="vmkt0123456789a", mac=HOSTILE_MAC, address="198.18.10.10")
    # a model built without validation is still refused by the renderer
    for hostile in (dict(mac=HOSTILE_MAC), dict(address='198.18.10.10" accept'),
                    dict(tap='vmkt01" accept'), dict(vm="web\nadd rule"),
                    dict(address="198.18.10.1"),  # the gateway: spoofing it
                    dict(address=DB.address)):  # a neighbour's address
        bad = Attachment.model_construct(**{**dict(WEB), **hostile})
        with pytest.raises(InvalidValue):
            render_nftables([(LAN, [bad, DB])], table="vmkit_t")
    bad_net = NetworkSpec.model_construct(**{**dict(LAN), "bridge": 'br0" accept'})
    with pytest.raises(InvalidValue, match="invalid network bridge"):
        render_nftables([(bad_net, [DB])], table="vmkit_t")
    with pytest.raises(InvalidValue):
        render_nftables([(LAN, [DB])], table="vmkit_t; flush ruleset")
