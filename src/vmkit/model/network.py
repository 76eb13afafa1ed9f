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
import re
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
DEFAULT_BIND = "127.0.0.1"  # where a forward listens unless the user names an address
ANY_ADDRESS = "0.0.0.0"
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")

# Everything below reaches nft scripts, dnsmasq files and QEMU options: only these shapes pass.
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")  # a Linux interface name, no quotes
_VMKIT_IFNAME = re.compile(r"vmk[bt][0-9a-f]{11}")


def validate_mac(value: object, *, field: str = "mac") -> str:
    """A unicast Ethernet address, lower case (the form vmkit writes)."""
    if not isinstance(value, str) or not _MAC.fullmatch(value.lower()):
        raise InvalidValue(f"invalid {field} {value!r}: not a MAC address",
                           hint="six hex pairs separated by ':', e.g. 52:54:00:12:34:56")
    mac = value.lower()
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise InvalidValue(f"invalid {field} {value!r}: not a unicast MAC address",
                           hint="the first octet must be even, e.g. 52:54:00:12:34:56")
    return mac


def validate_ipv4(value: object, *, field: str) -> str:
    """A dotted-quad IPv4 address, in its canonical form."""
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidValue(f"invalid {field} {value!r}: not an IPv4 address",
                           hint="e.g. 127.0.0.1, 0.0.0.0 (every address) or 198.18.10.10") \
            from None


def validate_ifname(value: object, *, field: str, vmkit_only: bool = False) -> str:
    pattern = _VMKIT_IFNAME if vmkit_only else _IFNAME
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidValue(f"invalid {field} {value!r}: not "
                           f"{'an interface name of vmkit' if vmkit_only else 'an interface name'}",
                           hint="vmkb/vmkt + 11 hex digits" if vmkit_only else
                           "1-15 characters A-Z, a-z, 0-9, '_', '.', '-'")
    return value


class PortForward(BaseModel):
    """HOST ADDRESS:HOST PORT -> GUEST PORT. `address` absent (vm.json from before addresses
    existed) reads as 127.0.0.1: such forwards used to answer on every local address; the safe
    reading is the host's loopback, and `--port 0.0.0.0:H:G` says "everywhere" explicitly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    proto: Proto = "tcp"
    address: str = Field(default=DEFAULT_BIND,
                         description="host IPv4 address it answers on; 0.0.0.0: every one")
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, value: object) -> str:
        return validate_ipv4(value, field="port forward address")

    @property
    def everywhere(self) -> bool:
        return self.address == ANY_ADDRESS

    @property
    def loopback(self) -> bool:
        return ipaddress.IPv4Address(self.address) in LOOPBACK

    def overlaps(self, other: PortForward) -> bool:
        """Whether both would claim the same host socket."""
        return (self.proto, self.host_port) == (other.proto, other.host_port) and (
            self.everywhere or other.everywhere or self.address == other.address)

    @property
    def hostfwd(self) -> str:
        """QEMU user-mode `hostfwd` value (address validated: no comma can reach it)."""
        return f"{self.proto}:{self.address}:{self.host_port}-:{self.guest_port}"

    def describe(self) -> str:
        return f"{self.address}:{self.host_port}/{self.proto}"


class Nic(BaseModel):
    """One NIC of a VM: on a vmkit network (tap on its bridge) or on QEMU user networking.
    Every field is checked: vm.json may come from an imported bundle, and these values end up
    in root's nftables script, dnsmasq's files and QEMU's options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    network: str
    mac: str
    address: str | None = Field(default=None, description="fixed DHCP lease (vmkit networks)")
    forwards: tuple[PortForward, ...] = ()
    restricted: bool = Field(default=False, description="user-mode only: no way out")

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: object) -> str:
        if value == USER_NETWORK:
            return USER_NETWORK
        return validate_name(value, kind="NIC network")  # type: ignore[arg-type]

    @field_validator("mac", mode="before")
    @classmethod
    def _mac(cls, value: object) -> str:
        return validate_mac(value, field="NIC mac")

    @field_validator("address", mode="before")
    @classmethod
    def _nic_address(cls, value: object) -> str | None:
        return None if value is None else validate_ipv4(value, field="NIC address")


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

    @field_validator("bridge", mode="before")
    @classmethod
    def _bridge(cls, value: object) -> str:
        # vmkit's own (vmkbXXXXXXXXXXX) or, for a bridged network, a host interface name
        return validate_ifname(value, field="network bridge")

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


_FORWARD_HINT = ("use [ADDRESS:]HOST:GUEST with ports 1-65535, optionally /tcp or /udp; "
                 "ADDRESS is the host's IPv4 address to answer on (default 127.0.0.1, "
                 "0.0.0.0 for every one), e.g. --port 8080:80 or --port 0.0.0.0:8080:80")


