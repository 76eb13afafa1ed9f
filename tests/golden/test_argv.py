"""Golden tests: the QEMU argv for a fixed VM must not change without a reviewed golden update.

Regenerate after an intended change with: VMKIT_UPDATE_GOLDEN=1 pytest tests/golden
"""

import json
import os
from pathlib import Path

import pytest

from vmkit.model.spec import BootConfig, HardwareProfile, VmConfig, VmSpec
from vmkit.qemu.argv import LaunchOptions, build_argv, escape_opt
from vmkit.storage.layout import VmFolder

HERE = Path(__file__).parent


def _config(name: str = "web") -> VmConfig:
    return VmConfig(
        uuid="0b0c5d2e-1111-4222-8333-444455556666", mac="52:54:00:12:34:56", created_at=0.0,
        spec=VmSpec(name=name, image="tiny", cpus=2, memory=512 << 20, disk=2 << 30),
        hardware=HardwareProfile(machine="pc-q35-10.0"),
        boot=BootConfig(kernel="boot/vmlinuz", initrd="boot/initrd.img",
                        cmdline="console=ttyS0 root=/dev/vda rw vmkit.hostname=web"),
    )


def _argv(folder: str, accel: str) -> list[str]:
    config = _config()
    paths = VmFolder(Path(folder)).run_paths(config.disk_file, config.boot.kernel,
                                             config.boot.initrd)
    return build_argv(config, paths, LaunchOptions(accel=accel))


