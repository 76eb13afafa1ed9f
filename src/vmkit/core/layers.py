"""Disk layer mechanics of the VM store, under the VM's lock: take a snapshot (freeze the active
layer, a new one on top; with memory, the paused VM's state to a file), delete one (merge its
layer into each child: qemu-img rebase, or block-stream while QEMU has the chain open), and
quiesce/thaw the guest. Journalled (`take_locked` records every step; `recover_take` finishes or
undoes a cut). Operations (snapshots, clones, bundles) call these; they call no operation.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.core.journal import Journal, register_recovery
from vmkit.core.locks import Held
from vmkit.core.store import (
    DiskState,
    load_tree,
    new_layer,
    remove_unreferenced,
    save_tree,
)
from vmkit.errors import AgentError, InvalidState, OperationTimeout, VmkitError
from vmkit.isolation import jail
from vmkit.model.journal import JournalEntry
from vmkit.model.runtime import RuntimeRecord
from vmkit.model.snapshots import SnapshotNode
from vmkit.model.spec import disk_names
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.qemu import agent, blockops, img
from vmkit.qemu.qmp import QmpConnection
from vmkit.storage.layout import write_bytes_atomic

if TYPE_CHECKING:
    from vmkit.core.engine import VM

QMP_TIMEOUT = 10.0
MEMORY_STATE_TIMEOUT = 300.0
LIVE_SAVE_DOWNTIME_MS = 20  # QEMU's target for the last pass of a running VM's save
LIVE_SAVE_LIMIT = 20.0  # seconds of live copying before a save that does not converge pauses
MERGE_TIMEOUT = 3600.0
FREEZE_TIMEOUT = 10.0


def take_locked(held: Held, vm: VM, record: RuntimeRecord, name: str, *, disk_only: bool,
                journal: bool | Journal = True, qmp: QmpConnection | None = None,
                quiesce: bool = True) -> SnapshotNode:
    """Take the snapshot (the caller holds the VM's lock). With `journal`, every step is
    recorded so an interruption is rolled forward or back (`recover_take`); an operation that
    takes a helper snapshot inside its own journal passes that Journal (its steps go there,
    and its recovery calls `recover_take`: an instant clone) or False (export). `qmp`: the
    caller's own connection to the VM's monitor (an instant clone's, mid-migration).
    `quiesce`: a disk-only snapshot of a running guest freezes its file systems first (a
    move's helper does not: its layer and the mirrored layer above are the disk whole)."""
    held.require(vm.name)
    tree = load_tree(vm)
    tree.check_new(vm.name, name)
    if record.state in (VmState.STARTING, VmState.STOPPING):
        raise InvalidState(f"cannot snapshot VM {vm.name!r}: it is {record.state.value}",
                           hint="wait until it is running or stopped")
    live = record.state in (VmState.RUNNING, VmState.PAUSED)
    with_memory = live and not disk_only
    active = vm.active_layer()
    new_active = new_layer()
    new_path = vm.folder.path / new_active
    memory_rel = f"snapshots/{name}.state" if with_memory else None
    memory_path = vm.folder.path / memory_rel if memory_rel else None
    taken_in = record.state.value if live else "stopped"
    in_the_way = disk_names(vm.config, record.machine.config if record.machine else None)
    if with_memory and in_the_way:
        raise InvalidState(f"cannot take a memory snapshot of VM {vm.name!r}: its extra disks "
                           f"({in_the_way}) are not in snapshots, and a saved memory "
                           "would not match what they hold by the time it is restored",
                           hint="take it --disk-only (the extra disks stay as they are)")
    if with_memory and record.machine is not None and not record.machine.rebuildable:
        raise InvalidState(f"cannot take a memory snapshot of VM {vm.name!r}: a device it "
                           "started with was unplugged live, and that machine cannot be started "
                           "again", hint="take it --disk-only, or restart the VM first")
    nvram_rel = f"snapshots/{name}.nvram.fd" if vm.folder.nvram.is_file() else None
    if not live:
        img.create_overlay(new_path, Path(active).name)
        node = SnapshotNode(name=name, parent=tree.current, created_at=time.time(),
                            layer=active, taken_in=taken_in,
                            nvram=_keep_nvram(vm, nvram_rel))
        _commit(vm, tree, node, new_active, new_path)
        return node

    own_journal = journal is True
    log = journal if isinstance(journal, Journal) else Journal(vm.folder.runtime_root) if journal \
        else None
    if own_journal and log is not None:
        log.begin("snapshot", name=name, new_layer=new_active, memory=memory_rel)
    quiesced: bool | None = None
    switched = False
    with (contextlib.nullcontext(qmp) if qmp is not None else
          QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT)) as qmp:
        was_running = record.state is VmState.RUNNING
        paused_by_us = freeze_tried = False
        try:
            if disk_only:
                if was_running and quiesce:
                    freeze_tried = True
                    _step(log, "paused", frozen=True)
                    quiesced = _freeze(vm)
            elif was_running:
                # the save pauses the guest only for its last pass, and leaves it paused:
                # the disk switches at that same moment, then it resumes
                _step(log, "paused", paused_by_us=True, live_save=True)
                paused_by_us = True
            # the new layer is made and journalled before the pause: the pause holds only
            # the save's last pass, the disk switch and `cont`
            img.create_overlay(new_path, Path(active).name)
            jail.give_file(vm.owner(), vm.folder.path, new_active)  # QEMU opens it as the VM
            node = SnapshotNode(
                name=name, parent=tree.current, created_at=time.time(), layer=active,
                memory=memory_rel, taken_in=taken_in, quiesced=quiesced,
                machine=record.machine if with_memory else None, nvram=nvram_rel)
            _step(log, "overlay-created", node=node.model_dump(mode="json"), name=name,
                  new_layer=new_active, memory=memory_rel)
            with contextlib.ExitStack() as saved:
                # STOP and RESUME events carry QEMU's timestamps: the pause, whole
                pauses = saved.enter_context(qmp.listening("STOP", "RESUME"))
                if memory_path is not None:
                    memory_path.parent.mkdir(mode=0o700, exist_ok=True)
                    if was_running and record.copies_memory_live:
                        saved.enter_context(blockops.saving_memory_live(
                            qmp, memory_path, MEMORY_STATE_TIMEOUT,
                            downtime_ms=LIVE_SAVE_DOWNTIME_MS, live_for=LIVE_SAVE_LIMIT))
                    else:
                        if was_running:
                            qmp.execute("stop")  # see RuntimeRecord.copies_memory_live
                        saved.enter_context(blockops.saving_memory(qmp, memory_path,
                                                                   MEMORY_STATE_TIMEOUT))
                # the variables at the moment the disk switches (the guest is paused or
                # frozen); journalled in the node above, copied before the switch: a
                # roll-forward finds it
                _keep_nvram(vm, nvram_rel)
                # switch QEMU over first, then publish the tree: the tree never names a layer
                # QEMU is not writing to; a cut in between is rolled forward by the journal
                blockops.add_overlay_on_top(qmp, new_path, f"layer-{Path(new_active).stem}")
                switched = True
                if paused_by_us:
                    qmp.execute("cont")
                    paused_by_us = False
                    # by QEMU's own stamps (None, "unknown", if it did not send both)
                    paused = blockops.pause_of(pauses, qmp)
                    node = node.model_copy(update={
                        "paused_ms": round(paused, 1) if paused is not None else None})
            # (the memory state's descriptor was let go here, after the guest resumed)
            if memory_path is not None:
                node = node.model_copy(update={"memory_size": memory_path.stat().st_size})
                _step(log, "memory-saved")
            _step(log, "switched")
            save_tree(vm, tree.with_node(node).model_copy(update={"active_layer": new_active}))
            _step(log, "tree-saved")
        except BaseException:
            if not switched:
                new_path.unlink(missing_ok=True)
                if memory_path is not None:
                    memory_path.unlink(missing_ok=True)
                if nvram_rel is not None:
                    (vm.folder.path / nvram_rel).unlink(missing_ok=True)
                if own_journal and log is not None:
                    log.end()  # rolled back here; after the switch recovery rolls forward
            raise
        finally:
            if freeze_tried:
                thaw(vm)  # also when the freeze timed out: the guest may be frozen anyway
            if paused_by_us:  # a save that failed: it may still be going, or have paused it
                blockops.cancel_migration(qmp)
                qmp.execute("cont")
    if own_journal and log is not None:
        log.end()
    return node


def note_pause(vm: VM, name: str, paused_ms: float) -> None:
    """Record on snapshot `name` how long its taking paused the guest (the caller holds the
    VM's lock; an instant clone's helper snapshot is taken inside the clone's switch-over)."""
    tree = load_tree(vm)
    node = tree.nodes[name].model_copy(update={"paused_ms": round(paused_ms, 1)})
    save_tree(vm, tree.model_copy(update={"nodes": {**tree.nodes, name: node}}))


def _keep_nvram(vm: VM, relative: str | None) -> str | None:
    """A copy of the VM's UEFI variables for a snapshot (root's: QEMU never opens it)."""
    if relative is None:
        return None
    target = vm.folder.path / relative
    target.parent.mkdir(mode=0o700, exist_ok=True)
    write_bytes_atomic(target, vm.folder.nvram.read_bytes(), mode=0o600)
    return relative


NVRAM_BEFORE = "disks/nvram.fd.before-restore"


def restore_nvram(vm: VM, node: SnapshotNode) -> bool:
    """Put a snapshot's UEFI variables back, the present ones kept aside first (a file, so a
    restore cut here is undone by recovery: `undo_nvram`); False when it has none."""
    if node.nvram is None:
        return False
    write_bytes_atomic(vm.folder.path / NVRAM_BEFORE, vm.folder.nvram.read_bytes(), mode=0o600)
    write_bytes_atomic(vm.folder.nvram, (vm.folder.path / node.nvram).read_bytes(), mode=0o600)
    return True


def undo_nvram(vm: VM) -> None:
    """A restore that did not happen: the variables kept aside go back (idempotent)."""
    before = vm.folder.path / NVRAM_BEFORE
    if before.is_file() and not before.is_symlink():
        os.replace(before, vm.folder.nvram)


def forget_nvram_before(vm: VM) -> None:
    (vm.folder.path / NVRAM_BEFORE).unlink(missing_ok=True)


def _step(log: Journal | None, step: str, /, **intent: object) -> None:
    if log is not None:
        log.step(step, **intent)


def recover_take(held: Held, vm: VM, entry: JournalEntry) -> None:
    """Finish or undo an interrupted live snapshot: forward when QEMU already writes to the
    new layer (or the tree was saved), else back; then thaw and resume what it stopped."""
    intent = entry.intent
    new_layer = str(intent["new_layer"])
    record = vm._record()
    alive = vm._alive(record)
    top = None
    if alive:
        with contextlib.suppress(VmkitError), \
                QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
            top = blockops.top_node(qmp)
    tree = load_tree(vm)
    forward = entry.done("switched") or top == f"layer-{Path(new_layer).stem}"
    node_data = intent.get("node")
    if forward and node_data is not None and intent["name"] not in tree.nodes:
        node = SnapshotNode.model_validate(node_data)
        if node.memory is not None:  # journalled before the save: its size is known now
            with contextlib.suppress(OSError):
                node = node.model_copy(update={
                    "memory_size": (vm.folder.path / node.memory).stat().st_size})
        save_tree(vm, tree.with_node(node).model_copy(update={"active_layer": new_layer}))
    elif not forward:
        kept = SnapshotNode.model_validate(node_data).nvram if node_data is not None else None
        remove_unreferenced(vm, [new_layer, intent.get("memory"), kept])
    if alive:
        if intent.get("frozen"):
            thaw(vm)
        if intent.get("paused_by_us"):
            _continue_if_paused(vm)


def _continue_if_paused(vm: VM) -> None:
    with contextlib.suppress(VmkitError), \
            QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        # a live save cut short may still be copying: it would pause the guest when it ends
        blockops.cancel_migration(qmp)
        # after a completed save QEMU says postmigrate; both continue with `cont`
        if qmp.execute("query-status")["status"] in ("paused", "postmigrate"):
            qmp.execute("cont")


def _commit(vm: VM, tree: DiskState, node: SnapshotNode, new_active: str, new_path: Path) -> None:
    try:
        save_tree(vm, tree.with_node(node).model_copy(update={"active_layer": new_active}))
    except BaseException:
        new_path.unlink(missing_ok=True)
        raise


def _freeze(vm: VM) -> bool:
    """Quiesce the guest's file systems through the agent; False when it cannot (the caller
    thaws in any case: a freeze that timed out here may still complete in the guest)."""
    try:
        with agent.AgentConnection(vm.folder.agent_socket, timeout=FREEZE_TIMEOUT) as conn:
            conn.call("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
        return True
    except (AgentError, OperationTimeout):
        return False


THAW_ATTEMPTS = 6


def thaw(vm: VM) -> bool:
    """Thaw the guest's file systems, retrying while a stalled freeze may still hold the
    agent; True once the agent says nothing is frozen."""
    for attempt in range(THAW_ATTEMPTS):
        try:
            with agent.AgentConnection(vm.folder.agent_socket, timeout=FREEZE_TIMEOUT) as conn:
                conn.call("guest-fsfreeze-thaw", timeout=FREEZE_TIMEOUT)
                if conn.call("guest-fsfreeze-status", timeout=FREEZE_TIMEOUT) == "thawed":
                    return True
        except (AgentError, OperationTimeout):
            pass
        time.sleep(min(5.0, 0.5 * 2 ** attempt))
    return False


def delete_locked(held: Held, vm: VM, record: RuntimeRecord, name: str, *,
                  log: Journal | None = None) -> None:
    held.require(vm.name)
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
            img.rebase(child, parent_backing, timeout=MERGE_TIMEOUT, untrusted=True,
                       owner=vm.disk_owner())
    _step(log, "merged")
    save_tree(vm, tree.without(name))
    _step(log, "tree-saved")
    layer_path.unlink(missing_ok=True)
    for kept in (node.memory, node.nvram):
        if kept is not None:
            (vm.folder.path / kept).unlink(missing_ok=True)


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




register_recovery("snapshot", recover_take)
