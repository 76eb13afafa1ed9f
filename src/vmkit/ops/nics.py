"""NICs of a VM: add or remove one, hot-plugged into a running VM.

A running VM has empty PCIe root ports (see qemu.argv) a NIC is plugged into; the guest sees a
new interface and asks for a lease. Removal asks the guest to let go (PCIe hot-unplug) and waits
until QEMU reports the device gone. vm.json changes first, so a failure is rolled back to the
configuration the VM had.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from vmkit.core import networks as net_ops
from vmkit.core.journal import Journal, register_recovery
from vmkit.core.locks import Held
from vmkit.errors import InvalidState, NotFound, OperationTimeout, QemuError
from vmkit.model.journal import JournalEntry
from vmkit.model.network import USER_NETWORK, Nic
from vmkit.model.spec import VmConfig
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.net import links
from vmkit.qemu.argv import USER_NET, netdev_id, nic_id, port_count, port_id
from vmkit.qemu.qmp import QmpConnection

if TYPE_CHECKING:
    from vmkit.core.engine import VM

QMP_TIMEOUT = 10.0
UNPLUG_TIMEOUT = 30.0


def _explicit(vm: VM) -> tuple[Nic, ...]:
    """The VM's NICs, with the implicit restricted user-mode NIC of an older VM spelled out."""
    config = vm.config
    if config.nics:
        return config.nics
    return (Nic(network=USER_NETWORK, mac=config.mac, restricted=True),)


def add(vm: VM, network: str, *, ports: tuple[str, ...] = ()) -> Nic:
    """Give the VM a NIC on `network` (hot-plugged when it runs)."""
    host = vm.host
    with host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        if record.state not in (VmState.RUNNING, VmState.STOPPED, VmState.DEFINED,
                                VmState.CRASHED):
            raise InvalidState(f"cannot change the NICs of VM {vm.name!r}: it is "
                               f"{record.state.value}", hint="wait, or resume it first")
        before = vm.config
        current = _explicit(vm)
        log = Journal(vm.folder.runtime_root)
        with net_ops.locked(host):
            (nic,) = net_ops.new_nics(host, before.uuid, [network], list(ports),
                                      existing=current)
            (nic,) = net_ops.with_addresses(host, (nic,))
            log.begin("nic-add", nic=nic.model_dump(mode="json"),
                      before=before.model_dump(mode="json"))
            vm.save_config(before.model_copy(update={"nics": (*current, nic)}))
        try:
            log.step("saved")
            net_ops.forget(host)
            if record.state is VmState.RUNNING:
                _plug(vm, nic, slots=port_count(
                    record.machine.config if record.machine else before))
            log.step("plugged")
        except BaseException:
            vm.save_config(before)
            net_ops.release(vm, (nic,))
            net_ops.forget(host)
            log.end()
            raise
        log.end()
    return nic


def _plugged(vm: VM, nic: Nic) -> bool | None:
    """Whether the running QEMU has the NIC's device (None: the VM does not run)."""
    record = vm._record()
    if not vm._alive(record):
        return None
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        devices = qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return any(d.get("name") == nic_id(nic) for d in devices)