def _check(name: str, argv: list[str]) -> None:
    golden = HERE / name
    if os.environ.get("VMKIT_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(golden.read_text())


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_q35_argv(accel: str) -> None:
    _check(f"argv_q35_{accel}.json", _argv("/var/lib/vmkit/vms/web", accel))


def test_commas_in_paths_are_escaped() -> None:
    argv = _argv("/srv/a,b/vms/web", "tcg")
    _check("argv_comma_path.json", argv)
    chardevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-chardev"]
    assert all("/srv/a,,b/vms/web/run/" in c for c in chardevs)
    assert "logfile=/srv/a,,b/vms/web/logs/serial.log" in chardevs[1]
    blockdev = json.loads(argv[argv.index("-blockdev") + 1])
    assert blockdev["file"]["filename"] == "/srv/a,b/vms/web/disks/root.qcow2"  # JSON: no escaping
    assert argv[argv.index("-kernel") + 1] == "/srv/a,b/vms/web/boot/vmlinuz"  # plain file arg


def test_escape_opt() -> None:
    assert escape_opt("a,b,,c") == "a,,b,,,,c"
    assert escape_opt("plain") == "plain"


def test_disk_format_is_explicit_and_accel_as_asked() -> None:
    argv = _argv("/x", "tcg")
    assert json.loads(argv[argv.index("-blockdev") + 1])["driver"] == "qcow2"
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert "-nodefaults" in argv


def test_the_tcg_cache_is_the_policy_s_and_kvm_has_none() -> None:
    """Policy.tcg_cache becomes QEMU's tb-size in MiB; KVM translates nothing."""
    config = _config()
    paths = VmFolder(Path("/x")).run_paths(config.disk_file, config.boot.kernel,
                                           config.boot.initrd)
    tcg = build_argv(config, paths, LaunchOptions(accel="tcg", tcg_cache=32 << 20))
    assert tcg[tcg.index("-accel") + 1] == "tcg,thread=multi,tb-size=32"
    kvm = build_argv(config, paths, LaunchOptions(accel="kvm", tcg_cache=32 << 20))
    assert kvm[kvm.index("-accel") + 1] == "kvm"
    assert tcg[:tcg.index("-accel")] == kvm[:kvm.index("-accel")]


def test_cloud_init_vm_gets_a_read_only_seed_and_an_ssh_forward() -> None:
    config = _config()
    paths = VmFolder(Path("/var/lib/vmkit/vms/db")).run_paths(
        config.disk_file, config.boot.kernel, config.boot.initrd, seed=True)
    argv = build_argv(config, paths, LaunchOptions(accel="tcg", ssh_port=40022))
    _check("argv_cloud_init.json", argv)
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    seed = blockdevs[1]
    assert seed["driver"] == "raw" and seed["read-only"] and seed["file"]["read-only"]
    assert seed["file"]["filename"] == "/var/lib/vmkit/vms/db/run/seed.iso"
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.endswith(",hostfwd=tcp:127.0.0.1:40022-:22") and "restrict=on" in netdev
    # the root disk stays the first virtio disk (the guest's vda)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices.index("virtio-blk-pci,drive=disk0,id=virtio-disk0,bootindex=1") < \
        devices.index("virtio-blk-pci,drive=seed0,id=virtio-seed0")


def test_nics_on_networks_sit_on_root_ports_with_spares_for_hot_plug() -> None:
    from vmkit.model.network import Nic, PortForward

    nics = (Nic(network="lan", mac="52:54:00:aa:00:01", address="198.18.10.10"),
            Nic(network="user", mac="52:54:00:aa:00:02",
                forwards=(PortForward(host_port=8080, guest_port=80),)))
    config = _config().model_copy(update={
        "nics": nics, "hardware": HardwareProfile(machine="pc-q35-10.0", hotplug_ports=4)})
    paths = VmFolder(Path("/var/lib/vmkit/vms/web")).run_paths(
        config.disk_file, config.boot.kernel, config.boot.initrd)
    argv = build_argv(config, paths, LaunchOptions(accel="tcg", ssh_port=40022,
                                                   tap_fds=(("52:54:00:aa:00:01", 7),)))
    _check("argv_networks.json", argv)
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs[0] == "tap,id=net-525400aa0001,fd=7,vhost=off"  # QEMU opens no tap itself
    assert netdevs[1].endswith("hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:40022-:22")
    assert "restrict" not in netdevs[1]  # an explicit user NIC reaches out (QEMU's NAT)
    ports = [a for a in argv if a.startswith("pcie-root-port")]
    assert len(ports) == 2 + 4


def test_vms_made_before_hot_plug_ports_keep_their_hardware() -> None:
    """A vm.json without hotplug_ports (older vmkit) gets no root ports: the same machine."""
    argv = _argv("/x", "tcg")
    assert not any(a.startswith("pcie-root-port") for a in argv)


def test_vmgenid_device_on_seabios() -> None:
    """A VM with a generation ID device: SeaBIOS (qboot cannot place vmgenid's buffer) and one
    vmgenid whose guid each QEMU draws itself (guid=auto), so a restore shows a new one."""
    config = _config().model_copy(update={"hardware": HardwareProfile(
        machine="pc-q35-10.0", hotplug_ports=4, firmware="seabios", vmgenid=True)})
    paths = VmFolder(Path("/var/lib/vmkit/vms/web")).run_paths(
        config.disk_file, config.boot.kernel, config.boot.initrd)
    argv = build_argv(config, paths, LaunchOptions(accel="tcg"))
    _check("argv_vmgenid.json", argv)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices.count("vmgenid,id=vmgenid0,guid=auto") == 1
    assert argv[argv.index("-bios") + 1] == "/usr/share/seabios/bios-256k.bin"


def test_vms_made_before_vmgenid_keep_their_hardware() -> None:
    """A vm.json without vmgenid (older vmkit) gets no vmgenid device: the same machine."""
    config = VmConfig.model_validate(_config().model_dump(mode="json", exclude={"hardware"}) |
                                     {"hardware": {"machine": "pc-q35-10.0"}})
    assert config.hardware.vmgenid is False
    argv = _argv("/x", "tcg")
    assert not any(a.startswith("vmgenid") for a in argv)


def _firmware_config(firmware: str, cdrom: str = "scsi", secure_boot: bool = False,
                     **extra: object) -> VmConfig:
    """A VM that boots through its firmware (from a foreign disk or media): no -kernel."""
    return VmConfig(
        uuid="0b0c5d2e-1111-4222-8333-444455556666", mac="52:54:00:12:34:56", created_at=0.0,
        spec=VmSpec(name="inst", image=None, cpus=2, memory=1 << 30, disk=20 << 30,
                    full_copy=True),
        hardware=HardwareProfile(machine="pc-q35-10.0", firmware=firmware, display="std",
                                 cdrom=cdrom, hotplug_ports=4,
                                 vmgenid=firmware == "seabios", secure_boot=secure_boot),
        boot=None, **extra)  # type: ignore[arg-type]


def _firmware_argv(config: VmConfig, media_fd: int | None = None) -> list[str]:
    folder = VmFolder(Path("/var/lib/vmkit/vms/inst"))
    return build_argv(config, folder.config_run_paths(config, config.disk_file),
                      LaunchOptions(accel="tcg", media_fd=media_fd))


def test_uefi_install_from_media_argv() -> None:
    """OVMF code read-only and the VM's own NVRAM as pflash; the ISO as a descriptor vmkit
    opened (QEMU never opens the host path); boot from the CD-ROM after the empty disk; a VGA
    screen on a VNC unix socket and no TCP port."""
    config = _firmware_config("ovmf", cdrom="sata", boot_order=("disk", "cdrom"),
                              media="/srv/isos/installer,1.iso")
    argv = _firmware_argv(config, media_fd=7)
    _check("argv_uefi_media.json", argv)
    assert "-kernel" not in argv and "-bios" not in argv
    assert "pflash0=fw-code,pflash1=fw-vars" in argv[argv.index("-machine") + 1]
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    code, nvram = nodes[0], nodes[1]
    assert code["read-only"] and code["file"]["filename"].endswith("OVMF_CODE_4M.fd")
    assert nvram["file"]["filename"] == "/var/lib/vmkit/vms/inst/disks/nvram.fd"
    assert "/srv/isos" not in " ".join(argv)  # the path never reaches QEMU
    assert argv[argv.index("-add-fd") + 1] == "fd=7,set=1,opaque=media"
    media = next(n for n in nodes if n["node-name"] == "media0")
    assert media["read-only"] and media["file"]["filename"] == "/dev/fdset/1"
    assert "ide-cd,bus=ide.0,id=cd0,drive=media0,bootindex=2" in argv
    assert any(a.startswith("virtio-blk-pci,drive=disk0") and a.endswith("bootindex=1")
               for a in argv)
    assert argv[argv.index("-vnc") + 1] == "unix:/var/lib/vmkit/vms/inst/run/vnc.sock"
    assert "VGA,id=video0" in argv


def test_bios_foreign_disk_with_network_boot_argv() -> None:
    config = _firmware_config("seabios", boot_order=("network", "disk"))
    argv = _firmware_argv(config)
    _check("argv_bios_disk.json", argv)
    assert argv[argv.index("-bios") + 1].endswith("bios-256k.bin")
    assert "-add-fd" not in argv and "scsi-cd,bus=scsi0.0,id=cd0" in argv  # an empty drive
    assert "virtio-scsi-pci,id=scsi0" in argv
    nic = next(a for a in argv if a.startswith("virtio-net-pci"))
    assert nic.endswith(",bootindex=1")
    assert any(a.startswith("virtio-blk-pci,drive=disk0") and a.endswith("bootindex=2")
               for a in argv)


def test_a_kernel_booted_vm_has_no_screen_no_cdrom_and_boots_its_kernel() -> None:
    argv = _argv("/x", "tcg")
    assert "-vnc" not in argv and "VGA,id=video0" not in argv
    assert not any(a.startswith("ide-cd") for a in argv) and "-kernel" in argv


def test_secure_boot_argv() -> None:
    config = _firmware_config("ovmf", secure_boot=True)
    argv = _firmware_argv(config)
    _check("argv_secure_boot.json", argv)
    assert argv[argv.index("-machine") + 1].endswith(",smm=on")
    assert argv[argv.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"
    code = json.loads(argv[argv.index("-blockdev") + 1])
    assert code["node-name"] == "fw-code" and code["file"]["filename"].endswith("secboot.fd")


def test_windows_argv() -> None:
    """--os-type windows: OVMF, a TPM 2.0 on the VM's own swtpm socket, the disk and CD-ROM on
    SATA, an e1000e NIC, the clock in local time: devices Windows has drivers for."""
    from vmkit.model.spec import os_type_hardware

    devices = os_type_hardware("windows")
    config = VmConfig(
        uuid="0b0c5d2e-1111-4222-8333-444455556666", mac="52:54:00:12:34:56", created_at=0.0,
        spec=VmSpec(name="win", image=None, cpus=2, memory=4 << 30, disk=64 << 30,
                    full_copy=True),
        hardware=HardwareProfile.model_validate({
            "machine": "pc-q35-10.0", "display": "std", "hotplug_ports": 4, **devices}),
        boot=None, boot_order=("disk", "cdrom"))
    argv = _firmware_argv(config)
    _check("argv_windows.json", argv)
    assert "pflash0=fw-code,pflash1=fw-vars" in argv[argv.index("-machine") + 1]
    assert argv[argv.index("-rtc") + 1] == "base=localtime"
    assert "socket,id=chrtpm,path=/var/lib/vmkit/vms/inst/run/swtpm.sock" in argv
    assert argv[argv.index("-tpmdev") + 1] == "emulator,id=tpm0,chardev=chrtpm"
    assert "tpm-crb,tpmdev=tpm0" in argv
    assert "ide-hd,bus=ide.1,drive=disk0,id=virtio-disk0,bootindex=1" in argv
    assert "ide-cd,bus=ide.0,id=cd0,bootindex=2" in argv
    assert any(a.startswith("e1000e,netdev=net0") for a in argv)
    assert not any(a.startswith(("virtio-blk-pci,drive=disk0", "virtio-net-pci")) for a in argv)


def test_extra_disks_sit_on_root_ports_after_the_nics_with_their_names_as_serials() -> None:
    """Each extra disk: a qcow2 node on its own file in volumes/ (format explicit), a virtio
    disk whose serial is its name, on the root port after the NICs'; the spares stay."""
    from vmkit.model.network import Nic
    from vmkit.model.spec import ExtraDisk

    config = _config().model_copy(update={
        "nics": (Nic(network="lan", mac="52:54:00:aa:00:01"),),
        "disks": (ExtraDisk(name="data", size=10 << 30), ExtraDisk(name="logs", size=1 << 30)),
        "hardware": HardwareProfile(machine="pc-q35-10.0", hotplug_ports=4)})
    paths = VmFolder(Path("/var/lib/vmkit/vms/web")).run_paths(
        config.disk_file, config.boot.kernel, config.boot.initrd)
    argv = build_argv(config, paths, LaunchOptions(accel="tcg",
                                                   tap_fds=(("52:54:00:aa:00:01", 7),)))
    _check("argv_extra_disks.json", argv)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-blk-pci,drive=vol-data,id=vol-data,serial=data,bus=hp1" in devices
    assert "virtio-blk-pci,drive=vol-logs,id=vol-logs,serial=logs,bus=hp2" in devices
    assert len([d for d in devices if d.startswith("pcie-root-port")]) == 1 + 2 + 4
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    volume = next(n for n in nodes if n["node-name"] == "vol-data")
    assert volume["driver"] == "qcow2" and volume["backing"] is None  # stands alone
    assert volume["file"]["filename"] == "/var/lib/vmkit/vms/web/volumes/data.qcow2"
