"""Disks and media "made elsewhere", built by the tests from Debian packages (nothing
downloaded): a disk that carries its own boot loader (GRUB for BIOS and for UEFI, made by
grub-mkrescue) and the tiny image's root file system as a partition of it, and small data ISOs.

The root gets what the tiny image leaves out and these tests need: the kernel modules for a
CD-ROM on virtio-scsi (virtio_scsi, sr_mod, isofs) and for UEFI variables (efivarfs), listed in
/etc/extra-modules in load order, and a file /etc/made-elsewhere the guest is asked for.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

from vmkit.images.initramfs import load_order, parse_modules_dep
from vmkit.storage.layout import HomeLayout

EXTRA_MODULES = ["virtio_scsi", "sr_mod", "isofs", "efivarfs"]
MARKER = "/etc/made-elsewhere"
MARKER_TEXT = "written where the disk was made\n"


def _run(argv: list[str], **kwargs: object) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False,
                          **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv[0]} failed: {done.stderr[-2000:]}"
    return str(done.stdout)


def _kernel_modules(image_home: Path, work: Path) -> tuple[Path, list[str]]:
    """The module folder of the tiny image's kernel (from the package the image was built
    from, in the image cache) and the modules to load, dependencies first."""
    debs = sorted((HomeLayout(image_home).cache / "debs").glob("linux-image-*/*/*.deb"))
    assert debs, "the tiny image's kernel package is not in the image cache"
    root = work / "kernel"
    _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
    moddir = next((root / "lib/modules").iterdir())
    _run(["depmod", "-b", str(root), moddir.name])
    order = load_order(parse_modules_dep((moddir / "modules.dep").read_text()), EXTRA_MODULES)
    return moddir, order


def _root_with_extras(image_home: Path, work: Path) -> Path:
    """The tiny image's root file system (raw ext4) with the extra modules and the marker,
    written with debugfs (no mount, no loop device)."""
    image = HomeLayout(image_home).image("tiny")
    qcow2 = next(image.glob("root-*.qcow2"))
    raw = work / "root.ext4"
    _run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)])
    moddir, order = _kernel_modules(image_home, work)
    staged = work / "staged"
    staged.mkdir()
    commands = ["mkdir /lib/extra-modules"]
    names = []
    for path in order:
        name = path.rsplit("/", 1)[-1]
        shutil.copyfile(moddir / path, staged / name)
        commands.append(f"write {staged / name} /lib/extra-modules/{name}")
        names.append(name)
    (staged / "extra-modules").write_text("\n".join(names) + "\n")
    (staged / "marker").write_text(MARKER_TEXT)
    commands += [f"write {staged / 'extra-modules'} /etc/extra-modules",
                 f"write {staged / 'marker'} {MARKER}"]
    script = work / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    _run(["debugfs", "-w", "-f", str(script), str(raw)])
    return raw


GRUB_CFG = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry "made elsewhere" {{
  linux /boot/vmlinuz {cmdline}
  initrd /boot/initrd.img
}}
"""
TINY_CMDLINE = "console=ttyS0 root=/dev/vda{partition} rw quiet loglevel=3"


def appended_partition(disk: Path) -> int:
    """The GPT number of the partition grub-mkrescue appended (the root file system)."""
    with open(disk, "rb") as handle:
        handle.seek(512)
        header = handle.read(92)
        assert header[:8] == b"EFI PART", "grub-mkrescue made no GPT"
        table, count, size = struct.unpack("<QII", header[72:88])
        handle.seek(table * 512)
        for index in range(count):
            entry = handle.read(size)
            name = entry[56:128].decode("utf-16le").rstrip("\0")
            if entry[:16] != bytes(16) and name.startswith("Appended"):
                return index + 1
    raise AssertionError("no appended partition in the GPT")


def bootable_disk(image_home: Path, work: Path, image_name: str = "tiny") -> Path:
    """A raw disk that boots through BIOS and UEFI firmware alike into a vmkit image's system
    (tiny: with the extras above; debian-12: as built, found by its file system's UUID)."""
    work.mkdir(parents=True, exist_ok=True)
    image = HomeLayout(image_home).image(image_name)
    if image_name == "tiny":
        root = _root_with_extras(image_home, work)
        cmdline = TINY_CMDLINE
    else:
        info = json.loads((image / "image.json").read_text())
        root = work / "root.ext4"
        _run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
              str(image / info["root_disk"]), str(root)])
        cmdline = info["cmdline"]  # root=UUID=...: any partition number will do
    tree = work / "iso"
    (tree / "boot/grub").mkdir(parents=True)
    shutil.copyfile(image / "vmlinuz", tree / "boot/vmlinuz")
    shutil.copyfile(image / "initrd.img", tree / "boot/initrd.img")
    disk = work / "made-elsewhere.img"
    partition = 4  # what grub-mkrescue 2.06 makes; checked below, rebuilt if it differs
    for _attempt in range(2):
        (tree / "boot/grub/grub.cfg").write_text(GRUB_CFG.format(
            cmdline=cmdline.format(partition=partition)))
        disk.unlink(missing_ok=True)
        _run(["grub-mkrescue", "-o", str(disk), str(tree), "--",
              "-append_partition", "3", "0x83", str(root)])
        found = appended_partition(disk)
        if found == partition:
            return disk
        partition = found
    raise AssertionError("the root partition number did not settle")


