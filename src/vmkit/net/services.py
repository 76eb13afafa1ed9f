"""dnsmasq per network and vmkit's nftables tables: start, reload, stop, apply.

Each function is idempotent: starting a running dnsmasq reloads it, stopping a stopped one is a
no-op, and the ruleset is replaced as a whole (`nft -f` is atomic).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from vmkit.errors import HostError, OperationTimeout

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
