"""Extra disks of a VM: add or remove one, hot-plugged into a running VM.

Each extra disk is a qcow2 file of its own in the VM folder's volumes/ (model/spec.ExtraDisk).
Adding creates the file, then vm.json names it, then (running) QEMU opens it and a virtio disk
goes into a free PCIe root port. Removing unplugs it first (the guest lets go; QEMU reports the
device gone), then vm.json forgets it, then the file goes. Each step is journalled: a cut is
finished or undone by the next command (recover_add / recover_remove).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from vmkit.core.journal import Journal, register_recovery
from vmkit.core.locks import Held
from vmkit.errors import (
    AlreadyExists,
    InvalidState,
    InvalidValue,
    NotFound,
    OperationTimeout,
    QemuError,
    VmkitError,
)
from vmkit.isolation import jail
from vmkit.model.journal import JournalEntry
from vmkit.model.sizes import parse_size
from vmkit.model.spec import DISKS_LIMIT, ExtraDisk
from vmkit.model.state import VmState
from vmkit.model.views import DiskInfo
from vmkit.qemu import blockops, img
from vmkit.qemu.argv import port_count, port_id, volume_device, volume_id, volume_node
from vmkit.qemu.qmp import QmpConnection

if TYPE_CHECKING:
    from vmkit.core.engine import VM

QMP_TIMEOUT = 10.0
UNPLUG_TIMEOUT = 30.0
# q35's root bus has 32 slots; the host bridge, the chipset's functions and vmkit's own
# devices (disk, serial, balloon, rng, screen, CD-ROM controller, seed) keep about ten
MAX_ROOT_PORTS = 22
CHANGEABLE = (VmState.RUNNING, VmState.STOPPED, VmState.DEFINED, VmState.CRASHED)


def add(vm: VM, name: str, size: int | str) -> ExtraDisk:
    """Give the VM an empty extra disk `name` of `size` (bytes, or a size with a unit such as
    "10G"; a bare number in a string is GiB), hot-plugged when it runs."""
    if not isinstance(size, int | str):  # (a bool, an int to Python, is refused by parse_size)
        raise InvalidValue(f"invalid disk size {size!r}", hint="bytes, or e.g. 10G")
    disk = ExtraDisk(name=name, size=parse_size(size, field="disk size",
                                                default_unit="G" if isinstance(size, str) else ""))
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        if record.state not in CHANGEABLE:
            raise InvalidState(f"cannot add a disk to VM {vm.name!r}: it is "
                               f"{record.state.value}", hint="wait, or resume it first")
        before = vm.config
        if any(d.name == disk.name for d in before.disks):
            raise AlreadyExists(f"VM {vm.name!r} already has a disk named {disk.name!r}",
                                hint="pick another name (vmkit disk list " f"{vm.name})")
        if len(before.disks) >= DISKS_LIMIT:
            raise InvalidState(f"VM {vm.name!r} has {DISKS_LIMIT} extra disks already",
                               hint="remove one first (vmkit disk remove)")
        running = record.state is VmState.RUNNING
        after = before.model_copy(update={"disks": (*before.disks, disk)})
        if port_count(after) > MAX_ROOT_PORTS:
            raise InvalidState(f"VM {vm.name!r} has no room for another disk: its NICs, disks "
                               f"and spare ports would take {port_count(after)} PCIe root "
                               f"ports (at most {MAX_ROOT_PORTS})",
                               hint="remove a disk or a NIC first")
        if running and not before.hardware.machine.startswith("pc-q35"):
            raise InvalidState(f"cannot hot-plug a disk into VM {vm.name!r}: its machine "
                               f"{before.hardware.machine} has no PCIe hot-plug",
                               hint="stop it, add the disk, start it again")
        path = vm.folder.path / disk.file
        log = Journal(vm.folder.runtime_root)
        log.begin("disk-add", disk=disk.model_dump(mode="json"))
        try:
            path.parent.mkdir(mode=0o750, exist_ok=True)
            path.unlink(missing_ok=True)  # a file no config names (a cut add's leftover)
            img.create_empty(path, disk.size)
            log.step("created")
            vm.save_config(after)
            log.step("saved")
            if running:
                jail.give_file(vm.disk_owner(), vm.folder.path, disk.file)
                # the ports the QEMU has: those of the machine it started as
                started = record.machine.config if record.machine else before
                _plug(vm, disk, port_count(started))
            log.step("plugged")
        except BaseException:
            _undo_add(vm, disk)
            log.end()
            raise
        log.end()
    return disk


def _plug(vm: VM, disk: ExtraDisk, ports: int) -> None:
    """Open the file in QEMU and put a virtio disk on the first free root port (in the VM's
    I/O throttle group when it has limits)."""
    limits = vm.config.spec.limits
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        qmp.execute("blockdev-add", volume_node(disk, str(vm.folder.path)))
        try:
            for index in range(ports):
                try:
                    qmp.execute("device_add", _device_arguments(disk, port_id(index)))
                    break
                except QemuError as exc:
                    if not _port_taken(exc):
                        raise
            else:
                raise InvalidState(f"VM {vm.name!r} has no free hot-plug port left",
                                   hint="stop it, add the disk, start it again (every disk "
                                        "gets a port at start)")
            if (limits.disk_iops, limits.disk_bps) != (None, None):
                blockops.apply_io_throttle(qmp, limits.disk_iops, limits.disk_bps,
                                           [volume_id(disk)])
        except BaseException:
            with contextlib.suppress(VmkitError, OSError):
                if not _has_device(qmp, disk):
                    qmp.execute("blockdev-del", {"node-name": volume_id(disk)})
            raise


def _port_taken(error: QemuError) -> bool:
    """device_add failed because that root port holds a device already (try the next)."""
    text = f"{error.message} {error.detail or ''}".lower()
    return "not available" in text or "in use" in text or "occupied" in text


def _has_device(qmp: QmpConnection, disk: ExtraDisk) -> bool:
    return any(d.get("name") == volume_id(disk)
               for d in qmp.execute("qom-list", {"path": "/machine/peripheral"}))


def _device_arguments(disk: ExtraDisk, port: str) -> dict[str, str]:
    """volume_device's option string as device_add's arguments (one description of it)."""
    driver, *options = volume_device(disk, port).split(",")
    return {"driver": driver, **dict(option.split("=", 1) for option in options)}


def _plugged(vm: VM, disk: ExtraDisk) -> bool | None:
    """Whether the running QEMU has the disk's device (None: the VM does not run)."""
    if not vm._alive(vm._record()):
        return None
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        return _has_device(qmp, disk)


