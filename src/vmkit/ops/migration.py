"""Moving a VM between hosts (live: `migrate`; stopped: the same call, no QEMU involved).

`capabilities(host)` is the destination's side (GET /1.0/host/capabilities): its QEMU's
machine types and CPU models under its accelerator, and the room it has. `check(vm, caps)` is
the source's side: every reason the VM cannot move there (model/hardware.preflight), computed
before anything is touched.

The move follows model/migration.py's phases. Source (`migrate`): begin (pre-flight, the VM's
lock, journal `migrate-out`; a live VM gets a disk-only helper snapshot so its frozen layers can
travel as files) → the files as a bundle to the destination's `prepare` (the active layer stays:
the destination makes an empty overlay of it) → perform (the destination's QEMU waits, paused;
the source mirrors its top layer into the destination's NBD export and sends its memory, both
TLS with a key made for this move) → performed (QEMU completed, the source is paused for good)
→ the destination's `finish` (resume, announce the MACs) → confirm (the source's QEMU and
folder go; a tombstone says where the VM went and at which generation). Any failure before
finish — and a cancel — rolls the source back: mirror and stream stopped, helper snapshot merged,
guest running; the destination is told to abort. A side killed mid-way is recovered from its
journal (recover_out / recover_in) by `model/migration.recover`.

Destination (`receive` + `Incoming`): the bundle is imported under the journal `migrate-in`, so
until finish every other command on that VM rolls it back (kill, folder removed); the session
holds the VM's lock from the QEMU's start to the end."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import shutil
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vmkit.core import layers, store
from vmkit.core import networks as net_core
from vmkit.core.journal import Journal, register_recovery
from vmkit.core.locks import Held
from vmkit.errors import (
    InvalidState,
    InvalidValue,
    LockTimeout,
    MoveRefused,
    NotFound,
    OperationTimeout,
    VmkitError,
)
from vmkit.images import catalog
from vmkit.isolation import jail, uids
from vmkit.model.hardware import HostCapabilities, preflight, preflight_disks
from vmkit.model.journal import JournalEntry
from vmkit.model.migration import MigrationOptions, Progress, option_reasons
from vmkit.model.names import validate_name
from vmkit.model.resources import memory_limit, vcpu_limit
from vmkit.model.runtime import MachineRecord, RuntimeRecord
from vmkit.model.spec import KNOWN_DEVICES, VmConfig
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.qemu import blockops, hostinfo
from vmkit.qemu import migrate as qm
from vmkit.qemu.qmp import QmpConnection, qmp_execute
from vmkit.storage import shared as shared_storage
from vmkit.storage.layout import (
    Registration,
    VmFolder,
    file_lock,
    read_metadata,
    read_registration,
    write_json_atomic,
    write_registration,
)

if TYPE_CHECKING:
    from vmkit.core.engine import VM, Host

TOKEN_BYTES = 32
GATE_TIMEOUT = 60.0        # the source must connect its memory stream within this
MIRROR_TIMEOUT = 3600.0
MEMORY_TIMEOUT = 3600.0
STALL_TIMEOUT = 15.0       # no byte sent for this long: the link is cut
FINISH_TIMEOUT = 120.0
OWNER_ASK_TIMEOUT = 90.0   # a destination that stopped answering at finish: how long to ask
RECOVER_ASK_TIMEOUT = 10.0
INCOMING_TIMEOUT = 3600.0  # a prepared destination nobody finishes is rolled back
QMP_TIMEOUT = 30.0
PSK_FOLDER = "migration"   # in the VM folder, root's: the key QEMU reads for this move
Report = Callable[[Progress], None]


def capabilities(host: Host) -> HostCapabilities:
    accel = host.accel().accel
    machines, cpu_models = hostinfo.probe_capabilities(accel)
    capacity, policy = host.capacity(), host.policy()
    allocated = host.allocated()
    version = ".".join(map(str, hostinfo.qemu_version()))
    return HostCapabilities(
        qemu_version=version, accel=accel,
        machines=machines, cpu_models=cpu_models,
        devices=tuple(sorted(KNOWN_DEVICES)),
        vms=tuple(vm.name for vm in host.vms(include_broken=True)),
        networks={net.name: net.subnet or "" for net in net_core.definitions(host)},
        images={image.name: image.sha256 for image in catalog.list_images(host.layout)},
        boot_files=tuple(sorted(catalog.boot_files(host.layout))),
        memory_room=max(0, memory_limit(capacity, policy) - allocated.memory),
        vcpu_room=max(0, vcpu_limit(capacity, policy) - allocated.cpus),
        disk_free=shutil.disk_usage(host.layout.root).free, postcopy=postcopy_possible(),
        firmwares=hostinfo.firmwares(),
        uid_range=_uid_range())


def _uid_range() -> tuple[int, int] | None:
    """This host's VM uids (base, count), where vmkit runs them as their own (root)."""
    if os.geteuid() != 0:
        return None
    here = uids.configured_range()
    return here.base, here.count


def postcopy_possible() -> bool:
    """Post-copy needs userfaultfd in the (unprivileged) QEMU: /dev/userfaultfd open to it, or
    the sysctl vm.unprivileged_userfaultfd=1. Both widen the kernel surface a VM's uid reaches;
    vmkit never changes them (docs/architecture.md, threat model)."""
    try:
        if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "1":
            return True
    except OSError:
        pass
    try:
        return os.stat("/dev/userfaultfd").st_mode & 0o006 == 0o006
    except OSError:
        return False


