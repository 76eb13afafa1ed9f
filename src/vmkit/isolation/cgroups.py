"""One cgroup per VM, on cgroup v1 (separate controller mounts: cpu, cpuacct, memory, pids) or
v2 (one unified tree), behind one small interface.

    driver = detect()            # None when there is no writable cgroup tree (not root)
    driver.apply(vm, limits)     # create if needed and set cpu weight/quota, memory, pids: live
    driver.procs_files(vm)       # joined by QEMU's exec chain: QEMU starts inside its cgroup
    driver.usage(vm)             # CPU time (ns) and memory (bytes) as the kernel counts them
    driver.remove(vm)

Values: weight 1..10000 (100 = default; v1 cpu.shares = weight * 1024 / 100), cpu limit in
percent of one core (quota = percent * period / 100), memory limit in bytes.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import HostError

GROUP = "vmkit"
PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLimits:
    cpu_weight: int
    cpu_limit: float | None
    memory: int
    pids: int


@dataclass(frozen=True)
class CgroupUsage:
    cpu_ns: int
    memory: int


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise HostError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


REMOVE_TIMEOUT = 5.0


def _rmdir_when_empty(folder: Path, timeout: float = REMOVE_TIMEOUT) -> None:
    """Remove a cgroup; a QEMU just killed still counts in it until its parent has reaped it
    (EBUSY for a moment), so retry briefly. Absent: nothing to do (idempotent)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                return  # still busy: a process of the VM lives on; the next remove retries
            time.sleep(0.05)


class CgroupV1:
    version = "v1"
    CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")

    def __init__(self, root: Path = Path("/sys/fs/cgroup"), scope: str = ""):
        self.root = root
        self.scope = scope

    def _dirs(self, vm: str) -> dict[str, Path]:
        return {c: self.root / c / GROUP / group_name(vm, self.scope) for c in self.CONTROLLERS}

    def apply(self, vm: str, limits: CgroupLimits) -> None:
        dirs = self._dirs(vm)
        for folder in dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        _write(dirs["cpu"] / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
        _write(dirs["cpu"] / "cpu.cfs_period_us", str(PERIOD_US))
        quota = -1 if limits.cpu_limit is None else int(limits.cpu_limit * PERIOD_US / 100)
        _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        _write(dirs["memory"] / "memory.limit_in_bytes", str(limits.memory))
        _write(dirs["pids"] / "pids.max", str(limits.pids))

    def procs_files(self, vm: str) -> list[Path]:
        """The cgroup.procs files a process writes its pid to, to join the VM's cgroup."""
        return [folder / "cgroup.procs" for folder in self._dirs(vm).values()]

    def usage(self, vm: str) -> CgroupUsage:
        dirs = self._dirs(vm)
        return CgroupUsage(
            cpu_ns=int((dirs["cpuacct"] / "cpuacct.usage").read_text()),
            memory=int((dirs["memory"] / "memory.usage_in_bytes").read_text()))

    def remove(self, vm: str) -> None:
        for folder in self._dirs(vm).values():
            _rmdir_when_empty(folder)


class CgroupV2:
    version = "v2"
    CONTROLLERS = ("cpu", "memory", "pids")

    def __init__(self, root: Path = Path("/sys/fs/cgroup"), scope: str = ""):
        self.root = root
        self.scope = scope

    def _dir(self, vm: str) -> Path:
        return self.root / GROUP / group_name(vm, self.scope)

    def apply(self, vm: str, limits: CgroupLimits) -> None:
        parent = self.root / GROUP
        if not parent.exists():
            parent.mkdir()
        enable = " ".join(f"+{c}" for c in self.CONTROLLERS)
        for folder in (self.root, parent):
            _write(folder / "cgroup.subtree_control", enable)
        folder = self._dir(vm)
        folder.mkdir(exist_ok=True)
        _write(folder / "cpu.weight", str(limits.cpu_weight))
        quota = "max" if limits.cpu_limit is None else str(int(limits.cpu_limit * PERIOD_US / 100))
        _write(folder / "cpu.max", f"{quota} {PERIOD_US}")
        _write(folder / "memory.max", str(limits.memory))
        _write(folder / "pids.max", str(limits.pids))

    def procs_files(self, vm: str) -> list[Path]:
        """The cgroup.procs file a process writes its pid to, to join the VM's cgroup."""
        return [self._dir(vm) / "cgroup.procs"]

    def usage(self, vm: str) -> CgroupUsage:
        folder = self._dir(vm)
        stats = dict(line.split() for line in (folder / "cpu.stat").read_text().splitlines())
        return CgroupUsage(cpu_ns=int(stats["usage_usec"]) * 1000,
                           memory=int((folder / "memory.current").read_text()))

    def remove(self, vm: str) -> None:
        _rmdir_when_empty(self._dir(vm))


Driver = CgroupV1 | CgroupV2


def group_name(vm: str, scope: str) -> str:
    """A VM's cgroup: `NAME.SCOPE` (the scope keeps two VMKIT_HOMEs' VMs of one name apart)."""
    return f"{vm}.{scope}" if scope else vm


def detect(root: Path = Path("/sys/fs/cgroup"), scope: str = "") -> Driver | None:
    """The cgroup tree vmkit can use here, or None (then `doctor` says why)."""
    if (root / "cgroup.controllers").exists():
        driver: Driver = CgroupV2(root, scope)
        writable = os.access(root / "cgroup.subtree_control", os.W_OK)
    elif all((root / c).is_dir() for c in CgroupV1.CONTROLLERS):
        driver = CgroupV1(root, scope)
        writable = os.access(root / "cpu", os.W_OK)
    else:
        return None
    return driver if writable else None


def why_not(root: Path = Path("/sys/fs/cgroup")) -> str:
    if os.geteuid() != 0:
        return "vmkit runs as a normal user and has no delegated cgroup: no CPU/memory caps"
    return f"no usable cgroup v1 controllers ({', '.join(CgroupV1.CONTROLLERS)}) or v2 tree " \
           f"under {root}"
