"""Golden tests: dnsmasq and nftables configuration rendered for fixed networks.

Regenerate after an intended change with: VMKIT_UPDATE_GOLDEN=1 pytest tests/golden
"""

import os
from pathlib import Path

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
                 address="198.18.10.10", forwards=(PortForward(host_port=8080, guest_port=80),
                                                   PortForward(proto="udp", host_port=5353,
                                                               guest_port=53)))
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
    nic = Attachment(vm="web", tap="vmkt000000000e", mac="52:54:00:aa:bb:0e", address=None)
    ruleset = render_nftables([(LAN, [DB]), (ext, [nic])], table="vmkit_t")
    assert '"br0"' not in ruleset  # the host's bridge is never named in a rule
    assert 'iifname "vmkt000000000e" ether saddr != 52:54:00:aa:bb:0e drop' in ruleset
    assert 'iifname "vmkt000000000e" ether type ip' not in ruleset  # the LAN assigns addresses
    assert ruleset.count("masquerade") == 1  # lan's only
