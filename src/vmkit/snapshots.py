"""Snapshot use cases of the engine: take, list, restore, delete.

Mechanism (chosen by measurement, see docs/architecture.md): external qcow2 layers plus memory
state files. Taking a snapshot freezes the VM's active disk layer (it becomes the snapshot's
layer) and puts a new, empty active layer on top; with memory, the paused VM's RAM and device
state are first written to snapshots/NAME.state by a migration to a file. Restoring puts a new
active layer on the snapshot's layer and, for a memory snapshot, starts a fresh QEMU that loads
the state. Deleting merges the snapshot's layer into each child layer (qemu-img rebase, or a
block-stream job while QEMU has the chain open), so every other node stays restorable.

All of this lives in the VM folder: disks/*.qcow2, snapshots/*.state, snapshots.json.
"""

from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from vmkit.errors import AgentError, InvalidState, OperationTimeout, os_errors
from vmkit.isolation import jail
from vmkit.model.runtime import RuntimeRecord
from vmkit.model.snapshots import SnapshotNode, SnapshotTree
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.qemu import agent, blockops, img
from vmkit.qemu.qmp import QmpConnection
from vmkit.storage.layout import read_metadata, write_json_atomic

if TYPE_CHECKING:
    from vmkit.host import VM

TREE_FILE = "snapshots.json"
QMP_TIMEOUT = 10.0
MEMORY_STATE_TIMEOUT = 300.0
MERGE_TIMEOUT = 3600.0
FREEZE_TIMEOUT = 10.0


class DiskState(SnapshotTree):
    """snapshots.json: the tree plus the active layer (one file, so one atomic write)."""

    active_layer: str | None = None


class SnapshotInfo(BaseModel):
    """One row of `snapshot list`."""

    model_config = ConfigDict(frozen=True)

    name: str
    parent: str | None
    depth: int
    created_at: float
    with_memory: bool
    taken_in: str
    quiesced: bool | None
    disk_bytes: int
    memory_bytes: int
    current: bool


def load_tree(vm: VM) -> DiskState:
    path = vm.folder.path / TREE_FILE
    if not path.exists():
        return DiskState()
    return read_metadata(path, DiskState, f"VM {vm.name!r}")


def save_tree(vm: VM, tree: DiskState) -> None:
    write_json_atomic(vm.folder.path / TREE_FILE, tree.model_dump(mode="json"))


def _new_layer() -> str:
    return f"disks/{uuidlib.uuid4().hex[:12]}.qcow2"


def _used_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def listing(vm: VM) -> list[SnapshotInfo]:
    tree = load_tree(vm)
    return [SnapshotInfo(
        name=node.name, parent=node.parent, depth=depth, created_at=node.created_at,
        with_memory=node.memory is not None, taken_in=node.taken_in, quiesced=node.quiesced,
        disk_bytes=_used_bytes(vm.folder.path / node.layer),
        memory_bytes=node.memory_size, current=tree.current == node.name,
    ) for depth, node in tree.walk()]


# -- take ---------------------------------------------------------------------------------
def take(vm: VM, name: str, *, disk_only: bool = False) -> SnapshotNode:
    with vm.host._vm_lock(vm.name), os_errors(f"snapshot {name!r} of VM {vm.name!r}"):
        record = vm._observe(persist=True, locked=True)
        return take_locked(vm, record, name, disk_only=disk_only)


def take_locked(vm: VM, record: RuntimeRecord, name: str, *, disk_only: bool) -> SnapshotNode:
    tree = load_tree(vm)
    tree.check_new(vm.name, name)
    if record.state in (VmState.STARTING, VmState.STOPPING):
        raise InvalidState(f"cannot snapshot VM {vm.name!r}: it is {record.state.value}",
                           hint="wait until it is running or stopped")
    live = record.state in (VmState.RUNNING, VmState.PAUSED)
    with_memory = live and not disk_only
    active = vm.active_layer()
    new_active = _new_layer()
    new_path = vm.folder.path / new_active
    memory_rel = f"snapshots/{name}.state" if with_memory else None
    memory_path = vm.folder.path / memory_rel if memory_rel else None
    taken_in = record.state.value if live else "stopped"
    if not live:
        img.create_overlay(new_path, Path(active).name)
        node = SnapshotNode(name=name, parent=tree.current, created_at=time.time(),
                            layer=active, taken_in=taken_in)
        _commit(vm, tree, node, new_active, new_path)
        return node

    quiesced: bool | None = None
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        was_running = record.state is VmState.RUNNING
        paused_by_us = False
        try:
            if disk_only:
                quiesced = _freeze(vm) if was_running else None
            elif was_running:
                qmp.execute("stop")
                paused_by_us = True
            memory_size = 0
            if memory_path is not None:
                memory_path.parent.mkdir(mode=0o700, exist_ok=True)
                blockops.save_memory(qmp, memory_path, MEMORY_STATE_TIMEOUT)
                memory_size = memory_path.stat().st_size
            img.create_overlay(new_path, Path(active).name)
            jail.give_file(vm.owner(), vm.folder.path, new_active)  # QEMU opens it as the VM
            node = SnapshotNode(
                name=name, parent=tree.current, created_at=time.time(), layer=active,
                memory=memory_rel, memory_size=memory_size, taken_in=taken_in,
                quiesced=quiesced)
            # record first, then switch QEMU over: a crash in between leaves a recorded
            # layer that QEMU has not started writing to yet, never lost writes
            _commit(vm, tree, node, new_active, new_path)
            try:
                blockops.add_overlay_on_top(qmp, new_path, f"layer-{Path(new_active).stem}")
            except BaseException:
                save_tree(vm, tree)
                raise
        except BaseException:
            new_path.unlink(missing_ok=True)
            if memory_path is not None:
                memory_path.unlink(missing_ok=True)
            raise
        finally:
            if quiesced:
                _thaw(vm)
            if paused_by_us:
                qmp.execute("cont")
    return node


