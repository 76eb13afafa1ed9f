"""Live resources, an engine use case: change a VM's share while it runs, or for its next boot.

Running VM: vCPUs are hot-added into free slots below max-cpus (`device_add` of the CPU type
QEMU lists in query-hotpluggable-cpus); memory grows by a pc-dimm below max-memory and shrinks
through the balloon; the disk grows with `block_resize`; I/O is throttled with
`block_set_io_throttle`; CPU weight, CPU cap and the memory cap are cgroup writes. What cannot
change live (beyond the maxima, fewer vCPUs) is saved for the next boot and reported as such.
Every change is saved in vm.json, so the next boot matches.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from vmkit.core.journal import Journal, pause_point, register_recovery
from vmkit.core.locks import Held
from vmkit.errors import InvalidState, InvalidValue
from vmkit.model.journal import JournalEntry
from vmkit.model.resources import Allocation, admit, check_fits_host
from vmkit.model.sizes import format_size, parse_count, parse_size
from vmkit.model.spec import Limits, VmSpec
from vmkit.model.state import VmState
from vmkit.model.views import SetResult
from vmkit.qemu import blockops, img
from vmkit.qemu.argv import volume_id
from vmkit.qemu.qmp import QmpConnection

if TYPE_CHECKING:
    from vmkit.core.engine import VM

DIMM_ALIGN = 128 << 20  # Linux onlines memory in 128 MiB blocks on x86-64
QMP_TIMEOUT = 10.0


def parse_percent(value: str | float | None, what: str) -> float | None:
    """'50%' or 50 -> 50.0 (percent of one host core); 'none' or 0 -> no limit."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("none", "0", "0%", "off"):
        return 0.0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%?", text)
    if not match or float(match.group(1)) <= 0:
        raise InvalidValue(f"invalid {what} {value!r}", hint="e.g. 50% (of one core) or none")
    return float(match.group(1))


def _optional_size(value: str | int | None, what: str) -> int | None:
    if value is None:
        return None
    if str(value).strip().lower() in ("none", "0", "off"):
        return 0
    return parse_size(value, field=what)


