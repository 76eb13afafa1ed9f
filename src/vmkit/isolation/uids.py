"""One uid/gid per VM, from a range vmkit reserves (the jailer's model: a VM's QEMU shares its
identity with nothing else on the host).

The registry is host-wide (not per VMKIT_HOME), so VMs of two homes on one host never share a
uid: one root-owned file per claimed uid, `<registry>/<uid>`, created with O_EXCL (the claim is
atomic without a lock) and holding `<vm uuid> <vm folder>`. A claim is freed when the VM is
deleted; a claim whose folder no longer holds a VM with that uuid (a home removed by hand) is
stale and may be taken again. The gid equals the uid; no group or user database entry is
needed (setpriv takes numbers).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import HostError, InvalidValue

DEFAULT_REGISTRY = Path("/var/lib/vmkit-uids")
DEFAULT_BASE = 2_000_000  # above the 65536 ids of user namespaces Debian hands out by default
DEFAULT_COUNT = 65536
_MAX_CLAIM_BYTES = 4096


@dataclass(frozen=True)
class UidRange:
    base: int = DEFAULT_BASE
    count: int = DEFAULT_COUNT

    def __post_init__(self) -> None:
        if not 1000 <= self.base < 2**31 - self.count or not 1 <= self.count <= 2**20:
            raise InvalidValue(f"invalid VM uid range {self.base}+{self.count}",
                               hint="VMKIT_UID_RANGE=BASE:COUNT with BASE >= 1000")

    def overlaps(self, base: int, count: int) -> bool:
        return base < self.base + self.count and self.base < base + count


def configured_range() -> UidRange:
    """The range from VMKIT_UID_RANGE (BASE:COUNT), else the default."""
    text = os.environ.get("VMKIT_UID_RANGE")
    if not text:
        return UidRange()
    base, sep, count = text.partition(":")
    if not sep or not base.isdigit() or not count.isdigit():
        raise InvalidValue(f"invalid VMKIT_UID_RANGE {text!r}", hint="use BASE:COUNT, e.g. "
                           f"{DEFAULT_BASE}:{DEFAULT_COUNT}")
    return UidRange(int(base), int(count))


def registry_dir() -> Path:
    return Path(os.environ.get("VMKIT_UID_REGISTRY", str(DEFAULT_REGISTRY)))


@dataclass(frozen=True)
class Claim:
    uid: int
    vm_uuid: str
    folder: str


def _read_claim(path: Path) -> Claim | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        text = os.read(fd, _MAX_CLAIM_BYTES).decode(errors="replace").split()
    finally:
        os.close(fd)
    if len(text) != 2 or not path.name.isdigit():
        return None
    return Claim(int(path.name), text[0], text[1])


def _claim_is_live(claim: Claim) -> bool:
    """The claiming VM still exists: its folder's vm.json carries that uuid, or (a VM on
    shared storage, claimed by its folder in this host's home) its registration does: a
    shared file system out of reach never frees the uid of a QEMU that runs."""
    for name in ("vm.json", "shared.json"):
        try:
            with open(Path(claim.folder) / name) as handle:
                if json.load(handle).get("uuid") == claim.vm_uuid:
                    return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _ensure_registry(registry: Path) -> None:
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(registry)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise HostError(f"the VM uid registry {registry} is not owned by this user or is "
                        "writable by others", hint="remove it (vmkit re-creates it)")


def lookup(vm_uuid: str, *, registry: Path | None = None) -> int | None:
    registry = registry or registry_dir()
    if not registry.is_dir():
        return None
    for entry in registry.iterdir():
        claim = _read_claim(entry)
        if claim is not None and claim.vm_uuid == vm_uuid:
            return claim.uid
    return None


def claim(vm_uuid: str, folder: Path, *, registry: Path | None = None,
          uid_range: UidRange | None = None) -> int:
    """The VM's uid: its existing claim, else the lowest free (or stale) one in the range."""
    registry = registry or registry_dir()
    uid_range = uid_range or configured_range()
    _ensure_registry(registry)
    existing = lookup(vm_uuid, registry=registry)
    if existing is not None:
        return existing
    payload = f"{vm_uuid} {folder}\n".encode()
    for uid in range(uid_range.base, uid_range.base + uid_range.count):
        path = registry / str(uid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            old = _read_claim(path)
            if old is not None and not _claim_is_live(old):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # a stale claim: its VM is gone; try this uid again
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600)
                except FileExistsError:
                    continue
            else:
                continue
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        return uid
    raise HostError(f"no free VM uid in {uid_range.base}..{uid_range.base + uid_range.count - 1}",
                    hint="delete VMs or widen VMKIT_UID_RANGE")


def release(vm_uuid: str, *, registry: Path | None = None) -> None:
    """Free the VM's uid (idempotent)."""
    registry = registry or registry_dir()
    if not registry.is_dir():
        return
    for entry in registry.iterdir():
        claim_ = _read_claim(entry)
        if claim_ is not None and claim_.vm_uuid == vm_uuid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry)