def parse_forward(value: str) -> PortForward:
    """`8080:80`, `8080:80/udp`, `198.18.1.5:8080:80`, `0.0.0.0:8080:80/udp` -> a port
    forward (host address : host port : guest port); the address defaults to 127.0.0.1."""
    ports, _, proto = value.partition("/")
    parts = ports.split(":")
    address = DEFAULT_BIND
    if len(parts) == 3:
        address = validate_ipv4(parts[0], field=f"port forward {value!r}: address")
        parts = parts[1:]
    try:
        if len(parts) != 2 or proto not in ("", "tcp", "udp") or \
                not all(p.isdigit() for p in parts):
            raise ValueError
        return PortForward(proto="udp" if proto == "udp" else "tcp", address=address,
                           host_port=int(parts[0]), guest_port=int(parts[1]))
    except ValueError:
        raise InvalidValue(f"invalid port forward {value!r}", hint=_FORWARD_HINT) from None


# -- rendering ------------------------------------------------------------------------------
class Attachment(BaseModel):
    """A NIC of some VM on some network, as the network's services need to know it."""

    model_config = ConfigDict(frozen=True)

    vm: str
    tap: str
    mac: str
    address: str | None  # None on a bridged network: the LAN's DHCP decides
    forwards: tuple[PortForward, ...] = ()

    @field_validator("vm", mode="before")
    @classmethod
    def _vm(cls, value: object) -> str:
        return validate_name(value, kind="VM name")  # type: ignore[arg-type]

    @field_validator("tap", mode="before")
    @classmethod
    def _tap(cls, value: object) -> str:
        return validate_ifname(value, field="tap", vmkit_only=True)

    @field_validator("mac", mode="before")
    @classmethod
    def _mac(cls, value: object) -> str:
        return validate_mac(value, field="NIC mac")

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, value: object) -> str | None:
        return None if value is None else validate_ipv4(value, field="NIC address")