def data_iso(work: Path, label: str, files: dict[str, str]) -> Path:
    """A small ISO 9660 image holding `files`."""
    tree = work / f"iso-{label}"
    tree.mkdir(parents=True)
    for name, text in files.items():
        (tree / name).write_text(text)
    out = work / f"{label}.iso"
    _run(["xorriso", "-as", "mkisofs", "-quiet", "-V", label, "-o", str(out), str(tree)])
    return out


def png_is_blank(data: bytes) -> bool:
    """True when every pixel of an 8-bit PNG has the same value (a screen showing nothing)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat = 8, b""
    width = bpp = 0
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            width, _height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8
            bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    previous = bytearray(stride)
    values: set[int] = set()
    for start in range(0, len(raw), stride + 1):  # each scanline: a filter byte, its pixels
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else
                                      up if pb <= pc else corner)) & 0xFF
        values.update(line)
        previous = line
        if len(values) > 1:
            return False
    return True


def efi_variable(name: str) -> str:
    """An efivarfs file name: NAME-GUID (a GUID of these tests)."""
    return f"{name}-{uuid.UUID('6d2d7a4e-7a1b-4c3e-9a55-766d6b697400')}"


INSTALLED = "/etc/installed-by"
INSTALLER_SCRIPT = """#!/bin/sh
# a small OS installer: write the system onto the empty disk, leave a note in it, power off
export PATH=/bin
mkdir -p /proc /sys /dev /target
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /etc/modules-load-order); do insmod "/lib/modules/$module"; done
tries=0
while [ ! -b /dev/vda ] && [ "$tries" -lt 200 ]; do usleep 20000; tries=$((tries + 1)); done
echo "installer: writing the system to /dev/vda"
gunzip -c /payload.img.gz | dd of=/dev/vda bs=1M conv=fsync 2>/dev/null
blockdev --rereadpt /dev/vda
tries=0
while [ ! -b /dev/vda{partition} ] && [ "$tries" -lt 200 ]; do
  usleep 20000; tries=$((tries + 1))
done
mount -t ext4 /dev/vda{partition} /target
echo "the vmkit test installer" > /target{installed}
umount /target
sync
echo "installer: done, powering off"
poweroff -f
"""


def installer_iso(image_home: Path, system: Path, work: Path) -> Path:
    """A bootable installer ISO (BIOS and UEFI, by grub-mkrescue): the tiny kernel with the
    tiny initramfs plus an appended archive holding an installer /init and the `system` disk
    (compressed) it writes to the VM's empty disk."""
    from vmkit.images.initramfs import (
        S_IFLNK,
        S_IFREG,
        CpioEntry,
        cpio_newc,
        gzip_reproducible,
    )

    work.mkdir(parents=True, exist_ok=True)
    image = HomeLayout(image_home).image("tiny")
    script = INSTALLER_SCRIPT.format(partition=appended_partition(system), installed=INSTALLED)
    entries = [CpioEntry("init", S_IFREG | 0o755, script.encode()),
               CpioEntry("payload.img.gz", S_IFREG | 0o644,
                         gzip_reproducible(system.read_bytes()))]
    entries += [CpioEntry(f"bin/{applet}", S_IFLNK | 0o777, b"busybox")
                for applet in ("gunzip", "dd", "blockdev", "sync")]
    tree = work / "installer"
    (tree / "boot/grub").mkdir(parents=True)
    shutil.copyfile(image / "vmlinuz", tree / "boot/vmlinuz")
    # initramfs archives may be concatenated: the kernel unpacks them in order
    (tree / "boot/installer.img").write_bytes(
        (image / "initrd.img").read_bytes() + gzip_reproducible(cpio_newc(entries)))
    (tree / "boot/grub/grub.cfg").write_text(
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        "terminal_output serial console\nset timeout=0\n"
        'menuentry "install" {\n  linux /boot/vmlinuz console=ttyS0 quiet\n'
        "  initrd /boot/installer.img\n}\n")
    out = work / "installer.iso"
    _run(["grub-mkrescue", "-o", str(out), str(tree)])
    return out
