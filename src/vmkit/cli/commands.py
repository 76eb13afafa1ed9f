"""`vmkit` commands (typer). Each one parses its input, calls Host/VM, and renders the result.

vmkit.cli.main runs them (and answers `vmkit list` itself, through vmkit.cli.fast, without
importing this module). Errors are raised to vmkit.cli.main, which prints them and maps them to
exit codes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from vmkit.cli import render
from vmkit.cli.console import DETACH_KEY, attach
from vmkit.errors import InvalidState, InvalidValue, VmkitError
from vmkit.model.defaults import AGENT_READY_TIMEOUT, EXEC_TIMEOUT, LOCK_TIMEOUT, STOP_TIMEOUT
from vmkit.model.names import validate_name
from vmkit.model.resources import Policy
from vmkit.model.sizes import format_size, parse_size
from vmkit.model.views import ImageInfo

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="vmkit: virtual machines on QEMU. Example: vmkit create web --start --wait")
image_app = typer.Typer(no_args_is_help=True, help="Build and list guest images.")
app.add_typer(image_app, name="image")


snapshot_app = typer.Typer(no_args_is_help=True, help="Snapshots of a VM: a tree.")
app.add_typer(snapshot_app, name="snapshot")
network_app = typer.Typer(no_args_is_help=True,
                          help="Virtual networks: bridges with DHCP/DNS, NAT or isolated.")
app.add_typer(network_app, name="network")
nic_app = typer.Typer(no_args_is_help=True, help="NICs of a VM (hot-plugged when it runs).")
app.add_typer(nic_app, name="nic")
disk_app = typer.Typer(no_args_is_help=True,
                       help="Extra disks of a VM (hot-plugged when it runs; not in snapshots).")
app.add_typer(disk_app, name="disk")
media_app = typer.Typer(no_args_is_help=True,
                        help="Installation media (ISO) in a VM's CD-ROM drive.")
app.add_typer(media_app, name="media")


#: the options of the `vmkit` callback that take a value (app_for skips them and their value)
_GLOBAL_VALUED = ("--lock-timeout", "--remote")


def app_for(argv: list[str]) -> typer.Typer:
    """The CLI with only the command `argv` names (and its group): typer builds a click
    command for every registered one at each start, ~35 ms for all of vmkit's, so a command
    builds just its own. Anything else (help, no or an unknown command, an option before the
    command that is not the callback's) gets the whole app, so help and "no such command" are
    typer's own. The pruned command parses and prints exactly as in the whole app."""
    words = iter(argv)
    for word in words:
        if word in _GLOBAL_VALUED:
            next(words, None)
        elif not word.startswith(tuple(f"{option}=" for option in _GLOBAL_VALUED)):
            break
    else:
        return app
    if word.startswith("-"):
        return app
    for command in app.registered_commands:
        if _command_name(command) == word:
            return _pruned(app, commands=[command], groups=[])
    for group in app.registered_groups:
        members = group.typer_instance
        if group.name == word and members is not None:
            inner = next(words, None)
            chosen = [c for c in members.registered_commands if _command_name(c) == inner]
            if chosen:
                group = copy.copy(group)
                group.typer_instance = _pruned(members, commands=chosen, groups=[])
            return _pruned(app, commands=[], groups=[group])
    return app


def _command_name(command: typer.models.CommandInfo) -> str | None:
    """The name typer gives a registered command (its own rule for an unnamed one)."""
    if command.name:
        return command.name
    callback = command.callback
    return typer.main.get_command_name(callback.__name__) if callback is not None else None


def _pruned(whole: typer.Typer, *, commands: list[typer.models.CommandInfo],
            groups: list[typer.models.TyperInfo]) -> typer.Typer:
    pruned = copy.copy(whole)
    pruned.registered_commands = commands
    pruned.registered_groups = groups
    return pruned


class Format(StrEnum):
    table = "table"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--format", help="table for people, json for scripts")]
NameArg = Annotated[str, typer.Argument(help="VM name (a DNS label)")]
_state: dict[str, Any] = {"lock_timeout": LOCK_TIMEOUT, "remote": None}


@app.callback()
def _main(lock_timeout: Annotated[float, typer.Option(
        help="seconds to wait for another vmkit command working on the same VM")] = LOCK_TIMEOUT,
          remote: Annotated[str | None, typer.Option(
              "--remote", envvar="VMKIT_REMOTE",
              help="run the command on a remote daemon (vmkit remote add); default: this "
                   "host's daemon when it runs, else the engine in this process")] = None,
) -> None:
    _state["lock_timeout"] = lock_timeout
    _state["remote"] = remote


def _host() -> Any:
    """Where the command runs: a remote daemon (--remote), this host's daemon when one serves
    VMKIT_HOME (set VMKIT_NO_DAEMON=1 to bypass it), else the engine in this process. All three
    offer the same methods and raise the same errors."""
    if _state["remote"]:
        from vmkit.client import remotes  # ssl, hashlib, the client: only for a remote

        return remotes.open_remote(_state["remote"])
    if not os.environ.get("VMKIT_NO_DAEMON"):
        from vmkit.storage.home import local_daemon_socket

        socket_path = local_daemon_socket()
        if socket_path is not None:
            from vmkit.client.remote import connect

            return connect(f"unix://{socket_path}")
    return _local_host()


def _local_host() -> Any:
    """The engine in this process, imported only here: a command that goes through a daemon
    never loads it (~0.2 s of pydantic models, QEMU and storage code)."""
    from vmkit.cli.fast import imports_kept

    with imports_kept():
        from vmkit.host import Host
    return Host(lock_timeout=_state["lock_timeout"])


def _is_local(host: Any) -> bool:
    """Whether `host` is the engine in this process (never imported: it cannot be)."""
    module = sys.modules.get("vmkit.host")
    return module is not None and isinstance(host, module.Host)


@contextlib.contextmanager
def _status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow runs, only when stderr is a terminal."""
    if sys.stderr.isatty():
        with render.err.status(message):
            yield
    else:
        yield


# -- host ---------------------------------------------------------------------------------
@app.command()
def recover(format: FormatOpt = Format.table) -> None:
    """Finish every operation a killed vmkit left half-done (snapshot, restore, snapshot
    delete, instant clone, export): roll it forward or back, resume what it paused, sweep
    files nothing names. Any later command on a VM does the same for that VM.

    Example: vmkit recover
    """
    done = _host().recover()
    if format is Format.json:
        render.print_json({"recovered": done})
        return
    render.say(f"recovered: {', '.join(done)}" if done else "nothing to recover")


@app.command()
def doctor(format: FormatOpt = Format.table) -> None:
    """Report what this host offers: QEMU, accelerator and why, cgroups, disk, capacity.

    Example: vmkit doctor --format json
    """
    report = _host().doctor()
    if format is Format.json:
        render.print_json(report)
    else:
        qemu = report["qemu"]
        rows = [["QEMU", f"{qemu['version'] or 'missing'} at {qemu['path'] or '-'} "
                 f"(supported: {'yes' if qemu['supported'] else 'no'}, need >= {qemu['minimum']})"]]
        if "accelerator" in report:
            acc = report["accelerator"]
            rows.append(["accelerator", f"{acc['chosen']}: {acc['reason']}"])
            if acc["isolation_note"]:
                rows.append(["isolation", acc["isolation_note"]])
        cap = report["capacity"]
        rows += [
            ["machine", f"{qemu.get('q35') or '-'} with qboot "
                        f"{'present' if report['qboot'] else 'missing (SeaBIOS)'}"],
            ["cgroup", _cgroup_line(report["cgroup"])],
            ["disk", f"{render.size(report['disk']['free'])} free of "
                     f"{render.size(report['disk']['total'])} at {report['disk']['home']}"],
            ["capacity", f"{cap['cores']} cores, {render.size(cap['memory'])} RAM"],
            ["policy", f"vCPU limit {cap['vcpu_limit']} (allocated {cap['allocated_cpus']}), "
                       f"memory limit {render.size(cap['memory_limit'])} "
                       f"(allocated {render.size(cap['allocated_memory'])})"],
            ["images", ", ".join(report["images"]) or "none (vmkit image build tiny)"],
            ["ksm", _ksm_line(report["ksm"])],
        ]
        render.table(["", ""], rows)
        for problem in report["problems"]:
            render.say(f"problem: {problem['message']}\nhint: {problem['hint']}")
    if not report["ok"]:
        raise typer.Exit(1)


def _cgroup_line(cgroup: dict[str, Any]) -> str:
    used = cgroup["used"] or f"none ({cgroup['note']})"
    return f"{cgroup['mounted']}; vmkit uses {used}"


# -- images -------------------------------------------------------------------------------
@image_app.command("build")
def image_build(name: Annotated[str, typer.Argument(help="image recipe: tiny or debian-12")],
                force: Annotated[bool, typer.Option(help="rebuild even if up to date")] = False,
                packages: Annotated[str | None, typer.Option(
                    help="debian-12: extra Debian packages, comma-separated (e.g. nginx,curl)")
                                    ] = None,
                ) -> None:
    """Build a guest image from Debian packages (cached: a second run is a no-op).

    Example: vmkit image build debian-12 --packages nginx,curl
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=render.err, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"image {name}", total=None)
        info, built = _host().build_image(
            name, force=force, progress=lambda msg: bar.update(task, description=msg),
            packages=[p.strip() for p in packages.split(",") if p.strip()] if packages else [])
    verb = "built" if built else "up to date"
    render.say(f"image {info.name} {verb}: kernel {info.kernel_version}, "
               f"{render.size(info.size)}, sha256 {info.sha256[:16]}...")


