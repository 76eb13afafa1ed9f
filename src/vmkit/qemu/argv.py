"""Pure generator: a VM's config and folder paths -> the QEMU argv. Golden-tested.

Option values that come from users or paths are escaped (a comma doubles), block devices are
given as JSON so no path can inject options, and every disk names its format (never probed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vmkit.model.network import Nic
from vmkit.model.spec import ExtraDisk, VmConfig

# QEMU's seccomp filter: no obsolete calls, no privilege elevation, no exec, no resource control
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# guid=auto: every QEMU process draws its own id, and the id is not part of the migration
# stream, so a restored or instant-cloned guest is shown a new one (with an ACPI notification).
VMGENID_DEVICE = "vmgenid,id=vmgenid0,guid=auto"
FIRMWARE_FILES = {"qboot": "qboot.rom", "seabios": "bios-256k.bin", "microvm": "bios-microvm.bin"}
# Debian's seabios package installs its images in /usr/share/seabios (the bookworm-backports
# QEMU 10 here has no bios-256k.bin in /usr/share/qemu); qboot.rom comes with QEMU.
SEABIOS_FIRMWARES = frozenset({"seabios", "microvm"})
SEABIOS_DIR = "/usr/share/seabios"
# Debian's ovmf package: the 4 MiB UEFI build and its empty variable store (copied per VM)
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS_TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.fd"
# Secure Boot: the SMM-protected build and a store with Microsoft's keys enrolled (what signed
# shims and Windows boot with); an unsigned boot loader is refused ("Access Denied")
OVMF_SECURE_CODE = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
OVMF_SECURE_VARS_TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"


def escape_opt(value: str) -> str:
    """Escape a value for QEMU's key=value,key=value option syntax: each comma is doubled."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class RunPaths:
    """Files QEMU is told about; absolute paths inside the VM folder."""

    folder: str
    qmp_socket: str
    serial_socket: str
    agent_socket: str
    pidfile: str
    serial_log: str
    disk: str
    kernel: str | None  # None: the firmware boots from the devices (no -kernel)
    initrd: str | None
    seed: str | None = None  # cloud-init NoCloud seed (read-only)
    nvram: str | None = None  # the VM's UEFI variables (OVMF)
    vnc_socket: str | None = None  # the graphical console (display std)
    tpm_socket: str | None = None  # the VM's swtpm (hardware.tpm)
    screendump: str | None = None


@dataclass(frozen=True)
class LaunchOptions:
    accel: str  # "kvm" or "tcg"
    firmware_dir: str = "/usr/share/qemu"
    seabios_dir: str = SEABIOS_DIR
    qemu_binary: str = "qemu-system-x86_64"
    ssh_port: int | None = None  # host port on 127.0.0.1 forwarded to the guest's port 22
    tap_fds: tuple[tuple[str, int], ...] = ()  # (NIC MAC, descriptor QEMU inherits)
    media_fd: int | None = None  # the CD-ROM's ISO, opened read-only by vmkit
    ovmf_code: str = OVMF_CODE
    tcg_cache: int | None = None  # bytes of translated code (tb-size); None: QEMU's default


MEMORY_SLOTS = 8


def memory_option(memory: int, ceiling: int) -> str:
    """-m value: the boot RAM, plus DIMM slots up to `ceiling` when memory may be hot-added."""
    size = f"{max(1, memory >> 20)}M"
    if ceiling <= memory:
        return size
    return f"size={size},slots={MEMORY_SLOTS},maxmem={ceiling >> 20}M"


MEDIA_FDSET = 1  # -add-fd set of the CD-ROM's ISO
CDROM_ID = "cd0"
DISK_DEVICE_ID = "virtio-disk0"


def _blockdev(node: dict[str, object]) -> str:
    return json.dumps(node, separators=(",", ":"))


def media_node(filename: str, node_name: str = "media0") -> dict[str, object]:
    """A read-only raw ISO node (never probed: a CD image is raw)."""
    return {"driver": "raw", "node-name": node_name, "read-only": True,
            "file": {"driver": "file", "filename": filename, "read-only": True}}


def boot_indexes(config: VmConfig) -> dict[str, int]:
    """bootindex per boot device class: the firmware tries them in the user's order. A
    kernel-booted VM starts from its disk (the kernel is loaded by QEMU)."""
    if config.boot is not None:
        return {"disk": 1}
    return {device: index + 1 for index, device in enumerate(config.boot_order)}


def _chardev_socket(chardev_id: str, path: str, extra: str = "") -> str:
    return f"socket,id={chardev_id},path={escape_opt(path)},server=on,wait=off{extra}"


