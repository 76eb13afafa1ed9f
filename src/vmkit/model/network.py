"""Virtual networks, pure: their definitions, interface names, addresses, and the dnsmasq and
nftables configuration they imply. Adapters (vmkit.net) apply what these functions render.

A managed network is a Linux bridge with a gateway address, a dnsmasq serving DHCP (a fixed
lease per NIC MAC) and DNS for VM names, and rules in nftables tables of vmkit's own: NAT out
for `nat` networks, nothing out for `isolated` ones, no traffic between networks, port forwards
to VMs, and anti-spoofing per tap (a VM may only send from its own MAC and address). A
`bridged` network puts taps on a bridge of the host's (its LAN's DHCP decides addresses); vmkit
never changes that bridge, and only checks the source MAC of its taps there.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmkit.errors import InvalidValue
from vmkit.model.names import validate_name

NetworkMode = Literal["nat", "isolated", "bridged"]
Proto = Literal["tcp", "udp"]
USER_NETWORK = "user"  # QEMU user-mode networking: no root needed, no bridge
DEFAULT_POOL = ipaddress.IPv4Network("198.18.0.0/15")  # where default subnets are taken from
NFT_TABLE = "vmkit"
_FIRST_LEASE = 10  # .1 is the gateway; .2-.9 stay free for static use


class PortForward(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    proto: Proto = "tcp"
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)


class Nic(BaseModel):
    """One NIC of a VM: on a vmkit network (tap on its bridge) or on QEMU user networking."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    network: str
    mac: str
    address: str | None = Field(default=None, description="fixed DHCP lease (vmkit networks)")
    forwards: tuple[PortForward, ...] = ()
    restricted: bool = Field(default=False, description="user-mode only: no way out")