@image_app.command("list")
def image_list(format: FormatOpt = Format.table) -> None:
    """List built images: name, OS, kernel, size, when built, and how many of their packages
    have newer versions in this host's apt (a rebuild updates them).

    Example: vmkit image list --format json
    """
    images = _host().images(check_updates=True)
    if format is Format.json:
        render.print_json([i.model_dump(mode="json") for i in images])
        return

    def updates(image: ImageInfo) -> str:
        newer = image.newer_packages or []
        return f"{len(newer)} newer" if newer else "up to date"

    render.table(["NAME", "KERNEL", "SIZE", "BUILT", "PACKAGES"],
                 [[i.name, i.kernel_version, render.size(i.size),
                   time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built_at)), updates(i)]
                  for i in images])
    for image in images:
        if image.newer_packages:
            render.say(f"{image.name}: newer {', '.join(image.newer_packages[:5])}"
                       f"{', ...' if len(image.newer_packages) > 5 else ''} in this "
                       f"host's apt; rebuild: vmkit image build {image.name}")


# -- VMs ----------------------------------------------------------------------------------
@app.command()
def create(
    name: NameArg,
    image: Annotated[str, typer.Option(help="image to base the VM on")] = "tiny",
    cpus: Annotated[str, typer.Option(help="vCPUs")] = "1",
    memory: Annotated[str, typer.Option(help="memory, e.g. 512M or 2G")] = "256M",
    disk: Annotated[str | None, typer.Option(
        help="disk size, e.g. 2G (default 2G; --from-disk: the image's own size)")] = None,
    full_copy: Annotated[bool, typer.Option(
        "--full-copy", help="copy the image instead of a qcow2 overlay on it")] = False,
    accel: Annotated[str, typer.Option(help="auto, kvm or tcg")] = "auto",
    start: Annotated[bool, typer.Option("--start", help="start it once created")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="with --start: until the agent answers")
                    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait may take")] = AGENT_READY_TIMEOUT,
    max_cpus: Annotated[str | None, typer.Option(help="room to hot-add vCPUs (default: host "
                                                 "cores)")] = None,
    max_memory: Annotated[str | None, typer.Option(help="room to hot-add memory (default: 4x "
                                                   "--memory)")] = None,
    hostname: Annotated[str | None, typer.Option(help="guest host name (default: the VM name)")
                        ] = None,
    ssh_key: Annotated[list[Path] | None, typer.Option(
        help="public key allowed to log in (cloud-init images; repeatable)")] = None,
    user_data: Annotated[Path | None, typer.Option(
        help="your cloud-init user-data file, passed to the guest unchanged")] = None,
    network: Annotated[list[str] | None, typer.Option(
        help="a NIC on this network (repeatable; 'user' = QEMU user-mode networking)")] = None,
    port: Annotated[list[str] | None, typer.Option(
        help="forward [ADDR:]HOST:GUEST[/udp] from the host to the first NIC (ADDR: default "
             "127.0.0.1, 0.0.0.0 = every address; repeatable)")] = None,
    restart: Annotated[str, typer.Option(
        help="what the daemon does when QEMU ends: no, on-failure (a crash) or always "
             "(a crash or a guest power-off); never after vmkit stop")] = "no",
    autostart: Annotated[bool, typer.Option(
        "--autostart", help="the daemon starts it when the daemon starts (once per boot)")
                         ] = False,
    cpu_model: Annotated[str, typer.Option(
        help="guest CPU model (default qemu64; vmkit cpu-baseline names one a group of hosts "
             "all run)")] = "qemu64",
    from_disk: Annotated[Path | None, typer.Option(
        help="make the VM from this disk image (qcow2, raw, vmdk, vdi or vhdx; copied, the "
             "file is not changed): it boots through its firmware")] = None,
    iso: Annotated[Path | None, typer.Option(
        help="installation media in the VM's CD-ROM drive (referenced read-only, not "
             "copied); with no --from-disk the VM gets an empty --disk to install to")] = None,
    firmware: Annotated[str | None, typer.Option(
        help="bios (SeaBIOS) or uefi (OVMF, with the VM's own NVRAM); default bios")] = None,
    boot: Annotated[str | None, typer.Option(
        help="boot order for --from-disk/--iso VMs, e.g. disk,cdrom,network "
             "(default: disk, then cdrom with --iso)")] = None,
    display: Annotated[str | None, typer.Option(
        help="none or std (a VGA screen over VNC on a unix socket; default std for "
             "--from-disk/--iso VMs)")] = None,
    os_type: Annotated[str, typer.Option(
        help="linux, windows or other: devices the guest has drivers for (the CD-ROM on "
             "virtio-scsi for linux, SATA otherwise)")] = "linux",
    secure_boot: Annotated[bool, typer.Option(
        "--secure-boot", help="with --firmware uefi: Secure Boot with Microsoft's keys (only "
                              "signed boot loaders start)")] = False,
    shared: Annotated[Path | None, typer.Option(
        "--shared", help="a folder on shared storage every host sees at the same path: the "
                         "VM's folder goes there, so a move between those hosts sends only "
                         "memory")] = None,
) -> None:
    """Create a VM (a folder under VMKIT_HOME/vms, or POOL/NAME with --shared POOL).

    Example: vmkit create db --image debian-12 --cpus 2 --memory 1G --disk 8G
    --ssh-key ~/.ssh/id_ed25519.pub --start --wait

    Any OS: vmkit create win --iso installer.iso --disk 40G --firmware uefi --memory 4G;
    vmkit create old --from-disk appliance.vmdk --firmware bios
    """
    host = _host()
    text = None
    if user_data is not None:
        try:
            text = user_data.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidValue(f"cannot read user-data file {str(user_data)!r}: "
                             f"{getattr(exc, 'strerror', None) or exc}",
                             hint="pass a readable cloud-config file") from exc
    with _status(f"creating {name}"):
        vm = host.create(name, image=image, cpus=cpus, memory=memory, disk=disk,
                         full_copy=full_copy, accel=accel, max_cpus=max_cpus,
                         max_memory=max_memory, hostname=hostname, ssh_keys=ssh_key or [],
                         user_data=text, networks=network or [], ports=port or [],
                         restart=restart, autostart=autostart, cpu_model=cpu_model,
                         firmware=firmware, boot=boot, from_disk=from_disk, iso=iso,
                         display=display, os_type=os_type, secure_boot=secure_boot,
                         shared=os.path.abspath(shared) if shared is not None else None)
    render.say(f"created VM {name}")
    if start:
        _start(vm.name, wait, timeout)


