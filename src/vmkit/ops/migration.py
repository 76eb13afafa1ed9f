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
    OperationTimeout,
    VmkitError,
)
from vmkit.images import catalog
from vmkit.model.hardware import HostCapabilities, preflight
from vmkit.model.journal import JournalEntry
from vmkit.model.migration import MigrationOptions, Progress
from vmkit.model.resources import memory_limit, vcpu_limit
from vmkit.model.runtime import MachineRecord, RuntimeRecord
from vmkit.model.spec import KNOWN_DEVICES, VmConfig
from vmkit.model.state import LIVE_STATES, VmState
from vmkit.qemu import hostinfo
from vmkit.qemu import migrate as qm
from vmkit.qemu.qmp import QmpConnection
from vmkit.storage.layout import VmFolder, file_lock

if TYPE_CHECKING:
    from vmkit.core.engine import VM, Host

TOKEN_BYTES = 32
GATE_TIMEOUT = 60.0        # the source must connect its memory stream within this
MIRROR_TIMEOUT = 3600.0
MEMORY_TIMEOUT = 3600.0
STALL_TIMEOUT = 15.0       # no byte sent for this long: the link is cut
FINISH_TIMEOUT = 120.0
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
        memory_room=max(0, memory_limit(capacity, policy) - allocated.memory),
        vcpu_room=max(0, vcpu_limit(capacity, policy) - allocated.cpus),
        disk_free=shutil.disk_usage(host.layout.root).free)


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


def check(vm: VM, caps: HostCapabilities, *, name: str | None = None) -> list[str]:
    """Every reason `vm` cannot move to the host described by `caps` (empty: it can)."""
    return preflight(vm.config, caps, name=name or vm.name, disk_bytes=folder_bytes(vm),
                     running=vm.state in LIVE_STATES)


# -- the destination as the source sees it --------------------------------------------------
class Peer(Protocol):
    """The destination host, reached through its daemon (client/remote.py implements it)."""

    address: str  # the destination's address, where its migration ports listen

    def describe(self) -> str: ...

    def capabilities(self) -> HostCapabilities: ...

    def prepare(self, bundle: Path, *, name: str, generation: int, live: bool,
                progress: Callable[[int, int], None]) -> str: ...

    def incoming(self, migration: str, *, key: str, machine: dict[str, Any] | None,
                 paused: bool, postcopy: bool) -> dict[str, Any]: ...

    def finish(self, migration: str) -> dict[str, Any]: ...

    def abort(self, migration: str) -> None: ...

    def owns(self, migration: str) -> bool | None: ...


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
    reasons = check(vm, peer.capabilities(), name=target)
    if reasons:
        raise _refusal(vm, peer.describe(), reasons)
    if options.storage == "shared":
        raise MoveRefused("shared storage is not supported yet: the VM's folder is copied",
                          hint="use --storage copy (the default here)")
    with host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        if record.state in (VmState.STARTING, VmState.STOPPING):
            raise InvalidState(f"cannot move VM {vm.name!r}: it is {record.state.value}",
                               hint="wait until it is running or stopped")
        if record.machine is not None and not record.machine.rebuildable:
            raise InvalidState(f"cannot move VM {vm.name!r}: a NIC it started with was "
                               "unplugged live, and that machine cannot be rebuilt",
                               hint=f"restart it first (vmkit restart {vm.name})")
        live = record.state in LIVE_STATES
        point = f"move-{uuidlib.uuid4().hex[:8]}" if live else None
        staging = host.layout.cache / f"move-{uuidlib.uuid4().hex[:8]}"
        log = Journal(vm.folder.path)
        log.begin("migrate-out", destination=peer.describe(), credentials=credentials,
                  point=point, staging=str(staging), live=live,
                  paused=record.state is VmState.PAUSED)
        mid: str | None = None
        outcome: dict[str, Any] = {}
        try:
            if point is not None:
                layers.take_locked(held, vm, record, point, disk_only=True, journal=False)
                log.step("snapshot-taken")
            staging.mkdir(mode=0o700, parents=True)
            bundle = staging / "files.vmkit"
            sent = pack(
                vm, bundle, None, staging / "base", lambda d, t: said(
                    Progress(stage="packing", transferred=d, total=t, remaining=t - d)),
                leave_out_active=live)
            mid = peer.prepare(bundle, name=target, generation=vm.config.generation + 1,
                               live=live, progress=lambda d, t: said(Progress(
                                   stage="files", transferred=d, total=t, remaining=t - d)))
            log.step("prepared", migration=mid)
            shutil.rmtree(staging, ignore_errors=True)
            if live:
                log.step("perform")
                outcome = _perform(vm, peer, mid, options, record, said)
                log.step("performed")
            said(Progress(stage="finishing"))
            there = _finish_or_ask(peer, mid)
        except BaseException:
            _roll_back(held, vm, peer, mid, point, staging)
            log.end()
            raise
        log.step("confirm")
        _confirm(held, vm, generation=vm.config.generation + 1, destination=peer.describe())
    return {"name": target, "destination": peer.describe(), "live": live,
            "seconds": round(time.monotonic() - started, 3), "files_bytes": sent["bytes"],
            **outcome, "status": there}


