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
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.core.journal import Journal, register_recovery
from vmkit.core.layers import (
    MEMORY_STATE_TIMEOUT,
    QMP_TIMEOUT,
    delete_locked,
    forget_nvram_before,
    restore_nvram,
    take_locked,
    undo_nvram,
)
from vmkit.core.locks import Held
from vmkit.core.store import (
    load_tree,
    new_layer,
    remove_unreferenced,
    save_tree,
    sweep_orphans,
)
from vmkit.errors import InvalidState, VmkitError, os_errors
from vmkit.model.journal import JournalEntry
from vmkit.model.snapshots import SnapshotNode
from vmkit.model.spec import disk_names
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.model.views import SnapshotInfo
from vmkit.qemu import agent, blockops, img
from vmkit.qemu.qmp import QmpConnection

if TYPE_CHECKING:
    from vmkit.core.engine import VM





RESEED_TIMEOUT = 30.0


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
        paused_ms=node.paused_ms,
    ) for depth, node in tree.walk()]


# -- take ---------------------------------------------------------------------------------
def take(vm: VM, name: str, *, disk_only: bool = False) -> SnapshotNode:
    with vm.host._vm_lock(vm.name) as held, os_errors(f"snapshot {name!r} of VM {vm.name!r}"):
        record = vm._observe(persist=True, held=held)
        return take_locked(held, vm, record, name, disk_only=disk_only)


# -- restore ------------------------------------------------------------------------------
def restore(vm: VM, name: str) -> None:
    """Bring the VM to the snapshot: a memory snapshot continues running from that moment; a
    disk-only snapshot leaves the VM stopped with that disk (it is a powered-off state).

    The present disk stays until the new QEMU has loaded the snapshot: only then is the tree
    switched and the old active layer retired."""
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        tree = load_tree(vm)
        node = tree.get(vm.name, name)
        if record.state in (VmState.STARTING, VmState.STOPPING):
            raise InvalidState(f"cannot restore VM {vm.name!r}: it is {record.state.value}")
        if node.memory is not None and vm.config.disks:
            # the saved machine has none of them: it would run without the disks vm.json
            # names, and a guest that had one in its memory would not find what it cached
            raise InvalidState(f"cannot restore memory snapshot {name!r} of VM {vm.name!r}: "
                               f"it has extra disks ({disk_names(vm.config)}) that machine "
                               "did not have", hint="remove them first (vmkit disk remove), "
                                                   "or restore a disk-only snapshot")
        old_active = vm.active_layer()
        new_active = new_layer()
        new_path = vm.folder.path / new_active
        log = Journal(vm.folder.runtime_root)
        log.begin("restore", name=name, new_layer=new_active, old_active=old_active)
        if record.state in LIVE_STATES:
            vm._kill_locked(held, record, note=f" (to restore snapshot {name!r})")
            record = vm._record()
        log.step("stopped")
        try:
            restore_nvram(vm, node)
            img.create_overlay(new_path, Path(node.layer).name)
            log.step("overlay-created")
            if node.memory is not None:
                state_file = vm.folder.path / node.memory
                vm._start_locked(held,
                    record, resume=node.taken_in == "running", layer=new_active,
                    machine=node.machine,  # the machine the state was taken from
                    incoming=lambda qmp: blockops.load_memory(qmp, state_file,
                                                              MEMORY_STATE_TIMEOUT))
            log.step("started")
        except BaseException:
            new_path.unlink(missing_ok=True)  # the present disk is untouched
            undo_nvram(vm)  # and so are its variables
            log.end()
            raise
        _finish_restore(vm, name, new_active, old_active)
        log.step("tree-saved")
        log.end()
        if node.memory is not None and node.taken_in == "running":
            # a restored guest resumes with the RNG state it was saved with: reseed it from the
            # host (False: no agent; the restore is done all the same)
            agent.reseed(vm.folder.agent_socket, RESEED_TIMEOUT)


def _finish_restore(vm: VM, name: str, new_active: str, old_active: str) -> None:
    forget_nvram_before(vm)
    tree = load_tree(vm)
    save_tree(vm, tree.model_copy(update={"current": name, "active_layer": new_active}))
    if old_active not in {n.layer for n in tree.nodes.values()} | {vm.config.disk_file}:
        (vm.folder.path / old_active).unlink(missing_ok=True)  # the discarded present


def recover_restore(held: Held, vm: VM, entry: JournalEntry) -> None:
    """Forward when the new QEMU runs from the snapshot (or the tree was saved), else back:
    no QEMU half-loaded, the present disk kept, the VM stopped."""
    intent = entry.intent
    new_layer, old_active = str(intent["new_layer"]), str(intent["old_active"])
    if entry.done("tree-saved"):
        remove_unreferenced(vm, [old_active])
        forget_nvram_before(vm)
        return
    tree = load_tree(vm)
    node = tree.nodes.get(str(intent["name"]))
    record = vm._observe(persist=True, held=held)
    if not entry.done("stopped"):
        remove_unreferenced(vm, [new_layer])
        undo_nvram(vm)
        return
    running_new = False
    if record.state in LIVE_STATES and vm._alive(record):
        with contextlib.suppress(VmkitError), \
                QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
            running_new = qmp.execute("query-status")["status"] in ("running", "paused")
        if not running_new:
            vm._kill_locked(held, record, note=" (an interrupted restore)")
    memory_snapshot = node is not None and node.memory is not None
    if node is not None and (running_new or (entry.done("started") and not memory_snapshot)):
        _finish_restore(vm, node.name, new_layer, old_active)
    else:
        remove_unreferenced(vm, [new_layer])
        undo_nvram(vm)


# -- delete -------------------------------------------------------------------------------
def delete(vm: VM, name: str) -> None:
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        tree = load_tree(vm)
        tree.get(vm.name, name)
        log = Journal(vm.folder.runtime_root)
        log.begin("delete-snapshot", name=name)
        try:
            delete_locked(held, vm, record, name, log=log)
        except BaseException:
            if load_tree(vm).nodes.get(name) is not None and not log_has(log, "merged"):
                log.end()  # nothing merged yet: nothing to finish
            raise
        log.end()


def log_has(log: Journal, step: str) -> bool:
    return log.entry is not None and log.entry.done(step)


def recover_delete(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A delete is safe to run again (a rebase onto the same parent changes nothing): finish
    it, or remove what its tree no longer names."""
    name = str(entry.intent["name"])
    tree = load_tree(vm)
    if name in tree.nodes:
        delete_locked(held, vm, vm._observe(persist=True, held=held), name)
    sweep_orphans(vm)




register_recovery("restore", recover_restore)


register_recovery("delete-snapshot", recover_delete)

__all__ = ["SnapshotInfo", "delete", "listing", "restore", "take"]