def _start(name: str, wait: bool, timeout: float) -> None:
    vm = _host().get(name)
    with _status(f"starting {name}"):
        vm.start()
    render.say(f"started VM {name} (pid {vm.status().pid})")
    if wait:
        with _status(f"waiting for the guest agent of {name}"):
            waited = vm.wait_ready(timeout=timeout)
        render.say(f"VM {name} is ready (agent answered after {waited:.1f}s)")


@app.command()
def start(name: NameArg,
          wait: Annotated[bool, typer.Option("--wait", help="until the guest agent answers")
                          ] = False,
          timeout: Annotated[float, typer.Option(help="seconds --wait may take")
                             ] = AGENT_READY_TIMEOUT) -> None:
    """Start a VM (QEMU runs detached and outlives this command).

    Example: vmkit start web --wait
    """
    _start(name, wait, timeout)


@app.command()
def stop(name: NameArg,
         timeout: Annotated[float, typer.Option(help="seconds before the VM is killed")
                            ] = STOP_TIMEOUT) -> None:
    """ACPI power-off; kill the VM if it is still running after --timeout.

    Example: vmkit stop web --timeout 10
    """
    vm = _host().get(name)
    with _status(f"stopping {name}"):
        vm.stop(timeout=timeout)
    exit_record = vm.status().last_exit
    render.say(f"stopped VM {name}" + (f": {exit_record.description}" if exit_record else ""))


@app.command()
def kill(name: NameArg) -> None:
    """Hard power-off (SIGKILL to the VM's QEMU). Example: vmkit kill web"""
    _host().get(name).kill()
    render.say(f"killed VM {name}")


@app.command()
def restart(name: NameArg,
            wait: Annotated[bool, typer.Option("--wait")] = False,
            timeout: Annotated[float, typer.Option(help="seconds the stop may take")
                               ] = STOP_TIMEOUT) -> None:
    """Stop (ACPI, then kill after --timeout) and start again. Example: vmkit restart web --wait"""
    vm = _host().get(name)
    with _status(f"restarting {name}"):
        vm.restart(wait=wait, timeout=timeout)
    render.say(f"restarted VM {name}")


@app.command()
def pause(name: NameArg) -> None:
    """Freeze the VM's vCPUs (it keeps its memory). Example: vmkit pause web"""
    _host().get(name).pause()
    render.say(f"paused VM {name}")


@app.command()
def resume(name: NameArg) -> None:
    """Continue a paused VM. Example: vmkit resume web"""
    _host().get(name).resume()
    render.say(f"resumed VM {name}")


@app.command()
def delete(name: NameArg,
           force: Annotated[bool, typer.Option("--force", help="kill it first if it runs")
                            ] = False) -> None:
    """Delete a VM and its folder; refuses a running VM unless --force.

    Example: vmkit delete web --force
    """
    _host().get(name).delete(force=force)
    render.say(f"deleted VM {name}")


@app.command("list")
def list_vms(format: FormatOpt = Format.table) -> None:
    """List VMs: name, state, vCPUs, memory, disk, uptime, pid, accelerator.

    Example: vmkit list --format json
    """
    statuses = _host().statuses(include_broken=True)
    render.vm_list([s.model_dump(mode="json") for s in statuses], as_json=format is Format.json)


@app.command()
def info(name: NameArg, format: FormatOpt = Format.table) -> None:
    """Everything about one VM, including why its accelerator was chosen.

    Example: vmkit info web --format json
    """
    status = _host().get(name).status(query_qemu=True)
    if format is Format.json:
        render.print_json(status.model_dump(mode="json"))
        return
    rows = [
        ["name", status.name], ["state", status.state.value],
        ["qemu status", status.qemu_status or "-"],
        ["vCPUs", str(status.cpus)], ["memory", render.size(status.memory)],
        ["disk", f"{render.size(status.disk)} ({status.disk_mode} on image {status.image})"
         if status.image else f"{render.size(status.disk)} (its own, no image)"],
        ["boot", f"{status.boot or '-'} ({status.firmware or '-'})"
         + (f", media {status.media}" if status.media else "")],
        ["uuid", status.uuid], ["MAC", status.mac], ["pid", str(status.pid or "-")],
        ["uptime", render.format_uptime(status.uptime)],
        ["hardware", f"{status.machine}, CPU {status.cpu_model}"],
        ["accelerator", f"{status.accel or '-'}: {status.accel_reason or 'not started yet'}"],
        ["folder", status.folder],
        ["hostname", status.hostname or "-"],
    ]
    if status.ssh:
        rows.append(["ssh", f"{status.ssh} (vmkit ssh {status.name})"])
    for nic in status.nics:
        forwards = ", ".join(f"{f.address}:{f.host_port}->{f.guest_port}/{f.proto}"
                             for f in nic.forwards)
        rows.append(["NIC", f"{nic.mac} on {nic.network}"
                            f"{f', address {nic.address}' if nic.address else ''}"
                            f"{f', forwards {forwards}' if forwards else ''}"])
    for disk in status.disks:
        rows.append(["extra disk", f"{disk.name}: {render.size(disk.size)} "
                                   f"(/dev/disk/by-id/virtio-{disk.name} in the guest)"])
    limits = status.limits
    rows += [
        ["maxima", f"{status.max_cpus} vCPUs, {render.size(status.max_memory)} (room to hot-add)"],
        ["limits", f"cpu weight {limits.cpu_weight}, cpu limit "
                   f"{f'{limits.cpu_limit:g}%' if limits.cpu_limit else 'none'}, disk iops "
                   f"{limits.disk_iops or 'none'}, disk bps "
                   f"{render.size(limits.disk_bps) if limits.disk_bps else 'none'}"],
    ]
    if status.usage:
        use = status.usage
        rows.append(["live usage",
                     f"{use.vcpus} vCPUs online, memory {render.size(use.memory_actual)} in the "
                     f"guest ({render.size(use.memory_plugged)} plugged), CPU "
                     f"{use.cpu_percent_avg:.0f}% avg, QEMU RSS {render.size(use.rss)}, disk "
                     f"read {render.size(use.disk_read)} written {render.size(use.disk_written)}"])
    if status.guest:
        os_info = status.guest.get("os") or {}
        rows.append(["guest", f"{os_info.get('pretty-name') or os_info.get('name') or '?'}, "
                              f"kernel {os_info.get('kernel-release', '?')}, hostname "
                              f"{status.guest.get('hostname', '?')}, addresses "
                              f"{status.guest.get('addresses', {})}, up "
                              f"{render.format_uptime(status.guest.get('uptime'))}"])
    if status.isolation_note:
        rows.append(["isolation", status.isolation_note])
    if status.restart_policy is not None:
        policy = status.restart_policy
        line = (f"{policy.mode} (at most {policy.max_restarts} in a row), autostart "
                f"{'on' if policy.autostart else 'off'}")
        if status.restarts:
            line += (f"; restarted {status.restarts.get('restarts') or 0} times, last: "
                     f"{status.restarts.get('last_reason') or '-'}")
        rows.append(["restart policy", line])
    if status.last_exit:
        rows.append(["last exit", status.last_exit.description])
        if status.last_exit.log_tail:
            rows.append(["log tail", status.last_exit.log_tail])
    render.table(["", ""], rows)