def _undo_add(vm: VM, disk: ExtraDisk) -> None:
    """The VM as it was before the add: no device, no config entry, no file."""
    if _plugged(vm, disk):
        _unplug(vm, disk)
    elif vm._alive(vm._record()):
        _close_node(vm, disk)
    _forget(vm, disk)


def remove(vm: VM, name: str) -> ExtraDisk:
    """Take extra disk `name` away from the VM and delete its file (hot-unplugged when it
    runs: the guest must let it go)."""
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        disk = next((d for d in vm.config.disks if d.name == name), None)
        if disk is None:
            names = ", ".join(d.name for d in vm.config.disks) or "none"
            raise NotFound(f"VM {vm.name!r} has no disk named {name!r}",
                           hint=f"its extra disks: {names}")
        if record.state not in CHANGEABLE:
            raise InvalidState(f"cannot remove a disk of VM {vm.name!r}: it is "
                               f"{record.state.value}", hint="wait, or resume it first")
        log = Journal(vm.folder.runtime_root)
        log.begin("disk-remove", disk=disk.model_dump(mode="json"))
        try:
            if record.state is VmState.RUNNING:
                _unplug(vm, disk)
        except BaseException:
            still = None
            with contextlib.suppress(VmkitError, OSError):
                still = _plugged(vm, disk)
            if still is not False:
                log.end()  # QEMU still has it (or is gone): nothing changed
            # else the guest let go after all: the journal has the next command finish it
            raise
        log.step("unplugged")
        _forget(vm, disk)
        log.end()
    return disk