def folder_bytes(vm: VM) -> int:
    """What the VM's folder takes on disk (allocated blocks: sparse layers count as written)."""
    total = 0
    for root, _dirs, files in os.walk(vm.folder.path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def check(vm: VM, caps: HostCapabilities, *, name: str | None = None,
          shared: bool = False) -> list[str]:
    """Every reason `vm` cannot move to the host described by `caps` (empty: it can);
    `shared`: by shared storage (nothing is copied)."""
    reasons = preflight(vm.config, caps, name=name or vm.name,
                        disk_bytes=0 if shared else folder_bytes(vm),
                        running=vm.state in LIVE_STATES, shared=shared)
    if shared and os.geteuid() == 0 and caps.uid_range is not None:
        here = uids.configured_range()
        base, count = caps.uid_range
        if here.overlaps(base, count):
            reasons.append(
                f"the destination's VM uids ({base}+{count}) overlap this host's "
                f"({here.base}+{here.count}): on shared storage one host's VM could open "
                "another's files (give each host its own VMKIT_UID_RANGE)")
    return reasons


# -- the destination as the source sees it --------------------------------------------------
class Peer(Protocol):
    """The destination host, reached through its daemon (client/remote.py implements it)."""

    address: str  # the destination's address, where its migration ports listen

    def describe(self) -> str: ...

    def capabilities(self) -> HostCapabilities: ...

    def prepare(self, bundle: Path, *, name: str, generation: int, live: bool,
                helper: str | None, progress: Callable[[int, int], None]) -> str: ...

    def incoming(self, migration: str, *, key: str, machine: dict[str, Any] | None,
                 paused: bool, postcopy: bool) -> dict[str, Any]: ...

    def finish(self, migration: str) -> dict[str, Any]: ...

    def sees(self, folder: str, nonce: str) -> str | None:
        """Why the destination does not see the VM's shared folder (None: it does)."""
        ...

    def prepare_shared(self, *, folder: str, nonce: str, name: str, generation: int,
                       live: bool) -> str:
        """Register the VM's folder on shared storage there, as an incoming VM."""
        ...

    def settle(self, migration: str) -> str:
        """Abort the move unless the destination already runs the guest: "aborted" (it
        never will), "finished" (it does), "finishing" (ask again). Raises when it cannot
        be reached."""
        ...


#: How a source that was killed mid-move reaches its destination again (set by the daemon
#: and the CLI: the engine cannot import the client). None: the destination cannot be asked.
peer_for_recovery: Callable[[dict[str, Any]], Peer] | None = None


def _refusal(vm: VM, destination: str, reasons: list[str]) -> MoveRefused:
    return MoveRefused(f"VM {vm.name!r} cannot move to {destination}: " + "; ".join(reasons),
                       hint="nothing was changed; fix these on either host and try again")


Pack = Callable[..., dict[str, Any]]  # ops/bundles._write_bundle (given by the facade)
Unpack = Callable[..., "VM"]          # ops/bundles.import_bundle


def migrate(vm: VM, peer: Peer, options: MigrationOptions, *, credentials: dict[str, Any],
            pack: Pack, report: Report | None = None) -> dict[str, Any]:
    """Move `vm` to the host behind `peer`, live when it runs. Returns what the move took
    (seconds, bytes, downtime) and the VM's status there. `credentials` let a restarted
    source ask the destination how the move ended (kept in the journal, root 0600);
    `pack` writes the VM's files as a bundle (the facade passes ops/bundles')."""
    host = vm.host
    said = report or (lambda progress: None)
    target = options.name or vm.name
    started = time.monotonic()
    lap = Laps()
    caps = peer.capabilities()
    lap("capabilities")
    nonce = _shared_nonce(vm, peer, options)
    try:
        reasons = check(vm, caps, name=target, shared=nonce is not None) + \
            option_reasons(options, caps.postcopy)
        if reasons:
            raise _refusal(vm, peer.describe(), reasons)
        if nonce is not None:
            return _migrate_shared(vm, peer, options, nonce=nonce, target=target,
                                   credentials=credentials, said=said, lap=lap,
                                   started=started)
    finally:
        if nonce is not None:
            shared_storage.remove_nonce(vm.folder.path, nonce)
    with host._vm_lock(vm.name) as held:
        record = _movable_record(vm, held)
        live = record.state in LIVE_STATES
        if live and (vm.config.disks or (record.machine and record.machine.config.disks)):
            # added since the pre-flight, or one the running machine started with
            raise _refusal(vm, peer.describe(), preflight_disks(
                record.machine.config if record.machine and record.machine.config.disks
                else vm.config))
        point = f"move-{uuidlib.uuid4().hex[:8]}" if live else None
        staging = host.layout.cache / f"move-{uuidlib.uuid4().hex[:8]}"
        log = Journal(vm.folder.runtime_root)
        log.begin("migrate-out", destination=peer.describe(), credentials=credentials,
                  point=point, staging=str(staging), live=live,
                  paused=record.state is VmState.PAUSED)
        mid: str | None = None
        outcome: dict[str, Any] = {}
        try:
            lap("begin")
            if point is not None:
                # not quiesced: the guest's file systems need no freeze, as the mirror
                # carries every write after this point (a freeze costs 0.1-0.3 s under TCG)
                layers.take_locked(held, vm, record, point, disk_only=True, journal=False,
                                   quiesce=False)
                log.step("snapshot-taken")
                lap("helper_snapshot")
            staging.mkdir(mode=0o700, parents=True)
            bundle = staging / "files.vmkit"
            sent = pack(
                vm, bundle, None, staging / "base", lambda d, t: said(
                    Progress(stage="packing", transferred=d, total=t, remaining=t - d)),
                leave_out_active=live, bases_there=frozenset(caps.images.values()),
                boot_there=frozenset(caps.boot_files))
            lap("packing")
            mid = peer.prepare(bundle, name=target, generation=vm.config.generation + 1,
                               live=live, helper=point, progress=lambda d, t: said(Progress(
                                   stage="files", transferred=d, total=t, remaining=t - d)))
            log.step("prepared", migration=mid)
            shutil.rmtree(staging, ignore_errors=True)
            lap("files")
            if live:
                log.step("perform")
                outcome = _perform(vm, peer, mid, options, record, said, lap)
            # from here the source never runs again unless the destination says it will not
            log.step("performed")
            said(Progress(stage="finishing"))
            there = _finish_or_ask(peer, mid)
            lap("finish")
            if outcome.get("postcopy"):  # the destination runs; the last pages follow
                outcome.update(_postcopy_tail(vm))
                lap("postcopy_tail")
        except BaseException:
            _roll_back(held, vm, peer, mid, point, staging)
            log.end()
            raise
        log.step("confirm")
        _confirm(held, vm, generation=vm.config.generation + 1, destination=peer.describe())
        lap("confirm")
    return {"name": target, "destination": peer.describe(), "live": live, "storage": "copy",
            "seconds": round(time.monotonic() - started, 3), "files_bytes": sent["bytes"],
            **outcome, "stages": lap.seconds, "status": there}


def reasons_against(vm: VM, peer: Peer, options: MigrationOptions) -> list[str]:
    """The pre-flight of `vmkit migrate --check`: what `migrate` would refuse, found the way
    it finds it (a shared-storage probe included), changing nothing."""
    caps = peer.capabilities()
    try:
        nonce = _shared_nonce(vm, peer, options)
    except MoveRefused as exc:
        return [exc.message, *option_reasons(options, caps.postcopy)]
    if nonce is not None:
        shared_storage.remove_nonce(vm.folder.path, nonce)
    return check(vm, caps, name=options.name, shared=nonce is not None) + \
        option_reasons(options, caps.postcopy)


def _shared_nonce(vm: VM, peer: Peer, options: MigrationOptions) -> str | None:
    """Whether the move sends memory only: the VM is on shared storage and the destination
    sees its folder (it reads back the nonce written there). Returns that nonce, or None
    for a copy; `--storage shared` that cannot be is refused."""
    if options.storage == "copy":
        return None
    if not vm.folder.shared:
        if options.storage == "shared":
            raise MoveRefused(f"VM {vm.name!r} is on this host's storage, not shared storage",
                              hint="use --storage copy, or create VMs that move by memory "
                                   "only with --shared DIR")
        return None
    nonce = shared_storage.write_nonce(vm.folder.path)
    try:
        why = peer.sees(str(vm.folder.path), nonce)
    except NotFound:  # a daemon older than shared storage: it cannot take one
        why = "the destination's vmkit does not know shared storage"
    except BaseException:
        shared_storage.remove_nonce(vm.folder.path, nonce)
        raise
    if why is None:
        return nonce
    shared_storage.remove_nonce(vm.folder.path, nonce)
    if options.storage == "shared":
        raise MoveRefused(f"cannot move VM {vm.name!r} by shared storage: {why}",
                          hint="use --storage copy, or mount the storage at the same path "
                               "there")
    return None


def _migrate_shared(vm: VM, peer: Peer, options: MigrationOptions, *, nonce: str, target: str,
                    credentials: dict[str, Any], said: Report, lap: Laps,
                    started: float) -> dict[str, Any]:
    """The move of a VM on shared storage both hosts see: the destination registers the same
    folder and its QEMU opens the same chain inactive; memory alone goes over the wire.
    Ownership is the generation: the destination writes the next one into vm.json at its
    point of no return, and this host (registered at the old one) can never start it again."""
    host = vm.host
    with host._vm_lock(vm.name) as held:
        record = _movable_record(vm, held)
        live = record.state in LIVE_STATES
        generation = vm.config.generation + 1
        log = Journal(vm.folder.runtime_root)
        log.begin("migrate-out", destination=peer.describe(), credentials=credentials,
                  point=None, staging=None, live=live, shared=True,
                  paused=record.state is VmState.PAUSED)
        mid: str | None = None
        outcome: dict[str, Any] = {}
        try:
            lap("begin")
            mid = peer.prepare_shared(folder=str(vm.folder.path), nonce=nonce, name=target,
                                      generation=generation, live=live)
            log.step("prepared", migration=mid)
            lap("prepare")
            if live:
                log.step("perform")
                outcome = _perform(vm, peer, mid, options, record, said, lap, shared=True)
            log.step("performed")
            said(Progress(stage="finishing"))
            there = _finish_or_ask(peer, mid)
            lap("finish")
            if outcome.get("postcopy"):
                outcome.update(_postcopy_tail(vm))
                lap("postcopy_tail")
        except BaseException:
            _roll_back(held, vm, peer, mid, None, None)
            log.end()
            raise
        log.step("confirm")
        _confirm(held, vm, generation=generation, destination=peer.describe(), shared=True)
        lap("confirm")
    return {"name": target, "destination": peer.describe(), "live": live, "storage": "shared",
            "seconds": round(time.monotonic() - started, 3), "files_bytes": 0,
            **outcome, "stages": lap.seconds, "status": there}


def _movable_record(vm: VM, held: Held) -> RuntimeRecord:
    """The VM's run, observed under its lock, in a state a move can start from."""
    record = vm._observe(persist=True, held=held)
    if record.state in (VmState.STARTING, VmState.STOPPING):
        raise InvalidState(f"cannot move VM {vm.name!r}: it is {record.state.value}",
                           hint="wait until it is running or stopped")
    if record.machine is not None and not record.machine.rebuildable:
        raise InvalidState(f"cannot move VM {vm.name!r}: a device it started with was "
                           "unplugged live, and that machine cannot be rebuilt",
                           hint=f"restart it first (vmkit restart {vm.name})")
    return record


class Laps:
    """Where a move's time went, stage by stage (seconds, in the result as `stages`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def __call__(self, stage: str) -> None:
        now = time.monotonic()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now


def _perform(vm: VM, peer: Peer, mid: str, options: MigrationOptions,
             record: RuntimeRecord, said: Report, lap: Laps, *,
             shared: bool = False) -> dict[str, Any]:
    """Disk mirror (not on shared storage) and memory stream, TLS with this move's key;
    returns QEMU's figures. When it returns the source is paused for good (postmigrate) and
    its disk is mirrored or, shared, inactive (its image locks let go for the destination)."""
    key = secrets.token_hex(32)
    machine = record.machine.model_dump(mode="json") if record.machine else None
    ports = peer.incoming(mid, key=key, machine=machine,
                          paused=record.state is VmState.PAUSED, postcopy=options.postcopy)
    lap("incoming")
    psk = vm.folder.runtime_root / PSK_FOLDER
    qm.write_psk(psk, key, vm.owner())
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        qm.add_tls(qmp, psk, server=False)
        qm.tune_source(qmp, options)
        if not shared:
            qm.start_mirror(qmp, peer.address, int(ports["nbd_port"]))
            qm.wait_mirror_ready(qmp, MIRROR_TIMEOUT, said)
            lap("disk_mirror")
        with socket.create_connection((peer.address, int(ports["port"])), timeout=10) as sock:
            sock.sendall(bytes.fromhex(str(ports["token"])))
            sock.settimeout(None)
            _keepalive(sock)
            if record.state is VmState.RUNNING and not record.copies_memory_live:
                qmp.execute("stop")  # see RuntimeRecord.copies_memory_live; undone on failure
            qm.send_memory(qmp, sock)
        # the vCPUs stop at the switch-over, with the disks still active: the mirror lands
        # its last writes there, then the device state goes (libvirt's order)
        info = qm.watch_memory(qmp, timeout=MEMORY_TIMEOUT, stall=STALL_TIMEOUT,
                               postcopy=options.postcopy, report=said,
                               at_switchover=None if shared else
                               lambda: qm.complete_mirror(qmp, FINISH_TIMEOUT))
        lap("memory")
    return _figures(info) | {"postcopy": info.get("status") == "postcopy-active"}


def _figures(info: dict[str, Any]) -> dict[str, Any]:
    ram = info.get("ram") or {}
    return {"downtime_ms": info.get("downtime"), "memory_seconds": info.get("total-time", 0)
            / 1000, "memory_bytes": ram.get("transferred"), "mbps": ram.get("mbps"),
            "dirty_syncs": ram.get("dirty-sync-count"),
            "switchover_ms": info.get("vmkit-switchover-ms"),
            "postcopy_requests": ram.get("postcopy-requests")}


def _postcopy_tail(vm: VM) -> dict[str, Any]:
    """After a post-copy switch-over the guest runs on the destination while the source still
    holds pages it has not sent: wait for the last one. A failure here cannot be undone by
    resuming the source (the guest ran there): the source holds, paused, with its journal."""
    try:
        with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
            return _figures(qm.wait_outgoing(qmp, MEMORY_TIMEOUT))
    except VmkitError as exc:
        raise _Undecided(f"the post-copy of VM {vm.name!r} failed after the destination took "
                         f"over ({exc.message}); the source stays paused and is never started",
                         hint="see the destination; vmkit recover decides once it answers"
                         ) from exc


def _finish_or_ask(peer: Peer, mid: str) -> dict[str, Any]:
    """The destination resumes the guest. When anything goes wrong once finish was sent
    (an error, a lost answer, Ctrl-C), the source settles with the destination first: it
    resumes only when the destination has aborted for good."""
    try:
        return peer.finish(mid)
    except BaseException as exc:
        owns = _settle(peer, mid, OWNER_ASK_TIMEOUT)
        if owns is True:
            return {}
        if owns is None:
            raise _Undecided(f"the destination did not say whether it finished the move "
                             f"({exc}); the source stays paused and is never started",
                             hint="run vmkit recover once the destination answers") from exc
        raise


def _settle(peer: Peer, mid: str, timeout: float) -> bool | None:
    """True: the destination runs the guest; False: it aborted and never will; None: no
    decision within `timeout` (a destination daemon that restarts answers from its
    records; one that is finishing is asked again)."""
    deadline = time.monotonic() + timeout
    while True:
        state = None
        with contextlib.suppress(Exception):
            state = peer.settle(mid)
        if state == "finished":
            return True
        if state == "aborted":
            return False
        if time.monotonic() >= deadline:
            return None
        time.sleep(1.0)


class _Undecided(VmkitError):
    """The destination may run the guest: the source must hold, not roll back."""


def _roll_back(held: Held, vm: VM, peer: Peer, mid: str | None, point: str | None,
               staging: Path | None) -> None:
    """A move that did not happen: the destination drops what it made, the source runs on
    its own disk with its helper snapshot merged away. Once the source's QEMU has sent the
    whole state the destination may already run the guest (it finishes on its own at
    completion): then the source resumes only when the destination settles as aborted, and
    otherwise holds, paused, with its journal for `recover` (_Undecided)."""
    import sys

    failure = sys.exc_info()[1]
    if isinstance(failure, _Undecided):
        raise failure
    if vm.folder.shared and _taken_over(vm):
        raise _Undecided(f"the move of VM {vm.name!r} failed ({failure}) after the "
                         "destination took the VM over (the shared folder holds its "
                         "generation): the source stays paused and is never started",
                         hint="vmkit recover lets go of it here")
    if mid is not None:
        sent_all = _source_sent_all(vm)
        verdict = _settle(peer, mid, OWNER_ASK_TIMEOUT if sent_all else 5.0)
        if sent_all and verdict is not False:
            raise _Undecided(f"the move of VM {vm.name!r} failed after the whole state was "
                             f"sent ({failure}); the destination "
                             + ("runs the guest" if verdict else "did not say whether it does")
                             + ": the source stays paused and is never started",
                             hint="vmkit recover decides (it asks the destination)")
    _source_back(held, vm, point)
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)


def _source_sent_all(vm: VM) -> bool:
    """Whether the source's QEMU sent the whole state (or switched to post-copy): from then
    on only the destination may say the guest did not move. A dead QEMU counts as sent."""
    if not vm._alive(vm._record()):
        return True
    try:
        status = str(qmp_execute(vm.folder.qmp_socket, "query-migrate").get("status", ""))
    except VmkitError:
        return True
    return status == "completed" or status.startswith("postcopy")


def _source_back(held: Held, vm: VM, point: str | None) -> None:
    record = vm._observe(persist=True, held=held)
    if record.state in LIVE_STATES and vm._alive(record):
        with contextlib.suppress(VmkitError), \
                QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
            qm.cancel(qmp)
            deadline = time.monotonic() + 10
            while qm.incoming_status(qmp) in ("cancelling", "active", "device",
                                              "pre-switchover") and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
            qm.abandon_mirror(qmp)
            qm.reset(qmp)
            status = blockops.until_finalized(qmp)
            if status != "running" and record.state is VmState.RUNNING:
                qmp.execute("cont")
    with contextlib.suppress(OSError, FileNotFoundError):
        qm.remove_psk(vm.folder.runtime_root / PSK_FOLDER)
    if point is not None and point in store.load_tree(vm).nodes:
        layers.delete_locked(held, vm, vm._observe(persist=True, held=held), point)
    if vm.folder.shared:  # the destination's QEMU was handed the files: back to this VM's uid
        jail.prepare_folder(vm.owner(), vm.folder.path, vm.folder.runtime)


def _taken_over(vm: VM) -> bool:
    """The shared folder's vm.json holds a newer generation than this host's registration:
    another host passed its point of no return with this VM."""
    try:
        folder_generation = read_metadata(vm.folder.config_file, VmConfig,
                                          f"VM {vm.name!r}").generation
    except (FileNotFoundError, VmkitError):
        return False
    return folder_generation > _registered_generation(vm)


def _registered_generation(vm: VM) -> int:
    registration = read_registration(vm.folder.runtime_root)
    return registration.generation if registration is not None else vm.config.generation


def _confirm(held: Held, vm: VM, *, generation: int, destination: str,
             shared: bool = False) -> None:
    """The destination owns the VM: remember where it went, then the source goes (`shared`:
    the destination runs it from the same folder, which stays)."""
    store.bury(vm.host, vm.config, generation, destination)
    vm._remove_locked(held, vm._observe(persist=True, held=held), leave_shared=shared)


def recover_out(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A source killed mid-move (model/migration.recover, source side)."""
    from vmkit.model.migration import Action, Phase, Side, recover

    intent = entry.intent
    phase = (Phase.CONFIRM if entry.done("confirm") else Phase.PERFORMED
             if entry.done("performed") else Phase.PERFORM if entry.done("prepared")
             else Phase.BEGIN)
    mid = intent.get("migration")
    peer = None
    if peer_for_recovery is not None and isinstance(intent.get("credentials"), dict):
        with contextlib.suppress(Exception):
            peer = peer_for_recovery(intent["credentials"])
    if phase is Phase.PERFORM and _source_sent_all(vm):
        phase = Phase.PERFORMED  # cut between QEMU's completion and the journal's step
    owns: bool | None = None
    if intent.get("shared") and _taken_over(vm):
        phase, owns = Phase.PERFORMED, True  # the folder itself says: no need to ask
    elif phase is Phase.PERFORMED and peer is not None and isinstance(mid, str):
        owns = _settle(peer, mid, RECOVER_ASK_TIMEOUT)
    decision = recover(Side.SOURCE, phase, destination_owns=owns)
    point = intent.get("point") if isinstance(intent.get("point"), str) else None
    staging = Path(str(intent.get("staging")))
    if staging.parent == vm.host.layout.cache:
        shutil.rmtree(staging, ignore_errors=True)
    if decision.action is Action.KILL_SOURCE:
        shared = bool(intent.get("shared"))
        # shared: the destination writes the next generation into the folder's vm.json
        generation = _registered_generation(vm) + 1 if shared else vm.config.generation + 1
        _confirm(held, vm, generation=generation, destination=str(intent.get("destination")),
                 shared=shared)
        return
    if decision.action is Action.HOLD:
        raise InvalidState(f"VM {vm.name!r} was moving to {intent.get('destination')} when "
                           f"vmkit stopped, and the destination cannot be asked whether it "
                           "took over: the guest stays paused here and is not started",
                           hint="make the destination reachable, then run vmkit recover")
    if phase is not Phase.PERFORMED and peer is not None and isinstance(mid, str):
        with contextlib.suppress(Exception):
            peer.settle(mid)  # finish was never sent (PERFORMED: settled above)
    _source_back(held, vm, point)
    if intent.get("frozen") and not entry.done("snapshot-taken") and vm._alive(vm._record()):
        with contextlib.suppress(VmkitError):
            layers.thaw(vm)  # a journal of a vmkit that froze the guest for the helper


# -- destination --------------------------------------------------------------------------------
def receive(host: Host, bundle: Path, *, name: str, generation: int, migration: str,
            helper: str | None, unpack: Unpack,
            progress: Callable[[int, int], None] | None = None) -> VM:
    """Import the moving VM's files as an incoming VM (journal `migrate-in`: any other
    command on it before finish rolls it back), at its new generation. `unpack` is
    ops/bundles.import_bundle (passed by the facade)."""
    if host.layout.vm(name).path.exists():
        raise MoveRefused(f"a VM named {name!r} already exists here",
                          hint="pick another name on the destination (--name)")
    if helper is not None:
        validate_name(helper, kind="helper snapshot name")

    def arriving(work: VmFolder, config: VmConfig) -> VmConfig:
        _check_arrival(host, config, generation)
        with _ARRIVING_LOCK:
            _ARRIVING.add(migration)
        log = Journal(work.path)
        log.begin("migrate-in", migration=migration, helper=helper,
                  started=_process_start(os.getpid()))
        return config.model_copy(update={"generation": generation})

    try:
        return unpack(host, bundle, name=name, progress=progress, arriving=arriving)
    except BaseException:
        with _ARRIVING_LOCK:
            _ARRIVING.discard(migration)
        raise


def _check_arrival(host: Host, config: VmConfig, generation: int) -> None:
    moved = store.tombstone(host, config.uuid)
    if moved is not None and int(moved.get("generation", 0)) >= generation:
        raise MoveRefused(f"VM {config.uuid} already left this host at generation "
                          f"{moved.get('generation')}; generation {generation} is stale")
    # a uuid is a VM's identity here (its uid claim, its QEMU): never a second holder
    if any(v.config.uuid == config.uuid for v in host.vms()) or \
            (os.geteuid() == 0 and uids.lookup(config.uuid) is not None):
        raise MoveRefused(f"a VM with uuid {config.uuid} already exists on this host",
                          hint="the same machine cannot live here twice")


def receive_shared(host: Host, *, folder: str, nonce: str, name: str, generation: int,
                   migration: str) -> VM:
    """Register a VM's folder on shared storage as an incoming VM under `name`, at the next
    generation (its vm.json keeps the source's until finish). Nothing is copied: the folder
    must be the source's (the nonce it wrote there), in root's hands (neither it nor the
    folder that holds it writable by anyone else: no user can offer a folder of theirs),
    and its vm.json at the generation before `generation`."""
    validate_name(name)
    shared_storage.require_sees(folder, nonce)
    shared_storage.require_root_owned(folder)
    shared_storage.claim_uid_range(Path(folder).parent)
    path = Path(folder)
    try:
        config = read_metadata(path / "vm.json", VmConfig, f"the VM in {folder}")
    except FileNotFoundError:
        raise MoveRefused(f"{folder} holds no vm.json: not a VM folder") from None
    if config.generation + 1 != generation:
        raise MoveRefused(f"the VM in {folder} is at generation {config.generation}; a move "
                          f"at generation {generation} is stale")
    shared_storage.check_chain_bottom(folder, config.backing_file)
    if config.media is not None:  # a file of the source host: root would lend it the guest
        raise MoveRefused(f"the VM in {folder} has installation media in its drive",
                          hint="eject it on the source first (vmkit media eject NAME)")
    _check_arrival(host, config, generation)
    with host._vm_lock(name):
        if (host.layout.vms / name).exists():
            raise MoveRefused(f"a VM named {name!r} already exists here",
                              hint="pick another name on the destination (--name)")
        local = host.layout.vms / f".creating-{name}-{uuidlib.uuid4().hex[:8]}"
        try:
            local.mkdir(mode=0o700)
            (local / "logs").mkdir()
            (local / "run").mkdir(mode=0o700)
            write_registration(local, Registration(folder, generation, config.uuid))
            write_json_atomic(local / "state.json", RuntimeRecord().model_dump(mode="json"))
            with _ARRIVING_LOCK:
                _ARRIVING.add(migration)
            Journal(local).begin("migrate-in", migration=migration, helper=None, shared=True,
                                 started=_process_start(os.getpid()))
            os.rename(local, host.layout.vms / name)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            with _ARRIVING_LOCK:
                _ARRIVING.discard(migration)
            raise
    return host._vm(name)


class Incoming:
    """One VM arriving here, as a state machine under one lock:

        prepared → starting → started → finishing → finished
               ↘          ↘          ↘ (a failure before the guest runs: back to started)
                aborted (every trace removed; the guest never ran here)

    `settle` (the source's abort) is refused once finishing has begun: it answers what the
    destination did instead. The VM's lock is held from `start` to the end."""

    def __init__(self, vm: VM, migration: str, *, helper: str | None = None,
                 on_end: Callable[[str], None] | None = None,
                 before_resume: Callable[[], None] | None = None):
        self.vm = vm
        self.migration = migration
        self.helper = helper
        self.state = "prepared"
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.refused = 0  # connections without the token (a third party)
        self._on_end = on_end or (lambda state: None)
        self._before_resume = before_resume or (lambda: None)
        self._mutex = threading.RLock()
        self._lock_cm: Any = None
        self._held: Held | None = None
        self._listeners: list[socket.socket] = []
        self._accepted = threading.Event()
        self._ended = threading.Event()
        self._paused = False
        self._postcopy = False
        self._live = False
        self._status: dict[str, Any] = {}

    # the VM's lock, taken without recovery (the journal `migrate-in` is this session's own)
    def _take_lock(self) -> Held:
        if self._held is None:
            host = self.vm.host
            cm = file_lock(host._lock_path(self.vm.name), timeout=host.lock_timeout,
                           what=f"VM {self.vm.name!r}")
            cm.__enter__()
            self._lock_cm, self._held = cm, Held(self.vm.name)
        return self._held

    def _release_lock(self) -> None:
        if self._lock_cm is not None:
            cm, self._lock_cm = self._lock_cm, None
            if self._held is not None:
                self._held.release()
            self._held = None
            cm.__exit__(None, None, None)
        with _ARRIVING_LOCK:
            _ARRIVING.discard(self.migration)

    def _enter(self, wanted: tuple[str, ...], next_state: str) -> None:
        if self.state not in wanted:
            raise InvalidState(f"the move of VM {self.vm.name!r} here is {self.state}, not "
                               f"{' or '.join(wanted)}")
        self.state = next_state

    def start(self, *, key: str, listen: str, source: str | None,
              machine: dict[str, Any] | None, paused: bool, postcopy: bool) -> dict[str, Any]:
        """Start the incoming QEMU (paused, -S), its NBD export and the memory gate (which
        admits the one connection from `source` that presents the token)."""
        with self._mutex:
            self._enter(("prepared",), "starting")
            try:
                return self._start(key=key, listen=listen, source=source, machine=machine,
                                   paused=paused, postcopy=postcopy)
            except BaseException:
                self._abort_locked()
                raise

    def _start(self, *, key: str, listen: str, source: str | None,
               machine: dict[str, Any] | None, paused: bool, postcopy: bool
               ) -> dict[str, Any]:
        vm = self.vm
        held = self._take_lock()
        self._paused, self._postcopy, self._live = paused, postcopy, True
        running_as = _checked_machine(vm, machine)
        psk = vm.folder.runtime_root / PSK_FOLDER
        qm.write_psk(psk, key, vm.owner())
        memory = socket.create_server((listen, 0))
        # shared storage: the chain is the source's own files, opened inactive (no mirror)
        nbd = None if vm.folder.shared else socket.create_server((listen, 0))
        self._listeners = [memory] if nbd is None else [memory, nbd]

        def setup(qmp: QmpConnection) -> None:
            qm.add_tls(qmp, psk, server=True)
            qm.tune_destination(qmp, postcopy=postcopy)
            if nbd is not None:
                qm.serve_disk(qmp, nbd)

        vm._start_locked(held, RuntimeRecord(), incoming=setup, resume=False,
                         machine=running_as)
        ports = {"port": memory.getsockname()[1]}
        if nbd is not None:
            ports["nbd_port"] = nbd.getsockname()[1]
            nbd.close()  # QEMU holds its own copy
        threading.Thread(target=self._admit, args=(memory, source), daemon=True,
                         name=f"migration-gate-{self.migration}").start()
        threading.Thread(target=self._watch, daemon=True,
                         name=f"migration-watch-{self.migration}").start()
        self.state = "started"
        return {**ports, "token": self.token.hex()}

    def _admit(self, listener: socket.socket, source: str | None) -> None:
        """Accept until the source's connection presents the token (any other peer is closed
        unanswered), then hand that socket to QEMU."""
        deadline = time.monotonic() + INCOMING_TIMEOUT
        try:
            while not self._ended.is_set() and time.monotonic() < deadline:
                listener.settimeout(1.0)
                try:
                    conn, peer = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with contextlib.closing(conn), contextlib.suppress(OSError, VmkitError):
                    if source is not None and peer[0] != source:
                        self.refused += 1
                        continue
                    conn.settimeout(2)
                    got = b""
                    while len(got) < TOKEN_BYTES:
                        chunk = conn.recv(TOKEN_BYTES - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if not hmac.compare_digest(got, self.token):
                        self.refused += 1
                        continue
                    conn.settimeout(None)
                    _keepalive(conn)
                    with QmpConnection(self.vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as q:
                        qm.receive_memory(q, conn)
                    self._accepted.set()
                    break
        finally:
            listener.close()
        if self._accepted.is_set():
            self._follow()

    def _follow(self) -> None:
        """Finish as soon as the whole state is here: the source's QEMU completed (its disk
        mirror ended before, at the switch-over), so it is stopped for good, and the guest's
        pause is QEMU's downtime plus a few ms here, not a round trip to the source."""
        try:
            with QmpConnection(self.vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                qm.wait_incoming(qmp, INCOMING_TIMEOUT, postcopy=self._postcopy)
        except VmkitError:
            with self._mutex:
                if self.state == "started":
                    self._abort_locked()
            return
        with contextlib.suppress(Exception):  # the source's finish call says what failed
            self.finish()

    def _watch(self) -> None:
        """Roll back on our own when the stream breaks (QEMU gone, the transfer failed): a
        source cut off by the network cannot tell us."""
        while not self._ended.wait(1.0):
            with self._mutex:
                if self.state != "started":
                    continue
                broken = not self.vm._alive(self.vm._record())
                # once the stream is in, _follow holds the monitor and watches the transfer
                if not broken and not self._accepted.is_set():
                    try:
                        with QmpConnection(self.vm.folder.qmp_socket,
                                           timeout=QMP_TIMEOUT) as qmp:
                            broken = qm.incoming_status(qmp) in ("failed", "cancelled")
                    except VmkitError:
                        broken = True
                if broken:
                    self._abort_locked()
                    return

    def finish(self, timeout: float = FINISH_TIMEOUT) -> dict[str, Any]:
        """The whole state arrived and the source is paused for good: run the guest here."""
        with self._mutex:
            if self.state == "finished":  # it finished on its own at completion
                return self._status
            self._enter(("started", "prepared"), "finishing")
            vm, live = self.vm, self._live
            with contextlib.ExitStack() as stack:
                try:
                    self._take_lock()
                    qmp = None
                    if live:
                        if not self._accepted.wait(timeout):
                            raise OperationTimeout("the source never connected its memory "
                                                   "stream")
                        qmp = stack.enter_context(QmpConnection(vm.folder.qmp_socket,
                                                                timeout=QMP_TIMEOUT))
                        qm.wait_incoming(qmp, timeout, postcopy=self._postcopy)
                        if not vm.folder.shared:
                            qm.stop_serving(qmp)
                except BaseException:
                    self.state = "started" if live else "prepared"  # the source will settle
                    raise
                # the point of no return, recorded first: a restart keeps a running guest
                # (the daemon's record says "finishing" before it: a source that asks a
                # restarted daemon is then told to wait for the recovery's verdict)
                self._before_resume()
                log = Journal(vm.folder.runtime_root)
                log.entry = log.read()
                log.step("finish", paused=self._paused)
                if vm.folder.shared:
                    _take_shared(vm)
                if qmp is not None:
                    if not self._paused:
                        qmp.execute("cont")
                    qm.announce(qmp)
                    qm.reset(qmp)
            if live:
                vm._write(vm._record().model_copy(update={
                    "state": VmState.PAUSED if self._paused else VmState.RUNNING}))
            Journal(vm.folder.runtime_root).end()  # from here on this host owns the VM
            self.state = "finished"
            with contextlib.suppress(OSError):
                qm.remove_psk(vm.folder.runtime_root / PSK_FOLDER)
            # the source's helper snapshot, merged away here too while the guest runs, and
            # before the VM's lock is let go (a next command never races the merge's job)
            if self.helper is not None:
                _merge_helper(vm, self.helper, self._held)
            status = self._status = vm.status().model_dump(mode="json")
            self._end("finished")
        return status

    def settle(self) -> str:
        """The source's abort: done unless the guest runs here (or is about to)."""
        with self._mutex:
            if self.state in ("finishing", "finished", "aborted"):
                return self.state
            self._abort_locked()
            return "aborted"

    def _abort_locked(self) -> None:
        held = self._take_lock()
        with contextlib.suppress(FileNotFoundError):
            _destroy_incoming(held, self.vm)
        self.state = "aborted"
        self._end("aborted")

    def _end(self, state: str) -> None:
        self._ended.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        self._release_lock()
        with contextlib.suppress(Exception):
            self._on_end(state)


def _keep_shared_arrival(vm: VM, held: Held, *, paused: bool) -> None:
    """Past its point of no return a shared arrival is this host's, whatever became of its
    QEMU: the source's QEMU let go of the disk at completion and this guest may have written
    it since, so the source must never resume its older memory on it. A QEMU cut between
    the step and its `cont` is resumed; a dead one is recorded as an exit."""
    _take_shared(vm)
    record = vm._record()
    if not vm._alive(record):
        vm._observe(persist=True, held=held)
        return
    status = ""
    with contextlib.suppress(VmkitError), \
            QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        status = str(qmp.execute("query-status")["status"])
        if status == "paused" and not paused:
            qmp.execute("cont")
            qm.announce(qmp)
            status = "running"
    vm._write(record.model_copy(update={
        "state": VmState.RUNNING if status == "running" else VmState.PAUSED}))


def _take_shared(vm: VM) -> None:
    """The arrival's point of no return on shared storage: the folder's vm.json gets this
    host's generation (and name), so the source, registered at the one before, never starts
    the VM again. Idempotent (a recovery after a cut repeats it)."""
    registration = read_registration(vm.folder.runtime_root)
    if registration is None:
        return
    config = read_metadata(vm.folder.config_file, VmConfig, f"VM {vm.name!r}")
    if config.generation != registration.generation or config.spec.name != vm.name or \
            config.ssh_identity is not None:
        # ssh_identity names a key file of the source host: never read here
        vm.save_config(config.model_copy(update={
            "generation": registration.generation, "ssh_identity": None,
            "spec": config.spec.model_copy(update={"name": vm.name})}))


def _checked_machine(vm: VM, machine: dict[str, Any] | None) -> MachineRecord | None:
    """The source's running machine, accepted only as the machine vm.json describes: same
    uuid, hardware and NICs (forwards included), CPUs and memory within its maxima."""
    if machine is None:
        return None
    running = MachineRecord.model_validate(machine)
    config, ran = vm.config, running.config
    spec = config.spec
    if ran.uuid != config.uuid or ran.hardware != config.hardware or ran.nics != config.nics \
            or ran.disks or config.disks \
            or ran.spec.cpu_ceiling > spec.cpu_ceiling \
            or ran.spec.memory_ceiling > spec.memory_ceiling \
            or ran.spec.accel != spec.accel:
        raise InvalidValue(f"the running machine sent for VM {vm.name!r} is not the one its "
                           "vm.json describes; refused")
    return running.model_copy(update={"config": ran.model_copy(update={
        "spec": ran.spec.model_copy(update={"name": vm.name}),
        "generation": config.generation})})


def _merge_helper(vm: VM, helper: str, held: Held | None) -> None:
    if held is None:
        return
    with contextlib.suppress(VmkitError):
        if helper in store.load_tree(vm).nodes:
            layers.delete_locked(held, vm, vm._observe(persist=True, held=held), helper)


def _keepalive(sock: socket.socket) -> None:
    """Notice a peer that vanished (a cut link sends no reset) within ~10 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 4)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 10_000)


def _destroy_incoming(held: Held, vm: VM) -> None:
    """Every trace of an arrival that did not happen; of one on shared storage only this
    host's registration (the folder is the source's, which runs it)."""
    if not vm.folder.runtime_root.exists():
        return
    vm._remove_locked(held, vm._observe(persist=True, held=held), leave_shared=True)


def recover_in(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A destination interrupted mid-arrival (model/migration.recover, destination side):
    past the point of no return with the guest running here, it keeps the VM; otherwise the
    guest never ran here and nothing of it stays — unless the move is still under way (in
    this process, or in the live process that journalled it)."""
    from vmkit.model.migration import Action, Phase, Side, recover

    intent = entry.intent
    with _ARRIVING_LOCK:
        ours = intent.get("migration") in _ARRIVING
    started = intent.get("started")
    if ours or (entry.pid != os.getpid() and started is not None
                and _process_start(entry.pid) == started):
        raise LockTimeout(f"VM {vm.name!r} is arriving from another host (process "
                          f"{entry.pid})", hint="wait until the move has finished")
    if vm.folder.shared and entry.done("finish"):
        _keep_shared_arrival(vm, held, paused=bool(intent.get("paused")))
        return
    running, status = False, ""
    if entry.done("finish") and vm._alive(vm._record()):
        with contextlib.suppress(VmkitError):
            status = qmp_execute(vm.folder.qmp_socket, "query-status")["status"]
            running = status == "running" or (status == "paused" and bool(intent.get("paused")))
    decision = recover(Side.DESTINATION, Phase.FINISH if entry.done("finish")
                       else Phase.PREPARE, destination_owns=None, destination_running=running)
    if decision.action is Action.KEEP:
        if vm.folder.shared:
            _take_shared(vm)
        vm._write(vm._record().model_copy(update={
            "state": VmState.RUNNING if status == "running" else VmState.PAUSED}))
        return
    _destroy_incoming(held, vm)


def _process_start(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with the pid, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


_ARRIVING: set[str] = set()  # migrations this process is receiving now
_ARRIVING_LOCK = threading.Lock()


register_recovery("migrate-out", recover_out)
register_recovery("migrate-in", recover_in)