@app.command("set")
def set_(
    name: NameArg,
    cpus: Annotated[str | None, typer.Option(help="vCPUs (hot-added if running)")] = None,
    memory: Annotated[str | None, typer.Option(help="memory: grows by DIMM, shrinks by the "
                                               "balloon if running")] = None,
    max_cpus: Annotated[str | None, typer.Option(help="room to hot-add vCPUs (next start)")
                        ] = None,
    max_memory: Annotated[str | None, typer.Option(help="room to hot-add memory (next start)")
                          ] = None,
    disk_size: Annotated[str | None, typer.Option(help="grow the disk (online)")] = None,
    cpu_weight: Annotated[str | None, typer.Option(help="share under contention, 1-10000, "
                                                   "default 100")] = None,
    cpu_limit: Annotated[str | None, typer.Option(help="hard cap, percent of one host core "
                                                  "(e.g. 50%), or none")] = None,
    disk_iops: Annotated[str | None, typer.Option(help="I/O operations per second, or none")
                         ] = None,
    disk_bps: Annotated[str | None, typer.Option(help="I/O bytes per second (e.g. 20M), or "
                                                 "none")] = None,
    restart: Annotated[str | None, typer.Option(
        help="restart policy: no, on-failure or always (applied by the daemon)")] = None,
    max_restarts: Annotated[int | None, typer.Option(
        help="restarts in a row before the daemon gives up (default 5)")] = None,
    autostart: Annotated[bool | None, typer.Option(
        "--autostart/--no-autostart", help="start with the daemon")] = None,
) -> None:
    """Change a VM's share; live where it runs, else at its next start.

    Example: vmkit set web --cpus 4 --memory 2G --cpu-weight 200 --cpu-limit 50%
    """
    changes = {k: v for k, v in {
        "cpus": cpus, "memory": memory, "max_cpus": max_cpus, "max_memory": max_memory,
        "disk_size": disk_size, "cpu_weight": cpu_weight, "cpu_limit": cpu_limit,
        "disk_iops": disk_iops, "disk_bps": disk_bps}.items() if v is not None}
    policy = restart is not None or max_restarts is not None or autostart is not None
    if not changes and not policy:
        raise typer.BadParameter("nothing to change: give at least one option (see --help)")
    vm = _host().get(name)
    lines: list[str] = []
    if changes:
        result = vm.set(**changes)
        lines += [*result.now, *result.at_restart]
    if policy:
        new = vm.set_restart_policy(mode=restart, max_restarts=max_restarts,
                                    autostart=autostart)
        lines.append(f"restart policy {new.mode} (max {new.max_restarts} in a row), autostart "
                     f"{'on' if new.autostart else 'off'}")
    for line in lines:
        render.say(f"{name}: {line}")


@app.command()
def cp(source: Annotated[str, typer.Argument(help="FILE or VM:PATH")],
       dest: Annotated[str, typer.Argument(help="VM:PATH or FILE")]) -> None:
    """Copy a file into or out of a running guest (through the agent, permissions kept).

    Example: vmkit cp ./backup.sql db:/root/ ; vmkit cp db:/etc/os-release .
    """
    host = _host()
    if ":" in dest and ":" not in source:
        name, path = dest.split(":", 1)
        if path.endswith("/"):
            path += Path(source).name
        size = host.get(name).copy_in(source, path)
    elif ":" in source and ":" not in dest:
        name, path = source.split(":", 1)
        size = host.get(name).copy_out(path, dest)
    else:
        raise typer.BadParameter("exactly one side must be VM:PATH (e.g. web:/root/file)")
    render.say(f"copied {render.size(size)}")


@app.command()
def top(interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
        once: Annotated[bool, typer.Option("--once", help="one sample, then exit")] = False,
        format: FormatOpt = Format.table) -> None:
    """Live CPU, memory and disk use of every running VM, refreshing like top.

    Example: vmkit top --interval 1
    """
    from rich.live import Live

    host = _host()

    def sample() -> list[dict[str, Any]]:
        first = {vm.name: vm.usage() for vm in host.vms()}
        time.sleep(interval)
        rows = []
        for vm in host.vms():
            before, after = first.get(vm.name), vm.usage()
            if before is None or after is None:
                continue
            rows.append({"name": vm.name, "cpu_percent": round(
                100 * (after.cpu_seconds - before.cpu_seconds) / interval, 1),
                "vcpus": after.vcpus, "memory_guest": after.memory_actual, "rss": after.rss,
                "cgroup_memory": after.cgroup_memory,
                "disk_read_per_s": (after.disk_read - before.disk_read) / interval,
                "disk_write_per_s": (after.disk_written - before.disk_written) / interval})
        return rows

    def table(rows: list[dict[str, Any]]) -> Any:
        from rich.table import Table

        out = Table(box=None, header_style="bold")
        for column in ("NAME", "CPU%", "VCPUS", "GUEST MEM", "QEMU RSS", "DISK R/s", "DISK W/s"):
            out.add_column(column)
        for row in rows:
            out.add_row(row["name"], f"{row['cpu_percent']:.1f}", str(row["vcpus"]),
                        render.size(row["memory_guest"]), render.size(row["rss"]),
                        render.size(int(row["disk_read_per_s"])),
                        render.size(int(row["disk_write_per_s"])))
        return out

    if once or format is Format.json:
        rows = sample()
        if format is Format.json:
            render.print_json(rows)
        else:
            render.out.print(table(rows))
        return
    with contextlib.suppress(KeyboardInterrupt), Live(table([]), console=render.out) as screen:
        while True:
            screen.update(table(sample()))


@app.command(help=f"Attach to the VM's serial console; {DETACH_KEY} detaches. "
             "Example: vmkit console web; vmkit console win --vnc --port 5901")
def console(name: NameArg,
            vnc: Annotated[bool, typer.Option(
                "--vnc", help="the graphical console instead: print its VNC unix socket, or "
                              "with --port forward 127.0.0.1:PORT to it until Ctrl-C")] = False,
            port: Annotated[int | None, typer.Option(
                help="with --vnc: the local TCP port to forward (0: a free one)",
                min=0, max=65535)] = None) -> None:
    host = _host()
    vm = host.get(name)
    if vnc:
        path = vm.vnc_socket()
        if port is None:
            render.out.print(str(path))
            render.say(f"VM {name}'s screen: VNC on unix socket {path} (root only); "
                       f"a TCP viewer: vmkit console {name} --vnc --port 5901")
            return
        from vmkit.cli.console import forward_vnc

        with contextlib.suppress(KeyboardInterrupt):
            forward_vnc(path, port, ready=lambda bound: render.say(
                f"VM {name}'s screen on vnc://127.0.0.1:{bound} (loopback only); Ctrl-C ends"))
        return
    if _is_local(host):
        path = vm.console_socket()
        render.say(f"connected to {name}'s serial console; {DETACH_KEY} detaches")
        attach(path)
    else:
        from vmkit.cli.console import attach_remote

        connection = host.connection
        route = f"/1.0/vms/{name}/console"
        url = f"{connection.url}|{route}" if connection.ws_base is None else \
            f"{connection.ws_base}{route}"
        render.say(f"connected to {name}'s serial console; {DETACH_KEY} detaches")
        attach_remote(url, connection.headers, getattr(connection, "ssl_context", None))
    render.say(f"\ndetached from {name}")


@app.command()
def screenshot(name: NameArg,
               out: Annotated[Path, typer.Argument(help="PNG file to write")]) -> None:
    """Save a PNG of the VM's screen (VMs with a display). Example: vmkit screenshot win s.png"""
    size = _host().get(name).screenshot(out)
    render.say(f"wrote {out} ({render.size(size)})")


@media_app.command("attach")
def media_attach(name: NameArg,
                 iso: Annotated[Path, typer.Argument(help="the ISO file (referenced, not "
                                                          "copied)")]) -> None:
    """Insert an ISO into the CD-ROM drive (a running VM sees it at once).

    Example: vmkit media attach win virtio-drivers.iso
    """
    path = _host().get(name).attach_media(iso)
    render.say(f"VM {name}: {path} in the CD-ROM drive")


