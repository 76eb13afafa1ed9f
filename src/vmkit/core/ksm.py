"""Kernel same-page merging (KSM) as a host policy: identical guest pages (the same kernel,
initramfs and zeroed memory in many VMs of one image) kept once. QEMU marks guest RAM
mergeable by default (mem-merge); the kernel merges only while /sys/kernel/mm/ksm/run is 1.
It is host-wide and costs CPU to scan, so vmkit switches it only when the admin asks
(`vmkit host set --ksm on`), and `doctor` shows what it saves."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import HostError

SYSFS = Path("/sys/kernel/mm/ksm")
# pages scanned per wake-up (every sleep_millisecs, 20 ms by default): the kernel's 100 takes
# minutes to go through a few GiB of guests; 1000 is ~200 MiB/s for a few % of one core
PAGES_TO_SCAN = 1000


@dataclass(frozen=True)
class KsmState:
    available: bool
    running: bool = False
    pages_to_scan: int = 0
    sleep_ms: int = 0
    pages_shared: int = 0  # pages kept once
    pages_sharing: int = 0  # further uses of them: what merging saves
    full_scans: int = 0

    @property
    def saved_bytes(self) -> int:
        return self.pages_sharing * os.sysconf("SC_PAGE_SIZE")

    def as_dict(self) -> dict[str, object]:
        return {"available": self.available, "running": self.running,
                "pages_to_scan": self.pages_to_scan, "sleep_ms": self.sleep_ms,
                "pages_shared": self.pages_shared, "pages_sharing": self.pages_sharing,
                "full_scans": self.full_scans, "saved_bytes": self.saved_bytes}


def read(root: Path = SYSFS) -> KsmState:
    if not (root / "run").exists():
        return KsmState(available=False)

    def number(name: str) -> int:
        try:
            return int((root / name).read_text().strip())
        except (OSError, ValueError):
            return 0

    return KsmState(available=True, running=number("run") == 1,
                    pages_to_scan=number("pages_to_scan"), sleep_ms=number("sleep_millisecs"),
                    pages_shared=number("pages_shared"), pages_sharing=number("pages_sharing"),
                    full_scans=number("full_scans"))


def switch(on: bool, root: Path = SYSFS) -> KsmState:
    """Start merging (and scan at PAGES_TO_SCAN) or stop it; merged pages stay merged until
    written (unmerging all at once could need their memory back at a bad moment)."""
    if not (root / "run").exists():
        raise HostError("this kernel has no KSM (/sys/kernel/mm/ksm is missing)",
                        hint="a kernel built with CONFIG_KSM is needed; leave --ksm at host")
    try:
        if on:
            (root / "pages_to_scan").write_text(f"{PAGES_TO_SCAN}\n")
        (root / "run").write_text("1\n" if on else "0\n")
    except OSError as exc:
        raise HostError(f"cannot switch KSM {'on' if on else 'off'}: {exc.strerror} "
                        f"({root / 'run'})",
                        hint="run as root on the host (a container may see sysfs read-only)"
                        ) from exc
    return read(root)