def recover_add(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A NIC add cut short: kept when QEMU has it (or the VM does not run: it is configured for
    the next start), else vm.json goes back and its tap is removed."""
    held.require(vm.name)
    nic = Nic.model_validate(entry.intent["nic"])
    vm._observe(persist=True, held=held)
    if not entry.done("saved") or _plugged(vm, nic) is False:
        before = VmConfig.model_validate(entry.intent["before"])
        vm.save_config(vm.config.model_copy(update={"nics": before.nics}))
        net_ops.release(vm, (nic,))
    net_ops.forget(vm.host)


def recover_remove(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A NIC remove cut short: finished when the guest let the device go (or the VM does not
    run), else the NIC stays as it was."""
    held.require(vm.name)
    nic = Nic.model_validate(entry.intent["nic"])
    vm._observe(persist=True, held=held)
    if _plugged(vm, nic) is not True:
        current = _explicit(vm)
        vm.save_config(vm.config.model_copy(update={
            "nics": tuple(n for n in current if n.mac != nic.mac)}))
        net_ops.release(vm, (nic,))
    net_ops.forget(vm.host)


def _plug(vm: VM, nic: Nic, *, slots: int) -> None:
    arguments: dict[str, Any]
    if nic.network == USER_NETWORK:
        arguments = {"type": "user", "id": netdev_id(nic),
                     **dict(item.split("=", 1) for item in USER_NET.split(",")),
                     "hostfwd": [{"str": f.hostfwd} for f in nic.forwards]}
    tap_fd: int | None = None
    try:
        with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
            if nic.network != USER_NETWORK:
                tap_fd = links.open_tap(net_ops.ensure_tap(vm, nic))
                qmp.send_fd(tap_fd, netdev_id(nic))  # QEMU cannot open /dev/net/tun itself
                arguments = {"type": "tap", "id": netdev_id(nic), "fd": netdev_id(nic),
                             "vhost": False}
            qmp.execute("netdev_add", arguments)
            _device_add(qmp, vm, nic, slots)
    finally:
        if tap_fd is not None:
            os.close(tap_fd)


def _device_add(qmp: QmpConnection, vm: VM, nic: Nic, slots: int) -> None:
    last: QemuError | None = None
    for index in range(slots):
        try:
            qmp.execute("device_add", {"driver": vm.config.hardware.nic_model,
                                       "id": nic_id(nic),
                                       "netdev": netdev_id(nic), "mac": nic.mac,
                                       "bus": port_id(index)})
            vm.record_nic_plugged(nic, index)
            return
        except QemuError as exc:  # that port holds a device already: try the next
            last = exc
    qmp.execute("netdev_del", {"id": netdev_id(nic)})
    raise InvalidState(f"VM {vm.name!r} has no free hot-plug port left",
                       hint="stop and start it: every NIC gets a port at start",
                       detail=last.message if last else None)


def remove(vm: VM, network: str) -> Nic:
    """Take the VM's NIC on `network` away (hot-unplugged when it runs)."""
    host = vm.host
    with host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        current = _explicit(vm)
        nic = next((n for n in current if n.network == network), None)
        if nic is None:
            raise NotFound(f"VM {vm.name!r} has no NIC on network {network!r}",
                           hint=f"its NICs: {', '.join(n.network for n in current)}")
        if record.state in LIVE_STATES and record.state is not VmState.RUNNING:
            raise InvalidState(f"cannot unplug a NIC of VM {vm.name!r}: it is "
                               f"{record.state.value}", hint="resume it first")
        log = Journal(vm.folder.runtime_root)
        log.begin("nic-remove", nic=nic.model_dump(mode="json"))
        try:
            if record.state in LIVE_STATES:
                _unplug(vm, nic)
        except BaseException:
            log.end()  # QEMU still has it: nothing changed
            raise
        log.step("unplugged")
        vm.save_config(vm.config.model_copy(update={
            "nics": tuple(n for n in current if n is not nic)}))
        log.step("saved")
        net_ops.release(vm, (nic,))
        log.end()
    net_ops.forget(host)
    return nic


def _unplug(vm: VM, nic: Nic) -> None:
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        try:
            qmp.execute("device_del", {"id": nic_id(nic)})
        except QemuError as exc:
            raise InvalidState(f"the NIC of VM {vm.name!r} on {nic.network!r} cannot be "
                               f"unplugged while it runs ({exc.message})",
                               hint="stop the VM, remove the NIC, start it again") from exc
        deadline = time.monotonic() + UNPLUG_TIMEOUT
        while any(d.get("name") == nic_id(nic)
                  for d in qmp.execute("qom-list", {"path": "/machine/peripheral"})):
            if time.monotonic() > deadline:
                raise OperationTimeout(f"the guest of VM {vm.name!r} did not release its NIC "
                                       f"on {nic.network!r} within {UNPLUG_TIMEOUT:g}s")
            time.sleep(0.2)
        qmp.execute("netdev_del", {"id": netdev_id(nic)})
    vm.record_nic_unplugged(nic)


register_recovery("nic-add", recover_add)
register_recovery("nic-remove", recover_remove)
