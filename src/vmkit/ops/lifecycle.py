"""Lifecycle operations: create, start, stop, kill, restart, pause, resume, delete; and the
guest's doors (exec, file copies, console, serial log, ssh). Each holds the VM's lock for what
it changes; the runtime (spawn, observe, kill) is the engine core's."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vmkit.core import networks as net_ops
from vmkit.core.engine import (
    COPY_TIMEOUT,
    DEFAULT_MACHINE,
    QMP_TIMEOUT,
    VM,
    Host,
    _read_ssh_keys,
    guest_file_mode,
)
from vmkit.core.journal import Journal, register_recovery
from vmkit.core.locks import Held
from vmkit.core.media import check_media
from vmkit.errors import (
    AgentError,
    HostError,
    InvalidState,
    InvalidValue,
    VmkitError,
    os_errors,
)
from vmkit.images import catalog
from vmkit.isolation import jail
from vmkit.model.cloudinit import (
    CloudInit,
    check_user_data,
    instance_id_for,
    validate_hostname,
)
from vmkit.model.defaults import AGENT_READY_TIMEOUT, EXEC_TIMEOUT, STOP_TIMEOUT
from vmkit.model.journal import JournalEntry
from vmkit.model.network import USER_NETWORK, Nic
from vmkit.model.resources import (
    check_fits_host,
    memory_limit,
)
from vmkit.model.restart import RestartPolicy, parse_mode
from vmkit.model.sizes import format_size, parse_count, parse_size
from vmkit.model.spec import (
    DISPLAYS,
    OS_TYPES,
    PVH_FIRMWARES,
    ROOT_DISK_FILE,
    VMGENID_FIRMWARES,
    BootConfig,
    HardwareProfile,
    VmConfig,
    VmSpec,
    make_spec,
    new_mac,
    new_uuid,
    os_type_hardware,
    parse_boot_order,
    parse_firmware,
    with_hostname,
)
from vmkit.model.state import LIVE_STATES, Operation, VmState, check_transition
from vmkit.model.views import ExecResult
from vmkit.qemu import agent, hostinfo, img, process
from vmkit.qemu import argv as qemu_argv
from vmkit.qemu.argv import HOTPLUG_SPARE
from vmkit.qemu.qmp import QmpConnection, qmp_execute
from vmkit.storage import shared as shared_storage
from vmkit.storage.layout import (
    VmFolder,
    file_lock,
)

DEFAULT_DISK = "2G"
OVMF_VARS_TEMPLATE = Path(qemu_argv.OVMF_VARS_TEMPLATE)
QEMU_SETTLE_TIMEOUT = 10.0  # a cut start's exec chain (sh, setpriv) becoming QEMU


def start(vm: VM, *, wait: bool = False, timeout: float = AGENT_READY_TIMEOUT,
          only_after_exit: str | None = None) -> VM:
    """Boot the VM (journalled: a cut start is adopted when its QEMU answers, else undone).
    `only_after_exit` (the restart policy's): start only if the VM's last exit is still that
    one — checked under the VM's lock, so a user's start or stop since then always wins."""
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        if only_after_exit is not None and (
                record.last_exit is None or record.last_exit.key != only_after_exit):
            raise InvalidState(f"VM {vm.name!r} changed since the exit the restart was for: "
                               "not restarted")
        check_transition(vm.name, record.state, Operation.START)
        log = Journal(vm.folder.runtime_root)
        log.begin("start")
        try:
            vm._start_locked(held, record, log=log)
            log.step("ready")
        finally:
            log.end()
    if wait:
        vm.wait_ready(timeout=timeout)
    return vm


_start_vm = start  # `create` has a parameter named start


def recover_start(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A start cut short: its QEMU kept when it runs and answers QMP, else killed; what the
    start prepared (taps, cgroup, sockets) cleared, the share given back."""
    if entry.done("spawned"):  # the exec chain may still be on its way to QEMU
        process.settle_start(vm.config.uuid, vm.folder.exit_file, QEMU_SETTLE_TIMEOUT)
    record = vm._observe(persist=True, held=held)  # adopts a QEMU whose pid was not recorded
    if record.state not in LIVE_STATES:
        vm._clear_run()
        return
    answers = False
    with contextlib.suppress(VmkitError):
        answers = qmp_execute(vm.folder.qmp_socket, "query-status",
                              timeout=QMP_TIMEOUT)["status"] in ("running", "paused")
    if answers:
        if record.state is VmState.STARTING:
            vm._write(record.model_copy(update={"state": VmState.RUNNING}))
    else:
        vm._kill_locked(held, record, note=" (an interrupted start)")


def stop(vm: VM, *, timeout: float = STOP_TIMEOUT) -> VM:
    """ACPI power-off; if the guest has not gone within `timeout`, kill QEMU."""
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        check_transition(vm.name, record.state, Operation.STOP)
        identity = vm._identity(record)
        assert identity is not None
        log = Journal(vm.folder.runtime_root)
        log.begin("stop")
        vm._write(record.model_copy(update={"state": VmState.STOPPING, "intent": "stop"}))
        log.step("stopping")
        note = ""
        try:
            with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                if record.state is VmState.PAUSED:
                    qmp.execute("cont")
                qmp.execute("system_powerdown")
            log.step("powerdown-sent")
            gone = process.wait_for_exit(identity, vm.config.uuid, timeout)
        except VmkitError as exc:
            gone, note = False, f" (ACPI power-off failed: {exc.message})"
        if not gone:
            note = note or f" (the guest did not power off within {timeout:g}s; killed)"
            vm._kill_process(identity)
        vm._finish("stop", note)
        log.end()
    return vm


def recover_stop(held: Held, vm: VM, entry: JournalEntry) -> None:
    """A stop cut short is finished: the user asked for the VM to be off."""
    record = vm._observe(persist=True, held=held)
    if record.state in LIVE_STATES:
        vm._kill_locked(held, record.model_copy(update={"intent": "stop"}),
                        note=" (a stop that was interrupted, finished)")


def kill(vm: VM) -> VM:
    """Hard power-off: SIGKILL the VM's QEMU."""
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        check_transition(vm.name, record.state, Operation.KILL)
        vm._kill_locked(held, record)
    return vm


def restart(vm: VM, *, wait: bool = False, timeout: float = STOP_TIMEOUT) -> VM:
    check_transition(vm.name, vm.state, Operation.RESTART)
    stop(vm, timeout=timeout)
    return start(vm, wait=wait)


def pause(vm: VM) -> VM:
    return _pause_resume(vm, Operation.PAUSE, "stop", VmState.PAUSED)


def resume(vm: VM) -> VM:
    return _pause_resume(vm, Operation.RESUME, "cont", VmState.RUNNING)


def _pause_resume(vm: VM, operation: Operation, command: str, result: VmState) -> VM:
    with vm.host._vm_lock(vm.name) as held:
        record = vm._observe(persist=True, held=held)
        check_transition(vm.name, record.state, operation)
        qmp_execute(vm.folder.qmp_socket, command, timeout=QMP_TIMEOUT)
        vm._write(record.model_copy(update={"state": result}))
    return vm


def delete(vm: VM, *, force: bool = False) -> None:
    """Remove the VM folder; a live VM only with force (it is killed first)."""
    reason = vm.broken_reason()
    if reason is not None:
        if not force:
            raise InvalidState(f"{reason}; deleting it needs --force",
                               hint=f"vmkit delete {vm.name} --force")
        _delete_broken(vm)
        return
    # a VM on shared storage that another host now runs: only this host's registration goes
    with vm.host._vm_lock(vm.name, not_held=True) as held:
        record = vm._observe(persist=True, held=held)
        users = vm.linked_clones()
        if users:
            raise InvalidState(
                f"cannot delete VM {vm.name!r}: linked clones use its disk layers "
                f"({', '.join(users)})", hint="delete those clones first")
        if record.state in LIVE_STATES and not force:
            check_transition(vm.name, record.state, Operation.DELETE)
        vm._remove_locked(held, record)


def _delete_broken(vm: VM) -> None:
    """Remove a VM whose metadata is unreadable: kill a QEMU that still runs for it (found
    by the uuid vm.json may still name, or by its folder in QEMU's argv), its cgroup, its
    uid claim, its folder."""
    vm_uuid = str(vm._lenient().get("uuid") or "")
    with file_lock(vm.host._lock_path(vm.name), timeout=vm.host.lock_timeout,
                   what=f"VM {vm.name!r}"):
        # a VM on shared storage: by its runtime here only (another host may run the same
        # uuid from the same folder)
        for identity in process.find_qemus_of(
                vm.folder.runtime_root, None if vm.folder.shared else vm_uuid or None):
            with contextlib.suppress(ProcessLookupError):
                os.kill(identity.pid, signal.SIGKILL)
        if vm.host.cgroups is not None:
            with contextlib.suppress(VmkitError, OSError):
                vm.host.cgroups.remove(vm.name)
        vm.host._discard_vm_folder(vm.name)
        if vm_uuid:
            jail.release_owner(vm_uuid)


def exec(vm: VM, argv: list[str], *, timeout: float = EXEC_TIMEOUT,
         stdin: bytes | None = None) -> ExecResult:
    """Run a command in the guest through qemu-guest-agent."""
    check_transition(vm.name, vm.state, Operation.EXEC)
    return agent.guest_exec(vm.folder.agent_socket, argv, timeout=timeout, stdin=stdin)


def copy_in(vm: VM, source: str | Path, dest: str, *, timeout: float = COPY_TIMEOUT) -> int:
    """Copy a host file into the guest through the agent, keeping its permission bits."""
    check_transition(vm.name, vm.state, Operation.EXEC)
    source = Path(source)
    if not source.is_file():
        raise InvalidValue(f"cannot copy {source}: not a file on the host")
    partial = f"{dest}.vmkit-part"
    size = agent.copy_to_guest(vm.folder.agent_socket, source, partial, timeout=timeout)
    mode = f"{source.stat().st_mode & 0o7777:o}"
    done = agent.guest_exec(vm.folder.agent_socket, ["sh", "-c",
                            'chmod "$1" "$2" && mv -f "$2" "$3"', "cp", mode, partial, dest],
                            timeout=timeout)
    if done.exit_code != 0:
        raise AgentError(f"cannot put {dest} in place in the guest: {done.stderr.strip()}")
    return size


def copy_out(vm: VM, source: str, dest: str | Path, *, timeout: float = COPY_TIMEOUT) -> int:
    """Copy a guest file to the host through the agent, keeping its permission bits."""
    check_transition(vm.name, vm.state, Operation.EXEC)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / Path(source).name
    mode = agent.guest_exec(vm.folder.agent_socket, ["stat", "-c", "%a", source],
                            timeout=timeout)
    if mode.exit_code != 0:
        raise InvalidValue(f"cannot copy {vm.name}:{source}: {mode.stderr.strip()}")
    host_mode = guest_file_mode(mode.stdout)
    partial = dest.with_name(f".{dest.name}.vmkit-part")
    try:
        with os_errors(f"copying {vm.name}:{source} to {dest}"):
            partial.unlink(missing_ok=True)
            # a new file of the caller's, never through a symlink; no bits from the guest
            # beyond read/execute and the owner's write
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                free = shutil.disk_usage(partial.parent).free
                size = agent.copy_from_guest(vm.folder.agent_socket, source, handle,
                                             timeout=timeout, max_bytes=free)
                os.fchmod(handle.fileno(), host_mode)
            os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return size


def console_socket(vm: VM) -> Path:
    check_transition(vm.name, vm.state, Operation.CONSOLE)
    return vm.folder.serial_socket


def read_log(vm: VM, *, follow: bool = False, poll: float = 0.2,
             should_stop: Callable[[], bool] | None = None, offset: int = 0) -> Iterator[bytes]:
    """The serial log from byte `offset`; with follow, keep yielding what the guest writes."""
    path = vm.folder.serial_log
    position = offset
    while True:
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(position)
                while data := handle.read(1 << 20):  # a guest may have written a lot
                    position = handle.tell()
                    yield data
        if not follow or (should_stop is not None and should_stop()):
            return
        time.sleep(poll)


def ssh_argv(vm: VM, command: list[str] | None = None, *,
             batch: bool = False) -> list[str]:
    """The ssh command line that logs in to this running VM (through its port forward), or
    runs `command` there with its arguments as given (like exec). Host keys are remembered
    per VM in its folder, accepted on first use."""
    cfg, record = vm.config, vm._observe(persist=True)
    if cfg.ssh_user is None:
        raise InvalidState(f"VM {vm.name!r} runs no ssh server (image "
                           f"{cfg.spec.image!r})",
                           hint=f"use vmkit console {vm.name} or vmkit exec {vm.name}")
    target = vm._ssh_target(record) if record.state is VmState.RUNNING else None
    if target is None:
        raise InvalidState(f"cannot ssh to VM {vm.name!r}: it is {record.state.value}",
                           hint=f"start it first: vmkit start {vm.name} --wait")
    address, port = target.split("@", 1)[1].rsplit(":", 1)
    argv = ["ssh", "-p", port, "-l", cfg.ssh_user,
            "-o", f"UserKnownHostsFile={vm.folder.runtime_root / 'ssh_known_hosts'}",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"HostKeyAlias=vmkit-{cfg.uuid}"]
    if cfg.ssh_identity:
        argv += ["-i", cfg.ssh_identity]
    if batch:
        argv += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    # the remote side runs one shell string: quote so the guest sees exactly `command`
    return [*argv, address, *([shlex.join(command)] if command else [])]


def create(host: Host, name: str, *, image: str = "tiny", cpus: int | str = 1,
           memory: int | str = "256M", disk: int | str | None = None, full_copy: bool = False,
           accel: str = "auto", start: bool = False, wait: bool = False,
           timeout: float = AGENT_READY_TIMEOUT, max_cpus: int | str | None = None,
           max_memory: int | str | None = None, hostname: str | None = None,
           ssh_keys: Iterable[str | Path] = (), user_data: str | None = None,
           networks: Iterable[str] = (), ports: Iterable[str] = (), restart: str = "no",
           autostart: bool = False, cpu_model: str = "qemu64", firmware: str | None = None,
           boot: str | None = None, from_disk: str | Path | None = None,
           iso: str | Path | None = None, display: str | None = None,
           os_type: str = "linux", secure_boot: bool = False,
           shared: str | Path | None = None) -> VM:
    """The create operation; the parameters are documented on the SDK's Host.create."""
    pool = shared_storage.check_pool(shared) if shared is not None else None
    if pool is not None:
        with os_errors(f"using the shared storage {pool}"):
            shared_storage.claim_uid_range(pool)
    if os_type not in OS_TYPES:
        raise InvalidValue(f"invalid os-type {os_type!r}",
                           hint="use " + ", ".join(OS_TYPES) + " (the devices the guest has "
                                "drivers for)")
    foreign = from_disk is not None or iso is not None
    # a foreign disk keeps its own size unless a larger one is asked for (growing moves the
    # end of the disk away from where a GPT's backup header says it is)
    spec = make_spec(name, None if foreign else image, cpus, memory,
                     disk if disk is not None else DEFAULT_DISK, full_copy=full_copy,
                     accel=accel)
    restart_policy = RestartPolicy(mode=parse_mode(restart), autostart=autostart)
    hostname = validate_hostname(hostname) if hostname is not None else name
    capacity, policy = host.capacity(), host.policy()
    check_fits_host(name, spec.cpus, spec.memory, capacity, policy)
    ceiling_cpus = parse_count(max_cpus, "max-cpus") if max_cpus is not None \
        else max(spec.cpus, capacity.cores)
    ceiling_memory = parse_size(max_memory, field="max-memory", default_unit="M") \
        if max_memory is not None \
        else max(spec.memory, min(4 * spec.memory, memory_limit(capacity, policy)))
    if ceiling_cpus < spec.cpus or ceiling_memory < spec.memory:
        raise InvalidValue(f"invalid maxima for VM {name!r}: max-cpus {ceiling_cpus} and "
                           f"max-memory {format_size(ceiling_memory)} must not be below "
                           f"cpus {spec.cpus} and memory {format_size(spec.memory)}")
    check_fits_host(name, ceiling_cpus, ceiling_memory, capacity, policy)
    spec = spec.model_copy(update={"max_cpus": ceiling_cpus, "max_memory": ceiling_memory})
    implied = os_type_hardware(os_type)
    pinned_firmware = parse_firmware(firmware) if firmware is not None else \
        str(implied.pop("firmware", "seabios")) if foreign else "seabios"
    implied.pop("firmware", None)
    if secure_boot and pinned_firmware != "ovmf":
        raise InvalidValue("--secure-boot needs --firmware uefi",
                           hint="add --firmware uefi (Secure Boot is a UEFI feature)")
    if display is not None and display not in DISPLAYS:
        raise InvalidValue(f"invalid display {display!r}", hint="use none or std")
    keys, identity = _read_ssh_keys(ssh_keys)
    if foreign:
        if keys or user_data is not None:
            raise InvalidValue("--ssh-key and --user-data need a vmkit image with cloud-init; "
                               "a VM from a foreign disk or media configures itself",
                               hint="drop them, or use --image debian-12")
        if full_copy:
            raise InvalidValue("--full-copy is for images: a foreign disk is always copied")
        order = parse_boot_order(boot) if boot is not None else \
            (("disk", "cdrom") if iso is not None else ("disk",))
        if pool is not None:
            raise InvalidValue("--shared is for VMs from an image (a foreign disk or media "
                               "VM is created on this host's storage)",
                               hint="drop --shared, or create from --image")
        return _create_foreign(
            host, spec, grow=disk is not None, firmware=pinned_firmware, order=order,
            devices=implied, secure_boot=secure_boot,
            display=display or "std",
            from_disk=Path(from_disk) if from_disk is not None else None,
            media=check_media(str(iso)) if iso is not None else None,
            cpu_model=cpu_model, networks=networks, ports=ports, restart=restart_policy,
            start=start, wait=wait, timeout=timeout)
    if boot is not None or os_type != "linux":
        raise InvalidValue(f"--{'boot' if boot is not None else 'os-type'} is for VMs that "
                           "boot through their firmware (--from-disk or --iso); an image's VM "
                           "boots its Linux kernel directly")
    with host._image_lock(image, shared=True):  # waits out a rebuild's swap
        info = host.image(image)
    if (keys or user_data is not None) and not info.cloud_init:
        raise InvalidValue(f"image {info.name!r} has no cloud-init: --ssh-key and "
                           "--user-data need an image that reads a NoCloud seed",
                           hint="use --image debian-12 (vmkit image build debian-12)")
    if user_data is not None:
        user_data = check_user_data(user_data, "the user-data")
    if spec.disk < info.virtual_size:
        raise InvalidValue(
            f"invalid disk {format_size(spec.disk)} for VM {name!r}: smaller than image "
            f"{info.name!r} ({format_size(info.virtual_size)})",
            hint=f"use --disk {format_size(info.virtual_size)} or more")
    _check_disk_fits(host, name, spec.disk)
    _check_accel(spec.accel)
    machine = hostinfo.resolve_machine(DEFAULT_MACHINE)
    if cpu_model != "qemu64":
        _check_cpu_model(host, cpu_model)
    image_dir = host.layout.image(info.name)

    vm_uuid = new_uuid()
    nics = net_ops.new_nics(host, vm_uuid, list(networks), list(ports))

    def build(work: VmFolder) -> VmConfig:
        info = host.image(image)  # read again under the image's shared lock
        # the PVH entry skips ~0.4 s of every boot, where the firmware can enter it
        kernel = info.pvh_kernel if info.pvh_kernel and pinned_firmware in PVH_FIRMWARES \
            else info.kernel
        for source, dest in ((kernel, kernel), (info.initrd, "initrd.img")):
            catalog.link_or_copy(image_dir / source, work.boot / dest)
        disk_path = work.path / ROOT_DISK_FILE
        base = image_dir / info.root_disk
        if pool is not None and not spec.full_copy:  # the same base on every host
            base = shared_storage.pool_base(pool, info.name, info.sha256, base)
        if spec.full_copy:
            img.full_copy(disk_path, base, spec.disk)
        else:
            img.create_overlay(disk_path, base, spec.disk)
        _make_nvram(work, pinned_firmware, secure_boot=secure_boot)
        seed = CloudInit(instance_id=instance_id_for(vm_uuid), hostname=hostname,
                         ssh_keys=keys, user_data=user_data) if info.cloud_init else None
        return VmConfig(
            uuid=vm_uuid, mac=new_mac(), created_at=time.time(), spec=spec,
            # SeaBIOS: qboot cannot run the ACPI WRITE_POINTER step vmgenid needs
            hardware=HardwareProfile(machine=machine, cpu_model=cpu_model,
                                     hotplug_ports=HOTPLUG_SPARE, firmware=pinned_firmware,
                                     vmgenid=pinned_firmware in VMGENID_FIRMWARES,
                                     display=display or "none", secure_boot=secure_boot),
            boot=BootConfig(kernel=f"boot/{kernel}", initrd="boot/initrd.img",
                            cmdline=with_hostname(info.cmdline, hostname)),
            backing_file=None if spec.full_copy else str(base),
            base_image_sha256=info.sha256, cloud_init=seed, ssh_user=info.ssh_user,
            ssh_identity=identity if info.ssh_user else None, nics=nics,
            restart=restart_policy,
        )

    # the image's lock, shared: no rebuild can retire its base before this VM is listed
    with host._image_lock(image, shared=True):
        vm = _new_vm(host, name, nics, build, pool=pool)
    if start:
        _start_vm(vm, wait=wait, timeout=timeout)
    return vm


def _new_vm(host: Host, name: str, nics: tuple[Nic, ...] | list[Nic],
            build: Callable[[VmFolder], VmConfig], *, pool: Path | None = None) -> VM:
    """The VM's folder made by `build`; NICs on host networks get their addresses first."""
    if any(nic.network != USER_NETWORK for nic in nics):
        with net_ops.locked(host):  # addresses unique per network: decided under lock
            addressed = net_ops.with_addresses(host, tuple(nics))

            def build_addressed(work: VmFolder) -> VmConfig:
                return build(work).model_copy(update={"nics": tuple(addressed)})

            vm = host._new_vm_folder(name, build_addressed, pool=pool)
        net_ops.forget(host)  # leases and rules know the new NIC
        return vm
    return host._new_vm_folder(name, build, pool=pool)


def _check_disk_fits(host: Host, name: str, size: int) -> None:
    total = shutil.disk_usage(host.layout.root).total
    if size > total:
        raise InvalidValue(
            f"invalid disk {format_size(size)} for VM {name!r}: larger than the host's "
            f"file system ({format_size(total)})", hint="use a smaller --disk")


def _check_accel(accel: str) -> None:
    if accel == "kvm" and not Path("/dev/kvm").exists():
        raise InvalidValue("invalid accel 'kvm': /dev/kvm does not exist on this host",
                           hint="use --accel tcg or auto")


def _make_nvram(work: VmFolder, firmware: str, *, secure_boot: bool = False) -> None:
    """A UEFI VM's own variable store: a copy of OVMF's empty template (with Microsoft's keys
    for Secure Boot)."""
    if firmware == "ovmf":
        template = Path(qemu_argv.OVMF_SECURE_VARS_TEMPLATE) if secure_boot \
            else OVMF_VARS_TEMPLATE
        if not template.is_file():
            raise HostError(f"UEFI firmware variables template {template} is missing",
                            hint="apt-get install ovmf (make run installs it)")
        shutil.copyfile(template, work.nvram)
        os.chmod(work.nvram, 0o600)


def _create_foreign(host: Host, spec: VmSpec, *, grow: bool, firmware: str,
                    order: tuple[str, ...], devices: dict[str, object], secure_boot: bool,
                    display: str, from_disk: Path | None, media: str | None, cpu_model: str,
                    networks: Iterable[str], ports: Iterable[str], restart: RestartPolicy,
                    start: bool, wait: bool, timeout: float) -> VM:
    """A VM that boots through its firmware: from a disk image made elsewhere (converted into
    the folder: the original is never written) and/or an installation ISO (referenced)."""
    _check_accel(spec.accel)
    machine = hostinfo.resolve_machine(DEFAULT_MACHINE)
    if cpu_model != "qemu64":
        _check_cpu_model(host, cpu_model)
    staged = host.layout.cache / f"import-{new_uuid()}.qcow2"  # same file system: renamed in
    try:
        if from_disk is not None:
            # one descriptor for the probe and the copy; the copy is made before the folder
            # (and before the network lock a NIC on a host network takes): it may take long
            with img.opened_foreign(from_disk) as source:
                probed = img.probe_foreign(source, from_disk)
                size = max(spec.disk, probed.virtual_size) if grow else probed.virtual_size
                _check_disk_fits(host, spec.name, size)
                staged.parent.mkdir(parents=True, exist_ok=True)
                img.convert_foreign(source, probed, staged)
            if size > probed.virtual_size:
                img.resize(staged, size)
        else:
            size = spec.disk
            _check_disk_fits(host, spec.name, size)
        spec = spec.model_copy(update={"disk": size, "full_copy": True})
        vm_uuid = new_uuid()
        nics = net_ops.new_nics(host, vm_uuid, list(networks), list(ports))

        def build(work: VmFolder) -> VmConfig:
            disk_path = work.path / ROOT_DISK_FILE
            if from_disk is not None:
                os.replace(staged, disk_path)
            else:
                img.create_empty(disk_path, size)
            _make_nvram(work, firmware, secure_boot=secure_boot)
            return VmConfig(
                uuid=vm_uuid, mac=new_mac(), created_at=time.time(), spec=spec,
                hardware=HardwareProfile.model_validate({
                    "machine": machine, "cpu_model": cpu_model,
                    "hotplug_ports": HOTPLUG_SPARE, "firmware": firmware,
                    "vmgenid": firmware in VMGENID_FIRMWARES, "display": display,
                    "secure_boot": secure_boot, **devices}),
                boot=None, boot_order=order, media=media, nics=nics, restart=restart)

        vm = _new_vm(host, spec.name, nics, build)
    finally:
        staged.unlink(missing_ok=True)
    if start:
        _start_vm(vm, wait=wait, timeout=timeout)
    return vm


def _check_cpu_model(host: Host, cpu_model: str) -> None:
    """A CPU model this host's QEMU knows and its accelerator gives with every feature."""
    accel = host.accel().accel
    _machines, models = hostinfo.probe_capabilities(accel)
    if cpu_model not in models:
        raise InvalidValue(f"invalid cpu-model {cpu_model!r}: QEMU does not know it",
                           hint="see qemu-system-x86_64 -cpu help, or vmkit cpu-baseline")
    if models[cpu_model]:
        raise InvalidValue(f"invalid cpu-model {cpu_model!r}: this host ({accel}) cannot give "
                           f"its features {', '.join(models[cpu_model])}",
                           hint="vmkit cpu-baseline local names the newest model it runs")


def set_restart_policy(vm: VM, *, mode: str | None = None, max_restarts: int | None = None,
                       autostart: bool | None = None) -> RestartPolicy:
    """Change what the host service does when the VM's QEMU ends (saved in vm.json)."""
    updates: dict[str, object] = {}
    if mode is not None:
        updates["mode"] = parse_mode(mode)
    if max_restarts is not None:
        if not 0 <= max_restarts <= 1000:
            raise InvalidValue(f"invalid max-restarts {max_restarts}: 0 to 1000")
        updates["max_restarts"] = max_restarts
    if autostart is not None:
        updates["autostart"] = autostart
    with vm.host._vm_lock(vm.name):
        config = vm.config
        policy = config.restart.model_copy(update=updates)
        vm.save_config(config.model_copy(update={"restart": policy}))
    return policy


def delete_all(host: Host) -> None:
    """Delete every VM (running ones too), linked clones before the VMs they lean on."""
    while remaining := host.vms(include_broken=True):
        leaves = [vm for vm in remaining
                  if vm.broken_reason() is not None or not vm.linked_clones()]
        if not leaves:
            raise InvalidState("cannot order the deletes: linked clones form a cycle")
        for vm in leaves:
            delete(vm, force=True)


register_recovery("start", recover_start)
register_recovery("stop", recover_stop)