_TABLE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _checked(networks: list[tuple[NetworkSpec, list[Attachment]]], table: str
             ) -> list[tuple[NetworkSpec, list[Attachment]]]:
    """The renderer's own wall: every value is validated again (a model built without
    validation, e.g. model_construct, is caught here), each fixed address lies inside its
    network and is no gateway, and no two NICs claim one address or MAC."""
    if not _TABLE.fullmatch(table):
        raise InvalidValue(f"invalid nftables table name {table!r}")
    result = []
    macs: dict[str, str] = {}
    for spec, attachments in networks:
        spec = NetworkSpec.model_validate(spec.model_dump())
        checked = [Attachment.model_validate(a.model_dump()) for a in attachments]
        seen: dict[str, str] = {}
        for a in checked:
            if a.mac in macs:
                raise InvalidValue(f"NIC mac {a.mac} of VM {a.vm!r} is also VM "
                                   f"{macs[a.mac]!r}'s", hint="every NIC needs its own MAC")
            macs[a.mac] = a.vm
            if a.address is None:
                if spec.managed:
                    raise InvalidValue(f"VM {a.vm!r} has no address on network {spec.name!r}")
                continue
            if not spec.managed:
                raise InvalidValue(f"NIC address {a.address} of VM {a.vm!r}: network "
                                   f"{spec.name!r} is bridged (the LAN assigns addresses)")
            ip, net = ipaddress.IPv4Address(a.address), spec.network
            if ip not in net or ip in (net.network_address, net.broadcast_address,
                                       spec.gateway):
                raise InvalidValue(f"invalid NIC address {a.address} of VM {a.vm!r}: not a "
                                   f"host address of network {spec.name!r} ({spec.subnet}) "
                                   "other than its gateway")
            if a.address in seen:
                raise InvalidValue(f"NIC address {a.address} of VM {a.vm!r} is also VM "
                                   f"{seen[a.address]!r}'s on network {spec.name!r}",
                                   hint="every NIC needs its own address")
            seen[a.address] = a.vm
        result.append((spec, checked))
    return result


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

    inet TABLE: forwarding policy between networks and out, NAT and port forwards. A forward
    answers only on the host address its user chose (127.0.0.1 unless told), never to traffic
    that comes in over a vmkit bridge (so no network reaches another's forwards through its
    own gateway), and a packet for 127.0.0.0/8 that arrives on an interface is never DNATed.
    bridge TABLE: what each tap may send: only from its NIC's MAC (and on vmkit's networks
    its IPv4 address, ARP included), only IPv4 and ARP on vmkit's networks (no IPv6: no
    router adverts, no neighbour spoofing), no DHCP server, no router advert or redirect.
    Every value is validated before it is written (see `_checked`).
    """
    everything = _checked(networks, table)
    networks = [(spec, attachments) for spec, attachments in everything if spec.managed]
    bridges = sorted(spec.bridge for spec, _ in networks)
    out: list[str] = [  # declare, then delete: works whether the tables exist or not
        f"table inet {table}",
        f"delete table inet {table}",
        f"table bridge {table}",
        f"delete table bridge {table}",
    ]
    if not everything:
        return "\n".join(out) + "\n"  # no network left: no table left
    ours = f"{{ {_set(bridges)} }}"
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
                    # a forward is for the host's side only, never for another network
                    out.append(f"    iifname != {ours} oifname \"{br}\" ip daddr {a.address} "
                               f"{f.proto} dport {f.guest_port} ct status dnat accept")
            if spec.mode == "nat":
                out.append(f"    iifname \"{br}\" oifname != {ours} accept")
            out.append(f"    iifname \"{br}\" drop")
            out.append(f"    oifname \"{br}\" drop")
    out.append("  }")
    out += ["  chain input {", "    type filter hook input priority filter; policy accept;"]
    if bridges:
        # route_localnet is on for bridges with loopback forwards (their replies come back
        # to 127.0.0.1): nothing new from a guest may reach the host's loopback (CVE-2020-8558)
        out.append(f"    iifname {ours} ip daddr {LOOPBACK} ct state != {{ established, "
                   "related } drop")
    for spec, _ in networks:
        # the host answers DHCP and DNS on a network, nothing else (isolated networks included)
        out.append(f"    iifname \"{spec.bridge}\" udp dport {{ 53, 67 }} accept")
        out.append(f"    iifname \"{spec.bridge}\" tcp dport 53 accept")
        out.append(f"    iifname \"{spec.bridge}\" ct state established,related accept")
        out.append(f"    iifname \"{spec.bridge}\" ip protocol icmp accept")
        out.append(f"    iifname \"{spec.bridge}\" drop")
    out.append("  }")
    out += ["  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;"]
    out += _dnat_rules(networks, incoming=True, ours=ours)
    out.append("  }")
    out += ["  chain output {", "    type nat hook output priority -100; policy accept;"]
    out += _dnat_rules(networks, incoming=False, ours=ours)
    out.append("  }")
    out += ["  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;"]
    for spec, attachments in networks:
        if any(a.forwards for a in attachments):
            # forwarded connections from the host itself (127.0.0.1 included) leave with the
            # gateway's address; on an isolated network every one does (its VMs have no route
            # back to anywhere but their own subnet)
            local = "fib saddr type local " if spec.mode == "nat" else ""
            out.append(f"    oifname \"{spec.bridge}\" ct status dnat {local}masquerade")
        if spec.mode == "nat":
            out.append(f"    ip saddr {spec.subnet} oifname != \"{spec.bridge}\" masquerade")
    out.append("  }")
    out.append("}")
    out += [f"table bridge {table} {{", "  chain prerouting {",
            "    type filter hook prerouting priority -300; policy accept;"]
    for _spec, attachments in everything:
        for a in attachments:
            tap = f"iifname \"{a.tap}\""
            out.append(f"    {tap} ether saddr != {a.mac} drop")
            if a.address is not None:  # vmkit's network: IPv4 and ARP only, from its address
                out.append(f"    {tap} ether type != {{ ip, arp }} counter drop")
                out.append(f"    {tap} ether type ip ip saddr != {{ 0.0.0.0, {a.address} }} "
                           "drop")
                out.append(f"    {tap} ether type arp arp saddr ip != {a.address} "
                           "arp saddr ip != 0.0.0.0 drop")
            else:  # on a bridged LAN only the MAC is known; IPv6 is the LAN's business
                out.append(f"    {tap} ether type != {{ ip, arp, ip6 }} counter drop")
                out.append(f"    {tap} ether type ip6 udp sport 547 counter drop")
                out.append(f"    {tap} ether type ip6 udp dport 546 counter drop")
                out.append(f"    {tap} ether type ip6 icmpv6 type {{ nd-router-advert, "
                           "nd-redirect } counter drop")
            out.append(f"    {tap} ether type arp arp saddr ether != {a.mac} drop")
            # no guest answers DHCP or redirects its neighbours' routes
            out.append(f"    {tap} ether type ip udp sport 67 counter drop")
            out.append(f"    {tap} ether type ip udp dport 68 counter drop")
            out.append(f"    {tap} ether type ip icmp type redirect counter drop")
    out += ["  }", "}"]
    return "\n".join(out) + "\n"


def _set(names: list[str]) -> str:
    return ", ".join(f"\"{n}\"" for n in names)


def _dnat_rules(networks: list[tuple[NetworkSpec, list[Attachment]]], *, incoming: bool,
                ours: str) -> list[str]:
    """DNAT for every forward, on the address its user chose only. `incoming` (prerouting):
    never from a vmkit bridge, never for 127.0.0.0/8 (loopback traffic only passes the output
    hook; a packet for 127.x that arrives on an interface is an attack). Output: the host's
    own connections, `curl 127.0.0.1:PORT` included."""
    rules = []
    for _spec, attachments in networks:
        for a in attachments:
            for f in a.forwards if a.address is not None else ():
                if f.everywhere:
                    where = f"ip daddr != {LOOPBACK} " if incoming else ""
                elif f.loopback and incoming:
                    continue
                else:
                    where = f"ip daddr {f.address} "
                source = f"iifname != {ours} " if incoming else ""
                rules.append(f"    {source}{where}fib daddr type local {f.proto} dport "
                             f"{f.host_port} dnat ip to {a.address}:{f.guest_port}")
    return rules


def needs_route_localnet(attachments: list[Attachment]) -> bool:
    """Whether a bridge must route replies for 127.0.0.1 (a forward on the host's loopback
    ends up on it); the input rule above keeps guests from starting anything towards it."""
    return any(f.loopback or f.everywhere for a in attachments for f in a.forwards)
