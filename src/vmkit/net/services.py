"""dnsmasq per network and vmkit's nftables tables: start, reload, stop, apply.

Each function is idempotent: starting a running dnsmasq reloads it, stopping a stopped one is a
no-op, and the ruleset is replaced as a whole (`nft -f` is atomic).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from vmkit.errors import HostError, InvalidValue, OperationTimeout

DNSMASQ_START_TIMEOUT = 10.0
NFT_TIMEOUT = 30.0


def _pid(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that process is a running dnsmasq."""
    try:
        pid = int(pidfile.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "dnsmasq" else None


def dnsmasq_running(folder: Path) -> bool:
    return _pid(folder / "dnsmasq.pid") is not None


def start_dnsmasq(folder: Path, config: Path) -> None:
    """Run dnsmasq for a network (daemonised, its pid in folder/dnsmasq.pid), or make the
    running one re-read its hosts files."""
    pidfile = folder / "dnsmasq.pid"
    pid = _pid(pidfile)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)  # re-reads dhcp-hostsfile and addn-hosts
        return
    try:
        done = subprocess.run(["dnsmasq", f"--conf-file={config}",
                               f"--log-facility={folder / 'dnsmasq.log'}"],
                              capture_output=True, text=True, timeout=DNSMASQ_START_TIMEOUT,
                              check=False)
    except FileNotFoundError as exc:
        raise HostError("dnsmasq is not installed",
                        hint="apt-get install dnsmasq-base (make run installs it)") from exc
    if done.returncode != 0:
        raise HostError(f"dnsmasq did not start for {folder.name}",
                        detail=(done.stderr or done.stdout).strip())
    deadline = time.monotonic() + DNSMASQ_START_TIMEOUT
    while _pid(pidfile) is None:
        if time.monotonic() > deadline:
            raise OperationTimeout(f"dnsmasq of {folder.name} wrote no pid file within "
                                   f"{DNSMASQ_START_TIMEOUT:g}s")
        time.sleep(0.05)


def stop_dnsmasq(folder: Path, timeout: float = 5.0) -> None:
    pidfile = folder / "dnsmasq.pid"
    pid = _pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def apply_nftables(ruleset: str) -> None:
    """Replace vmkit's tables with `ruleset` in one transaction."""
    try:
        done = subprocess.run(["nft", "-f", "-"], input=ruleset, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise HostError("nft is not installed",
                        hint="apt-get install nftables (make run installs it)") from exc
    if done.returncode != 0:
        raise HostError("nftables refused vmkit's ruleset", detail=done.stderr.strip())


def enable_forwarding() -> None:
    """NAT networks route through the host: IPv4 forwarding must be on."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if path.read_text().strip() != "1":
        path.write_text("1\n")


def set_route_localnet(bridge: str, on: bool) -> None:
    """Let `bridge` carry packets for 127.0.0.0/8: the replies of a forward the host reached on
    its loopback come back through it (masqueraded, then un-NATed to 127.0.0.1). Only vmkit's
    bridges, and the ruleset drops anything new from a guest towards 127.0.0.0/8
    (CVE-2020-8558)."""
    if not bridge.startswith("vmkb"):
        raise HostError(f"refusing to change interface {bridge!r}: not one of vmkit's")
    path = Path(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet")
    wanted = "1" if on else "0"
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() != wanted:
            path.write_text(wanted + "\n")


# -- who holds a host port --------------------------------------------------------------------
class ProcSocket(NamedTuple):
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    state: str  # hex, as the kernel writes it: 0A is TCP LISTEN, 07 an unconnected UDP socket
    inode: int


def parse_proc_net(text: str, *, v6: bool) -> list[ProcSocket]:
    """Rows of /proc/net/{tcp,udp}{,6}: local address, port, state, inode."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        hexaddr, _, hexport = fields[1].partition(":")
        raw = bytes.fromhex(hexaddr)
        # the kernel prints each 32-bit word in host order (little-endian here)
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = \
            ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
        rows.append(ProcSocket(address, int(hexport, 16), fields[3], int(fields[9])))
    return rows


def _claims(bound: ipaddress.IPv4Address | ipaddress.IPv6Address,
            wanted: ipaddress.IPv4Address) -> bool:
    """Whether a socket bound to `bound` competes with a forward on `wanted` (IPv4)."""
    if isinstance(bound, ipaddress.IPv6Address):
        if bound == ipaddress.IPv6Address("::"):
            return True  # a dual-stack wildcard
        if bound.ipv4_mapped is None:
            return False
        bound = bound.ipv4_mapped
    return bound == wanted or bound.is_unspecified or wanted.is_unspecified


def _holders(proto: str, address: str, port: int) -> list[str]:
    wanted = ipaddress.IPv4Address(address)
    inodes: set[int] = set()
    for suffix, v6 in (("", False), ("6", True)):
        try:
            text = Path(f"/proc/net/{proto}{suffix}").read_text()
        except OSError:
            continue
        for row in parse_proc_net(text, v6=v6):
            if row.port == port and (proto == "udp" or row.state == "0A") and \
                    _claims(row.address, wanted) and row.inode:
                inodes.add(row.inode)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        targets = set()
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (the listing's own, too)
                targets.add(os.readlink(fd))
        if any(f"socket:[{inode}]" in targets for inode in inodes):
            with contextlib.suppress(OSError):
                name = (proc / "comm").read_text().strip()
                found.append(f"{name} (pid {proc.name})")
    return sorted(found, key=lambda s: int(s.rsplit(" ", 1)[1].rstrip(")")))


def check_port_free(proto: str, address: str, port: int, *, what: str) -> None:
    """Refuse (exit 2) a forward on a host port something already listens on, naming the
    process (from /proc/net/{tcp,udp}{,6} inode -> /proc/PID/fd), and one on an address that
    is not the host's."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        if proto == "tcp":  # a TIME_WAIT leftover is no owner; a listener still is
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
            return
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InvalidValue(f"invalid {what}: {address} is not an address of this host",
                                   hint="use 127.0.0.1 (default), 0.0.0.0 (every address) or "
                                        "one of `ip -4 addr`") from None
            if exc.errno != errno.EADDRINUSE:
                return  # e.g. a port below 1024 without root: not a conflict we can see
    holders = _holders(proto, address, port)
    who = ", ".join(holders) if holders else "another program (not visible to vmkit)"
    raise InvalidValue(f"invalid {what}: host port {address}:{port}/{proto} is in use by {who}",
                       hint="pick another host port, or stop what holds it")
