"""Virtual networks of a VMKIT_HOME: definitions under networks/NAME/network.json, brought to
life (and back after a host reboot) by `reconcile`.

Reconcile is idempotent and is the only place that makes the host match the definitions:
a bridge per network with its gateway address, dnsmasq with the fixed leases of every NIC on it,
one nftables ruleset in tables of this home's own, a tap per NIC of each live VM, and no tap of a
VM that is not running (a crashed VM's tap goes at the next operation).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.errors import AlreadyExists, HostError, InvalidState, InvalidValue, NotFound
from vmkit.model.names import validate_name
from vmkit.model.network import (
    USER_NETWORK,
    Attachment,
    NetworkMode,
    NetworkSpec,
    Nic,
    PortForward,
    bridge_name,
    check_no_overlap,
    free_subnet,
    needs_route_localnet,
    next_address,
    nft_table,
    nic_mac,
    parse_forward,
    parse_subnet,
    render_dhcp_hosts,
    render_dnsmasq,
    render_names,
    render_nftables,
    scope_of,
    tap_name,
)
from vmkit.model.state import LIVE_STATES
from vmkit.model.views import NetworkInfo
from vmkit.net import links, services
from vmkit.storage.layout import file_lock, read_json, write_json_atomic

if TYPE_CHECKING:
    from vmkit.core.engine import VM, Host

NETWORK_LOCK_TIMEOUT = 60.0
USER_MODE_SUBNET = "198.18.0.0/24"  # what user-mode NICs use inside QEMU


def _root(host: Host) -> Path:
    return host.layout.root / "networks"


def _folder(host: Host, name: str) -> Path:
    return _root(host) / name


def _scope(host: Host) -> str:
    return scope_of(str(host.layout.root))


@contextlib.contextmanager
def _lock(host: Host) -> Iterator[None]:
    host.layout.ensure()
    with file_lock(host.layout.locks / "network.lock", timeout=NETWORK_LOCK_TIMEOUT,
                   what="the network configuration"):
        yield


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise InvalidState(f"{what} needs root (bridges, taps, nftables)",
                           hint="run as root, or give VMs user-mode networking: --network user")


def definitions(host: Host) -> list[NetworkSpec]:
    root = _root(host)
    if not root.exists():
        return []
    return [NetworkSpec.model_validate(read_json(f / "network.json"))
            for f in sorted(root.iterdir()) if (f / "network.json").exists()]


def get(host: Host, name: str) -> NetworkSpec:
    validate_name(name, kind="network name")
    path = _folder(host, name) / "network.json"
    if not path.exists():
        known = ", ".join(n.name for n in definitions(host)) or "none"
        raise NotFound(f"unknown network {name!r} (networks: {known})",
                       hint=f"create it: vmkit network create {name}")
    return NetworkSpec.model_validate(read_json(path))


def create(host: Host, name: str, *, subnet: str | None = None, mode: NetworkMode = "nat",
           parent: str | None = None) -> NetworkSpec:
    """Define a network and bring it up; nothing is left behind when bringing it up fails.
    `bridged` puts VMs on the host's bridge `parent` (their LAN), which vmkit never changes."""
    _require_root("creating a network")
    if mode not in ("nat", "isolated", "bridged"):
        raise InvalidValue(f"invalid network mode {mode!r}",
                           hint="use --nat, --isolated or --bridged --parent BRIDGE")
    if (mode == "bridged") != (parent is not None):
        raise InvalidValue("--parent names the host bridge of a --bridged network, and only "
                           "that", hint="e.g. vmkit network create lan0 --bridged --parent br0")
    if mode == "bridged" and subnet is not None:
        raise InvalidValue("a bridged network takes no --subnet: the LAN's DHCP decides",
                           hint="drop --subnet")
    with _lock(host):
        existing = definitions(host)
        if any(n.name == name for n in existing):
            raise AlreadyExists(f"network {name!r} already exists",
                                hint=f"see vmkit network info {name}")
        if parent is not None:
            _check_parent(parent, existing)
            spec = NetworkSpec(name=name, mode=mode, bridge=parent, created_at=time.time())
        else:
            used = {n.name: n.subnet for n in existing}
            if subnet is None:
                subnet = free_subnet([*used.values(), USER_MODE_SUBNET])
            else:
                subnet = str(parse_subnet(subnet))
            check_no_overlap(subnet, {**used, "user-mode NICs": USER_MODE_SUBNET})
            spec = NetworkSpec(name=name, subnet=subnet, mode=mode,
                               bridge=bridge_name(_scope(host), name), created_at=time.time())
        folder = _folder(host, name)
        folder.mkdir(parents=True)
        try:
            write_json_atomic(folder / "network.json", spec.model_dump(mode="json"))
            _reconcile_locked(host)
        except BaseException:
            _tear_down(host, spec)
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(HostError):
                _reconcile_locked(host)
            raise
    return spec