def build_argv(config: VmConfig, paths: RunPaths, options: LaunchOptions) -> list[str]:
    """The complete QEMU command line for one VM."""
    spec, hw = config.spec, config.hardware
    accel = "kvm" if options.accel == "kvm" else "tcg,thread=multi"
    if options.accel != "kvm" and options.tcg_cache is not None:
        accel += f",tb-size={max(1, options.tcg_cache >> 20)}"
    machine = hw.machine
    if machine.startswith(("pc-q35", "pc-i440fx")):
        machine += ",hpet=off"  # the guest spends boot time calibrating an HPET it does not need
    if hw.firmware == "ovmf":
        machine += ",pflash0=fw-code,pflash1=fw-vars"
        if hw.secure_boot:
            machine += ",smm=on"  # the variable store is writable only from SMM
    order = boot_indexes(config)
    argv = [
        options.qemu_binary,
        "-name", f"guest={escape_opt(spec.name)},process=vmkit-{escape_opt(spec.name[:9])}",
        "-uuid", config.uuid,
        "-nodefaults", "-no-user-config", "-display", "none",
        *(["-vnc", f"unix:{escape_opt(paths.vnc_socket)}"]
          if hw.display == "std" and paths.vnc_socket else []),
        "-machine", machine,
        "-accel", accel,
        "-cpu", hw.cpu_model,
        "-smp", f"cpus={spec.cpus},maxcpus={spec.cpu_ceiling}",
        "-m", memory_option(spec.memory, spec.memory_ceiling),
        "-msg", "timestamp=on",
        *(["-rtc", "base=localtime"] if hw.rtc_localtime else []),
        "-sandbox", SANDBOX,
    ]
    firmware = FIRMWARE_FILES.get(hw.firmware)
    if firmware:
        folder = options.seabios_dir if hw.firmware in SEABIOS_FIRMWARES else options.firmware_dir
        argv += ["-bios", f"{folder}/{firmware}"]
    elif hw.firmware == "ovmf":
        if paths.nvram is None:
            raise ValueError("a UEFI VM needs its NVRAM file")
        code = OVMF_SECURE_CODE if hw.secure_boot else options.ovmf_code
        if hw.secure_boot:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        argv += [
            "-blockdev", _blockdev({"driver": "raw", "node-name": "fw-code", "read-only": True,
                                    "file": {"driver": "file", "filename": code,
                                             "read-only": True}}),
            "-blockdev", _blockdev({"driver": "raw", "node-name": "fw-vars",
                                    "file": {"driver": "file", "filename": paths.nvram}}),
        ]
    if config.boot is not None and paths.kernel and paths.initrd:
        argv += ["-kernel", paths.kernel, "-initrd", paths.initrd,
                 "-append", config.boot.cmdline]
    argv += [
        "-pidfile", paths.pidfile,
        "-chardev", _chardev_socket("qmp", paths.qmp_socket),
        "-mon", "chardev=qmp,mode=control",
        "-chardev", _chardev_socket("serial0", paths.serial_socket,
                                    f",logfile={escape_opt(paths.serial_log)},logappend=on"),
        "-serial", "chardev:serial0",
        "-blockdev", json.dumps({
            "driver": "qcow2", "node-name": "disk0", "discard": "unmap",
            "file": {"driver": "file", "filename": paths.disk, "discard": "unmap"},
        }, separators=(",", ":")),
        "-device", (f"ide-hd,bus=ide.1,drive=disk0,id={DISK_DEVICE_ID}"
                    if hw.disk_bus == "sata" else
                    f"virtio-blk-pci,drive=disk0,id={DISK_DEVICE_ID}")
                   + (f",bootindex={order['disk']}" if "disk" in order else ""),
    ]
    if hw.tpm:
        if paths.tpm_socket is None:
            raise ValueError("a VM with a TPM needs its swtpm socket")
        argv += ["-chardev", f"socket,id=chrtpm,path={escape_opt(paths.tpm_socket)}",
                 "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", "tpm-crb,tpmdev=tpm0"]
    if hw.cdrom != "none":
        # an empty tray until media; both firmwares boot from either bus
        if hw.cdrom == "scsi":
            argv += ["-device", "virtio-scsi-pci,id=scsi0"]
            cdrom = f"scsi-cd,bus=scsi0.0,id={CDROM_ID}"
        else:
            cdrom = f"ide-cd,bus=ide.0,id={CDROM_ID}"  # q35's built-in AHCI
        if config.media is not None and options.media_fd is not None:
            argv += ["-add-fd", f"fd={options.media_fd},set={MEDIA_FDSET},opaque=media",
                     "-blockdev", _blockdev(media_node(f"/dev/fdset/{MEDIA_FDSET}"))]
            cdrom += ",drive=media0"
        if "cdrom" in order:
            cdrom += f",bootindex={order['cdrom']}"
        argv += ["-device", cdrom]
    if hw.display == "std":
        argv += ["-device", "VGA,id=video0"]
    if paths.seed is not None:
        argv += [
            "-blockdev", json.dumps({
                "driver": "raw", "node-name": "seed0", "read-only": True,
                "file": {"driver": "file", "filename": paths.seed, "read-only": True},
            }, separators=(",", ":")),
            "-device", "virtio-blk-pci,drive=seed0,id=virtio-seed0",
        ]
    argv += [
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-chardev", _chardev_socket("agent0", paths.agent_socket),
        "-device",
        "virtserialport,bus=virtio-serial0.0,chardev=agent0,name=org.qemu.guest_agent.0",
        *(_legacy_nic(config, options, order.get("network")) if not config.nics else []),
        "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
    ]
    if hw.vmgenid:
        argv += ["-device", VMGENID_DEVICE]
    q35 = machine.startswith("pc-q35")
    if q35:
        argv += _hotplug_ports(port_count(config))
        argv += _nic_args(config, options, order.get("network"))
    for index, disk in enumerate(config.disks):
        argv += ["-blockdev", _blockdev(volume_node(disk, paths.folder)),
                 "-device", volume_device(disk, port_id(len(config.nics) + index) if q35
                                          else None)]
    return argv