def set_resources(vm: VM, *, cpus: int | str | None = None, memory: int | str | None = None,
                  max_cpus: int | str | None = None, max_memory: int | str | None = None,
                  disk_size: int | str | None = None, cpu_weight: int | str | None = None,
                  cpu_limit: str | float | None = None, disk_iops: int | str | None = None,
                  disk_bps: int | str | None = None) -> SetResult:
    # parse everything first: a bad value changes nothing
    want_cpus = parse_count(cpus, "cpus") if cpus is not None else None
    want_memory = parse_size(memory, field="memory", default_unit="M") \
        if memory is not None else None
    want_max_cpus = parse_count(max_cpus, "max-cpus") if max_cpus is not None else None
    want_max_memory = parse_size(max_memory, field="max-memory", default_unit="M") \
        if max_memory is not None else None
    want_disk = parse_size(disk_size, field="disk-size", default_unit="G") \
        if disk_size is not None else None
    weight = parse_count(cpu_weight, "cpu-weight") if cpu_weight is not None else None
    if weight is not None and weight > 10000:
        raise InvalidValue(f"invalid cpu-weight {cpu_weight!r}: 1 to 10000 (default 100)")
    limit = parse_percent(cpu_limit, "cpu-limit")
    iops = None if disk_iops is None else (0 if str(disk_iops).lower() in ("none", "0") else
                                           parse_count(disk_iops, "disk-iops"))
    bps = _optional_size(disk_bps, "disk-bps")

    host = vm.host
    result = SetResult()
    with host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        if record.state in (VmState.STARTING, VmState.STOPPING):
            raise InvalidState(f"cannot change VM {vm.name!r}: it is {record.state.value}")
        live = record.state in (VmState.RUNNING, VmState.PAUSED)
        config = vm.config
        spec = config.spec
        limits = spec.limits
        capacity, policy = host.capacity(), host.policy()
        new = {
            "cpus": want_cpus or spec.cpus, "memory": want_memory or spec.memory,
            "max_cpus": max(want_max_cpus or spec.cpu_ceiling, want_cpus or 0),
            "max_memory": max(want_max_memory or spec.memory_ceiling, want_memory or 0),
            "disk": want_disk or spec.disk,
        }
        check_fits_host(vm.name, new["cpus"], new["memory"], capacity, policy)
        if want_max_cpus is not None or want_max_memory is not None:
            check_fits_host(vm.name, new["max_cpus"], new["max_memory"], capacity, policy)
        if want_disk is not None and want_disk < spec.disk:
            raise InvalidValue(f"invalid disk-size {format_size(want_disk)} for VM {vm.name!r}: "
                               f"smaller than its disk ({format_size(spec.disk)}); disks only "
                               "grow")
        updates: dict[str, Any] = {}
        if weight is not None:
            updates["cpu_weight"] = weight
        if limit is not None:  # 0 clears
            updates["cpu_limit"] = limit or None
        if iops is not None:
            updates["disk_iops"] = iops or None
        if bps is not None:
            updates["disk_bps"] = bps or None
        new_limits = limits.model_copy(update=updates)
        new_spec = spec.model_copy(update={**new, "limits": new_limits})
        log = Journal(vm.folder.runtime_root) if live else None
        if live:  # partitioning applies to live changes too: admitted and reserved (the new
            # spec saved) under the host lock, so two racing grows cannot both take the rest
            assert log is not None
            log.begin("set", old=spec.model_dump(mode="json"))
            with host._host_lock():
                admit(vm.name, Allocation(cpus=new["cpus"], memory=new["memory"]),
                      host.allocated(exclude=vm.name), capacity, policy)
                vm.save_config(config.model_copy(update={"spec": new_spec}))
                pause_point("set", "admitted")
            log.step("reserved")
        try:
            _apply(vm, live=live, spec=spec, new_spec=new_spec, new_limits=new_limits,
                   want=(want_cpus, want_memory, want_disk), io=(iops, bps),
                   cpu=(weight, limit), result=result)
        except BaseException:
            if live:
                vm.save_config(config)  # the reservation goes back
            if log is not None:
                log.end()
            raise
        vm.save_config(config.model_copy(update={"spec": new_spec}))
        if log is not None:
            log.step("applied")
            log.end()
        if not live:
            result.at_restart.append("saved for the next start")
    return result


