"""Any OS: VMs that boot through their firmware from a disk made elsewhere, installation media in
a CD-ROM drive, UEFI variables that belong to the VM, a screen.

The "made elsewhere" disk is built here from Debian packages (tests/integration/anyos_media.py):
GRUB for BIOS and UEFI by grub-mkrescue and the tiny image's root as a partition. Each boot
goes through SeaBIOS or OVMF and GRUB; no -kernel is given to QEMU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.integration.anyos_media import (
    INSTALLED,
    MARKER,
    MARKER_TEXT,
    bootable_disk,
    data_iso,
    efi_variable,
    installer_iso,
    png_is_blank,
)
from tests.integration.conftest import run_cli, sh
from vmkit import VM, Host
from vmkit.cli.console import forward_vnc
from vmkit.errors import InvalidState, InvalidValue
from vmkit.ops.bundles import BundleError
from vmkit.ops.lifecycle import OVMF_VARS_TEMPLATE

BOOT_TIMEOUT = 240


@pytest.fixture(scope="module")
def made_elsewhere(image_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bootable_disk(image_home, tmp_path_factory.mktemp("anyos"))


@pytest.fixture(scope="module")
def formats(made_elsewhere: Path) -> dict[str, Path]:
    """The same disk as raw and as each foreign format qemu-img writes."""
    out = {"raw": made_elsewhere}
    for fmt in ("qcow2", "vmdk", "vdi", "vhdx"):
        target = made_elsewhere.with_suffix(f".{fmt}")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(made_elsewhere),
                        str(target)], check=True, capture_output=True, timeout=300)
        out[fmt] = target
    return out


def _load_extra_modules(vm: VM) -> None:
    sh(vm, "for m in $(cat /etc/extra-modules); do insmod /lib/extra-modules/$m 2>/dev/null "
           "|| true; done; grep -q virtio_scsi /proc/modules")


def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def test_each_foreign_format_is_detected_and_copied_exactly(host: Host, formats: dict[str, Path]
                                                              ) -> None:
    for fmt, path in formats.items():
        vm = host.create(f"from-{fmt}", from_disk=path)
        status = vm.status()
        assert status.image is None and status.boot == "disk" and status.firmware == "seabios"
        assert status.disk == formats["raw"].stat().st_size  # its own size, not grown
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                               str(formats["raw"]), str(vm.folder.path / "disks/root.qcow2")],
                              capture_output=True, text=True, timeout=120, check=False)
        assert same.returncode == 0, (fmt, same.stdout + same.stderr)
        vm.delete()
    # a larger --disk grows the copy; the file given is never written
    before = hashlib.sha256(formats["vdi"].read_bytes()).hexdigest()
    grown = host.create("grown", from_disk=formats["vdi"], disk="1G")
    assert grown.status().disk == 1 << 30
    assert hashlib.sha256(formats["vdi"].read_bytes()).hexdigest() == before


def test_disks_that_point_at_other_files_are_refused_and_leave_nothing(
        home: Path, host: Host, tmp_path: Path, formats: dict[str, Path]) -> None:
    # readable by anyone: the refusal below is vmkit's check, not a permission error
    shared = Path(tempfile.mkdtemp(prefix="vmk-secret-", dir="/tmp"))
    shared.chmod(0o755)
    secret = shared / "secret.raw"
    secret.write_bytes(b"host secret\n" * 4096)
    secret.chmod(0o644)
    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", str(secret),
                    str(backed)], check=True, capture_output=True)
    # a VMDK descriptor whose extent is another file of the host
    descriptor = tmp_path / "extent.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        f'RW 96 FLAT "{secret}" 0\n\n# The Disk Data Base\n#DDB\n'
        'ddb.adapterType = "ide"\nddb.geometry.cylinders = "1"\n'
        'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\n')
    qed = tmp_path / "old.qed"
    subprocess.run(["qemu-img", "create", "-f", "qed", str(qed), "64M"], check=True,
                   capture_output=True)
    link = tmp_path / "link.vdi"
    link.symlink_to(formats["vdi"])
    cases = {backed: "backing file", descriptor: "other files", qed: "format 'qed'",
             link: "no symlink", tmp_path / "missing.img": "cannot open"}
    for path, reason in cases.items():
        done = run_cli(home, "create", "bad", "--from-disk", str(path))
        assert done.returncode != 0 and reason in done.stderr, (path, done.stderr)
        assert "Traceback" not in done.stderr
        assert "bad" not in [vm.name for vm in host.vms(include_broken=True)]
        assert not (home / "vms" / "bad").exists()
    with pytest.raises(InvalidValue, match="boot order"):
        host.create("bad", from_disk=formats["raw"], boot="disk,floppy")
    with pytest.raises(InvalidValue, match="--boot is for"):
        host.create("bad", boot="cdrom")
    shutil.rmtree(shared)


def test_bios_boot_from_a_vdi_screen_media_attach_and_eject(
        host: Host, formats: dict[str, Path], tmp_path: Path) -> None:
    first = data_iso(tmp_path, "FIRST", {"hello.txt": "first medium\n"})
    second = data_iso(tmp_path, "SECOND", {"other.txt": "second medium\n"})
    vm = host.create("bios", from_disk=formats["vdi"], firmware="bios", iso=first,
                     memory="512M")
    vm.start()
    vm.wait_ready(timeout=BOOT_TIMEOUT)
    argv = (Path(f"/proc/{vm.status().pid}/cmdline").read_bytes().split(b"\0"))
    assert b"-kernel" not in argv and str(first).encode() not in b" ".join(argv)
    assert sh(vm, f"cat {MARKER}") == MARKER_TEXT.strip()
    # the screen: a PNG that shows something; VNC only on a 0600 unix socket, no TCP port
    shot = tmp_path / "screen.png"
    assert vm.screenshot(shot) > 0 and not png_is_blank(shot.read_bytes())
    socket_mode = os.stat(vm.vnc_socket()).st_mode
    assert stat.S_ISSOCK(socket_mode) and stat.S_IMODE(socket_mode) == 0o600
    pid = vm.status().pid
    assert pid is not None and not (_socket_inodes(pid) & _listening_tcp_inodes())
    # vmkit console --vnc --port: a loopback TCP port forwarded to the socket speaks RFB
    bound: list[int] = []
    stop = threading.Event()
    forwarder = threading.Thread(target=forward_vnc, args=(vm.vnc_socket(), 0), kwargs={
        "ready": bound.append, "should_stop": stop.is_set}, daemon=True)
    forwarder.start()
    deadline = time.monotonic() + 10
    while not bound and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", bound[0]), timeout=10) as viewer:
        assert viewer.recv(12).startswith(b"RFB 003.")
    # another local user reaching that loopback port gets nothing (VNC has no password here)
    other = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         f"import socket; s = socket.create_connection(('127.0.0.1', {bound[0]}), "
         "timeout=10); print(repr(s.recv(12)))"], capture_output=True, text=True, timeout=30,
        check=False)
    assert other.stdout.strip() == "b''", other.stdout + other.stderr
    stop.set()
    forwarder.join(timeout=5)
    # the guest reads the ISO it was created with, then what is attached while it runs
    _load_extra_modules(vm)
    assert sh(vm, "mkdir -p /mnt/cd && mount -t iso9660 -o ro /dev/sr0 /mnt/cd && "
                  "cat /mnt/cd/hello.txt; umount /mnt/cd") == "first medium"
    assert vm.eject_media() == str(first)
    empty = vm.exec(["sh", "-c", "dd if=/dev/sr0 of=/dev/null bs=2048 count=1"], timeout=60)
    assert empty.exit_code != 0  # no medium
    assert vm.attach_media(second) == str(second)
    assert sh(vm, "mount -t iso9660 -o ro /dev/sr0 /mnt/cd && cat /mnt/cd/other.txt; "
                  "umount /mnt/cd") == "second medium"
    assert vm.config.media == str(second)
    # the medium is lent read-only: the guest cannot write it
    assert vm.exec(["sh", "-c", "dd if=/dev/zero of=/dev/sr0 bs=2048 count=1"],
                   timeout=60).exit_code != 0
    assert second.read_bytes().count(b"second medium") == 1
    vm.kill()
    with pytest.raises(InvalidState, match="it is stopped"):
        vm.screenshot(tmp_path / "off.png")


def test_uefi_variables_belong_to_the_vm_and_travel_with_it(
        host: Host, formats: dict[str, Path], tmp_path: Path) -> None:
    """A variable the guest writes stays over a restart; a snapshot keeps the variables of its
    moment and its restore brings them back; a clone and an export/import carry them."""
    vm = host.create("uefi", from_disk=formats["vmdk"], firmware="uefi", memory="512M")
    nvram = vm.folder.path / "disks/nvram.fd"
    assert nvram.read_bytes() == OVMF_VARS_TEMPLATE.read_bytes()
    efivars = "/sys/firmware/efi/efivars"

    def booted(machine: VM) -> VM:
        machine.start()
        machine.wait_ready(timeout=BOOT_TIMEOUT)
        _load_extra_modules(machine)
        sh(machine, f"mount -t efivarfs efivarfs {efivars} 2>/dev/null || true")
        return machine

    def write(machine: VM, name: str, value: str) -> None:  # non-volatile, boot + runtime
        sh(machine, f"printf '\\007\\000\\000\\000{value}' > "
                    f"{efivars}/{efi_variable(name)}")

    def read(machine: VM, name: str) -> str:
        return sh(machine, f"tail -c 4 {efivars}/{efi_variable(name)} 2>/dev/null || true")

    write(booted(vm), "VmkitMarker", "kept")
    assert sh(vm, f"cat {MARKER}") == MARKER_TEXT.strip()
    vm.stop()
    assert b"kept" in nvram.read_bytes()
    vm.snapshot("with-kept")
    assert read(booted(vm), "VmkitMarker") == "kept"  # over a restart
    write(vm, "VmkitLater", "late")
    vm.stop()
    assert b"late" in nvram.read_bytes()
    vm.restore("with-kept")
    booted(vm)  # the variables of the snapshot's moment: the later one is gone
    assert (read(vm, "VmkitMarker"), read(vm, "VmkitLater")) == ("kept", "")
    vm.stop()
    clone = vm.clone("uefi-clone")
    assert (clone.folder.path / "disks/nvram.fd").read_bytes() == nvram.read_bytes()
    bundle = tmp_path / "uefi.vmkit"
    vm.export(bundle)
    vm.delete()
    imported = host.import_bundle(bundle, name="uefi-back")
    assert read(booted(imported), "VmkitMarker") == "kept"
    imported.kill()
    assert read(booted(clone), "VmkitMarker") == "kept"
    clone.kill()


@pytest.fixture(scope="module")
def installer(image_home: Path, made_elsewhere: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    return installer_iso(image_home, made_elsewhere, tmp_path_factory.mktemp("installer"))


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_an_os_installed_from_media_boots_from_its_own_disk(
        host: Host, home: Path, installer: Path, firmware: str) -> None:
    """create --iso on an empty disk: the firmware finds nothing on the disk and boots the
    installer from the CD-ROM; it writes the system and powers off; the next start boots from
    the VM's own disk (no -kernel, the ISO still in the drive) and the agent answers."""
    name = f"inst-{firmware}"
    done = run_cli(home, "create", name, "--iso", str(installer), "--disk", "1G",
                   "--firmware", firmware, "--memory", "512M")
    assert done.returncode == 0, done.stderr
    vm = host.get(name)
    status = vm.status()
    assert (status.boot, status.media, status.disk) == ("disk,cdrom", str(installer), 1 << 30)
    vm.start()
    deadline = time.monotonic() + BOOT_TIMEOUT
    while vm.state.value != "stopped" and time.monotonic() < deadline:
        time.sleep(1)
    log = b"".join(vm.read_log())
    assert b"installer: done, powering off" in log, log[-3000:]
    assert vm.state.value == "stopped" and vm.status().last_exit is not None
    vm.start()
    vm.wait_ready(timeout=BOOT_TIMEOUT)
    argv = Path(f"/proc/{vm.status().pid}/cmdline").read_bytes().split(b"\0")
    assert b"-kernel" not in argv
    assert sh(vm, f"cat {INSTALLED}") == "the vmkit test installer"
    assert sh(vm, "cat /proc/cmdline").find("root=/dev/vda") >= 0
    assert run_cli(home, "media", "eject", name).returncode == 0
    assert host.get(name).config.media is None  # read again: the CLI changed vm.json
    vm.kill()


