"""Clone use cases of the engine: full, linked, from a snapshot, and instant (live).

- full: a standalone qcow2 flattened from the chosen point (`qemu-img convert`).
- linked: a qcow2 overlay on an immutable snapshot layer of the source: O(1) in disk size. Without
  --from-snapshot an automatic disk-only snapshot `clone-TARGET` of the source is that layer.
- instant (--live): the running source's memory is streamed into the clone's new QEMU over a
  UNIX socket while it runs (QEMU re-sends what it dirties); its vCPUs stop only for the last
  pass, during which its disk is frozen by a snapshot the clone's overlay sits on; both then
  run. The guest is told its new identity through the agent: hostname, MAC address, a reseeded
  RNG.

Every clone gets a new identity: uuid, MAC, hostname (kernel command line) — never the source's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.core import layers, store
from vmkit.core.journal import Journal, register_recovery
from vmkit.core.locks import Held
from vmkit.errors import AlreadyExists, InvalidState, VmkitError
from vmkit.images import catalog
from vmkit.isolation import jail
from vmkit.model.journal import JournalEntry
from vmkit.model.names import validate_name
from vmkit.model.network import Nic
from vmkit.model.runtime import MachineRecord, RuntimeRecord
from vmkit.model.snapshots import SnapshotNode
from vmkit.model.spec import (
    ROOT_DISK_FILE,
    VOLUMES_DIR,
    VmConfig,
    as_new_machine,
    disk_names,
)
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.qemu import agent, blockops, img
from vmkit.qemu.qmp import QmpConnection, qmp_execute
from vmkit.storage.layout import VmFolder

if TYPE_CHECKING:
    from vmkit.core.engine import VM

MIGRATE_TIMEOUT = 300.0
IDENTITY_TIMEOUT = 30.0


def _identity(source: VmConfig, target: str, *, backing: Path | None) -> VmConfig:
    config = as_new_machine(source, target, created_at=time.time())
    return config.model_copy(update={
        "spec": config.spec.model_copy(update={"full_copy": backing is None}),
        "disk_file": ROOT_DISK_FILE,
        "backing_file": str(backing) if backing is not None else None,
    })


def _link_boot(source: VM, work: VmFolder, node: SnapshotNode | None = None) -> None:
    """The boot files (shared: nobody writes them) and a copy of the UEFI variables (each VM
    writes its own): those of snapshot `node` when the clone starts from it."""
    for item in source.folder.boot.iterdir():
        catalog.link_or_copy(item, work.boot / item.name)
    kept = source.folder.path / node.nvram if node is not None and node.nvram else None
    if kept is not None or source.folder.nvram.is_file():
        shutil.copyfile(kept or source.folder.nvram, work.nvram)
        os.chmod(work.nvram, 0o600)


def copy_volumes(source: VM, work: VmFolder) -> None:
    """Full copies of the extra disks (a linked clone shares the root disk's layers only),
    each standing alone whatever its header says."""
    if source.config.disks:
        (work.path / VOLUMES_DIR).mkdir(mode=0o700, exist_ok=True)
    for disk in source.config.disks:
        img.copy_standalone(source.folder.path / disk.file, work.path / disk.file,
                            owner=source.disk_owner())


def clone(source: VM, target: str, *, linked: bool = False, from_snapshot: str | None = None,
          live: bool = False) -> VM:
    validate_name(target)
    host = source.host
    if (linked or live) and source.folder.shared:
        # its layers move between hosts' uids with the VM, and another host may run it
        raise InvalidState(f"VM {source.name!r} is on shared storage: a "
                           f"{'linked' if linked else 'instant'} clone would lean on its "
                           "layers there", hint=f"make a full clone (vmkit clone {source.name} "
                                                f"{target})")
    if live:
        if from_snapshot is not None:
            raise InvalidState("an instant clone starts from the source's present state",
                               hint="drop --from-snapshot, or clone without --live")
        return instant_clone(source, target)
    _check_free(source, target)
    with host._vm_lock(source.name) as held:
        record = source._observe(persist=True, held=held)
        if source.config.disks and record.state in LIVE_STATES:
            raise InvalidState(f"cannot clone VM {source.name!r} while it is "
                               f"{record.state.value}: its extra disks "
                               f"({disk_names(source.config)}) are copied as they are, and a "
                               "running guest is writing them",
                               hint=f"stop it first (vmkit stop {source.name})")
        tree = store.load_tree(source)
        automatic: str | None = None
        node: SnapshotNode | None = None
        if from_snapshot is not None:
            node = tree.get(source.name, from_snapshot)
        elif linked or record.state in LIVE_STATES:
            automatic = f"clone-{target}"[:63]
        # journalled in the source's folder: the helper snapshot, the clone published, the
        # helper merged back (full clone); recover_clone finishes or undoes a cut
        log = Journal(source.folder.runtime_root)
        log.begin("clone", target=target, automatic=automatic, linked=linked,
                  frozen=automatic is not None and record.state is VmState.RUNNING)
        if automatic is not None:
            node = layers.take_locked(held, source, record, automatic, disk_only=True,
                                      journal=False)
        log.step("snapshot-taken")
        point = source.folder.path / (node.layer if node else source.active_layer())
        try:
            def build(work: VmFolder) -> VmConfig:
                # the variables of the still point (a helper snapshot's, frozen with the disk)
                _link_boot(source, work, node)
                disk = work.path / ROOT_DISK_FILE
                if linked:
                    img.create_overlay(disk, point)
                else:
                    # the source's layers hold what its guest wrote: read as its own uid
                    img.convert_flat(point, disk, untrusted=True, owner=source.disk_owner())
                copy_volumes(source, work)
                return _identity(source.config, target, backing=point if linked else None)

            vm = host._new_vm_folder(target, build)
            log.step("clone-published")
        except BaseException:
            if automatic is not None:
                layers.delete_locked(held, source, source._record(), automatic)
            log.end()
            raise
        if automatic is not None and not linked:
            # a full clone only needed a still point; give the layer back to the source
            layers.delete_locked(held, source, source._record(), automatic)
        log.step("merged-back")
        log.end()
    return vm


def recover_clone(held: Held, source: VM, entry: JournalEntry) -> None:
    """A clone is published by one rename (a hidden half-built folder is swept by the next
    listing); what the journal adds: the helper snapshot merged back unless a published linked
    clone leans on it, and a guest it froze thawed."""
    intent = entry.intent
    automatic = intent.get("automatic")
    published = source.host.layout.vm(str(intent["target"])).config_file.exists()
    record = source._observe(persist=True, held=held)
    if intent.get("frozen") and source._alive(record):
        layers.thaw(source)
    keep = published and bool(intent.get("linked"))
    if isinstance(automatic, str) and not keep and \
            automatic in store.load_tree(source).nodes:
        layers.delete_locked(held, source, record, automatic)


def _check_free(source: VM, target: str) -> None:
    """Refuse an existing target before touching the source (the builder checks again)."""
    if source.host.layout.vm(target).config_file.exists():
        raise AlreadyExists(f"VM {target!r} already exists",
                            hint=f"pick another name or delete it: vmkit delete {target}")


def instant_clone(source: VM, target: str) -> VM:
    """A running copy of a running VM; the source keeps running.

    Journalled in the source's folder: the clone published (its overlay on the source's
    active layer), the memory sent while the source runs, the source paused at the
    switch-over, its helper snapshot (that layer frozen), the clone running, the source
    resumed. A cut anywhere is rolled forward (the clone runs: resume the source) or back (no
    clone, no helper snapshot, the source running) by `recover_instant_clone`."""
    host = source.host
    _check_free(source, target)
    with host._vm_lock(source.name) as held:
        record = source._observe(persist=True, held=held)
        if record.state is not VmState.RUNNING:
            raise InvalidState(f"cannot instant-clone VM {source.name!r}: it is "
                               f"{record.state.value} (an instant clone needs a running VM)",
                               hint=f"start it first (vmkit start {source.name})")
        if source.config.hardware.tpm:
            raise InvalidState(f"cannot instant-clone VM {source.name!r}: it has a TPM, and a "
                               "running copy would carry the same TPM identity (its keys)",
                               hint=f"clone it without --live: vmkit clone {source.name} "
                                    f"{target} (the copy gets a TPM of its own)")
        in_the_way = disk_names(source.config,
                                record.machine.config if record.machine else None)
        if in_the_way:
            raise InvalidState(f"cannot instant-clone VM {source.name!r}: its extra disks "
                               f"({in_the_way}) are not shared the way its root "
                               "disk is, and the copy's memory would not match copies of them",
                               hint=f"clone it without --live: vmkit clone {source.name} "
                                    f"{target}")
        if record.machine is not None and not record.machine.rebuildable:
            raise InvalidState(f"cannot instant-clone VM {source.name!r}: a device it started "
                               "with was unplugged live, and that machine cannot be started "
                               "again", hint=f"restart it first (vmkit restart {source.name})")
        log = Journal(source.folder.runtime_root)
        point = f"clone-{target}"[:63]
        store.load_tree(source).check_new(source.name, point)  # before anything is made
        # the clone's disk is an overlay on the source's active layer, which becomes the
        # helper snapshot's frozen layer at the switch-over. The clone's QEMU opens it when it
        # starts (reading its header, no lock taken: an incoming QEMU's disks stay inactive)
        # and reads it again when its state has arrived.
        layer = source.folder.path / source.active_layer()
        with QmpConnection(source.folder.qmp_socket, timeout=10) as sq:
            size = blockops.disk_size(sq)
        log.begin("instant-clone", target=target, point=point, layer=str(layer))

        def build(work: VmFolder) -> VmConfig:
            _link_boot(source, work)
            img.create_overlay(work.path / ROOT_DISK_FILE, layer, size, unopened=True)
            return _identity(source.config, target, backing=layer)

        node: SnapshotNode | None = None
        paused_ms = 0.0
        try:
            # the clone's lock from before its folder exists: nobody starts it meanwhile
            with host._vm_lock(target) as target_held:
                clone_vm = host._new_vm_folder(target, build, held=target_held)
                log.step("clone-published")
                jail.share_layers(clone_vm.owner(), [layer])  # before it is a snapshot's
                # the memory travels over a socketpair vmkit hands to both QEMUs: each runs
                # under its own uid and neither can open the other's folder
                outgoing, incoming = socket.socketpair()

                def switch_disk(sq: QmpConnection) -> None:
                    """At the switch-over (the source's vCPUs stopped): freeze the disk the
                    clone's overlay sits on, and the UEFI variables of this moment."""
                    nonlocal node
                    log.step("paused")
                    paused = record.model_copy(update={"state": VmState.PAUSED})
                    node = layers.take_locked(held, source, paused, point, disk_only=True,
                                              journal=log, qmp=sq)
                    if source.folder.nvram.is_file():
                        shutil.copyfile(source.folder.nvram, clone_vm.folder.nvram)

                def receive(qmp: QmpConnection) -> None:
                    nonlocal paused_ms
                    blockops.listen_incoming(qmp, incoming)
                    with QmpConnection(source.folder.qmp_socket, timeout=10) as sq:
                        stopped_at = time.monotonic()
                        if not record.copies_memory_live:
                            sq.execute("stop")  # see RuntimeRecord.copies_memory_live
                        sent = blockops.send_memory_live(
                            sq, outgoing, MIGRATE_TIMEOUT, downtime_ms=SWITCHOVER_DOWNTIME_MS,
                            live_for=layers.LIVE_SAVE_LIMIT,
                            at_switchover=lambda: switch_disk(sq))
                        completed = time.monotonic()
                        sq.execute("cont")
                        # QEMU's figure (vCPUs stopped -> all sent, the disk switch included)
                        # + the `cont`; a source stopped first: all of it
                        paused_ms = 1000 * (time.monotonic() - stopped_at) \
                            if not record.copies_memory_live else \
                            blockops.downtime_of(sent) + 1000 * (time.monotonic() - completed)
                    blockops.wait_migration(qmp, MIGRATE_TIMEOUT, "receiving memory")

                try:
                    clone_vm._start_locked(target_held, RuntimeRecord(), incoming=receive,
                                           machine=_same_machine(source, clone_vm))
                finally:
                    outgoing.close()
                    incoming.close()
            log.step("clone-started")
        except BaseException:
            _undo_instant_clone(held, source, log.entry)
            log.end()
            raise
        _resume(source)
        log.step("source-resumed")
        if node is not None:
            layers.note_pause(source, node.name, paused_ms)
        log.end()
    _identity_or_remove(source, clone_vm, point)
    return clone_vm


def _identity_or_remove(source: VM, clone: VM, point: str,
                        source_held: Held | None = None) -> None:
    """A clone that could not be told its identity would run as its source's twin (hostname,
    MAC and RNG state) on the same networks: it is removed with the source's helper
    snapshot `point` (merged away while the source runs), and the error says so.
    `source_held`: the source's lock when the caller holds it (a recovery)."""
    try:
        tell_new_identity(clone)
    except BaseException as exc:
        with contextlib.suppress(VmkitError), clone.host._vm_lock(clone.name) as held:
            clone._remove_locked(held, clone._observe(persist=True, held=held))
        with contextlib.suppress(VmkitError), (
                contextlib.nullcontext(source_held) if source_held is not None
                else source.host._vm_lock(source.name)) as held:
            if point in store.load_tree(source).nodes:
                layers.delete_locked(held, source, source._observe(persist=True, held=held),
                                     point)
        if isinstance(exc, VmkitError):
            raise VmkitError(f"{exc.message}; the clone was removed (its source runs on)",
                             hint="see that the guest agent runs in the source, then clone "
                                  "again") from exc
        raise


SWITCHOVER_DOWNTIME_MS = 20  # QEMU's target for the last pass of an instant clone's source


def _undo_instant_clone(held: Held, source: VM, entry: JournalEntry | None) -> None:
    """No clone: its QEMU, folder, uid and read access to the source's layers gone, the
    source's migration settled, its helper snapshot finished as far as it got (recover_take:
    a layer QEMU already writes to is kept) and merged away, the source running (idempotent)."""
    if entry is None:
        return
    host = source.host
    target, point = str(entry.intent["target"]), str(entry.intent["point"])
    # (a journal of an older vmkit names no layer: its clone leaned on a frozen one only)
    lent = [Path(str(entry.intent["layer"]))] if entry.intent.get("layer") else []
    _settle_source(source)
    if host.layout.vm(target).config_file.exists():
        with host._vm_lock(target) as target_held:
            clone = host.get(target)
            record = clone._observe(persist=True, held=target_held)
            if record.state in LIVE_STATES:
                clone._kill_locked(target_held, record, note=" (an interrupted instant clone)")
            vm_uuid = clone.config.uuid
            owner = clone.owner()
            if owner is not None:
                jail.unshare_layers(owner.uid, [*lent, *clone.leaned_on_layers()])
            host._discard_vm_folder(target)
            jail.release_owner(vm_uuid)
    if entry.done("overlay-created"):
        layers.recover_take(held, source, entry)
    if point in store.load_tree(source).nodes:
        layers.delete_locked(held, source, source._observe(persist=True, held=held), point)
    _resume(source)


def _same_machine(source: VM, clone: VM) -> MachineRecord | None:
    """The clone's machine: the source's as it runs (its vm.json at start, with what was
    hot-plugged since), under the clone's own identity (uuid, MACs, name). A clone's NICs
    follow its source's in order, so MACs map by position."""
    running = source._record().machine
    if running is None:
        return None
    was, now = running.config, clone.config
    macs = {old.mac: new.mac for old, new in zip(source.config.nics, now.nics, strict=False)}

    def mapped(nic: Nic) -> Nic:
        return nic.model_copy(update={"mac": macs.get(nic.mac, nic.mac), "address": None})

    config = now.model_copy(update={
        "spec": was.spec.model_copy(update={"name": now.spec.name}),
        "hardware": was.hardware, "nics": tuple(mapped(n) for n in was.nics)})
    plugged = tuple(p.model_copy(update={"nic": mapped(p.nic)}) for p in running.nics)
    return running.model_copy(update={"config": config, "nics": plugged})


def recover_instant_clone(held: Held, source: VM, entry: JournalEntry) -> None:
    """Forward when the clone runs from the source's memory (the source resumed, the clone told
    its identity), else back (`_undo_instant_clone`). The caller holds the source's lock."""
    host = source.host
    target = str(entry.intent["target"])
    if host.layout.vm(target).config_file.exists():
        clone: VM | None = None
        with host._vm_lock(target) as target_held:
            found = host.get(target)
            record = found._observe(persist=True, held=target_held)
            if record.state in LIVE_STATES and found._alive(record):
                with contextlib.suppress(VmkitError):
                    # "paused": its state arrived but it was never continued (still -S)
                    if qmp_execute(found.folder.qmp_socket, "query-status")["status"] \
                            == "running":
                        clone = found
        if clone is not None:
            _resume(source)  # the clone has all it needs
            _settle_source(source)
            with contextlib.suppress(VmkitError):
                _identity_or_remove(source, clone, str(entry.intent["point"]), held)
            return
    _undo_instant_clone(held, source, entry)


def _settle_source(source: VM) -> None:
    """The source's migration to a clone cancelled if it still goes, its switch-over pause off."""
    with contextlib.suppress(VmkitError), \
            QmpConnection(source.folder.qmp_socket, timeout=10) as sq:
        blockops.settle_migration(sq)


def _resume(vm: VM) -> None:
    """Let the source run again whatever state the clone left it in (paused or postmigrate)."""
    try:
        with QmpConnection(vm.folder.qmp_socket, timeout=10) as qmp:
            # (a send that just ended, either way, may still be leaving finish-migrate)
            if blockops.until_finalized(qmp) != "running":
                qmp.execute("cont")
    except VmkitError:
        pass


def tell_new_identity(vm: VM) -> None:
    """Inside the cloned guest: its hostname, its MAC (the NIC follows), a reseeded RNG."""
    sock = vm.folder.agent_socket
    agent.wait_agent_ready(sock, IDENTITY_TIMEOUT)
    macs = [n.mac for n in vm.config.nics] or [vm.config.mac]
    # NICs in the guest appear in the order of the VM's NICs; each takes its new MAC and asks
    # for the lease that goes with it. The clone starts from its source's RNG state: credited
    # host entropy and a forced reseed (the guest kernels here have no vmgenid driver to do
    # it on their own), in the same guest process as the identity
    result = agent.reseed(sock, IDENTITY_TIMEOUT, identity=(vm.name, macs))
    if result is None or result.exit_code == agent.RESEED_FIRST_FAILED:
        detail = result.stderr if result else "its guest agent did not answer"
        raise VmkitError(f"could not give clone {vm.name!r} its new identity: {detail}")
    if not result.ok:
        raise VmkitError(f"could not reseed the RNG of clone {vm.name!r} through its guest "
                         f"agent: {result.stderr}")


register_recovery("instant-clone", recover_instant_clone)


register_recovery("clone", recover_clone)