def _check_parent(parent: str, existing: list[NetworkSpec]) -> None:
    if parent.startswith((links.BRIDGE_PREFIX, links.TAP_PREFIX)):
        raise InvalidValue(f"{parent!r} is one of vmkit's own interfaces",
                           hint="--parent names a bridge of the host's, e.g. br0")
    if not links.is_bridge(parent):
        raise InvalidValue(f"the host has no bridge {parent!r}",
                           hint="create it first (ip link add br0 type bridge) or name "
                                "another with --parent")
    taken = next((n.name for n in existing if n.bridge == parent), None)
    if taken is not None:
        raise AlreadyExists(f"bridge {parent!r} is network {taken!r} already")


def delete(host: Host, name: str) -> None:
    """Remove a network; refused while any VM has a NIC on it."""
    spec = get(host, name)
    with _lock(host):
        users = sorted({a.vm for a in _attachments(host).get(name, [])})
        if users:
            raise InvalidState(f"network {name!r} is in use by VM(s) {', '.join(users)}",
                               hint=f"remove their NICs first: vmkit nic remove VM {name}")
        _require_root("deleting a network")
        _tear_down(host, spec)
        shutil.rmtree(_folder(host, name), ignore_errors=True)
        _reconcile_locked(host)


def info(host: Host, name: str) -> NetworkInfo:
    return _info(host, get(host, name))


def list_networks(host: Host) -> list[NetworkInfo]:
    return [_info(host, spec) for spec in definitions(host)]


def _info(host: Host, spec: NetworkSpec) -> NetworkInfo:
    folder = _folder(host, spec.name)
    leases = _leases(folder)
    attached = []
    states = {vm.name: vm.state.value for vm in host.vms()}
    for a in _attachments(host).get(spec.name, []):
        attached.append({"vm": a.vm, "mac": a.mac, "address": a.address, "tap": a.tap,
                         "state": states.get(a.vm), "leased": a.mac in leases,
                         "forwards": [f.model_dump() for f in a.forwards]})
    up = os.geteuid() == 0 and links.exists(spec.bridge)
    return NetworkInfo(name=spec.name, subnet=spec.subnet or "", mode=spec.mode,
                       gateway=str(spec.gateway) if spec.managed else "", bridge=spec.bridge,
                       up=up,
                       dnsmasq=services.dnsmasq_running(folder), attached=attached)


def _leases(folder: Path) -> set[str]:
    try:
        return {line.split()[1] for line in (folder / "dnsmasq.leases").read_text().splitlines()
                if len(line.split()) > 2}
    except OSError:
        return set()


def _attachments(host: Host) -> dict[str, list[Attachment]]:
    """Every NIC of every VM of this home that is on a vmkit network, by network."""
    found: dict[str, list[Attachment]] = {}
    for vm in host.vms():
        config = vm.config
        for nic in config.nics:
            if nic.network == USER_NETWORK:
                continue
            found.setdefault(nic.network, []).append(Attachment(
                vm=vm.name, tap=tap_name(config.uuid, nic.mac), mac=nic.mac,
                address=nic.address, forwards=nic.forwards))
    return found


def reconcile(host: Host) -> None:
    """Make the host match the definitions (after a reboot, a crash, or any change)."""
    if not definitions(host):
        return
    _require_root("bringing networks up")
    with _lock(host):
        _reconcile_locked(host)


