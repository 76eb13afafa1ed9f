"""The engine core: the VM store (folders: publish, discard, sweep, broken ones), the locks
(one per VM, the host's admission lock, image locks; whoever takes a VM's lock first finishes an
interrupted operation from its journal), and the runtime (spawn, observe, adopt, kill, exit
classification, the machine record). Operations (vmkit.ops) are built on this; the facades
(vmkit.host, vmkit.cli) call the operations. Nothing here imports an operation or a facade.

Lock order: a VM's lock, then the host lock (admission + the reservation only), then the
network lock; an image lock (shared by creates, exclusive for a rebuild) is taken before a VM's.
Waits on other VMs' locks from inside a held lock use timeout 0 (never block).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import stat
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vmkit.core import ksm, store
from vmkit.core import networks as net_ops
from vmkit.core.journal import JOURNAL_FILE, Journal, recovery_rule
from vmkit.core.locks import Held
from vmkit.core.media import open_media
from vmkit.errors import (
    AgentError,
    AlreadyExists,
    BrokenVm,
    HostError,
    InvalidState,
    InvalidValue,
    LockTimeout,
    NotFound,
    QemuError,
    VmkitError,
    os_errors,
)
from vmkit.images import catalog
from vmkit.images.seed import write_seed
from vmkit.isolation import cgroups as cgroups_mod
from vmkit.isolation import jail, uids
from vmkit.isolation.cgroups import CgroupLimits
from vmkit.model.cloudinit import (
    KEY_TYPES,
    parse_ssh_public_keys,
    seed_files,
)
from vmkit.model.defaults import AGENT_READY_TIMEOUT, LOCK_TIMEOUT
from vmkit.model.names import validate_name
from vmkit.model.network import USER_NETWORK, Nic, scope_of
from vmkit.model.resources import (
    Allocation,
    HostCapacity,
    Policy,
    admit,
    tcg_cache_for,
)
from vmkit.model.restart import RESTARTS_FILE, summary
from vmkit.model.runtime import (
    ExitRecord,
    HotplugStep,
    Intent,
    MachineRecord,
    PluggedNic,
    RuntimeRecord,
    classify_exit,
)
from vmkit.model.spec import (
    ExtraDisk,
    Limits,
    VmConfig,
    VmSpec,
    hostname_in,
)
from vmkit.model.state import LIVE_STATES, Operation, VmState, check_transition
from vmkit.model.views import ExecResult, ImageInfo, Usage, VmStatus
from vmkit.qemu import accel as accel_mod
from vmkit.qemu import agent, blockops, hostinfo, process, tpm
from vmkit.qemu.argv import LaunchOptions, build_argv, volume_id
from vmkit.qemu.blockops import DISK_DEVICE
from vmkit.qemu.hotplug import replay_args, replay_nics
from vmkit.qemu.qmp import QmpConnection, qmp_execute, wait_qmp_ready
from vmkit.storage import statuscache
from vmkit.storage.home import default_home
from vmkit.storage.layout import (
    REGISTRATION_FILE,
    HomeLayout,
    Registration,
    VmFolder,
    file_lock,
    lock_is_free,
    read_json,
    read_metadata,
    write_json_atomic,
    write_registration,
)

# Named timeouts (seconds); every wait in the engine uses one of these or a caller's value.
# (The defaults a user can change are in model/defaults.py: the CLI reads them without the
# engine.)
QEMU_START_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
COPY_TIMEOUT = 600.0
QMP_TIMEOUT = 5.0
QEMU_MEMORY_OVERHEAD = 512 << 20  # cgroup memory limit = guest RAM ceiling + this (QEMU, TCG)
EXIT_STATUS_WAIT = 1.0  # the waiter writes QEMU's exit status a moment after QEMU is gone
DEFAULT_MACHINE = "q35"
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

Progress = Callable[[str], None]


class Host:
    """One host's VMs, images and policy, rooted at VMKIT_HOME."""

    vm_class: type[VM]

    def __init__(self, home: str | Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT):
        self.layout = HomeLayout(Path(home).absolute() if home else default_home())
        self.lock_timeout = lock_timeout
        self.layout.ensure()

    def _vm(self, name: str) -> VM:
        """A handle on VM `name` (the facade's own VM class when the facade made this Host)."""
        return self.vm_class(self, name)

    # -- host facts -----------------------------------------------------------------------
    @functools.cached_property
    def run_as(self) -> jail.RunAs | None:
        """The unprivileged account QEMU runs as (root only), or None."""
        return jail.run_as()

    @functools.cached_property
    def cgroups(self) -> cgroups_mod.Driver | None:
        """The cgroup tree VMs are fenced in, or None (not root / none mounted)."""
        return cgroups_mod.detect(scope=scope_of(str(self.layout.root)))

    def capacity(self) -> HostCapacity:
        return HostCapacity(cores=os.cpu_count() or 1, memory=_mem_total())

    def policy(self) -> Policy:
        if self.layout.policy_file.exists():
            return Policy.model_validate(read_json(self.layout.policy_file))
        return Policy()

    def set_policy(self, policy: Policy) -> None:
        if policy.ksm is not None:
            ksm.switch(policy.ksm)  # first: a host that cannot do it keeps its old policy
        write_json_atomic(self.layout.policy_file, policy.model_dump(mode="json"))

    def apply_policy(self) -> None:
        """What the policy sets outside VMKIT_HOME (KSM is off again after a reboot); called
        when the daemon starts."""
        policy = self.policy()
        if policy.ksm is not None and ksm.read().running != policy.ksm:
            ksm.switch(policy.ksm)

    def accel(self, *, refresh: bool = False) -> accel_mod.AccelDecision:
        kernels = sorted(self.layout.images.glob("*/vmlinuz"))
        return accel_mod.choose(self.layout.cache / "accel.json",
                                kernels[0] if kernels else None, refresh=refresh)

    def allocated(self, *, exclude: str | None = None) -> Allocation:
        cpus = memory = 0
        for vm in self.vms(include_broken=True):
            if vm.name == exclude:
                continue
            if vm.broken_reason() is not None:  # unknown state: counted as if it ran
                status = vm.status()
                cpus += status.cpus
                memory += status.memory
            elif vm.state in LIVE_STATES:
                cpus += vm.config.spec.cpus
                memory += vm.config.spec.memory
        return Allocation(cpus=cpus, memory=memory)


    def restart_record(self, name: str) -> dict[str, Any] | None:
        """The daemon's supervisor record of a VM (restarts, last reason), when it has one."""
        try:
            data = json.loads((self.layout.root / RESTARTS_FILE).read_text())
        except (OSError, ValueError):
            return None
        return summary(data.get(name)) if isinstance(data, dict) else None

    # -- images ---------------------------------------------------------------------------

    def image(self, name: str) -> ImageInfo:
        return catalog.image_info(self.layout, name)



    # -- networks -------------------------------------------------------------------------





    # -- VMs ------------------------------------------------------------------------------
    def vms(self, *, include_broken: bool = False) -> list[VM]:
        """The VMs of this host; those whose metadata cannot be read only with
        `include_broken` (listing, admission and delete_all see them; use cases do not)."""
        self._sweep_leftovers()
        result = []
        for folder in sorted(self.layout.vms.iterdir()):
            if not folder.name.startswith(".") and self._is_vm_folder(folder):
                self._finish_interrupted(folder.name)
                vm = self._vm(folder.name)
                if include_broken or vm.broken_reason() is None:
                    result.append(vm)
        return result


    def statuses(self, *, include_broken: bool = False) -> list[VmStatus]:
        """Every VM's status (what `vmkit list` shows). The full listing is remembered in
        cache/statuses.json, which the fast CLI path reuses while nothing has moved."""
        vms = self.vms(include_broken=include_broken)
        keys = {vm.name: statuscache.vm_key(self.layout.root, vm.name) for vm in vms}
        statuses = [vm.status() for vm in vms]
        if include_broken:
            statuscache.write(self.layout.root, keys,
                              [s.model_dump(mode="json") for s in statuses])
        return statuses

    @staticmethod
    def _is_vm_folder(local: Path) -> bool:
        """vms/NAME holds a VM: its vm.json, or the registration of one on shared storage."""
        return (local / "vm.json").exists() or (local / REGISTRATION_FILE).exists()

    def get(self, name: str) -> VM:
        validate_name(name)
        if not self._is_vm_folder(self.layout.vms / name):
            known = ", ".join(vm.name for vm in self.vms()) or "none"
            raise NotFound(f"unknown VM {name!r} (VMs on this host: {known})",
                           hint="see vmkit list")
        self._finish_interrupted(name)
        return self._vm(name)

    def _finish_interrupted(self, name: str) -> None:
        """Run an interrupted operation's recovery now when nobody holds the VM's lock (a
        holder is still working on it), so what `list`/`info` show is consistent."""
        if (self.layout.vms / name / JOURNAL_FILE).exists():
            with contextlib.suppress(LockTimeout, BrokenVm), \
                    self._vm_lock(name, timeout=0, not_held=True):
                pass


    def _new_vm_folder(self, name: str, build: Callable[[VmFolder], VmConfig], *,
                       held: Held | None = None, pool: Path | None = None) -> VM:
        """Make vms/NAME complete or not at all: `build` fills a hidden folder, then one rename
        publishes it. The caller has validated the request; this holds the name's lock (or
        the caller does, `held`: nobody may start the VM before the caller is done with it).
        `pool`: a folder on shared storage, where the VM's folder goes (POOL/NAME), with its
        registration and runtime in vms/NAME."""
        longest = self.layout.vm(name).serial_socket
        if len(str(longest)) > _UNIX_PATH_MAX:
            raise InvalidValue(
                f"VMKIT_HOME {self.layout.root} is too long: the VM's socket path {longest} "
                f"exceeds {_UNIX_PATH_MAX} bytes, the UNIX socket limit",
                hint="use a shorter VMKIT_HOME (or a shorter VM name)")
        if held is not None:
            held.require(name)
        with contextlib.nullcontext() if held is not None else self._vm_lock(name):
            self._sweep_leftovers()
            target = self.layout.vm(name)
            if target.path.exists():
                raise AlreadyExists(f"VM {name!r} already exists",
                                    hint=f"pick another name or delete it: vmkit delete {name}")
            tag = uuidlib.uuid4().hex[:8]
            local = self.layout.vms / f".creating-{name}-{tag}"
            work = VmFolder(local) if pool is None else \
                VmFolder(pool / f".creating-{name}-{tag}", runtime=local)
            reserved = None
            if pool is not None:  # another host may create the same name: mkdir decides
                try:
                    os.mkdir(pool / name, 0o700)
                except FileExistsError:
                    raise AlreadyExists(f"the shared storage {pool} already has a folder "
                                        f"{name!r}", hint="pick another name, or remove that "
                                                          "folder") from None
                reserved = pool / name
            try:
                with os_errors(f"creating VM {name!r}"):
                    for root in {work.path, work.runtime_root}:
                        root.mkdir()
                    work.make_dirs()
                    config = build(work)
                    write_json_atomic(work.config_file, config.model_dump(mode="json"))
                    write_json_atomic(work.state_file, RuntimeRecord().model_dump(mode="json"))
                    if pool is not None:  # the folder first: a registration names a folder
                        os.rename(work.path, pool / name)  # over its empty reservation
                        write_registration(local, Registration(
                            str(pool / name), config.generation, config.uuid))
                    os.rename(local, target.path)
            except BaseException:
                for root in {work.path, work.runtime_root}:
                    shutil.rmtree(root, ignore_errors=True)
                if reserved is not None and not target.path.exists():
                    shutil.rmtree(reserved, ignore_errors=True)  # ours: made above
                raise
        return self._vm(name)

    def _discard_vm_folder(self, name: str, *, leave_shared: bool = False) -> None:
        """Remove vms/NAME (the caller holds its lock): rename away first, so it is never seen
        half-deleted; an interrupted removal is finished by the next listing. A VM on shared
        storage: its folder there goes too, unless `leave_shared` (a move's source or a
        rolled-back arrival lets go of the VM; another host may run it)."""
        local = self.layout.vms / name
        try:
            folder = self.layout.vm(name)
        except BrokenVm:
            folder = VmFolder(local)
        shared_trash = None
        if folder.shared and not leave_shared and folder.path.exists() and \
                self._holds_shared(name):
            shared_trash = folder.path.parent / f".deleting-{name}-{uuidlib.uuid4().hex[:8]}"
            os.rename(folder.path, shared_trash)
        trash = self.layout.vms / f".deleting-{name}-{uuidlib.uuid4().hex[:8]}"
        os.rename(local, trash)
        shutil.rmtree(trash, ignore_errors=True)
        if shared_trash is not None:
            shutil.rmtree(shared_trash, ignore_errors=True)

    def _holds_shared(self, name: str) -> bool:
        """This host's registration of a VM on shared storage has the folder's generation: the
        VM is this host's to run or delete (a host it moved away from holds an older one)."""
        try:
            store.check_holds_shared(self._vm(name))
        except (VmkitError, OSError):
            return False
        return True

    # -- internals ------------------------------------------------------------------------
    def _lock_path(self, name: str) -> Path:
        return self.layout.locks / f"vm-{name}.lock"

    def _vm_lock(self, name: str, timeout: float | None = None, *,
                 not_held: bool = False) -> contextlib.AbstractContextManager[Held]:
        """The VM's lock; whoever takes it first finishes an interrupted operation (journal).
        A VM on shared storage that another host now runs (this host's registration is of an
        older generation) is refused, so nothing here writes its folder; `not_held` lets
        through what touches only this host's side (its runtime record, the delete of the
        registration)."""
        return self._locked_and_recovered(name, timeout, not_held)

    @contextlib.contextmanager
    def _locked_and_recovered(self, name: str, timeout: float | None,
                              not_held: bool) -> Iterator[Held]:
        wait = self.lock_timeout if timeout is None else timeout
        with file_lock(self._lock_path(name), timeout=wait, what=f"VM {name!r}"):
            held = Held(name)
            try:
                if (self.layout.vms / name / JOURNAL_FILE).exists():
                    self._vm(name).recover_locked(held)
                if not not_held and (self.layout.vms / name / REGISTRATION_FILE).exists():
                    store.check_holds_shared(self._vm(name))
                yield held
            finally:
                held.release()

    def recover(self) -> list[str]:
        """Finish every interrupted operation on this host (also done lazily, by the next
        command on each VM); returns the VMs that had one."""
        done = []
        for folder in sorted(self.layout.vms.iterdir()):
            if not folder.name.startswith(".") and (folder / JOURNAL_FILE).exists():
                # one VM that cannot be decided now (a move on hold, a busy lock) does not
                # keep the others from being recovered; its next command says why
                with contextlib.suppress(VmkitError), self._vm_lock(folder.name, not_held=True):
                    pass
                done.append(folder.name)
        return done

    def _image_lock(self, name: str, *, timeout: float | None = None,
                    shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """An image's lock: a rebuild holds it alone; creates that link its base share it."""
        return file_lock(self.layout.locks / f"image-{name}.lock",
                         timeout=self.lock_timeout if timeout is None else timeout,
                         what=f"image {name!r} (a rebuild or a create uses it)", shared=shared)

    def _host_lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.layout.locks / "host.lock", timeout=self.lock_timeout,
                         what="the host's admission lock")

    def _sweep_leftovers(self) -> None:
        """Finish what an interrupted create or delete left: remove its hidden folder."""
        for folder in self.layout.vms.iterdir():
            if not folder.name.startswith((".creating-", ".deleting-")):
                continue
            name = folder.name.split("-", 1)[1].rsplit("-", 1)[0]
            if folder.name.startswith(".deleting-") or lock_is_free(self._lock_path(name)):
                shutil.rmtree(folder, ignore_errors=True)