@media_app.command("eject")
def media_eject(name: NameArg) -> None:
    """Empty the CD-ROM drive. Example: vmkit media eject win"""
    was = _host().get(name).eject_media()
    render.say(f"VM {name}: ejected {was}" if was else f"VM {name}: the drive was empty")


@app.command()
def logs(name: NameArg,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing")] = False,
         ) -> None:
    """Print the VM's serial log. Example: vmkit logs web --follow"""
    vm = _host().get(name)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        for chunk in vm.read_log(follow=follow):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(name: NameArg,
          command: Annotated[list[str], typer.Argument(help="command and arguments, after --")],
          timeout: Annotated[float, typer.Option(help="seconds the command may run")
                             ] = EXEC_TIMEOUT) -> None:
    """Run a command in the guest (qemu-guest-agent) and return its exit code.

    Example: vmkit exec web -- uname -a
    """
    if command and command[0] == "--":
        command = command[1:]
    result = _host().get(name).exec(command, timeout=timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.stdout.flush()
    if result.exit_code is None:
        raise typer.Exit(128 + (result.signal or 0))
    raise typer.Exit(result.exit_code)


@app.command(context_settings={"allow_interspersed_args": False})
def ssh(name: NameArg,
        command: Annotated[list[str] | None, typer.Argument(
            help="command to run instead of a login shell, after --")] = None) -> None:
    """Open ssh to the guest through its port forward on 127.0.0.1 (cloud-init images).

    Example: vmkit ssh db            Example: vmkit ssh db -- systemctl status
    """
    if command and command[0] == "--":
        command = command[1:]
    argv = _host().get(name).ssh_argv(command)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise VmkitError(f"cannot run ssh: {exc.strerror}",
                         hint="install an ssh client (apt-get install openssh-client)") from exc


# -- networks -----------------------------------------------------------------------------
def _network_rows(nets: list[Any]) -> list[list[str]]:
    return [[n.name, n.mode, n.subnet, n.gateway, n.bridge, "up" if n.up else "down",
             str(len(n.attached))] for n in nets]


@network_app.command("create")
def network_create(
    name: Annotated[str, typer.Argument(help="network name (a DNS label)")],
    subnet: Annotated[str | None, typer.Option(
        help="IPv4 subnet, e.g. 198.18.10.0/24 (default: a free /24 of 198.18.0.0/15)")] = None,
    nat: Annotated[bool, typer.Option("--nat", help="reach out through the host (default)")
                   ] = False,
    isolated: Annotated[bool, typer.Option("--isolated", help="VMs on it reach only each other")
                        ] = False,
    bridged: Annotated[bool, typer.Option("--bridged", help="VMs join the host's bridge "
                                          "--parent (its LAN; vmkit never changes it)")] = False,
    parent: Annotated[str | None, typer.Option(help="with --bridged: the host bridge")] = None,
) -> None:
    """Create a network: a bridge, DHCP/DNS (dnsmasq), NAT or isolation (nftables); or bridged
    onto a bridge of the host's. Root only.

    Example: vmkit network create lan --subnet 198.18.10.0/24 --nat
    """
    if nat + isolated + bridged > 1:
        raise InvalidValue("--nat, --isolated and --bridged exclude each other", hint="pick one")
    mode = "isolated" if isolated else "bridged" if bridged else "nat"
    net = _host().create_network(name, subnet=subnet, mode=mode, parent=parent)
    where = f"{net.subnet}, gateway {net.gateway}" if net.subnet else "the host's LAN"
    render.say(f"created network {net.name} ({net.mode}): {where}, bridge {net.bridge}")


@network_app.command("list")
def network_list(format: FormatOpt = Format.table) -> None:
    """List networks: name, mode, subnet, gateway, bridge, state, NICs attached.

    Example: vmkit network list --format json
    """
    nets = _host().networks()
    if format is Format.json:
        render.print_json([n.model_dump(mode="json") for n in nets])
        return
    render.table(["NAME", "MODE", "SUBNET", "GATEWAY", "BRIDGE", "STATE", "NICS"],
                 _network_rows(nets))


@network_app.command("info")
def network_info(name: Annotated[str, typer.Argument(help="network name")],
                 format: FormatOpt = Format.table) -> None:
    """One network and the VM NICs on it (MAC, fixed address, lease, forwards).

    Example: vmkit network info lan
    """
    net = _host().network(name)
    if format is Format.json:
        render.print_json(net.model_dump(mode="json"))
        return
    render.table(["NAME", "MODE", "SUBNET", "GATEWAY", "BRIDGE", "STATE", "NICS"],
                 _network_rows([net]))
    render.table(["VM", "MAC", "ADDRESS", "LEASED", "STATE"],
                 [[a["vm"], a["mac"], a["address"], "yes" if a["leased"] else "no",
                   str(a["state"])] for a in net.attached])


@network_app.command("delete")
def network_delete(name: Annotated[str, typer.Argument(help="network name")]) -> None:
    """Delete a network (refused while VMs have NICs on it).

    Example: vmkit network delete lan
    """
    _host().delete_network(name)
    render.say(f"deleted network {name}")


@network_app.command("reconcile")
def network_reconcile() -> None:
    """Bring every network back as defined (bridges, dnsmasq, rules), e.g. after a reboot.

    Example: vmkit network reconcile
    """
    host = _host()
    host.reconcile_networks()
    render.say(f"{len(host.networks())} network(s) up")


@nic_app.command("add")
def nic_add(name: NameArg,
            network: Annotated[str, typer.Option(help="network name, or 'user'")],
            port: Annotated[list[str] | None, typer.Option(
                help="forward [ADDR:]HOST:GUEST[/udp] to this NIC (ADDR: default 127.0.0.1, "
                     "0.0.0.0 = every address; repeatable)")] = None) -> None:
    """Add a NIC on a network; a running VM gets it hot-plugged and asks for a lease.

    Example: vmkit nic add web --network backend
    """
    nic = _host().get(name).add_nic(network, ports=port or [])
    render.say(f"VM {name}: NIC {nic.mac} on {nic.network}"
               f"{f' ({nic.address})' if nic.address else ''}")


@nic_app.command("remove")
def nic_remove(name: NameArg,
               network: Annotated[str, typer.Argument(help="the network of the NIC")]) -> None:
    """Remove the VM's NIC on a network; hot-unplugged when the VM runs.

    Example: vmkit nic remove web backend
    """
    nic = _host().get(name).remove_nic(network)
    render.say(f"VM {name}: NIC {nic.mac} on {nic.network} removed")


@disk_app.command("add")
def disk_add(name: NameArg,
             disk: Annotated[str, typer.Argument(help="the disk's name (the guest sees "
                                                 "/dev/disk/by-id/virtio-DISK)")],
             size: Annotated[str, typer.Option(help="virtual size, e.g. 10G")] = "10G") -> None:
    """Add an empty disk; a running VM gets it hot-plugged. Snapshots leave it as it is
    (like a separate volume); clones, exports and cold moves carry it.

    Example: vmkit disk add web data --size 20G
    """
    added = _host().get(name).add_disk(disk, size)
    render.say(f"VM {name}: disk {added.name} ({format_size(added.size)}) added")


@disk_app.command("remove")
def disk_remove(name: NameArg,
                disk: Annotated[str, typer.Argument(help="the disk's name")]) -> None:
    """Remove a disk and delete its data; a running VM's guest must let it go (unmount it).

    Example: vmkit disk remove web data
    """
    removed = _host().get(name).remove_disk(disk)
    render.say(f"VM {name}: disk {removed.name} removed, its data deleted")


@disk_app.command("list")
def disk_list(name: NameArg, format: FormatOpt = Format.table) -> None:
    """The VM's extra disks: name, size, space used on the host.

    Example: vmkit disk list web
    """
    disks = [d.model_dump(mode="json") for d in _host().get(name).disks()]
    if format is Format.json:
        render.print_json(disks)
        return
    render.table(["NAME", "SIZE", "USED", "FILE"],
                 [[d["name"], format_size(d["size"]), format_size(d["used"]), d["file"]]
                  for d in disks])


# -- clones and bundles -------------------------------------------------------------------
@app.command()
def clone(
    name: NameArg,
    target: Annotated[str, typer.Argument(help="name of the new VM")],
    linked: Annotated[bool, typer.Option("--linked", help="a qcow2 overlay on the source's "
                                         "snapshot layer: instant, shares unchanged data")] = False,
    from_snapshot: Annotated[str | None, typer.Option(help="clone this snapshot's disk")] = None,
    live: Annotated[bool, typer.Option("--live", help="instant clone: a running copy of the "
                                       "running VM, from its memory")] = False,
) -> None:
    """Clone a VM (new uuid, MAC and hostname).

    Example: vmkit clone web web2 --linked --from-snapshot before-upgrade
    """
    with _status(f"cloning {name} to {target}"):
        source = _host().get(name)
        vm = source.clone(target, linked=linked, from_snapshot=from_snapshot, live=live)
    pause = ""
    if live:  # recorded on the helper snapshot the clone's disk sits on
        helper = next((s for s in source.snapshots() if s.name == f"clone-{target}"[:63]), None)
        if helper is not None and helper.paused_ms is not None:
            pause = f", {name} paused {helper.paused_ms:g} ms"
    render.say(f"cloned {name} to {target} ({vm.state.value}{pause})")


def _bytes_progress(label: str) -> tuple[Any, Any]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    bar = Progress(label, BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=render.err, disable=not sys.stderr.isatty())
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@app.command("export")
def export_(name: NameArg,
            path: Annotated[str, typer.Argument(help="bundle file to write, e.g. web.vmkit")]
            ) -> None:
    """Write a VM (config, disks, snapshot tree, memory states, checksums) as one file.

    Example: vmkit export web web.vmkit
    """
    vm = _host().get(name)
    bar, progress = _bytes_progress(f"export {name}")
    with bar:
        result = vm.export(path, progress=progress)
    render.say(f"exported {name} to {result['path']} ({render.size(result['bytes'])}, "
               f"mode {result['mode']}: readable by its owner only)")


def _move(name: str, remote: str, *, live: bool | None, storage: str, bandwidth: str | None,
          downtime_ms: int, auto_converge: bool, postcopy: bool, check: bool,
          target: str | None, format: Format) -> None:
    """`vmkit migrate` and `vmkit move`: pre-flight on the destination's capabilities, then
    the move (driven by the source's daemon when one runs, else by this process)."""
    from vmkit.client import remotes
    from vmkit.model.migration import MigrationOptions

    try:
        options = MigrationOptions(
            storage=storage, bandwidth=parse_size(bandwidth) if bandwidth else None,
            downtime_ms=downtime_ms, auto_converge=auto_converge, postcopy=postcopy,
            name=target)
    except ValueError as exc:
        raise InvalidValue(f"invalid move option: {exc}") from None
    if target is not None:
        validate_name(target)
    destination = remotes.credentials(remote)
    vm = _host().get(name)
    state = vm.state
    if live is True and state.value not in ("running", "paused"):
        raise InvalidState(f"VM {name!r} is {state.value}: vmkit migrate moves a running or "
                           "paused VM", hint=f"move a stopped one with vmkit move {name} {remote}")
    if live is False and state.value in ("starting", "running", "paused", "stopping"):
        raise InvalidState(f"VM {name!r} is {state.value}: vmkit move moves a stopped VM",
                           hint=f"move it live with vmkit migrate {name} {remote}")
    if check:
        reasons = vm.check_move_to(destination, options)
        if format is Format.json:
            render.print_json({"vm": name, "destination": remote, "reasons": reasons})
        elif reasons:
            for reason in reasons:
                render.say(f"refused: {reason}")
        else:
            render.say(f"{name} can move to {remote}")
        if reasons:
            raise typer.Exit(2)
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TextColumn("{task.fields[extra]}"), console=render.err,
                   disable=not sys.stderr.isatty())
    task = bar.add_task(f"move {name}", total=None, extra="")

    def report(progress: Any) -> None:
        extra = ""
        if progress.stage == "memory":
            extra = (f"dirty {render.size(progress.dirty_rate)}/s"
                     + (f", pause ~{progress.expected_downtime_ms} ms"
                        if progress.expected_downtime_ms else ""))
        bar.update(task, description=f"{name}: {progress.stage}",
                   completed=progress.transferred, total=progress.total or None, extra=extra)

    with bar:
        result = vm.migrate(destination, options, report=report)
    if format is Format.json:
        render.print_json(result)
        return
    downtime = result.get("downtime_ms")
    render.say(f"moved {name} to {remote} as {result['name']} in {result['seconds']:.2f}s"
               + (f" (guest paused {downtime} ms)" if downtime is not None else ""))