def volume_id(disk: ExtraDisk) -> str:
    """The block node's and the device's id of an extra disk."""
    return f"vol-{disk.name}"


def volume_node(disk: ExtraDisk, folder: str) -> dict[str, object]:
    # backing null: an extra disk stands alone, whatever its header (the VM's uid writes it)
    return {"driver": "qcow2", "node-name": volume_id(disk), "discard": "unmap",
            "backing": None,
            "file": {"driver": "file", "filename": f"{folder}/{disk.file}",
                     "discard": "unmap"}}


def volume_device(disk: ExtraDisk, port: str | None) -> str:
    """A virtio disk whose serial is the disk's name; on a root port of its own (q35), so it
    can be unplugged while the VM runs."""
    device = f"virtio-blk-pci,drive={volume_id(disk)},id={volume_id(disk)},serial={disk.name}"
    return device + (f",bus={port}" if port else "")


USER_NET = "net=198.18.0.0/24,host=198.18.0.2,dhcpstart=198.18.0.15"


HOTPLUG_SPARE = 4  # empty PCIe root ports new VMs get for NIC hot-add (pinned in vm.json)


def _legacy_nic(config: VmConfig, options: LaunchOptions, bootindex: int | None) -> list[str]:
    """No NICs configured: one user-mode NIC with restrict=on (the guest has DHCP but no path
    out of its QEMU; the host reaches in only through the ssh forward)."""
    netdev = f"user,id=net0,restrict=on,{USER_NET}"
    if options.ssh_port is not None:
        netdev += f",hostfwd=tcp:127.0.0.1:{options.ssh_port}-:22"
    device = f"{config.hardware.nic_model},netdev=net0,id=nic0,mac={config.mac}"
    return ["-netdev", netdev,
            "-device", device + (f",bootindex={bootindex}" if bootindex else "")]


def _hotplug_ports(count: int) -> list[str]:
    """PCIe root ports: q35's root bus takes no hot-plug, a root port takes one device."""
    args: list[str] = []
    for index in range(count):
        args += ["-device", f"pcie-root-port,id={port_id(index)},bus=pcie.0,chassis={index + 1}"]
    return args


def port_count(config: VmConfig) -> int:
    """Root ports of a q35 VM: one per NIC and per extra disk it starts with, and the spares
    hot-plugged devices go into."""
    return len(config.nics) + len(config.disks) + config.hardware.hotplug_ports


def port_id(index: int) -> str:
    return f"hp{index}"


def _nic_args(config: VmConfig, options: LaunchOptions, bootindex: int | None) -> list[str]:
    """Configured NICs, each on its own root port (so each can be unplugged while running);
    with network in the boot order, the firmware tries the first one."""
    args: list[str] = []
    ssh_port = options.ssh_port
    fds = dict(options.tap_fds)
    for index, nic in enumerate(config.nics):
        on_user = nic.network == "user"
        args += ["-netdev", netdev_option(nic, ssh_port=ssh_port if on_user else None,
                                          tap_fd=fds.get(nic.mac)),
                 "-device", nic_device(nic, port_id(index), config.hardware.nic_model)
                 + (f",bootindex={bootindex}" if bootindex and index == 0 else "")]
        if on_user:
            ssh_port = None  # one forward is enough
    return args


def netdev_option(nic: Nic, *, ssh_port: int | None = None, tap_fd: int | str | None = None
                  ) -> str:
    """A user-mode netdev (its port forwards as hostfwd), or a tap given to QEMU as an open
    descriptor (a number it inherited, or a name passed over QMP)."""
    if nic.network == "user":
        netdev = f"user,id={netdev_id(nic)},{'restrict=on,' if nic.restricted else ''}{USER_NET}"
        for forward in nic.forwards:  # on the address the user chose (127.0.0.1 by default)
            netdev += f",hostfwd={forward.hostfwd}"
        if ssh_port is not None:
            netdev += f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
        return netdev
    if tap_fd is None:
        raise ValueError(f"NIC {nic.mac} on {nic.network} needs an open tap descriptor")
    return f"tap,id={netdev_id(nic)},fd={tap_fd},vhost=off"


def netdev_id(nic: Nic) -> str:
    return "net-" + nic.mac.replace(":", "")


def nic_id(nic: Nic) -> str:
    return "nic-" + nic.mac.replace(":", "")


def nic_device(nic: Nic, port: str, model: str = "virtio-net-pci") -> str:
    return f"{model},netdev={netdev_id(nic)},id={nic_id(nic)},mac={nic.mac},bus={port}"
