"""Bridges and taps through netlink (pyroute2): no strings handed to `ip`.

Only interfaces whose names carry vmkit's prefixes (vmkb*, vmkt*) are ever created or deleted.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vmkit.errors import HostError

BRIDGE_PREFIX = "vmkb"
TAP_PREFIX = "vmkt"


@contextmanager
def _netlink() -> Iterator[Any]:
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:  # pragma: no cover - a dependency of vmkit
        raise HostError("pyroute2 is not installed", hint="pip install pyroute2") from exc
    try:
        with IPRoute() as ipr:
            yield ipr
    except PermissionError as exc:
        raise HostError("changing network interfaces needs root (CAP_NET_ADMIN)",
                        hint="run as root, or use --network user") from exc


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _check_ours(name: str) -> None:
    if not name.startswith((BRIDGE_PREFIX, TAP_PREFIX)):
        raise HostError(f"refusing to touch interface {name!r}: not one of vmkit's")


def ensure_bridge(name: str, address: str, prefixlen: int) -> bool:
    """The bridge, up, with the network's gateway address; True when it had to be created."""
    _check_ours(name)
    with _netlink() as ipr:
        index = _index(ipr, name)
        created = index is None
        if index is None:
            ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
            index = _index(ipr, name)
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)}
        if address not in have:
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
        return created


def ensure_tap(name: str, bridge: str, *, uid: int | None, gid: int | None) -> None:
    """A persistent tap owned by QEMU's user, enslaved to `bridge`, up (created if missing).
    Only the tap changes; `bridge` may be the host's own (a bridged network)."""
    _check_ours(name)
    with _netlink() as ipr:
        index = _index(ipr, name)
        if index is None:
            owner: dict[str, Any] = {}
            if uid is not None:
                owner["uid"] = uid
            if gid is not None:
                owner["gid"] = gid
            ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                     ifr={"no_pi": True, "vnet_hdr": True}, **owner)
            index = _index(ipr, name)
        master = _index(ipr, bridge)
        if master is None:
            raise HostError(f"bridge {bridge} is missing", hint="vmkit network list")
        ipr.link("set", index=index, master=master, state="up")


def delete(name: str) -> bool:
    """Remove an interface of vmkit's; False when it did not exist (idempotent)."""
    _check_ours(name)
    with _netlink() as ipr:
        index = _index(ipr, name)
        if index is None:
            return False
        ipr.link("del", index=index)
        return True


def existing(prefix: str) -> list[str]:
    """Names of the interfaces that start with `prefix` (vmkit's bridges or taps)."""
    with _netlink() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(n for n in names if n and n.startswith(prefix))


def is_bridge(name: str) -> bool:
    """Whether `name` is a bridge on this host (read only: nothing is changed)."""
    with _netlink() as ipr:
        index = _index(ipr, name)
        if index is None:
            return False
        info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
        return info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge"


def exists(name: str) -> bool:
    with _netlink() as ipr:
        return _index(ipr, name) is not None


_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def open_tap(name: str) -> int:
    """An open descriptor on tap `name` for QEMU (it cannot open /dev/net/tun itself: it runs
    unprivileged and sandboxed). The caller closes it once QEMU holds its own copy."""
    _check_ours(name)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open /dev/net/tun: {exc.strerror}",
                        hint="load the tun module (modprobe tun) and run as root") from exc
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise HostError(f"cannot attach to tap {name}: {exc.strerror}") from exc
    return fd