def _reconcile_locked(host: Host) -> None:
    specs = definitions(host)
    attachments = _attachments(host)
    live = {vm.name for vm in host.vms() if vm._record().state in LIVE_STATES}
    # a VM that is not running forwards nothing (its host port is free for another VM)
    forwarding = {name: [a if a.vm in live else a.model_copy(update={"forwards": ()})
                         for a in net_attachments]
                  for name, net_attachments in attachments.items()}
    if any(spec.mode == "nat" for spec in specs) or any(
            a.forwards for net_attachments in forwarding.values() for a in net_attachments):
        services.enable_forwarding()  # NAT out, or forwards in: the host routes
    for spec in specs:
        folder = _folder(host, spec.name)
        mine = [a for a in attachments.get(spec.name, []) if a.address is not None]
        if not spec.managed:
            continue  # the host's bridge: nothing of vmkit's to run on it
        new_bridge = links.ensure_bridge(spec.bridge, str(spec.gateway),
                                         spec.network.prefixlen)
        write_text(folder / "hosts", render_dhcp_hosts(mine))
        write_text(folder / "names", render_names(spec, mine))
        conf = folder / "dnsmasq.conf"
        wanted = render_dnsmasq(spec, str(folder), upstream=True)
        if new_bridge or (conf.exists() and conf.read_text() != wanted):
            # a dnsmasq bound to a bridge that was gone, or a changed config: restart it
            services.stop_dnsmasq(folder)
        write_text(conf, wanted)
        services.start_dnsmasq(folder, conf)
    services.apply_nftables(render_nftables(
        [(spec, forwarding.get(spec.name, [])) for spec in specs], table=nft_table(
            _scope(host))))
    for spec in specs:
        if spec.managed:  # only while a forward on the host's loopback needs it
            services.set_route_localnet(spec.bridge,
                                        needs_route_localnet(forwarding.get(spec.name, [])))
    for net_attachments in attachments.values():
        for a in net_attachments:
            if a.vm not in live:
                links.delete(a.tap)  # a tap outlives no VM


def _tear_down(host: Host, spec: NetworkSpec) -> None:
    services.stop_dnsmasq(_folder(host, spec.name))
    if os.geteuid() == 0 and spec.managed:
        links.delete(spec.bridge)  # never the host's bridge of a bridged network


def write_text(path: Path, text: str) -> None:
    """Write only when different (dnsmasq re-reads on SIGHUP; unchanged files stay put)."""
    if path.exists() and path.read_text() == text:
        return
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# -- VMs ------------------------------------------------------------------------------------
def prepare_start(vm: VM) -> None:
    """Before QEMU starts: its networks up with its leases and rules, a tap per NIC owned by
    the user QEMU runs as."""
    forwards = tuple(f for n in vm.config.nics for f in n.forwards)
    _check_forwards_free(vm.host, forwards, exclude=vm.name, live_only=True)
    nics = [n for n in vm.config.nics if n.network != USER_NETWORK]
    if not nics:
        return
    _require_root(f"starting VM {vm.name!r} on a vmkit network")
    host = vm.host
    owner = vm.owner()  # the tap belongs to the VM's own uid
    with _lock(host):
        specs = {n.name: n for n in definitions(host)}
        for nic in nics:
            if nic.network not in specs:
                raise NotFound(f"VM {vm.name!r} has a NIC on network {nic.network!r}, which "
                               "does not exist", hint=f"vmkit network create {nic.network}, "
                               f"or vmkit nic remove {vm.name} {nic.network}")
        addressed = with_addresses(host, vm.config.nics)  # a clone's NICs get theirs now
        if addressed != vm.config.nics:
            vm.save_config(vm.config.model_copy(update={"nics": addressed}))
            nics = [n for n in addressed if n.network != USER_NETWORK]
        _reconcile_locked(host)
        for nic in nics:
            links.ensure_tap(tap_name(vm.config.uuid, nic.mac), specs[nic.network].bridge,
                             uid=owner.uid if owner else None, gid=owner.gid if owner else None)


def open_taps(vm: VM) -> dict[str, int]:
    """NIC MAC -> an open descriptor on its tap (prepare_start made the taps)."""
    opened: dict[str, int] = {}
    try:
        for nic in vm.config.nics:
            if nic.network != USER_NETWORK:
                opened[nic.mac] = links.open_tap(tap_name(vm.config.uuid, nic.mac))
    except BaseException:
        for fd in opened.values():
            os.close(fd)
        raise
    return opened


def ensure_tap(vm: VM, nic: Nic) -> str:
    """The tap of one NIC (hot-plug), after the network learnt of the NIC."""
    host = vm.host
    owner = vm.owner()  # the tap belongs to the VM's own uid
    with _lock(host):
        _reconcile_locked(host)
        spec = {n.name: n for n in definitions(host)}[nic.network]
        tap = tap_name(vm.config.uuid, nic.mac)
        links.ensure_tap(tap, spec.bridge, uid=owner.uid if owner else None,
                         gid=owner.gid if owner else None)
    return tap