def _perform(vm: VM, peer: Peer, mid: str, options: MigrationOptions,
             record: RuntimeRecord, said: Report) -> dict[str, Any]:
    """Disk mirror and memory stream, TLS with this move's key; returns QEMU's figures.
    When it returns the source is paused for good (postmigrate) and its disk is mirrored."""
    key = secrets.token_hex(32)
    machine = record.machine.model_dump(mode="json") if record.machine else None
    ports = peer.incoming(mid, key=key, machine=machine,
                          paused=record.state is VmState.PAUSED, postcopy=options.postcopy)
    psk = vm.folder.path / PSK_FOLDER
    qm.write_psk(psk, key, vm.owner())
    with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
        qm.add_tls(qmp, psk, server=False)
        qm.tune_source(qmp, options)
        qm.start_mirror(qmp, peer.address, int(ports["nbd_port"]))
        qm.wait_mirror_ready(qmp, MIRROR_TIMEOUT, said)
        with socket.create_connection((peer.address, int(ports["port"])), timeout=10) as sock:
            sock.sendall(bytes.fromhex(str(ports["token"])))
            sock.settimeout(None)
            _keepalive(sock)
            qm.send_memory(qmp, sock)
        info = qm.watch_memory(qmp, timeout=MEMORY_TIMEOUT, stall=STALL_TIMEOUT,
                               postcopy=options.postcopy, report=said)
        qm.complete_mirror(qmp, FINISH_TIMEOUT)
    ram = info.get("ram") or {}
    return {"downtime_ms": info.get("downtime"), "memory_seconds": info.get("total-time", 0)
            / 1000, "memory_bytes": ram.get("transferred"), "mbps": ram.get("mbps"),
            "dirty_syncs": ram.get("dirty-sync-count")}


def _finish_or_ask(peer: Peer, mid: str) -> dict[str, Any]:
    """The destination resumes the guest. When its answer is lost, ask who owns the VM: a
    source never runs again a guest the destination may have resumed."""
    try:
        return peer.finish(mid)
    except VmkitError as exc:
        owns = None
        with contextlib.suppress(Exception):
            owns = peer.owns(mid)
        if owns is True:
            return {}
        if owns is None:
            raise _Undecided(f"the destination did not say whether it finished the move "
                             f"({exc.message}); the source stays paused and is never "
                             "started", hint="run vmkit recover once the destination answers"
                             ) from exc
        raise


class _Undecided(VmkitError):
    """The destination may run the guest: the source must hold, not roll back."""


def _roll_back(held: Held, vm: VM, peer: Peer, mid: str | None, point: str | None,
               staging: Path) -> None:
    """A move that did not happen: the destination drops what it made, the source runs on
    its own disk with its helper snapshot merged away. A move that may have happened
    (_Undecided) is left paused with its journal for `recover`."""
    import sys

    if isinstance(sys.exc_info()[1], _Undecided):
        raise sys.exc_info()[1]  # type: ignore[misc]
    if mid is not None:
        with contextlib.suppress(Exception):
            peer.abort(mid)
    _source_back(held, vm, point)
    shutil.rmtree(staging, ignore_errors=True)


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
            with contextlib.suppress(VmkitError):
                qmp.execute("object-del", {"id": qm.TLS_ID})
            status = qmp.execute("query-status")["status"]
            if status != "running" and record.state is VmState.RUNNING:
                qmp.execute("cont")
    with contextlib.suppress(OSError, FileNotFoundError):
        qm.remove_psk(vm.folder.path / PSK_FOLDER)
    if point is not None and point in store.load_tree(vm).nodes:
        layers.delete_locked(held, vm, vm._observe(persist=True, held=held), point)