MoveRemote = Annotated[str, typer.Argument(help="destination remote (vmkit remote add)")]


@app.command("migrate")
def migrate_(
    name: NameArg, remote: MoveRemote,
    storage: Annotated[str, typer.Option(help="auto|shared|copy: how the disks get there "
                                              "(shared: the destination sees the VM's "
                                              "folder and runs it from there; copy: "
                                              "mirrored while the guest runs; auto: shared "
                                              "when it can)")] = "auto",
    bandwidth: Annotated[str | None, typer.Option(help="cap per second, e.g. 100M")] = None,
    downtime_ms: Annotated[int, typer.Option("--downtime-ms", help="target pause at the "
                                             "switch-over, ms")] = 50,
    auto_converge: Annotated[bool, typer.Option("--auto-converge", help="slow a guest that "
                                                "dirties memory faster than it is sent")] = False,
    postcopy: Annotated[bool, typer.Option("--postcopy", help="switch to post-copy when "
                                           "pre-copy does not converge")] = False,
    check: Annotated[bool, typer.Option("--check", help="pre-flight only: list every reason "
                                        "it cannot move, change nothing")] = False,
    target: Annotated[str | None, typer.Option("--name", help="its name there")] = None,
    format: FormatOpt = Format.table,
) -> None:
    """Move a running (or paused) VM to another host without stopping it.

    Example: vmkit migrate web lab-b --downtime-ms 50
    """
    _move(name, remote, live=None if check else True, storage=storage, bandwidth=bandwidth,
          downtime_ms=downtime_ms, auto_converge=auto_converge, postcopy=postcopy,
          check=check, target=target, format=format)


@app.command("move")
def move_(
    name: NameArg, remote: MoveRemote,
    check: Annotated[bool, typer.Option("--check", help="pre-flight only")] = False,
    target: Annotated[str | None, typer.Option("--name", help="its name there")] = None,
    storage: Annotated[str, typer.Option(help="auto|shared|copy: shared registers the same "
                                              "folder there, copy sends the files")] = "auto",
    format: FormatOpt = Format.table,
) -> None:
    """Move a stopped VM (disks, snapshots, memory states, settings) to another host.

    Example: vmkit move web lab-b
    """
    _move(name, remote, live=None if check else False, storage=storage, bandwidth=None,
          downtime_ms=50, auto_converge=False, postcopy=False, check=check, target=target,
          format=format)


@app.command("import")
def import_(path: Annotated[str, typer.Argument(help="bundle file, e.g. web.vmkit")],
            name: Annotated[str | None, typer.Option(help="register it under another name "
                                                     "(then with a new identity)")] = None,
            ) -> None:
    """Import a bundle; every checksum and disk is checked before the VM is registered.

    Example: vmkit import web.vmkit --name web-copy
    """
    bar, progress = _bytes_progress("import")
    with bar:
        vm = _host().import_bundle(path, name=name, progress=progress)
    render.say(f"imported VM {vm.name}")


# -- snapshots ----------------------------------------------------------------------------
SnapArg = Annotated[str, typer.Argument(help="snapshot name (a DNS label)")]