def _commit(vm: VM, tree: DiskState, node: SnapshotNode, new_active: str, new_path: Path) -> None:
    try:
        save_tree(vm, tree.with_node(node).model_copy(update={"active_layer": new_active}))
    except BaseException:
        new_path.unlink(missing_ok=True)
        raise


def _freeze(vm: VM) -> bool:
    """Quiesce the guest's file systems through the agent; False when it cannot."""
    try:
        with agent.AgentConnection(vm.folder.agent_socket, timeout=FREEZE_TIMEOUT) as conn:
            conn.call("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
        return True
    except (AgentError, OperationTimeout):
        return False


def _thaw(vm: VM) -> None:
    with contextlib.suppress(AgentError, OperationTimeout), agent.AgentConnection(
            vm.folder.agent_socket, timeout=FREEZE_TIMEOUT) as conn:
        conn.call("guest-fsfreeze-thaw", timeout=FREEZE_TIMEOUT)


# -- restore ------------------------------------------------------------------------------
def restore(vm: VM, name: str) -> None:
    """Bring the VM to the snapshot: a memory snapshot continues running from that moment; a
    disk-only snapshot leaves the VM stopped with that disk (it is a powered-off state)."""
    with vm.host._vm_lock(vm.name):
        record = vm._observe(persist=True, locked=True)
        tree = load_tree(vm)
        node = tree.get(vm.name, name)
        if record.state in (VmState.STARTING, VmState.STOPPING):
            raise InvalidState(f"cannot restore VM {vm.name!r}: it is {record.state.value}")
        if record.state in LIVE_STATES:
            vm._kill_locked(record, note=f" (to restore snapshot {name!r})")
            record = vm._record()
        old_active = vm.active_layer()
        new_active = _new_layer()
        new_path = vm.folder.path / new_active
        img.create_overlay(new_path, Path(node.layer).name)
        try:
            save_tree(vm, tree.model_copy(update={"current": name, "active_layer": new_active}))
        except BaseException:
            new_path.unlink(missing_ok=True)
            raise
        if old_active not in {n.layer for n in tree.nodes.values()}:
            (vm.folder.path / old_active).unlink(missing_ok=True)  # the discarded present
        if node.memory is not None:
            state_file = vm.folder.path / node.memory
            vm._start_locked(
                record, resume=node.taken_in == "running",
                incoming=lambda qmp: blockops.load_memory(qmp, state_file, MEMORY_STATE_TIMEOUT))


# -- delete -------------------------------------------------------------------------------
def delete(vm: VM, name: str) -> None:
    with vm.host._vm_lock(vm.name):
        record = vm._observe(persist=True, locked=True)
        delete_locked(vm, record, name)


def delete_locked(vm: VM, record: RuntimeRecord, name: str) -> None:
    tree = load_tree(vm)
    node = tree.get(vm.name, name)
    layer_path = vm.folder.path / node.layer
    users = [other.name for other in vm.host.vms()
             if other.name != vm.name and other.config.backing_file == str(layer_path)]
    if users:
        raise InvalidState(
            f"cannot delete snapshot {name!r} of VM {vm.name!r}: linked clones use it as their "
            f"base ({', '.join(users)})", hint="delete those clones first")
    if record.state in (VmState.STARTING, VmState.STOPPING):
        raise InvalidState(f"cannot delete a snapshot of VM {vm.name!r}: it is "
                           f"{record.state.value}")
    parent_backing = _backing_of_children(vm, tree, node)
    children = [vm.folder.path / child.layer for child in tree.children(name)]
    active = vm.folder.path / vm.active_layer()
    if tree.current == name:
        children.append(active)
    running_chain = _running_chain(vm, tree) if record.state in LIVE_STATES else set()
    for child in children:
        if child in running_chain:
            _stream_into(vm, child, active, parent_backing)
        else:
            img.rebase(child, parent_backing, timeout=MERGE_TIMEOUT)
    save_tree(vm, tree.without(name))
    layer_path.unlink(missing_ok=True)
    if node.memory is not None:
        (vm.folder.path / node.memory).unlink(missing_ok=True)


def _backing_of_children(vm: VM, tree: DiskState, node: SnapshotNode) -> str | None:
    """What a child of `node` is backed by once `node` is gone: the parent's layer (relative,
    both live in disks/), else the VM's base image, else nothing (a full copy)."""
    if node.parent is not None:
        return Path(tree.nodes[node.parent].layer).name
    return vm.config.backing_file


def _running_chain(vm: VM, tree: DiskState) -> set[Path]:
    chain = {vm.folder.path / vm.active_layer()}
    name = tree.current
    while name is not None:
        chain.add(vm.folder.path / tree.nodes[name].layer)
        name = tree.nodes[name].parent
    return chain


def _stream_into(vm: VM, child: Path, active: Path, backing: str | None) -> None:
    """Merge the layer below `child` into it while QEMU has the chain open (block-stream)."""
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        device = blockops.top_node(qmp) if child == active else blockops.node_for_file(qmp, child)
        arguments: dict[str, object] = {"device": device}
        if backing is not None:
            base_path = Path(backing) if Path(backing).is_absolute() else child.parent / backing
            arguments["base-node"] = blockops.node_for_file(qmp, base_path)
            arguments["backing-file"] = backing
        blockops.run_job(qmp, "block-stream", arguments, f"merge-{uuidlib.uuid4().hex[:8]}",
                         MERGE_TIMEOUT)


__all__ = ["SnapshotInfo", "delete", "listing", "load_tree", "restore", "take"]