def _confirm(held: Held, vm: VM, *, generation: int, destination: str) -> None:
    """The destination owns the VM: remember where it went, then the source goes."""
    store.bury(vm.host, vm.config, generation, destination)
    vm._remove_locked(held, vm._observe(persist=True, held=held))


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
    owns: bool | None = None
    if phase is Phase.PERFORMED and peer is not None and isinstance(mid, str):
        with contextlib.suppress(Exception):
            owns = peer.owns(mid)
    decision = recover(Side.SOURCE, phase, destination_owns=owns)
    point = intent.get("point") if isinstance(intent.get("point"), str) else None
    staging = Path(str(intent.get("staging")))
    if staging.parent == vm.host.layout.cache:
        shutil.rmtree(staging, ignore_errors=True)
    if decision.action is Action.KILL_SOURCE:
        _confirm(held, vm, generation=vm.config.generation + 1,
                 destination=str(intent.get("destination")))
        return
    if decision.action is Action.HOLD:
        raise InvalidState(f"VM {vm.name!r} was moving to {intent.get('destination')} when "
                           f"vmkit stopped, and the destination cannot be asked whether it "
                           "took over: the guest stays paused here and is not started",
                           hint="make the destination reachable, then run vmkit recover")
    if peer is not None and isinstance(mid, str):
        with contextlib.suppress(Exception):
            peer.abort(mid)
    _source_back(held, vm, point)


# -- destination --------------------------------------------------------------------------------
def receive(host: Host, bundle: Path, *, name: str, generation: int, migration: str,
            unpack: Unpack, progress: Callable[[int, int], None] | None = None) -> VM:
    """Import the moving VM's files as an incoming VM (journal `migrate-in`: any other
    command on it before finish rolls it back), at its new generation. `unpack` is
    ops/bundles.import_bundle (passed by the facade)."""
    if host.layout.vm(name).path.exists():
        raise MoveRefused(f"a VM named {name!r} already exists here",
                          hint="pick another name on the destination (--name)")

    def arriving(work: VmFolder, config: VmConfig) -> VmConfig:
        moved = store.tombstone(host, config.uuid)
        if moved is not None and int(moved.get("generation", 0)) >= generation:
            raise MoveRefused(f"VM {config.uuid} already left this host at generation "
                              f"{moved.get('generation')}; generation {generation} is stale")
        with _ARRIVING_LOCK:
            _ARRIVING.add(migration)
        log = Journal(work.path)
        log.begin("migrate-in", migration=migration)
        return config.model_copy(update={"generation": generation})

    try:
        return unpack(host, bundle, name=name, progress=progress, arriving=arriving)
    except BaseException:
        with _ARRIVING_LOCK:
            _ARRIVING.discard(migration)
        raise