def test_secure_boot_refuses_an_unsigned_boot_loader(host: Host, formats: dict[str, Path]
                                                      ) -> None:
    """The GRUB grub-mkrescue builds is not signed: with Secure Boot (Microsoft's keys) OVMF
    will not start it, where the same disk boots without Secure Boot (the test above)."""
    with pytest.raises(InvalidValue, match="needs --firmware uefi"):
        host.create("sb", from_disk=formats["raw"], secure_boot=True)
    vm = host.create("sb", from_disk=formats["raw"], firmware="uefi", secure_boot=True)
    vm.start()
    deadline = time.monotonic() + BOOT_TIMEOUT
    said = b""
    for chunk in vm.read_log(follow=True, should_stop=lambda: time.monotonic() > deadline):
        said += chunk
        if b"No bootable option" in said:
            break
    assert b"Access Denied" in said, said[-2000:]
    assert b"Linux version" not in said and b"made elsewhere" not in said
    vm.kill()


def _processes_named(name: str) -> dict[int, int]:
    """pid -> real uid of every process whose command is `name`."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            if argv0 == name.encode():
                uid = next(line.split()[1] for line in status.splitlines()
                           if line.startswith("Uid:"))
                found[int(entry)] = int(uid)
    return found


def test_a_windows_vm_gets_its_own_unprivileged_tpm_that_stops_with_it(
        host: Host, formats: dict[str, Path], tmp_path: Path) -> None:
    before = set(_processes_named("swtpm"))
    vm = host.create("win", from_disk=formats["raw"], os_type="windows", memory="512M")
    hardware = vm.config.hardware
    assert (hardware.firmware, hardware.tpm, hardware.disk_bus, hardware.nic_model,
            hardware.cdrom, hardware.rtc_localtime) == ("ovmf", True, "sata", "e1000e",
                                                         "sata", True)
    vm.start()
    with pytest.raises(InvalidState, match="TPM identity"):
        vm.clone("win-twin", live=True)  # a running copy would share the TPM's keys
    qemu_pid = vm.status().pid
    assert qemu_pid is not None
    qemu_uid = int(next(line.split()[1] for line in
                        Path(f"/proc/{qemu_pid}/status").read_text().splitlines()
                        if line.startswith("Uid:")))
    swtpms = {pid: uid for pid, uid in _processes_named("swtpm").items() if pid not in before}
    assert len(swtpms) == 1, swtpms
    [(swtpm_pid, swtpm_uid)] = swtpms.items()
    assert swtpm_uid == qemu_uid != 0  # the VM's own uid, not root
    socket_mode = os.stat(vm.folder.path / "run/swtpm.sock").st_mode
    assert stat.S_IMODE(socket_mode) == 0o600
    # the firmware talks to the TPM at boot: swtpm writes its state into the VM's folder
    deadline = time.monotonic() + BOOT_TIMEOUT
    state = vm.folder.path / "tpm"
    while not any(state.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any(p.name.startswith("tpm2-") for p in state.iterdir())
    vm.kill()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{swtpm_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{swtpm_pid}").exists()
    # the TPM's state travels with its machine in a bundle; a copy (a clone, an import under
    # another name) gets a TPM of its own
    permall = state / "tpm2-00.permall"
    keys = permall.read_bytes()
    bundle = tmp_path / "win.vmkit"
    vm.export(bundle)
    copy = host.import_bundle(bundle, name="win-copy")
    assert not (copy.folder.path / "tpm/tpm2-00.permall").exists()
    assert not (vm.clone("win-clone").folder.path / "tpm").exists()
    # what the VM's uid can plant in tpm/ (a link to a host secret) is never exported
    permall.unlink()
    permall.symlink_to("/etc/shadow")
    with pytest.raises(BundleError, match="symlink"):
        vm.export(tmp_path / "leak.vmkit")
    assert not (tmp_path / "leak.vmkit").exists()
    vm.delete()
    back = host.import_bundle(bundle)  # the same machine, back under its own name
    assert (back.folder.path / "tpm/tpm2-00.permall").read_bytes() == keys
    back.start()
    assert back.status().state.value == "running"
    back.kill()
