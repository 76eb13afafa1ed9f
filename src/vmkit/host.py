"""The Python SDK: `Host` and `VM`, the facade every front end uses (the CLI, scripts, next the
daemon). Each method hands its request to the operation that implements it (vmkit.ops); the
engine core (vmkit.core) keeps state, locks and the runtime. Three lines:

    from vmkit import Host
    vm = Host().create("web", start=True, wait=True)
    print(vm.exec(["uname", "-a"]).stdout)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from vmkit.core import engine
from vmkit.core.engine import (
    COPY_TIMEOUT,
    Progress,
)
from vmkit.errors import InvalidState
from vmkit.model.defaults import AGENT_READY_TIMEOUT, EXEC_TIMEOUT, LOCK_TIMEOUT, STOP_TIMEOUT
from vmkit.model.hardware import HostCapabilities
from vmkit.model.migration import MigrationOptions
from vmkit.model.migration import Progress as MigrationProgress
from vmkit.model.network import Nic
from vmkit.model.restart import RestartPolicy
from vmkit.model.spec import ExtraDisk
from vmkit.model.views import (
    DiskInfo,
    ExecResult,
    ImageInfo,
    SetResult,
    Usage,
    VmStatus,
)
from vmkit.ops import bundles, clones, lifecycle, live, media, migration, screen
from vmkit.ops import disks as disk_ops
from vmkit.ops import doctor as doctor_ops
from vmkit.ops import images as image_ops
from vmkit.ops import networks as network_ops
from vmkit.ops import nics as nic_ops
from vmkit.ops import snapshots as snapshot_ops


class Host(engine.Host):
    """One host's VMs, images, networks and policy, rooted at VMKIT_HOME."""

    def vms(self, *, include_broken: bool = False) -> list[VM]:  # type: ignore[override]
        return cast(list[VM], super().vms(include_broken=include_broken))

    def get(self, name: str) -> VM:
        return cast(VM, super().get(name))

    def create(self, name: str, *, image: str = "tiny", cpus: int | str = 1,
               memory: int | str = "256M", disk: int | str | None = None,
               full_copy: bool = False,
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
        """Create a VM folder (complete or not at all); optionally start it.

        Maxima (room to hot-add) default to the host's cores and 4x the memory, within what
        the host can give one VM. `ssh_keys` are public-key files (or key lines) and
        `user_data` the user's own cloud-init user-data; both need a cloud-init image.
        `networks` gives a NIC on each (`user` = QEMU user-mode networking); `ports` are
        forwards (HOST:GUEST[/udp]) to the first NIC. Neither: one restricted user-mode NIC.
        `restart` (no, on-failure, always) and `autostart` are applied by the host service
        (vmkit daemon). `cpu_model` pins the guest's CPU (vmkit cpu-baseline names one every
        host of a group runs).

        Any OS: `from_disk` (a qcow2, raw, vmdk, vdi or vhdx image made elsewhere, converted
        into the folder) and/or `iso` (installation media, referenced read-only) make a VM
        that boots through its `firmware` (bios or uefi) in `boot` order (e.g.
        "disk,cdrom"), with a graphical console (`display` std, VNC on a unix socket);
        `os_type` (linux, windows, other) picks devices the guest has drivers for;
        `secure_boot` (UEFI) starts only signed boot loaders.

        `shared`: a folder on shared storage every host of a group sees at the same path;
        the VM's folder goes there (this host keeps its registration and runtime), so a move
        to another of those hosts sends only memory."""
        return cast(VM, lifecycle.create(
            self, name, image=image, cpus=cpus, memory=memory, disk=disk, full_copy=full_copy,
            accel=accel, start=start, wait=wait, timeout=timeout, max_cpus=max_cpus,
            max_memory=max_memory, hostname=hostname, ssh_keys=ssh_keys, user_data=user_data,
            networks=networks, ports=ports, restart=restart, autostart=autostart,
            cpu_model=cpu_model, firmware=firmware, boot=boot, from_disk=from_disk, iso=iso,
            display=display, os_type=os_type, secure_boot=secure_boot, shared=shared))

    def delete_all(self) -> None:
        """Delete every VM (running ones too), linked clones before the VMs they lean on."""
        return lifecycle.delete_all(self)

    def import_bundle(self, path: str | Path, *, name: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> VM:
        """Register a VM from a bundle after checking every byte of it."""
        return cast(VM, bundles.import_bundle(self, Path(path), name=name, progress=progress))

    def create_network(self, name: str, *, subnet: str | None = None, mode: str = "nat",
                       parent: str | None = None) -> network_ops.NetworkInfo:
        """A bridge with DHCP/DNS; `nat` reaches out through the host, `isolated` does not;
        `bridged` (with `parent`) puts VMs on a bridge of the host's, i.e. on its LAN."""
        return network_ops.create(self, name, subnet=subnet, mode=mode, parent=parent)

    def networks(self) -> list[network_ops.NetworkInfo]:
        return network_ops.list_networks(self)

    def network(self, name: str) -> network_ops.NetworkInfo:
        return network_ops.info(self, name)

    def delete_network(self, name: str) -> None:
        network_ops.delete(self, name)

    def reconcile_networks(self) -> None:
        """Re-create bridges, dnsmasq and rules from the definitions (e.g. after a reboot)."""
        network_ops.reconcile(self)

    def doctor(self) -> dict[str, Any]:
        """A report of what this host offers vmkit; `ok` is False when vmkit cannot run VMs."""
        return doctor_ops.report(self)

    def capabilities(self) -> HostCapabilities:
        """What this host's QEMU offers (machine types, CPU models under its accelerator) and
        the room it has: what another host checks before moving a VM here."""
        return migration.capabilities(self)

    def images(self, *, check_updates: bool = False) -> list[ImageInfo]:
        """The built images; `check_updates`: each lists the packages apt here has newer
        versions of (what a rebuild would update)."""
        return image_ops.list_images(self, check_updates=check_updates)

    def build_image(self, name: str, *, force: bool = False, progress: Progress | None = None,
                    packages: list[str] | None = None) -> tuple[ImageInfo, bool]:
        """Build an image from its recipe (a no-op when its inputs have not changed).
        `packages` adds Debian packages to images that have a package manager (debian-12)."""
        return image_ops.build_image(self, name, force=force, progress=progress,
                                     packages=packages)


class VM(engine.VM):
    """A handle on one VM. State is observed fresh on every call, never cached."""

    host: Host

    def start(self, *, wait: bool = False, timeout: float = AGENT_READY_TIMEOUT) -> VM:
        return cast(VM, lifecycle.start(self, wait=wait, timeout=timeout))

    def start_after_exit(self, exit_key: str) -> VM:
        """Start only if the VM's last exit is still `exit_key` (what a restart policy does:
        a user who started or stopped the VM since has the last word)."""
        return cast(VM, lifecycle.start(self, only_after_exit=exit_key))

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> VM:
        """ACPI power-off; if the guest has not gone within `timeout`, kill QEMU."""
        return cast(VM, lifecycle.stop(self, timeout=timeout))

    def kill(self) -> VM:
        """Hard power-off: SIGKILL the VM's QEMU."""
        return cast(VM, lifecycle.kill(self))

    def restart(self, *, wait: bool = False, timeout: float = STOP_TIMEOUT) -> VM:
        return cast(VM, lifecycle.restart(self, wait=wait, timeout=timeout))

    def pause(self) -> VM:
        return cast(VM, lifecycle.pause(self))

    def resume(self) -> VM:
        return cast(VM, lifecycle.resume(self))

    def delete(self, *, force: bool = False) -> None:
        """Remove the VM folder; a live VM only with force (it is killed first)."""
        return lifecycle.delete(self, force=force)

    def exec(self, argv: list[str], *, timeout: float = EXEC_TIMEOUT,
             stdin: bytes | None = None) -> ExecResult:
        """Run a command in the guest through qemu-guest-agent."""
        return lifecycle.exec(self, argv, timeout=timeout, stdin=stdin)

    def copy_in(self, source: str | Path, dest: str, *, timeout: float = COPY_TIMEOUT) -> int:
        """Copy a host file into the guest through the agent, keeping its permission bits."""
        return lifecycle.copy_in(self, source, dest, timeout=timeout)

    def copy_out(self, source: str, dest: str | Path, *, timeout: float = COPY_TIMEOUT) -> int:
        """Copy a guest file to the host through the agent, keeping its permission bits."""
        return lifecycle.copy_out(self, source, dest, timeout=timeout)

    def console_socket(self) -> Path:
        return lifecycle.console_socket(self)

    def screenshot(self, dest: str | Path) -> int:
        """A PNG of the VM's screen (display std) written to `dest`; returns its size."""
        return screen.screenshot(self, dest)

    def vnc_socket(self) -> Path:
        """The unix socket of the VM's graphical console (VNC; display std, while it runs)."""
        return screen.vnc_socket(self)

    def attach_media(self, path: str | Path) -> str:
        """Insert the ISO at `path` into the VM's CD-ROM drive (running or not)."""
        return media.attach(self, str(path))

    def eject_media(self) -> str | None:
        """Empty the CD-ROM drive; returns what was in it."""
        return media.eject(self)

    def read_log(self, *, follow: bool = False, poll: float = 0.2,
                 should_stop: Callable[[], bool] | None = None,
                 offset: int = 0) -> Iterator[bytes]:
        """The serial log from byte `offset`; with follow, keep yielding what the guest
        writes next."""
        return lifecycle.read_log(self, follow=follow, poll=poll, should_stop=should_stop,
                                  offset=offset)

    def ssh_argv(self, command: list[str] | None = None, *,
                 batch: bool = False) -> list[str]:
        """The ssh command line that logs in to this running VM (through its port forward), or
        runs `command` there with its arguments as given (like exec). Host keys are remembered
        per VM in its folder, accepted on first use."""
        return lifecycle.ssh_argv(self, command, batch=batch)

    def add_nic(self, network: str, *, ports: Iterable[str] = ()) -> Nic:
        """A NIC on `network` (or `user`), hot-plugged when the VM runs."""
        return nic_ops.add(self, network, ports=tuple(ports))

    def remove_nic(self, network: str) -> Nic:
        """Remove the VM's NIC on `network`, hot-unplugged when the VM runs."""
        return nic_ops.remove(self, network)

    def add_disk(self, name: str, size: int | str) -> ExtraDisk:
        """An empty extra disk `name` of `size` (e.g. "10G"), hot-plugged when the VM runs;
        the guest sees it as /dev/disk/by-id/virtio-NAME. Snapshots leave it as it is."""
        return disk_ops.add(self, name, size)

    def remove_disk(self, name: str) -> ExtraDisk:
        """Remove extra disk `name` and delete its file (the guest must let it go first when
        the VM runs)."""
        return disk_ops.remove(self, name)

    def disks(self) -> list[DiskInfo]:
        """The extra disks: name, size, bytes used, file."""
        return disk_ops.list_disks(self)

    def set(self, **changes: Any) -> SetResult:
        """Change vCPUs, memory, maxima, disk size, CPU weight/limit or I/O limits; live where
        the VM runs (see vmkit.ops.live), else for the next start."""
        return live.set_resources(self, **changes)

    def set_restart_policy(self, *, mode: str | None = None, max_restarts: int | None = None,
                           autostart: bool | None = None) -> RestartPolicy:
        """What the host service does when QEMU ends: no, on-failure or always; and whether
        it starts this VM when it starts."""
        return lifecycle.set_restart_policy(self, mode=mode, max_restarts=max_restarts,
                                            autostart=autostart)

    def snapshot(self, name: str, *, disk_only: bool = False) -> snapshot_ops.SnapshotInfo:
        """Take a snapshot: with memory when the VM runs (unless disk_only), else of the disk."""
        snapshot_ops.take(self, name, disk_only=disk_only)
        return next(s for s in self.snapshots() if s.name == name)

    def snapshots(self) -> list[snapshot_ops.SnapshotInfo]:
        return snapshot_ops.listing(self)

    def restore(self, name: str) -> VM:
        snapshot_ops.restore(self, name)
        return self

    def delete_snapshot(self, name: str) -> None:
        snapshot_ops.delete(self, name)

    def clone(self, target: str, *, linked: bool = False, from_snapshot: str | None = None,
              live: bool = False) -> VM:
        """A new VM from this one (new uuid, MAC, hostname); see vmkit.ops.clones."""
        return cast(VM, clones.clone(self, target, linked=linked, from_snapshot=from_snapshot,
                                     live=live))

    def check_move(self, destination: HostCapabilities, *, name: str | None = None
                   ) -> list[str]:
        """Every reason this VM cannot move to the host described by `destination`
        (Host.capabilities() there); empty when it can."""
        return migration.check(self, destination, name=name)

    def check_move_to(self, destination: dict[str, Any],
                      options: MigrationOptions | None = None) -> list[str]:
        """Every reason this VM cannot move to that host's daemon (credentials as for
        `migrate`) with `options`, asked there: its capabilities, and whether it sees this
        VM's folder on shared storage. Empty when it can; nothing changes."""
        from vmkit.client.remote import MovePeer

        return migration.reasons_against(self, MovePeer(destination),
                                         options or MigrationOptions())

    def migrate(self, destination: dict[str, Any], options: MigrationOptions | None = None, *,
                report: Callable[[MigrationProgress], None] | None = None) -> dict[str, Any]:
        """Move this VM to another host (live when it runs; see vmkit.ops.migration).
        `destination`: that host's daemon — {"url", "server_cert" (PEM), "token"}, what
        `vmkit remote add` keeps."""
        from vmkit.client.remote import MovePeer

        migration.peer_for_recovery = MovePeer
        return migration.migrate(self, MovePeer(destination), options or MigrationOptions(),
                                 credentials=destination, pack=bundles._write_bundle,
                                 report=report)

    def export(self, path: str | Path, *,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Write this VM — disks, snapshot tree, memory states — as one checked bundle file."""
        return bundles.export(self, Path(path), progress=progress)


Host.vm_class = VM

__all__ = ["AGENT_READY_TIMEOUT", "EXEC_TIMEOUT", "LOCK_TIMEOUT", "STOP_TIMEOUT", "VM",
           "ExecResult", "Host", "InvalidState", "Usage", "VmStatus"]