class Incoming:
    """One VM arriving here: its QEMU waits for the stream; finish resumes it, abort
    removes every trace. Holds the VM's lock from start to end."""

    def __init__(self, vm: VM, migration: str):
        self.vm = vm
        self.migration = migration
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.finished = False
        self.ended = threading.Event()
        self._lock_cm: Any = None
        self._held: Held | None = None
        self._listeners: list[socket.socket] = []
        self._gate: threading.Thread | None = None
        self._accepted = threading.Event()
        self._paused = False
        self.refused = 0  # connections without the token (a third party)
        self._finishing = threading.Event()
        self._state_lock = threading.Lock()

    # the lock is taken here and released by finish/abort (from another request's thread);
    # taken without recovery: the journal `migrate-in` is this session's own
    def _take_lock(self) -> Held:
        if self._held is None:
            host = self.vm.host
            self._lock_cm = file_lock(host._lock_path(self.vm.name), timeout=host.lock_timeout,
                                      what=f"VM {self.vm.name!r}")
            self._lock_cm.__enter__()
            self._held = Held(self.vm.name)
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

    def start(self, *, key: str, listen: str, machine: dict[str, Any] | None, paused: bool,
              postcopy: bool) -> dict[str, Any]:
        """Start the incoming QEMU (paused), its NBD export and the memory gate; returns the
        ports and the one-time token the source presents."""
        vm = self.vm
        held = self._take_lock()
        self._paused = paused
        running_as = None
        if machine is not None:
            running_as = MachineRecord.model_validate(machine)
            config = vm.config
            if running_as.config.uuid != config.uuid:
                raise InvalidValue("the machine record names another VM")
            running_as = running_as.model_copy(update={"config": running_as.config.model_copy(
                update={"spec": running_as.config.spec.model_copy(
                    update={"name": vm.name}), "generation": config.generation})})
        psk = vm.folder.path / PSK_FOLDER
        qm.write_psk(psk, key, vm.owner())
        memory = socket.create_server((listen, 0))
        nbd = socket.create_server((listen, 0))
        self._listeners = [memory, nbd]

        def setup(qmp: QmpConnection) -> None:
            qm.add_tls(qmp, psk, server=True)
            qm.tune_destination(qmp, postcopy=postcopy)
            qm.serve_disk(qmp, nbd)

        try:
            vm._start_locked(held, RuntimeRecord(), incoming=setup, resume=False,
                             machine=running_as)
        except BaseException:
            self.abort()
            raise
        ports = {"port": memory.getsockname()[1], "nbd_port": nbd.getsockname()[1]}
        nbd.close()  # QEMU holds its own copy
        self._gate = threading.Thread(target=self._admit, args=(memory,), daemon=True,
                                      name=f"migration-gate-{self.migration}")
        self._gate.start()
        threading.Thread(target=self._watch, daemon=True,
                         name=f"migration-watch-{self.migration}").start()
        return {**ports, "token": self.token.hex()}

    def _watch(self) -> None:
        """Roll back on our own when the stream breaks (QEMU gone, the transfer failed, or
        nothing connected in time): a source cut off by the network cannot tell us."""
        while not self.ended.wait(1.0):
            if self._finishing.is_set():
                continue
            broken = not self.vm._alive(self.vm._record())
            if not broken:
                try:
                    with QmpConnection(self.vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                        broken = qm.incoming_status(qmp) in ("failed", "cancelled")
                except VmkitError:
                    broken = True
            if broken or (self._gate is not None and not self._gate.is_alive()
                          and not self._accepted.is_set()):
                with contextlib.suppress(Exception):
                    self.abort()
                return

    def _admit(self, listener: socket.socket) -> None:
        """Accept until a connection presents the token (others are closed unanswered), then
        hand that socket to QEMU."""
        deadline = time.monotonic() + GATE_TIMEOUT
        try:
            while not self.ended.is_set() and time.monotonic() < deadline:
                listener.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with contextlib.suppress(OSError):
                    conn.settimeout(5)
                    got = b""
                    while len(got) < TOKEN_BYTES:
                        chunk = conn.recv(TOKEN_BYTES - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if hmac.compare_digest(got, self.token):
                        conn.settimeout(None)
                        _keepalive(conn)
                        with QmpConnection(self.vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as q:
                            qm.receive_memory(q, conn)
                        self._accepted.set()
                        conn.close()
                        return
                self.refused += 1
                conn.close()
        finally:
            listener.close()

    def finish(self, timeout: float = FINISH_TIMEOUT) -> dict[str, Any]:
        """The whole state arrived and the source is paused for good: run the guest here."""
        with self._state_lock:
            if self.ended.is_set():
                raise InvalidState(f"the move of VM {self.vm.name!r} here was rolled back")
            self._finishing.set()
        vm, held = self.vm, self._take_lock()
        if self._gate is not None:
            if not self._accepted.wait(timeout):
                raise OperationTimeout("the source never connected its memory stream")
            with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                qm.wait_incoming(qmp, timeout)
                qm.stop_serving(qmp)
                if not self._paused:
                    qmp.execute("cont")
                qm.announce(qmp)
                with contextlib.suppress(VmkitError):
                    qmp.execute("object-del", {"id": qm.TLS_ID})
            record = vm._record()
            vm._write(record.model_copy(update={
                "state": VmState.PAUSED if self._paused else VmState.RUNNING}))
        Journal(vm.folder.path).end()  # from here on this host owns the VM
        self.finished = True
        with contextlib.suppress(OSError):
            qm.remove_psk(vm.folder.path / PSK_FOLDER)
        tree = store.load_tree(vm)
        helpers = [n for n in tree.nodes if n.startswith("move-")]
        for point in helpers:  # the source's helper snapshot: merged away here too
            with contextlib.suppress(VmkitError):
                layers.delete_locked(held, vm, vm._observe(persist=True, held=held), point)
        self._end()
        return vm.status().model_dump(mode="json")

    def abort(self) -> None:
        """Nothing of the move stays here (idempotent; the guest never ran here)."""
        with self._state_lock:
            if self.finished or self.ended.is_set():
                return
            held = self._take_lock()
            with contextlib.suppress(FileNotFoundError):
                _destroy_incoming(held, self.vm)
            self._end()

    def _end(self) -> None:
        self.ended.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        self._release_lock()


def _keepalive(sock: socket.socket) -> None:
    """Notice a peer that vanished (a cut link sends no reset) within ~10 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 4)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 10_000)


def _destroy_incoming(held: Held, vm: VM) -> None:
    if not vm.folder.path.exists():
        return
    vm._remove_locked(held, vm._observe(persist=True, held=held))


def recover_in(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A destination that did not finish: the guest never ran here; nothing of it stays —
    unless the move is still under way (in this process, or in a live one)."""
    mid = entry.intent.get("migration")
    with _ARRIVING_LOCK:
        ours = mid in _ARRIVING
    if ours or (entry.pid != os.getpid() and _pid_alive(entry.pid)):
        raise LockTimeout(f"VM {vm.name!r} is arriving from another host (process "
                          f"{entry.pid})", hint="wait until the move has finished")
    _destroy_incoming(held, vm)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ARRIVING: set[str] = set()  # migrations this process is receiving now
_ARRIVING_LOCK = threading.Lock()


register_recovery("migrate-out", recover_out)
register_recovery("migrate-in", recover_in)