@snapshot_app.command("create")
def snapshot_create(name: NameArg, snapshot: SnapArg,
                    disk_only: Annotated[bool, typer.Option(
                        "--disk-only", help="disk only (crash-consistent, quiesced by the agent "
                        "where possible); no memory")] = False) -> None:
    """Snapshot a VM; a running VM's memory and device state too, and it keeps running.

    Example: vmkit snapshot create web before-upgrade
    """
    with _status(f"snapshotting {name}"):
        info = _host().get(name).snapshot(snapshot, disk_only=disk_only)
    kind = "disk + memory" if info.with_memory else "disk only"
    paused = f", guest paused {info.paused_ms:g} ms" if info.paused_ms is not None else ""
    render.say(f"snapshot {snapshot} of {name} taken ({kind}{paused})")
    if info.quiesced is False:
        render.say("warning: the guest agent did not freeze the file systems; the "
                   "snapshot is crash-consistent only")


@snapshot_app.command("list")
def snapshot_list(name: NameArg, format: FormatOpt = Format.table) -> None:
    """The snapshot tree: name, parent, created, size, with/without memory, current position.

    Example: vmkit snapshot list web
    """
    rows = _host().get(name).snapshots()
    if format is Format.json:
        render.print_json([r.model_dump(mode="json") for r in rows])
        return
    render.table(
        ["SNAPSHOT", "PARENT", "CREATED", "DISK", "MEMORY", "TAKEN", "PAUSED", ""],
        [["  " * r.depth + r.name, r.parent or "-",
          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
          render.size(r.disk_bytes), render.size(r.memory_bytes) if r.with_memory else "no",
          r.taken_in, f"{r.paused_ms:g} ms" if r.paused_ms is not None else "-",
          "<- current" if r.current else ""] for r in rows])


@snapshot_app.command("restore")
def snapshot_restore(name: NameArg, snapshot: SnapArg) -> None:
    """Go back to a snapshot; with memory the VM continues from that moment.

    Example: vmkit snapshot restore web before-upgrade
    """
    vm = _host().get(name)
    with _status(f"restoring {name} to {snapshot}"):
        vm.restore(snapshot)
    render.say(f"VM {name} restored to {snapshot} ({vm.state.value})")


@snapshot_app.command("delete")
def snapshot_delete(name: NameArg, snapshot: SnapArg) -> None:
    """Delete any snapshot of the tree; its data is merged so the others stay restorable.

    Example: vmkit snapshot delete web before-upgrade
    """
    with _status(f"deleting snapshot {snapshot}"):
        _host().get(name).delete_snapshot(snapshot)
    render.say(f"snapshot {snapshot} of {name} deleted")


# -- the host service ------------------------------------------------------------------------
def _ksm_line(state: dict[str, Any]) -> str:
    if not state["available"]:
        return "not in this kernel"
    policy = {None: "left to the host", True: "on", False: "off"}[state["policy"]]
    running = "merging" if state["running"] else "off"
    return (f"{running}, saves {render.size(int(state['saved_bytes']))} "
            f"(policy: {policy}; vmkit host set --ksm on|off|host)")


host_app = typer.Typer(no_args_is_help=True, help="This host's policy: overcommit limits, KSM.")
app.add_typer(host_app, name="host")


@host_app.command("show")
def host_show(format: FormatOpt = Format.table) -> None:
    """The host policy (what VMs may be promised, memory merging) and what KSM saves now.

    Example: vmkit host show
    """
    host = _host()
    policy = host.policy()
    if format is Format.json:
        render.print_json(policy.model_dump(mode="json"))
        return
    ksm_state = host.doctor()["ksm"]  # read where the host is (a remote's, too)
    render.table(["", ""], [
        ["vcpu ratio", f"{policy.vcpu_ratio:g} vCPUs per core"],
        ["memory ratio", f"{policy.memory_ratio:g}"],
        ["memory reserve", render.size(policy.memory_reserve)],
        ["ksm", _ksm_line(ksm_state)],
        ["tcg cache", _tcg_cache_line(policy)]])


def _tcg_cache_line(policy: Policy) -> str:
    if policy.tcg_cache == "auto":
        return "auto: a quarter of each VM's memory, 32M to 1G (vmkit host set --tcg-cache)"
    if policy.tcg_cache == "qemu":
        return "QEMU's default (1G)"
    return f"{render.size(policy.tcg_cache)} of translated code per VM"


@host_app.command("set")
def host_set(
    vcpu_ratio: Annotated[float | None, typer.Option(
        "--vcpu-ratio", help="vCPUs VMs may be promised per host core")] = None,
    memory_ratio: Annotated[float | None, typer.Option(
        "--memory-ratio", help="memory VMs may be promised per byte of RAM (after the "
        "reserve)")] = None,
    memory_reserve: Annotated[str | None, typer.Option(
        "--memory-reserve", help="RAM kept for the host, e.g. 1G")] = None,
    ksm: Annotated[str | None, typer.Option(
        "--ksm", help="on: merge identical pages across VMs (costs some CPU); off; host: "
        "leave the kernel's setting")] = None,
    tcg_cache: Annotated[str | None, typer.Option(
        "--tcg-cache", help="translated code each TCG VM keeps: a size, e.g. 32M (8M to "
        "2G; less memory, more translating again), auto (a quarter of the VM's memory, 32M "
        "to 1G) or qemu (QEMU's default, 1G); from each VM's next start")] = None,
) -> None:
    """Change the host policy; what is not given stays.

    Example: vmkit host set --ksm on --vcpu-ratio 8
    """
    host = _host()
    changes: dict[str, Any] = {}
    if vcpu_ratio is not None:
        changes["vcpu_ratio"] = vcpu_ratio
    if memory_ratio is not None:
        changes["memory_ratio"] = memory_ratio
    if memory_reserve is not None:
        changes["memory_reserve"] = parse_size(memory_reserve, field="memory reserve",
                                               default_unit="M")
    if ksm is not None:
        choices = {"on": True, "off": False, "host": None}
        if ksm not in choices:
            raise InvalidValue(f"invalid --ksm {ksm!r}", hint="use on, off or host")
        changes["ksm"] = choices[ksm]
    if tcg_cache is not None:
        changes["tcg_cache"] = (tcg_cache if tcg_cache in ("auto", "qemu") else
                                parse_size(tcg_cache, field="tcg cache", default_unit="M"))
    if not changes:
        raise InvalidValue("nothing to set", hint="see vmkit host set --help")
    try:
        policy = Policy.model_validate({**host.policy().model_dump(), **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "--" + str(first["loc"][0]).replace("_", "-")  # (not a union member's name)
        raise InvalidValue(f"invalid {where} {first.get('input')!r}: {first['msg'].lower()}",
                           hint="see vmkit host set --help") from None
    host.set_policy(policy)
    render.say("host policy set")


token_app = typer.Typer(no_args_is_help=True,
                        help="Bearer tokens for the daemon's TLS port (stored hashed).")
app.add_typer(token_app, name="token")
trust_app = typer.Typer(no_args_is_help=True,
                        help="Client certificates for the daemon's TLS port (its own CA).")
app.add_typer(trust_app, name="trust")
remote_app = typer.Typer(no_args_is_help=True, help="Daemons on other hosts this CLI can use.")
app.add_typer(remote_app, name="remote")


def _daemon_paths() -> Any:
    from vmkit.daemon.service import paths_for

    return paths_for(_local_host())


@app.command()
def daemon(
    socket: Annotated[Path, typer.Option(help="unix socket to listen on")
                      ] = Path("/run/vmkit/vmkit.sock"),
    group: Annotated[str | None, typer.Option(
        help="group allowed on the socket (mode 0660); default: root's only")] = None,
    listen: Annotated[str | None, typer.Option(
        help="also listen on IP:PORT with TLS (tokens or client certificates)")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="run in the background")] = False,
    pidfile: Annotated[Path | None, typer.Option(
        help="pid file (default with --detach: /run/vmkit/vmkitd.pid)")] = None,
    log: Annotated[Path | None, typer.Option(
        help="with --detach: the daemon's log (default /var/log/vmkitd.log)")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="stop the daemon of --pidfile; its "
                                       "VMs keep running")] = False,
) -> None:
    """Run the host service: REST API /1.0, events, metrics, restart policy, autostart.

    VMs keep running when it stops; when it starts again it adopts them.
    Example: vmkit daemon --detach --listen 198.18.0.1:8443
    """
    from vmkit.daemon import server

    options = server.DaemonOptions(socket=socket.absolute(), group=group, listen=listen,
                                   pidfile=(pidfile or (server.DEFAULT_PIDFILE
                                                        if detach or stop else None)),
                                   log=log)
    if stop:
        assert options.pidfile is not None
        stopped = server.stop_daemon(options.pidfile)
        render.say(f"stopped daemon {stopped}" if stopped else "no daemon running")
        return
    if detach:
        argv = [sys.executable, "-m", "vmkit.cli.main", "daemon", "--socket",
                str(options.socket), "--pidfile", str(options.pidfile)]
        if group:
            argv += ["--group", group]
        if listen:
            argv += ["--listen", listen]
        pid = server.detach(argv, options)
        render.say(f"vmkit daemon {pid} listening on {options.socket}"
                   + (f" and https://{listen}" if listen else ""))
        return
    server.serve(_local_host(), options)