def _forget(vm: VM, disk: ExtraDisk) -> None:
    """vm.json without the disk, then its file gone."""
    vm.save_config(vm.config.model_copy(update={
        "disks": tuple(d for d in vm.config.disks if d.name != disk.name)}))
    (vm.folder.path / disk.file).unlink(missing_ok=True)


def _unplug(vm: VM, disk: ExtraDisk) -> None:
    """Ask the guest to let the disk go and wait until QEMU no longer has it; then QEMU closes
    the file. A device already gone (a guest that let go after an earlier try timed out) or an
    unplug already asked for is waited for the same way."""
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        try:
            if _has_device(qmp, disk):
                qmp.execute("device_del", {"id": volume_id(disk)})
        except QemuError as exc:
            if "in progress" in f"{exc.message} {exc.detail or ''}".lower():
                pass  # asked before: wait for the guest below
            else:
                raise InvalidState(f"disk {disk.name!r} of VM {vm.name!r} cannot be "
                                   f"unplugged while it runs ({exc.message})",
                                   hint="stop the VM, remove the disk, start it again"
                                   ) from exc
        deadline = time.monotonic() + UNPLUG_TIMEOUT
        while _has_device(qmp, disk):
            if time.monotonic() > deadline:
                raise OperationTimeout(f"the guest of VM {vm.name!r} did not release disk "
                                       f"{disk.name!r} within {UNPLUG_TIMEOUT:g}s",
                                       hint="unmount it in the guest, or stop the VM and "
                                            "remove it then")
            time.sleep(0.2)
    _close_node(vm, disk)
    vm.record_disk_unplugged(disk)


def _close_node(vm: VM, disk: ExtraDisk) -> None:
    """QEMU lets go of the file (its block node outlives the device until deleted)."""
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        nodes = qmp.execute("query-named-block-nodes", {"flat": True})
        if any(node.get("node-name") == volume_id(disk) for node in nodes):
            qmp.execute("blockdev-del", {"node-name": volume_id(disk)})


def recover_add(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A disk add cut short: kept when QEMU has it (or the VM does not run: it is configured
    for the next start), else undone."""
    held.require(vm.name)
    disk = ExtraDisk.model_validate(entry.intent["disk"])
    vm._observe(persist=True, held=held)
    named = any(d.name == disk.name for d in vm.config.disks)
    if named and _plugged(vm, disk) is not False:
        return  # running with it, or configured for the next start
    _undo_add(vm, disk)


def recover_remove(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A disk remove cut short: finished when the guest let the device go (or the VM does not
    run), else the disk stays as it was."""
    held.require(vm.name)
    disk = ExtraDisk.model_validate(entry.intent["disk"])
    vm._observe(persist=True, held=held)
    if _plugged(vm, disk) is True:
        return
    if vm._alive(vm._record()):
        _close_node(vm, disk)
        vm.record_disk_unplugged(disk)
    _forget(vm, disk)


def list_disks(vm: VM) -> list[DiskInfo]:
    """Each extra disk: its name, virtual size, the bytes its file takes, and its file."""
    out: list[DiskInfo] = []
    for disk in vm.config.disks:
        path = vm.folder.path / disk.file
        used = path.stat().st_blocks * 512 if path.is_file() else 0
        out.append(DiskInfo(name=disk.name, size=disk.size, used=used, file=disk.file))
    return out


register_recovery("disk-add", recover_add)
register_recovery("disk-remove", recover_remove)
