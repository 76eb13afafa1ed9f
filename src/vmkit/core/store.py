"""The VM store's disk side: snapshots.json (the snapshot tree and the active layer, one file
written atomically) and the layer files it names; what nothing names is swept."""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.core.journal import Journal
from vmkit.errors import InvalidState
from vmkit.model.migration import may_start
from vmkit.model.snapshots import SnapshotTree
from vmkit.model.spec import VmConfig, check_relative_path
from vmkit.storage.layout import read_metadata, read_registration, write_json_atomic

if TYPE_CHECKING:
    from vmkit.core.engine import VM, Host

TREE_FILE = "snapshots.json"


class DiskState(SnapshotTree):
    """snapshots.json: the tree plus the active layer (one file, so one atomic write)."""

    active_layer: str | None = None


def load_tree(vm: VM) -> DiskState:
    path = vm.folder.path / TREE_FILE
    if not path.exists():
        return DiskState()
    return read_metadata(path, DiskState, f"VM {vm.name!r}")


def save_tree(vm: VM, tree: DiskState) -> None:
    write_json_atomic(vm.folder.path / TREE_FILE, tree.model_dump(mode="json"))


def new_layer() -> str:
    return f"disks/{uuidlib.uuid4().hex[:12]}.qcow2"


def _own_files(vm: VM) -> set[str]:
    """Disk files the VM uses besides its snapshot layers: the active layer, the root disk and
    a base inside the folder (an imported VM's flattened `disks/base.qcow2`)."""
    files = {vm.active_layer(), vm.config.disk_file}
    backing = vm.config.backing_file
    if backing and not backing.startswith("/"):
        files.add(f"disks/{backing}")
    return files


def remove_unreferenced(vm: VM, files: list[object]) -> None:
    """Remove files the tree does not name (a half-made layer or state)."""
    tree = load_tree(vm)
    used = {n.layer for n in tree.nodes.values()} | {n.memory for n in tree.nodes.values()}
    used |= {n.nvram for n in tree.nodes.values()}
    used |= _own_files(vm)
    for rel in files:
        if isinstance(rel, str) and rel not in used:
            check_relative_path("journal file", rel)
            (vm.folder.path / rel).unlink(missing_ok=True)


def sweep_orphans(vm: VM) -> list[str]:
    """Remove layers and memory states nothing names (left by an interruption before there
    was a journal, or by a crash of vmkit itself); the caller holds the lock, no journal."""
    tree = load_tree(vm)
    used = {n.layer for n in tree.nodes.values()} | {n.memory for n in tree.nodes.values()}
    used |= {n.nvram for n in tree.nodes.values()}
    used |= _own_files(vm)
    used |= {disk.file for disk in vm.config.disks}
    removed = []
    for folder, suffix in (("disks", ".qcow2"), ("snapshots", ".state"),
                           ("snapshots", ".nvram.fd"), ("volumes", ".qcow2")):
        directory = vm.folder.path / folder
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            rel = f"{folder}/{entry.name}"
            if entry.name.endswith(suffix) and rel not in used and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(rel)
    return removed


# -- ownership: where a VM went (model/migration.may_start) ----------------------------------
def _tombstones(host: Host) -> Path:
    return host.layout.root / "moved"


def tombstone(host: Host, vm_uuid: str) -> dict[str, Any] | None:
    """What this host remembers of a VM that moved away (None: it never left from here)."""
    try:
        data = json.loads((_tombstones(host) / f"{vm_uuid}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_may_start(vm: VM) -> None:
    """Refuse to start a VM another host owns at a newer generation (it moved away)."""
    if vm.folder.shared:
        check_holds_shared(vm)
    moved = tombstone(vm.host, vm.config.uuid)
    owner = moved.get("generation") if moved else None
    if not may_start(vm.config.generation, owner if isinstance(owner, int) else None):
        raise InvalidState(f"VM {vm.name!r} moved to {moved and moved.get('destination')} "
                           f"(generation {owner}; this copy is {vm.config.generation}): it "
                           "runs there, never here", hint="delete this stale copy")


def check_holds_shared(vm: VM) -> None:
    """A VM on shared storage runs where the registration's generation is the folder's; an
    arrival (journal migrate-in) holds the next one until its finish writes it there."""
    registration = read_registration(vm.folder.runtime_root)
    held = registration.generation if registration is not None else -1
    entry = Journal(vm.folder.runtime_root).read()
    arriving = entry is not None and entry.op == "migrate-in"
    if registration is not None and registration.uuid != vm.config.uuid:
        raise InvalidState(f"VM {vm.name!r} is not this host's to start: its folder on shared "
                           f"storage ({vm.folder.path}) now holds another VM (uuid "
                           f"{vm.config.uuid}, this host registered {registration.uuid})",
                           hint=f"vmkit delete {vm.name} here removes only this host's "
                                "registration")
    if held == vm.config.generation + (1 if arriving else 0):
        return
    raise InvalidState(f"VM {vm.name!r} is not this host's to start: its folder on shared "
                       f"storage ({vm.folder.path}) is at generation {vm.config.generation} "
                       f"and this host holds generation {held}: it moved to another host",
                       hint=f"run it there; vmkit delete {vm.name} here removes only this "
                            "host's registration")


def bury(host: Host, config: VmConfig, generation: int, destination: str) -> None:
    """Remember that the VM left for `destination`, which owns it from `generation` on."""
    folder = _tombstones(host)
    folder.mkdir(mode=0o700, exist_ok=True)
    write_json_atomic(folder / f"{config.uuid}.json", {
        "uuid": config.uuid, "name": config.spec.name, "generation": generation,
        "destination": destination, "at": time.time()})