class VM:
    """A handle on one VM. State is observed fresh on every call, never cached."""

    def __init__(self, host: Host, name: str):
        self.host = host
        self.name = name
        self._unregistered: str | None = None
        try:
            self.folder = host.layout.vm(name)
        except BrokenVm as exc:  # listed as broken; delete --force removes it
            self.folder, self._unregistered = VmFolder(host.layout.vms / name), exc.message
        self._config: VmConfig | None = None

    def __repr__(self) -> str:
        return f"VM({self.name!r})"

    @property
    def config(self) -> VmConfig:
        if self._config is None:
            try:
                self._config = read_metadata(self.folder.config_file, VmConfig,
                                             f"VM {self.name!r}")
            except FileNotFoundError:
                raise NotFound(f"unknown VM {self.name!r}", hint="see vmkit list") from None
        return self._config

    def broken_reason(self) -> str | None:
        """Why this VM's metadata cannot be read (vm.json, state.json, snapshots.json), or
        None when it can."""
        if self._unregistered is not None:
            return self._unregistered
        if self.folder.shared and not self.folder.config_file.exists():
            return (f"VM {self.name!r} is broken: its folder on shared storage "
                    f"{self.folder.path} cannot be reached (is the storage mounted?)")
        try:
            self.config  # noqa: B018 - loading is the check
            self._record()
            store.load_tree(self)
            Journal(self.folder.runtime_root).read()
        except BrokenVm as exc:
            return exc.message
        return None

    def _lenient(self) -> dict[str, Any]:
        """What can still be made out of a broken vm.json (for admission and cleanup)."""
        try:
            data = json.loads(self.folder.config_file.read_bytes()[:1 << 22])
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def owner(self) -> jail.RunAs | None:
        """The uid/gid this VM's QEMU runs under (its own; None when vmkit is not root)."""
        return jail.vm_owner(self.config.uuid, self.folder.runtime_root)

    def disk_owner(self) -> jail.RunAs | None:
        """The VM's uid, with its folder in the jail's shape and the layers it leans on shared
        with it: who runs qemu-img on its layers (what its guest wrote is untrusted)."""
        owner = self.owner()
        jail.prepare_folder(owner, self.folder.path, self.folder.runtime)
        jail.share_layers(owner, self.leaned_on_layers())
        return owner

    def save_config(self, config: VmConfig) -> None:
        """Replace vm.json (the caller holds the VM's lock)."""
        write_json_atomic(self.folder.config_file, config.model_dump(mode="json"))
        self._config = None

    # -- observation ----------------------------------------------------------------------
    @property
    def state(self) -> VmState:
        return self._observe(persist=True).state

    def _record(self) -> RuntimeRecord:
        try:
            return read_metadata(self.folder.state_file, RuntimeRecord, f"VM {self.name!r}")
        except FileNotFoundError:
            return RuntimeRecord()

    def _write(self, record: RuntimeRecord) -> None:
        write_json_atomic(self.folder.state_file, record.model_dump(mode="json"))

    def _identity(self, record: RuntimeRecord) -> process.ProcessIdentity | None:
        if record.pid is None or record.start_ticks is None:
            return None
        return process.ProcessIdentity(record.pid, record.start_ticks)

    def _alive(self, record: RuntimeRecord) -> bool:
        identity = self._identity(record)
        return identity is not None and process.is_alive(identity, self.config.uuid)

    def _observe(self, *, persist: bool, held: Held | None = None) -> RuntimeRecord:
        """The recorded state, corrected when the QEMU process turned out to be gone; persisted
        under `held` (the VM's lock) or, when free, under the lock taken without waiting."""
        locked = held is not None
        if held is not None:
            held.require(self.name)
        record = self._record()
        if record.state not in LIVE_STATES or self._alive(record):
            return record
        if record.state is VmState.STARTING and record.pid is None:
            if not locked and not lock_is_free(self.host._lock_path(self.name)):
                return record  # a start in progress has not written its pid yet
            # the starting command died before it recorded QEMU's pid: adopt QEMU if it runs
            final = self._adopt_running_qemu(record) or RuntimeRecord(
                state=VmState.CRASHED, accel=record.accel, accel_reason=record.accel_reason,
                last_exit=ExitRecord(at=time.time(), reason="start-failed",
                                     description="the start was interrupted before QEMU ran "
                                                 "(the starting command died)"))
        else:
            final = self._exit_record(record)
        if persist:
            if locked:
                self._write(final)
                if final.state not in LIVE_STATES:
                    self._clear_run()
            else:
                with contextlib.suppress(LockTimeout), \
                        self.host._vm_lock(self.name, timeout=0, not_held=True):
                    if self._record() == record:
                        self._write(final)
                        if final.state not in LIVE_STATES:
                            self._clear_run()
        return final

    def _adopt_running_qemu(self, record: RuntimeRecord) -> RuntimeRecord | None:
        identity = process.find_vm_qemu(self.config.uuid)
        if identity is None:
            return None
        return record.model_copy(update={
            "state": VmState.RUNNING, "pid": identity.pid, "start_ticks": identity.start_ticks,
            "started_at": process.started_at(identity)})

    def _exit_record(self, record: RuntimeRecord, note: str = "") -> RuntimeRecord:
        status = process.wait_exit_status(self.folder.exit_file, EXIT_STATUS_WAIT)
        state, reason = classify_exit(record.intent, status)
        description = {
            "requested": f"{record.intent} requested by vmkit",
            "guest-shutdown": "the guest powered off",
            "crash": f"QEMU exited unexpectedly ({process.describe_exit(status)})",
        }[reason] + note
        tail = ""
        if reason == "crash":
            qemu_tail = process.log_tail(self.folder.qemu_log) or "(QEMU wrote nothing)"
            serial_tail = process.log_tail(self.folder.serial_log, lines=5) or "(empty)"
            tail = f"QEMU log:\n{qemu_tail}\nserial log:\n{serial_tail}"
        return RuntimeRecord(
            state=state, accel=record.accel, accel_reason=record.accel_reason,
            last_exit=ExitRecord(at=time.time(), reason=reason, status=status,
                                 run=run_id(record.pid, record.start_ticks),
                                 description=description, log_tail=tail),
        )

    def status(self, *, query_qemu: bool = False) -> VmStatus:
        reason = self.broken_reason()
        if reason is not None:
            return self._broken_status(reason)
        record = self._observe(persist=True)
        cfg = self.config
        live = record.state in LIVE_STATES
        qemu_status = None
        usage = None
        guest: dict[str, Any] | None = None
        if query_qemu and live:
            try:
                qemu_status = qmp_execute(self.folder.qmp_socket, "query-status",
                                          timeout=2.0)["status"]
                usage = self.usage(record)
            except VmkitError as exc:
                qemu_status = f"unknown ({exc.message})"
            if qemu_status == "running":
                with contextlib.suppress(VmkitError):
                    guest = agent.guest_facts(self.folder.agent_socket, timeout=3.0)
        return VmStatus(
            name=self.name, state=record.state, cpus=cfg.spec.cpus, memory=cfg.spec.memory,
            disk=cfg.spec.disk, image=cfg.spec.image, uuid=cfg.uuid, mac=cfg.mac,
            pid=record.pid if live else None,
            uptime=(time.time() - record.started_at) if live and record.started_at else None,
            accel=record.accel, accel_reason=record.accel_reason,
            isolation_note=accel_mod.TCG_ISOLATION_NOTE if record.accel == "tcg" else None,
            machine=cfg.hardware.machine, cpu_model=cfg.hardware.cpu_model,
            folder=str(self.folder.path),
            disk_mode="full-copy" if cfg.spec.full_copy else "overlay",
            firmware=cfg.hardware.firmware,
            boot="kernel" if cfg.boot else ",".join(cfg.boot_order), media=cfg.media,
            display=cfg.hardware.display,
            vnc_socket=str(self.folder.vnc_socket)
            if live and cfg.hardware.display == "std" else None,
            last_exit=record.last_exit, qemu_status=qemu_status,
            max_cpus=cfg.spec.cpu_ceiling, max_memory=cfg.spec.memory_ceiling,
            limits=cfg.spec.limits, usage=usage, guest=guest,
            hostname=cfg.cloud_init.hostname if cfg.cloud_init else
            hostname_in(cfg.boot.cmdline) if cfg.boot else None,
            ssh=self._ssh_target(record) if live and cfg.ssh_user else None,
            nics=list(cfg.nics), disks=list(cfg.disks), restart_policy=cfg.restart,
            restarts=self.host.restart_record(self.name),
        )

    def _broken_status(self, reason: str) -> VmStatus:
        data = self._lenient()
        spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
        assert isinstance(spec, dict)

        def number(key: str) -> int:
            value = spec.get(key)
            return value if isinstance(value, int) and value >= 0 else 0

        text: dict[str, str] = {k: v if isinstance(v := data.get(k), str) else ""
                                for k in ("uuid", "mac")}
        return VmStatus(
            name=self.name, state=VmState.BROKEN, broken=reason, cpus=number("cpus"),
            memory=number("memory"), disk=number("disk"), image="", uuid=text["uuid"][:64],
            mac=text["mac"][:32], pid=None, uptime=None, accel=None, accel_reason=None,
            isolation_note=None, machine="", cpu_model="", folder=str(self.folder.path),
            disk_mode="", last_exit=None, max_cpus=number("cpus"), max_memory=number("memory"),
            limits=Limits())

    def _ssh_target(self, record: RuntimeRecord) -> str | None:
        """user@host:port of the guest's sshd: the user-mode forward, else the address of
        its first NIC on a vmkit network."""
        cfg = self.config
        if record.ssh_port is not None:
            return f"{cfg.ssh_user}@127.0.0.1:{record.ssh_port}"
        address = next((n.address for n in cfg.nics if n.address), None)
        return f"{cfg.ssh_user}@{address}:22" if address else None




    def usage(self, record: RuntimeRecord | None = None) -> Usage | None:
        """Live use of a running VM: CPU time and RSS from /proc, memory from its cgroup, what
        the guest has from QMP (vCPUs, DIMMs, balloon) and disk bytes from blockstats."""
        record = record or self._observe(persist=True)
        if record.state not in LIVE_STATES or record.pid is None:
            return None
        cpu = process.cpu_seconds(record.pid)
        rss = process.rss_bytes(record.pid)
        if cpu is None or rss is None:
            return None
        elapsed = max(1e-3, time.time() - (record.started_at or time.time()))
        with QmpConnection(self.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
            vcpus = len(qmp.execute("query-cpus-fast"))
            summary = qmp.execute("query-memory-size-summary")
            plugged = int(summary["base-memory"]) + int(summary.get("plugged-memory", 0))
            actual = int(qmp.execute("query-balloon")["actual"])
            blockstats: list[dict[str, Any]] = qmp.execute("query-blockstats")
        stats: dict[str, Any] = next((entry.get("stats", {}) for entry in blockstats
                                      if DISK_DEVICE in (entry.get("qdev") or "")), {})
        cgroup_memory = None
        if self.host.cgroups is not None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                cgroup_memory = self.host.cgroups.usage(self.name).memory
        return Usage(cpu_seconds=cpu, cpu_percent_avg=100 * cpu / elapsed, rss=rss,
                     cgroup_memory=cgroup_memory, vcpus=vcpus, memory_plugged=plugged,
                     memory_actual=actual, disk_read=int(stats.get("rd_bytes", 0)),
                     disk_written=int(stats.get("wr_bytes", 0)),
                     disk_read_ops=int(stats.get("rd_operations", 0)),
                     disk_write_ops=int(stats.get("wr_operations", 0)))

    # -- lifecycle ------------------------------------------------------------------------
    def argv(self, accel: str, *, incoming: bool = False, ssh_port: int | None = None,
             tap_fds: tuple[tuple[str, int], ...] = (), layer: str | None = None,
             machine: MachineRecord | None = None, media_fd: int | None = None) -> list[str]:
        """The QEMU command line this VM runs with (used by start and by benchmarks); `layer`
        overrides the active disk layer (a restore starts on a layer not yet published);
        `machine` rebuilds a machine as it was (its vm.json then + its hot-plugged devices)."""
        cfg = machine.config if machine is not None else self.config
        paths = self.folder.config_run_paths(cfg, layer or self.active_layer())
        argv = build_argv(cfg, paths, LaunchOptions(accel=accel, ssh_port=ssh_port,
                                                    tap_fds=tap_fds, media_fd=media_fd,
                                                    tcg_cache=tcg_cache_for(
                                                        self.host.policy(), cfg.spec.memory)))
        if machine is not None:
            argv += replay_args(machine.hotplug)
            argv += replay_nics(machine.nics, dict(tap_fds), cfg.hardware.nic_model)
        # -S: an incoming machine stays paused when the state has arrived; vmkit says when it
        # runs (a move's destination only at finish, after the source stopped for good)
        return [*argv, "-S", "-incoming", "defer"] if incoming else argv

    def record_nic_plugged(self, nic: Nic, port_index: int) -> None:
        """Note a NIC hot-plugged on root port `port_index`, so a rebuilt machine has it there
        (the migration stream knows the device by its PCI address)."""
        record = self._record()
        if record.machine is not None:
            machine = record.machine
            plugged = (*machine.nics, PluggedNic(nic=nic, port=port_index))
            self._write(record.model_copy(update={
                "machine": machine.model_copy(update={"nics": plugged})}))

    def record_nic_unplugged(self, nic: Nic) -> None:
        """Forget a hot-plugged NIC QEMU let go of (a start-time NIC's unplug leaves its port
        empty: not expressible as a start-time machine, so such a machine is not rebuilt)."""
        record = self._record()
        if record.machine is not None:
            machine = record.machine
            kept = tuple(p for p in machine.nics if p.nic.mac != nic.mac)
            if len(kept) == len(machine.nics):
                machine = machine.model_copy(update={"rebuildable": False})
            self._write(record.model_copy(update={
                "machine": machine.model_copy(update={"nics": kept})}))

    def record_disk_unplugged(self, disk: ExtraDisk) -> None:
        """An extra disk the machine started with, unplugged: its port stays empty, which a
        start cannot reproduce (a hot-plugged one leaves the machine as it started)."""
        record = self._record()
        machine = record.machine
        if machine is not None and any(d.name == disk.name for d in machine.config.disks):
            self._write(record.model_copy(update={
                "machine": machine.model_copy(update={"rebuildable": False})}))

    def record_hotplug(self, kind: str, args: Mapping[str, Any]) -> None:
        """Note a device hot-plugged into the running QEMU (the caller holds the lock), so the
        machine can be rebuilt exactly."""
        record = self._record()
        if record.machine is not None:
            step = HotplugStep.model_validate({"kind": kind, "args": dict(args)})
            self._write(record.model_copy(update={"machine": record.machine.plugged(step)}))

    def active_layer(self) -> str:
        """The disk layer the guest writes to (relative to the folder); snapshots move it."""
        return store.load_tree(self).active_layer or self.config.disk_file

    def _choose_accel(self) -> tuple[str, str]:
        wanted = self.config.spec.accel
        if wanted == "tcg":
            return "tcg", "TCG chosen for this VM (--accel tcg)"
        if wanted == "kvm":
            return "kvm", "KVM forced for this VM (--accel kvm)"
        decision = self.host.accel()
        return decision.accel, decision.reason


    def _start_locked(self, held: Held, record: RuntimeRecord, *,
                      incoming: Callable[[QmpConnection], None] | None = None,
                      resume: bool = True, layer: str | None = None,
                      machine: MachineRecord | None = None, log: Journal | None = None) -> None:
        """Spawn QEMU under the VM's lock (`held`). With `incoming`, QEMU waits for a memory
        state that `incoming(qmp)` feeds it (a file or another QEMU), then continues from it."""
        held.require(self.name)
        hostinfo.require_supported_qemu()
        store.check_may_start(self)
        spec = self.config.spec
        accel, reason = self._choose_accel()
        # the host lock covers admission and the record that reserves the share, nothing
        # more: a start that then waits minutes for a memory state blocks no other start
        with self.host._host_lock():
            admit(self.name, Allocation(cpus=spec.cpus, memory=spec.memory),
                  self.host.allocated(exclude=self.name), self.host.capacity(),
                  self.host.policy())
            self._write(RuntimeRecord(state=VmState.STARTING, accel=accel, accel_reason=reason,
                                      last_exit=record.last_exit))
        if log is not None:
            log.step("reserved")
        taps: dict[str, int] = {}
        media_fd: int | None = None
        try:
            self._clear_run()
            net_ops.prepare_start(self)
            cfg = self.config
            over_user_nic = not cfg.nics or any(n.network == USER_NETWORK for n in cfg.nics)
            ssh_port = _free_local_port() if cfg.ssh_user and over_user_nic else None
            taps = net_ops.open_taps(self)
            machine = machine or MachineRecord(config=self.config)
            # the ISO is always this VM's vm.json's: a machine record (a snapshot's, a
            # bundle's, a source host's) never names a host file for root to open
            machine = machine.model_copy(update={"config": machine.config.model_copy(update={
                "media": self.config.media if machine.config.hardware.cdrom != "none"
                else None})})
            media_fd = open_media(machine.config.media)
            argv = self.argv(accel, incoming=incoming is not None, ssh_port=ssh_port,
                             tap_fds=tuple(taps.items()), layer=layer, machine=machine,
                             media_fd=media_fd)
            self.folder.run.mkdir(mode=0o700, exist_ok=True)
            if self.config.cloud_init is not None:
                with os_errors(f"writing the cloud-init seed of VM {self.name!r}"):
                    # written in the folder of root's, then renamed over whatever the VM's
                    # uid may have left in run/ (rename replaces a symlink, never follows it)
                    staged = self.folder.runtime_root / ".seed.iso.tmp"
                    staged.unlink(missing_ok=True)
                    write_seed(staged, seed_files(self.config.cloud_init))
                    os.chmod(staged, 0o644)
                    os.replace(staged, self.folder.seed_file)
            starting = RuntimeRecord(state=VmState.STARTING, accel=accel, accel_reason=reason,
                                     last_exit=record.last_exit, ssh_port=ssh_port,
                                     machine=machine)
            self._write(starting)
            driver = self.host.cgroups
            join: list[Path] = []
            if driver is not None:
                driver.apply(self.name, self.cgroup_limits())
                join = driver.procs_files(self.name)
            owner = self.owner()
            jail.prepare_folder(owner, self.folder.path, self.folder.runtime)
            jail.share_layers(owner, self.leaned_on_layers())
            if machine.config.hardware.tpm:
                jail.prepare_tpm(owner, self.folder.path, self.folder.runtime)
                tpm.start(jail.drop_to(owner, tpm.swtpm_argv(
                    self.folder.tpm_state, self.folder.tpm_socket, self.folder.tpm_pidfile,
                    self.folder.logs / "swtpm.log"), join=join),
                    self.folder.tpm_socket, self.folder.logs / "swtpm.log")
            log_start = process.file_size(self.folder.qemu_log)
            process.spawn_detached(jail.drop_to(owner, argv, join=join),
                                   self.folder.qemu_log, self.folder.exit_file,
                                   pass_fds=(*taps.values(),
                                             *([media_fd] if media_fd is not None else [])))
            if log is not None:
                log.step("spawned")
        except BaseException:
            self._write(record)  # nothing ran: the share goes back, the state is as it was
            self._clear_run()
            raise
        finally:
            for fd in (*taps.values(), *([media_fd] if media_fd is not None else [])):
                os.close(fd)  # QEMU holds its own copies now
        identity: process.ProcessIdentity | None = None
        state = VmState.RUNNING
        try:
            identity = process.wait_for_start(
                self.folder.pidfile, self.folder.exit_file, self.folder.qemu_log,
                self.config.uuid, QEMU_START_TIMEOUT)
            started = identity
            wait_qmp_ready(self.folder.qmp_socket, QEMU_START_TIMEOUT,
                           alive=lambda: process.is_alive(started, self.config.uuid))
            io_limits = spec.limits.disk_iops, spec.limits.disk_bps
            if io_limits != (None, None):
                with QmpConnection(self.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                    blockops.apply_io_throttle(qmp, *io_limits,
                                               [volume_id(d) for d in self.config.disks])
            if incoming is not None:
                with QmpConnection(self.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                    incoming(qmp)
                    if resume:
                        qmp.execute("cont")
                    else:
                        state = VmState.PAUSED
        except VmkitError as exc:
            if identity is not None:  # never leave a QEMU behind that vmkit disowns
                self._kill_process(identity)
            said = process.log_since(self.folder.qemu_log, log_start)
            if said:  # QEMU's own reason, in the message and in last_exit
                exc.message = f"{exc.message}: {process.last_error_line(said)}"
                exc.detail = f"QEMU log ({self.folder.qemu_log}):\n{said}"
                exc.args = (exc.message,)
            self._write(RuntimeRecord(
                state=VmState.CRASHED, accel=accel, accel_reason=reason,
                last_exit=ExitRecord(at=time.time(), reason="start-failed",
                                     status=process.read_exit_status(self.folder.exit_file),
                                     description=exc.message, log_tail=exc.detail or "")))
            self._clear_run()  # no QEMU: its sockets, taps and cgroup go
            raise
        self._write(starting.model_copy(update={
            "state": state, "pid": identity.pid,
            "start_ticks": identity.start_ticks, "started_at": time.time()}))
        for sock in (self.folder.qmp_socket, self.folder.serial_socket,
                     self.folder.agent_socket, self.folder.vnc_socket):
            _chmod_socket(sock, 0o600)

    def wait_ready(self, *, timeout: float = AGENT_READY_TIMEOUT) -> float:
        """Block until the guest agent answers; returns the seconds waited."""
        record = self._record()
        if record.state not in (VmState.RUNNING, VmState.STARTING):
            check_transition(self.name, self._observe(persist=True).state, Operation.EXEC)

        def alive() -> bool:
            return self._alive(self._record())

        try:
            return agent.wait_agent_ready(self.folder.agent_socket, timeout, alive=alive)
        except VmkitError as exc:
            final = self._observe(persist=True)
            if final.state not in LIVE_STATES and final.last_exit is not None:
                exc.detail = f"{final.last_exit.description}\n{final.last_exit.log_tail}".strip()
            raise



    def _kill_locked(self, held: Held, record: RuntimeRecord, note: str = "") -> None:
        held.require(self.name)
        self._write(record.model_copy(update={"intent": "kill"}))
        identity = self._identity(record)
        if identity is not None:
            self._kill_process(identity)
        self._finish("kill", note)






    def _remove_locked(self, held: Held, record: RuntimeRecord, *,
                       leave_shared: bool = False) -> None:
        """Kill the VM's QEMU if it runs, then remove its taps, uid, cgroup and folder (the
        caller holds the lock and has checked that it may); `leave_shared`: of a VM on shared
        storage, only what this host holds (see _discard_vm_folder)."""
        held.require(self.name)
        if record.state in LIVE_STATES:
            self._kill_locked(held, record)
        net_ops.release(self)
        vm_uuid = self.config.uuid
        uid = uids.lookup(vm_uuid) if os.geteuid() == 0 else None
        if uid is not None:
            jail.unshare_layers(uid, self.leaned_on_layers())
        if self.folder.shared and uid is not None:  # the folder lives on: nothing stays ours
            jail.disown(uid, self.folder.path)
        self.host._discard_vm_folder(self.name, leave_shared=leave_shared)
        jail.release_owner(vm_uuid)
        if self.host.cgroups is not None:  # a VM that crashed at start left its cgroup
            self.host.cgroups.remove(self.name)
        if any(nic.network != USER_NETWORK for nic in self.config.nics):
            net_ops.forget(self.host)  # its leases, names and forwards go too

    def recover_locked(self, held: Held) -> None:
        """Roll an unfinished operation recorded in the journal forward or back, then sweep
        files nothing names."""
        held.require(self.name)
        journal = Journal(self.folder.runtime_root)
        entry = journal.read()
        if entry is None:
            return
        recovery_rule(entry.op)(held, self, entry)
        journal.end()
        if self.folder.runtime_root.exists():  # a rolled-back arrival leaves no folder
            store.sweep_orphans(self)


    def leaned_on_layers(self) -> list[Path]:
        """The layers of other VMs this VM's disk chain leans on (a linked or instant clone's
        base and everything below it, down to the image store, which all may read)."""
        layers: list[Path] = []
        backing, seen = self.config.backing_file, {self.name}
        while backing:
            try:
                name = Path(backing).relative_to(self.host.layout.vms).parts[0]
            except ValueError:
                break
            if name in seen:
                break
            seen.add(name)
            source = self.host._vm(name)
            folder = source.folder.path
            tree = store.load_tree(source)
            layers += [folder / node.layer for node in tree.nodes.values()]
            layers.append(folder / source.config.disk_file)
            backing = source.config.backing_file
        return list(dict.fromkeys(layers))

    def linked_clones(self) -> list[str]:
        """VMs whose disk is an overlay on one of this VM's layers."""
        inside = str(self.folder.path) + os.sep
        return [vm.name for vm in self.host.vms()
                if vm.name != self.name and (vm.config.backing_file or "").startswith(inside)]













    # -- internals ------------------------------------------------------------------------
    def _kill_process(self, identity: process.ProcessIdentity) -> None:
        process.send_signal(identity, self.config.uuid, signal.SIGKILL)
        if not process.wait_for_exit(identity, self.config.uuid, KILL_TIMEOUT):
            raise QemuError(f"QEMU of VM {self.name!r} (pid {identity.pid}) survived SIGKILL "
                            f"for {KILL_TIMEOUT:g}s")

    def _finish(self, intent: Intent, note: str) -> None:
        """Record the end of a run vmkit asked for, and clear what the run left."""
        current = self._record()
        final = self._exit_record(current.model_copy(update={"intent": intent}), note)
        self._write(final)
        self._clear_run()

    def _clear_run(self) -> None:
        """Remove the sockets, pidfile and cgroup of a finished run (idempotent)."""
        tpm.stop(self.folder.tpm_pidfile, self.folder.tpm_socket)
        if self.folder.run.exists():
            for entry in self.folder.run.iterdir():
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    entry.unlink()
        if self.host.cgroups is not None:
            self.host.cgroups.remove(self.name)
        net_ops.release(self)

    def cgroup_limits(self, spec: VmSpec | None = None) -> CgroupLimits:
        spec = spec or self.config.spec
        return CgroupLimits(cpu_weight=spec.limits.cpu_weight, cpu_limit=spec.limits.cpu_limit,
                            memory=spec.memory_ceiling + QEMU_MEMORY_OVERHEAD,
                            pids=spec.limits.pids)


def run_id(pid: int | None, start_ticks: int | None) -> str | None:
    """One QEMU run: its pid and start time (pids are reused, the pair is not)."""
    return f"{pid}@{start_ticks}" if pid is not None and start_ticks is not None else None


def guest_file_mode(text: str) -> int:
    """The host mode of a file copied out of a guest: the guest's permission bits, without
    setuid/setgid/sticky and without group/other write (guest data is data)."""
    word = text.strip()
    if not word or len(word) > 4 or any(c not in "01234567" for c in word):
        raise AgentError(f"the guest reported an invalid file mode {word[:16]!r}")
    return int(word, 8) & 0o755


def _read_ssh_keys(sources: Iterable[str | Path]) -> tuple[tuple[str, ...], str | None]:
    """The public keys of `sources` (files, or key lines), and the private key next to the
    first .pub file (what `vmkit ssh` logs in with)."""
    keys: list[str] = []
    identity: str | None = None
    for source in sources:
        text = str(source)
        if text.split(" ", 1)[0] in KEY_TYPES:
            keys += parse_ssh_public_keys(text, "the ssh key")
            continue
        path = Path(text).expanduser()
        try:
            content = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidValue(f"cannot read ssh key {text!r}: "
                               f"{getattr(exc, 'strerror', None) or exc}",
                               hint="pass a public key file such as ~/.ssh/id_ed25519.pub") \
                from exc
        keys += parse_ssh_public_keys(content, f"ssh key file {text!r}")
        private = path.with_suffix("") if path.suffix == ".pub" else None
        if identity is None and private is not None and private.exists():
            identity = str(private.resolve())
    return tuple(dict.fromkeys(keys)), identity


def _free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (QEMU binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _chmod_socket(path: Path, mode: int) -> None:
    """chmod a socket QEMU made in run/ (a folder its uid can write): only if it is a socket,
    never through a symlink the VM's uid may have put there."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _mem_total() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise HostError("cannot read MemTotal from /proc/meminfo")


def _cgroup_version() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2"
    if Path("/sys/fs/cgroup/unified").exists():
        return "v1 (hybrid, with a v2 hierarchy at /sys/fs/cgroup/unified)"
    if Path("/sys/fs/cgroup/memory").exists():
        return "v1"
    return "none found"


__all__ = ["VM", "ExecResult", "Host", "InvalidState", "VmStatus"]


Host.vm_class = VM  # the facade's Host sets its own VM class