class NetworkSpec(BaseModel):
    """The content of networks/NAME/network.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    name: str
    subnet: str | None = Field(default=None, description="None for bridged: the LAN's own")
    mode: NetworkMode
    bridge: str = Field(description="Linux bridge: vmkit's own (unique per VMKIT_HOME and "
                                    "network name), or for bridged the host's (never changed)")
    created_at: float = 0.0

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value == USER_NETWORK:
            raise InvalidValue(f"invalid network name {value!r}: it is reserved for QEMU "
                               "user-mode networking", hint="pick another name")
        return validate_name(value, kind="network name")

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_subnet(value))

    @property
    def managed(self) -> bool:
        """vmkit runs its bridge, DHCP/DNS and routing; a bridged network is the host's LAN."""
        return self.mode != "bridged"

    @property
    def network(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise ValueError(f"network {self.name} ({self.mode}) has no subnet of vmkit's")
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def lease_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        net = self.network
        return net.network_address + _FIRST_LEASE, net.broadcast_address - 1


def parse_subnet(value: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise InvalidValue(f"invalid subnet {value!r}: {exc}",
                           hint="use a network address with a prefix, e.g. 198.18.10.0/24") \
            from None
    if not 16 <= net.prefixlen <= 28:
        raise InvalidValue(f"invalid subnet {value!r}: the prefix must be /16 to /28",
                           hint="e.g. 198.18.10.0/24")
    if not net.is_private:
        raise InvalidValue(f"invalid subnet {value!r}: not a private range",
                           hint="use a private range such as 198.18.0.0/15 or 10.0.0.0/8")
    return net


def check_no_overlap(subnet: str, others: dict[str, str | None]) -> None:
    net = ipaddress.IPv4Network(subnet)
    for name, other in sorted(others.items()):
        if other is not None and net.overlaps(ipaddress.IPv4Network(other)):
            raise InvalidValue(f"subnet {subnet} overlaps network {name!r} ({other})",
                               hint="pick a subnet no other network uses")


def free_subnet(used: list[str | None], *, prefix: int = 24) -> str:
    """The first /24 of 198.18.0.0/15 (skipping 198.18.0.0/24, used by user-mode NICs) that
    overlaps no network in `used`."""
    taken = [ipaddress.IPv4Network(u) for u in used if u is not None]
    for candidate in DEFAULT_POOL.subnets(new_prefix=prefix):
        if candidate.network_address == DEFAULT_POOL.network_address:
            continue
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise InvalidValue("no free subnet left in 198.18.0.0/15", hint="pass --subnet")


def scope_of(home: str) -> str:
    """What keeps two VMKIT_HOMEs on one host apart: their bridges and nftables tables."""
    return hashlib.sha256(home.encode()).hexdigest()[:8]


def bridge_name(scope: str, network: str) -> str:
    return interface_name("vmkb", f"{scope}/{network}")


def nft_table(scope: str) -> str:
    return f"{NFT_TABLE}_{scope}"


def interface_name(prefix: str, key: str) -> str:
    """A Linux interface name (15 characters at most) that is a stable function of `key`."""
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:15 - len(prefix)]


def tap_name(vm_uuid: str, mac: str) -> str:
    return interface_name("vmkt", f"{vm_uuid}/{mac}")


def nic_mac(vm_uuid: str, index: int, salt: str = "") -> str:
    """A NIC's MAC, derived from the VM's uuid and the NIC's slot: the same VM keeps it across
    restarts; a clone (a new uuid) gets a new one. Locally administered, QEMU's 52:54:00 prefix."""
    digest = hashlib.sha256(f"{vm_uuid}/{index}/{salt}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def next_address(spec: NetworkSpec, used: set[str]) -> str:
    first, last = spec.lease_range
    address = first
    while address <= last:
        if str(address) not in used:
            return str(address)
        address += 1
    raise InvalidValue(f"network {spec.name!r} ({spec.subnet}) has no free address left",
                       hint="detach a VM or use a larger subnet")


def parse_forward(value: str) -> PortForward:
    """`8080:80`, `8080:80/udp` -> a port forward (host port : guest port)."""
    ports, _, proto = value.partition("/")
    host, sep, guest = ports.partition(":")
    try:
        if not sep or proto not in ("", "tcp", "udp"):
            raise ValueError
        return PortForward(proto="udp" if proto == "udp" else "tcp", host_port=int(host),
                           guest_port=int(guest))
    except ValueError:
        raise InvalidValue(f"invalid port forward {value!r}",
                           hint="use HOST:GUEST with ports 1-65535, optionally /tcp or /udp, "
                                "e.g. --port 8080:80") from None


# -- rendering ------------------------------------------------------------------------------
class Attachment(BaseModel):
    """A NIC of some VM on some network, as the network's services need to know it."""

    model_config = ConfigDict(frozen=True)

    vm: str
    tap: str
    mac: str
    address: str | None  # None on a bridged network: the LAN's DHCP decides
    forwards: tuple[PortForward, ...] = ()


def render_dnsmasq(spec: NetworkSpec, folder: str, *, upstream: bool) -> str:
    """dnsmasq's configuration for one network. Leases are fixed per MAC in `hosts`, names in
    `names` (both re-read on SIGHUP); an isolated network is told of no router."""
    first, last = spec.lease_range
    lines = [
        f"# vmkit network {spec.name}: generated, do not edit",
        f"interface={spec.bridge}",
        "bind-interfaces",
        "except-interface=lo",
        f"listen-address={spec.gateway}",
        "strict-order",
        f"pid-file={folder}/dnsmasq.pid",
        f"dhcp-leasefile={folder}/dnsmasq.leases",
        f"dhcp-hostsfile={folder}/hosts",
        f"addn-hosts={folder}/names",
        f"dhcp-range={first},{last},{spec.network.netmask},1h",
        "dhcp-authoritative",
        "dhcp-ignore=tag:!known",  # only NICs vmkit attached get a lease
        f"domain={spec.name}.vmkit",
        f"local=/{spec.name}.vmkit/",
        "expand-hosts",
        "domain-needed",
        "bogus-priv",
    ]
    if spec.mode == "nat":
        lines += [f"dhcp-option=option:router,{spec.gateway}",
                  f"dhcp-option=option:dns-server,{spec.gateway}"]
    else:
        lines += ["dhcp-option=option:router", f"dhcp-option=option:dns-server,{spec.gateway}"]
    if not upstream or spec.mode == "isolated":
        lines.append("no-resolv")
    return "\n".join(lines) + "\n"


def render_dhcp_hosts(attachments: list[Attachment]) -> str:
    return "".join(f"{a.mac},{a.address},{a.vm}\n" for a in sorted(attachments,
                                                                   key=lambda a: a.address or ""))


def render_names(spec: NetworkSpec, attachments: list[Attachment]) -> str:
    rows = [f"{spec.gateway} gateway"]
    rows += [f"{a.address} {a.vm}" for a in sorted(attachments,
                                                    key=lambda a: a.address or "")]
    return "\n".join(rows) + "\n"


def render_nftables(networks: list[tuple[NetworkSpec, list[Attachment]]],
                    table: str = NFT_TABLE) -> str:
    """One atomic ruleset for every vmkit network: replaces vmkit's own tables and nothing else.

    inet TABLE: forwarding policy between networks and out, NAT and port forwards.
    bridge TABLE: anti-spoofing on each tap (source MAC and IPv4 address must be the NIC's).
    """
    everything = networks
    networks = [(spec, attachments) for spec, attachments in networks if spec.managed]
    bridges = sorted(spec.bridge for spec, _ in networks)
    out: list[str] = [  # declare, then delete: works whether the tables exist or not
        f"table inet {table}",
        f"delete table inet {table}",
        f"table bridge {table}",
        f"delete table bridge {table}",
    ]
    if not everything:
        return "\n".join(out) + "\n"  # no network left: no table left
    out.append(f"table inet {table} {{")
    out += ["  chain forward {", "    type filter hook forward priority filter; policy accept;"]
    if bridges:
        out.append("    ct state established,related accept")
        for spec, attachments in networks:
            br = spec.bridge
            # VMs of one network reach each other (seen here when br_netfilter is loaded)
            out.append(f"    iifname \"{br}\" oifname \"{br}\" accept")
            for a in attachments:
                for f in a.forwards:
                    out.append(f"    oifname \"{br}\" ip daddr {a.address} {f.proto} dport "
                               f"{f.guest_port} ct status dnat accept")
            if spec.mode == "nat":
                out.append(f"    iifname \"{br}\" oifname != {{ {_set(bridges)} }} accept")
            out.append(f"    iifname \"{br}\" drop")
            out.append(f"    oifname \"{br}\" drop")
    out.append("  }")
    out += ["  chain input {", "    type filter hook input priority filter; policy accept;"]
    for spec, _ in networks:
        # the host answers DHCP and DNS on a network, nothing else (isolated networks included)
        out.append(f"    iifname \"{spec.bridge}\" udp dport {{ 53, 67 }} accept")
        out.append(f"    iifname \"{spec.bridge}\" tcp dport 53 accept")
        out.append(f"    iifname \"{spec.bridge}\" ct state established,related accept")
        out.append(f"    iifname \"{spec.bridge}\" ip protocol icmp accept")
        out.append(f"    iifname \"{spec.bridge}\" drop")
    out.append("  }")
    out += ["  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;"]
    out += _dnat_rules(networks, "fib daddr type local")
    out.append("  }")
    out += ["  chain output {", "    type nat hook output priority -100; policy accept;"]
    out += _dnat_rules(networks, "fib daddr type local")
    out.append("  }")
    out += ["  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;"]
    for spec, attachments in networks:
        if any(a.forwards for a in attachments):
            # forwarded connections from the host itself leave with the gateway's address
            out.append(f"    oifname \"{spec.bridge}\" ct status dnat fib saddr type local "
                       f"masquerade")
        if spec.mode == "nat":
            out.append(f"    ip saddr {spec.subnet} oifname != \"{spec.bridge}\" masquerade")
    out.append("  }")
    out.append("}")
    out += [f"table bridge {table} {{", "  chain prerouting {",
            "    type filter hook prerouting priority -300; policy accept;"]
    for _spec, attachments in everything:
        for a in attachments:
            out.append(f"    iifname \"{a.tap}\" ether saddr != {a.mac} drop")
            if a.address is not None:  # on a bridged LAN only the MAC is known
                out.append(f"    iifname \"{a.tap}\" ether type ip ip saddr != {{ 0.0.0.0, "
                           f"{a.address} }} drop")
                out.append(f"    iifname \"{a.tap}\" ether type arp arp saddr ip != "
                           f"{a.address} arp saddr ip != 0.0.0.0 drop")
            out.append(f"    iifname \"{a.tap}\" ether type arp arp saddr ether != {a.mac} drop")
    out += ["  }", "}"]
    return "\n".join(out) + "\n"


def _set(names: list[str]) -> str:
    return ", ".join(f"\"{n}\"" for n in names)


def _dnat_rules(networks: list[tuple[NetworkSpec, list[Attachment]]], match: str) -> list[str]:
    rules = []
    for _spec, attachments in networks:
        for a in attachments:
            for f in a.forwards if a.address is not None else ():
                rules.append(f"    {match} {f.proto} dport {f.host_port} dnat ip to "
                             f"{a.address}:{f.guest_port}")
    return rules