def recover_set(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A live change cut short: vm.json made to say what the running machine really has (its
    start-time vCPUs and memory plus what was hot-plugged, from state.json), never less than
    before the change; a stopped VM keeps what was saved."""
    held.require(vm.name)
    record = vm._observe(persist=True, held=held)
    machine = record.machine
    if entry.done("applied") or machine is None or not vm._alive(record):
        return
    old = VmSpec.model_validate(entry.intent["old"])
    cpus = machine.config.spec.cpus + sum(
        1 for step in machine.hotplug if step.kind == "device"
        and str(step.args.get("driver", "")).endswith("-cpu"))
    memory = machine.config.spec.memory + sum(
        int(step.args.get("size", 0)) for step in machine.hotplug if step.kind == "object")
    config = vm.config
    spec = config.spec.model_copy(update={
        "cpus": max(old.cpus, cpus), "memory": max(old.memory, memory),
        "max_cpus": max(old.cpu_ceiling, cpus), "max_memory": max(old.memory_ceiling, memory),
        "limits": old.limits, "disk": config.spec.disk})
    vm.save_config(config.model_copy(update={"spec": spec}))


def _apply(vm: VM, *, live: bool, spec: VmSpec, new_spec: VmSpec, new_limits: Limits,
           want: tuple[int | None, int | None, int | None], io: tuple[Any, Any],
           cpu: tuple[Any, Any], result: SetResult) -> None:
    """Make the change happen: hot-plug and QMP on a running VM, the disk file otherwise."""
    host = vm.host
    want_cpus, want_memory, want_disk = want
    iops, bps = io
    weight, limit = cpu
    if live:
        with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
            if want_cpus is not None:
                _live_cpus(vm, qmp, want_cpus, spec.cpu_ceiling, result)
            if want_memory is not None:
                _live_memory(vm, qmp, want_memory, spec.memory_ceiling, result)
            if want_disk is not None:
                qmp.execute("block_resize", {"node-name": blockops.top_node(qmp),
                                             "size": want_disk})
                result.now.append(f"disk grown to {format_size(want_disk)}")
            if iops is not None or bps is not None:
                blockops.apply_io_throttle(qmp, new_limits.disk_iops, new_limits.disk_bps,
                                           [volume_id(d) for d in vm.config.disks])
                result.now.append("I/O throttle set")
        if (weight, limit) != (None, None) and host.cgroups is not None:
            host.cgroups.apply(vm.name, vm.cgroup_limits(new_spec))
            result.now.append("CPU weight/limit set")
    elif want_disk is not None:
        img.resize(vm.folder.path / vm.active_layer(), want_disk, untrusted=True,
                   owner=vm.disk_owner())


def _live_cpus(vm: VM, qmp: QmpConnection, want: int, ceiling: int,
               result: SetResult) -> None:
    slots = qmp.execute("query-hotpluggable-cpus")
    present = [slot for slot in slots if slot.get("qom-path")]
    if want > ceiling:
        result.at_restart.append(f"{want} vCPUs is above max-cpus {ceiling}: applies at restart")
        return
    if want < len(present):
        result.at_restart.append(f"fewer vCPUs ({want}) apply at restart")
        return
    free = [slot for slot in slots if not slot.get("qom-path")]
    free.sort(key=lambda slot: tuple(sorted(slot["props"].items())))
    for slot in free[: want - len(present)]:
        props: dict[str, Any] = slot["props"]
        ident = "vcpu-" + "-".join(f"{k[0]}{v}" for k, v in sorted(props.items()))
        qmp.execute("device_add", {"driver": slot["type"], "id": ident, **props})
        vm.record_hotplug("device", {"driver": slot["type"], "id": ident, **props})
    if want > len(present):
        result.now.append(f"hot-added {want - len(present)} vCPUs ({want} now)")


def _live_memory(vm: VM, qmp: QmpConnection, want: int, ceiling: int,
                 result: SetResult) -> None:
    summary = qmp.execute("query-memory-size-summary")
    plugged = int(summary["base-memory"]) + int(summary.get("plugged-memory", 0))
    if want > ceiling:
        result.at_restart.append(f"{format_size(want)} is above max-memory "
                                 f"{format_size(ceiling)}: applies at restart")
        return
    if want > plugged:
        add = want - plugged
        if add % DIMM_ALIGN:
            rounded = plugged + -(-add // DIMM_ALIGN) * DIMM_ALIGN
            raise InvalidValue(f"cannot hot-add {format_size(add)}: memory is added in "
                               f"multiples of {format_size(DIMM_ALIGN)}",
                               hint=f"ask for {format_size(rounded)}")
        index = len(qmp.execute("query-memory-devices"))
        backend = {"qom-type": "memory-backend-ram", "id": f"mem-dimm{index}", "size": add}
        dimm = {"driver": "pc-dimm", "id": f"dimm{index}", "memdev": f"mem-dimm{index}"}
        qmp.execute("object-add", backend)
        vm.record_hotplug("object", backend)
        qmp.execute("device_add", dimm)
        vm.record_hotplug("device", dimm)
        result.now.append(f"hot-added {format_size(add)} of memory")
    # the balloon takes back (or gives back) what is above `want`
    qmp.execute("balloon", {"value": want})
    if want < plugged:
        result.now.append(f"balloon set to {format_size(want)}")


register_recovery("set", recover_set)