@token_app.command("create")
def token_create(name: Annotated[str, typer.Argument(help="a name for the token")]) -> None:
    """Create a token; it is printed once (only its hash is kept). Example: vmkit token create ci
    """
    from vmkit.daemon.auth import TokenStore

    print(TokenStore(_daemon_paths().tokens).create(name))
    render.say(f"token {name} created: give it to the client "
               "(vmkit remote add NAME https://HOST:PORT --token TOKEN)")


@token_app.command("list")
def token_list(format: FormatOpt = Format.table) -> None:
    """List tokens (names and prefixes, never the tokens). Example: vmkit token list"""
    from vmkit.daemon.auth import TokenStore

    tokens = TokenStore(_daemon_paths().tokens).list()
    if format is Format.json:
        render.print_json([t.model_dump() for t in tokens])
        return
    render.table(["NAME", "PREFIX", "CREATED"],
                 [[t.name, t.prefix + "...", time.strftime("%Y-%m-%d %H:%M",
                                                            time.localtime(t.created_at))]
                  for t in tokens])


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="token name")]) -> None:
    """Revoke a token: refused from the next request on. Example: vmkit token revoke ci"""
    from vmkit.daemon.auth import TokenStore

    TokenStore(_daemon_paths().tokens).revoke(name)
    render.say(f"token {name} revoked")


@trust_app.command("issue")
def trust_issue(name: Annotated[str, typer.Argument(help="client name")],
                out: Annotated[Path, typer.Option(help="folder for NAME.crt and NAME.key")
                               ] = Path(".")) -> None:
    """Issue a client certificate signed by this daemon's client CA.

    Example: vmkit trust issue laptop --out /tmp
    """
    from vmkit.daemon.auth import ClientCA

    pem, key, fingerprint = ClientCA(_daemon_paths().folder).issue(name)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.crt").write_bytes(pem)
    fd = os.open(out / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    render.say(f"issued {out / name}.crt (sha256 {fingerprint[:16]}...) and its key")


@trust_app.command("revoke")
def trust_revoke(name: Annotated[str, typer.Argument(help="client name")]) -> None:
    """Refuse a client certificate from now on. Example: vmkit trust revoke laptop"""
    from vmkit.daemon.auth import ClientCA

    ClientCA(_daemon_paths().folder).revoke(name)
    render.say(f"client certificate {name} revoked")


@remote_app.command("add")
def remote_add(
    name: Annotated[str, typer.Argument(help="a name for the remote")],
    url: Annotated[str, typer.Argument(help="https://HOST:PORT")],
    token: Annotated[str | None, typer.Option(help="a token from vmkit token create")] = None,
    client_cert: Annotated[Path | None, typer.Option(help="client certificate (vmkit trust "
                                                     "issue)")] = None,
    client_key: Annotated[Path | None, typer.Option(help="its key")] = None,
    accept_fingerprint: Annotated[str | None, typer.Option(
        help="the server certificate's SHA-256 you expect (else you are asked)")] = None,
) -> None:
    """Add a remote daemon: shows and pins its certificate's fingerprint.

    Example: vmkit remote add lab https://198.18.0.1:8443 --token vmk_...
    """
    from vmkit.client import remotes
    from vmkit.client.remote import connect

    if token is None and client_cert is None:
        raise InvalidValue("a remote needs credentials: --token or --client-cert/--client-key")
    if (client_cert is None) != (client_key is None):
        raise InvalidValue("--client-cert and --client-key go together")
    pem, fingerprint = remotes.server_certificate(url)
    render.say(f"certificate fingerprint of {url}: {fingerprint}")
    if accept_fingerprint is not None:
        if accept_fingerprint.replace(":", "").lower() != fingerprint:
            raise InvalidValue(f"the server's certificate fingerprint is {fingerprint}, not "
                               f"{accept_fingerprint}: refusing (someone may be in between)")
    elif sys.stdin.isatty():
        if not typer.confirm("trust this certificate?"):
            raise InvalidValue("certificate not accepted; nothing was added")
    else:
        raise InvalidValue("not a terminal: pass --accept-fingerprint FINGERPRINT to pin it",
                           hint=f"--accept-fingerprint {fingerprint}")
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".crt") as pinned:
        pinned.write(pem)
        pinned.flush()
        client = (str(client_cert), str(client_key)) if client_cert and client_key else None
        with connect(url, token=token, server_cert=pinned.name, client_cert=client) as probe:
            info = probe.info()
    remotes.add(name, url, pem=pem, token=token,
                client_cert=(str(client_cert.absolute()), str(client_key.absolute()))
                if client_cert and client_key else None)
    render.say(f"remote {name} added: vmkit {info['version']} serving {info['home']} "
               f"(you are {info['requestor']})")


@remote_app.command("list")
def remote_list(format: FormatOpt = Format.table) -> None:
    """List remotes. Example: vmkit remote list"""
    from vmkit.client import remotes

    data = remotes.load()
    if format is Format.json:
        render.print_json({n: {"url": e["url"]} for n, e in data.items()})
        return
    render.table(["NAME", "URL", "AUTH"],
                 [[n, e["url"], "client certificate" if e.get("client_cert") else "token"]
                  for n, e in sorted(data.items())])


@app.command("cpu-baseline")
def cpu_baseline(
    remotes_: Annotated[list[str], typer.Argument(
        metavar="REMOTE...", help="remotes (vmkit remote add); 'local' is this host")],
    format: FormatOpt = Format.table,
) -> None:
    """The newest CPU model every given host runs with all its features: create VMs with it
    (then edit nothing) and they can move among these hosts.

    Example: vmkit cpu-baseline local lab-a lab-b
    """
    from vmkit.client import remotes
    from vmkit.model.hardware import cpu_baseline as baseline

    found = {}
    for name in dict.fromkeys(remotes_):
        host = _local_host() if name == "local" \
            else remotes.open_remote(name)
        found[name] = host.capabilities()
    model = baseline(caps.cpu_models for caps in found.values())
    if format is Format.json:
        render.print_json({"cpu_model": model, "hosts": {
            n: {"accel": c.accel, "qemu": c.qemu_version} for n, c in found.items()}})
        return
    print(model)
    render.say("hosts: " + ", ".join(f"{n} (QEMU {c.qemu_version}, {c.accel})"
                                          for n, c in found.items()))


@remote_app.command("remove")
def remote_remove(name: Annotated[str, typer.Argument(help="remote name")]) -> None:
    """Forget a remote. Example: vmkit remote remove lab"""
    from vmkit.client import remotes

    remotes.remove(name)
    render.say(f"remote {name} removed")