def release(vm: VM, nics: tuple[Nic, ...] | None = None) -> None:
    """Remove the taps of a VM's NICs (all, or `nics`): idempotent, also for a crashed VM."""
    if os.geteuid() != 0:
        return
    config = vm.config
    for nic in config.nics if nics is None else nics:
        if nic.network != USER_NETWORK:
            links.delete(tap_name(config.uuid, nic.mac))


def forget(host: Host) -> None:
    """Refresh leases and rules after VMs came or went (no-op without networks)."""
    if definitions(host) and os.geteuid() == 0:
        with _lock(host):
            _reconcile_locked(host)


def new_nics(host: Host, vm_uuid: str, networks: list[str], ports: list[str],
             existing: tuple[Nic, ...] = ()) -> tuple[Nic, ...]:
    """NICs for `networks` (in order; `user` is QEMU user-mode networking), the port forwards
    on the first of them, each with its MAC derived from the VM and its slot, and a fixed
    address on vmkit networks."""
    forwards = tuple(parse_forward(p) for p in ports)
    if forwards and not networks:
        networks = [USER_NETWORK]
    seen = {n.network for n in existing}
    for name in networks:
        if name in seen:
            raise InvalidValue(f"the VM already has a NIC on network {name!r}",
                               hint="one NIC per network")
        seen.add(name)
        if name != USER_NETWORK:
            get(host, name)
    if forwards and networks[0] != USER_NETWORK and not get(host, networks[0]).managed:
        raise InvalidValue(f"--port needs a NIC on a nat, isolated or user network; "
                           f"{networks[0]!r} is bridged (the LAN reaches the VM directly)",
                           hint="drop --port, or put the NIC with the forward first")
    _check_forwards_free(host, forwards)
    nics = []
    for offset, name in enumerate(networks):
        nics.append(Nic(network=name, mac=nic_mac(vm_uuid, len(existing) + offset),
                        forwards=forwards if offset == 0 else ()))
    return tuple(nics)


def _check_forwards_free(host: Host, forwards: tuple[PortForward, ...], *,
                         exclude: str | None = None, live_only: bool = False) -> None:
    """Refuse (exit 2) a forward whose host address:port another forward of this home or any
    program on the host holds already. At create and `nic add` every VM's forwards count; at
    start those of running VMs (a stopped VM forwards nothing)."""
    for index, f in enumerate(forwards):
        twin = next((g for g in forwards[:index] if g.overlaps(f)), None)
        if twin is not None:
            raise InvalidValue(f"invalid port forward: host port {f.describe()} is asked for "
                               f"twice ({twin.describe()})", hint="pick another host port")
    if not forwards:
        return
    for vm in host.vms():
        if vm.name == exclude or (live_only and vm._record().state not in LIVE_STATES):
            continue
        for g in (g for nic in vm.config.nics for g in nic.forwards):
            hit = next((f for f in forwards if f.overlaps(g)), None)
            if hit is not None:
                raise InvalidValue(f"invalid port forward: host port {hit.describe()} is in use "
                                   f"by another vmkit VM {vm.name!r} ({g.describe()})",
                                   hint="pick another host port")
    for f in forwards:
        services.check_port_free(f.proto, f.address, f.host_port,
                                 what=f"port forward {f.describe()}")


def with_addresses(host: Host, nics: tuple[Nic, ...]) -> tuple[Nic, ...]:
    """`nics` with a free fixed address for each NIC on a vmkit network that has none (the
    caller holds the network lock)."""
    used: dict[str, set[str]] = {}
    for network, attachments in _attachments(host).items():
        used[network] = {a.address for a in attachments if a.address is not None}
    result = []
    for nic in nics:
        spec = get(host, nic.network) if nic.network != USER_NETWORK else None
        if spec is not None and spec.managed and nic.address is None:
            taken = used.setdefault(nic.network, set())
            address = next_address(spec, taken)
            taken.add(address)
            nic = nic.model_copy(update={"address": address})
        result.append(nic)
    return tuple(result)


def locked(host: Host) -> contextlib.AbstractContextManager[None]:
    return _lock(host)
