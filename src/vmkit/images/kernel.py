"""The uncompressed kernel vmkit boots through its PVH entry point.

A bzImage starts in 16-bit real mode, is decompressed by its own stub and relocated inside the
guest; under TCG that costs ~0.4 s of every boot (measured: 3.97 s -> 3.60 s to the agent for
the tiny guest). A kernel built with CONFIG_PVH carries an ELF note (XEN_ELFNOTE_PHYS32_ENTRY)
with a 32-bit entry point: QEMU loads the ELF itself and jumps there. The image builders take
the vmlinux out of Debian's own bzImage (its payload, decompressed on the host) and keep it only
when it has that note. The guest kernel is byte for byte the one in the bzImage; what differs
is that nothing randomizes its physical and virtual base (KASLR runs in the decompressor), as
with Firecracker's and Cloud Hypervisor's direct boot.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from vmkit.errors import ImageBuildError

PVH_KERNEL = "vmlinux"  # its file name in an image folder and in a VM's boot/
PVH_NOTE_TYPE = 18  # XEN_ELFNOTE_PHYS32_ENTRY
_SETUP_SECTS = 0x1F1
_HEADER_MAGIC = 0x202  # "HdrS"
_PAYLOAD = 0x248  # payload_offset, payload_length (boot protocol 2.08+)
_SIZE_TRAILER = 4  # the kernel's build appends the decompressed size (little-endian)

# (magic at the start of the payload, format name); zstd and lz4 go through their tools
_FORMATS = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x02\x21\x4c\x18", "lz4"),
            (b"\x28\xb5\x2f\xfd", "zstd"))
_TOOLS = {"lz4": ["lz4", "-d", "-c"], "zstd": ["zstd", "-d", "-c", "-q"]}


def bzimage_payload(image: bytes) -> tuple[str, bytes]:
    """(format, compressed payload without its size trailer) of a bzImage."""
    if len(image) < 0x250 or image[_HEADER_MAGIC:_HEADER_MAGIC + 4] != b"HdrS":
        raise ImageBuildError("not a bzImage (no HdrS boot header)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        raise ImageBuildError(f"boot protocol {version:#x} predates payload fields (2.08)")
    setup = (image[_SETUP_SECTS] or 4) * 512 + 512
    offset, length = struct.unpack_from("<II", image, _PAYLOAD)
    payload = image[setup + offset:setup + offset + length]
    if len(payload) != length or length <= _SIZE_TRAILER:
        raise ImageBuildError("the bzImage's payload lies outside the file")
    for magic, name in _FORMATS:
        if payload.startswith(magic):
            return name, payload[:-_SIZE_TRAILER]
    raise ImageBuildError(f"unknown kernel compression (payload starts {payload[:6].hex()})")


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.decompress(data)
    if kind == "xz":
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    try:
        done = subprocess.run(_TOOLS[kind], input=data, capture_output=True, timeout=120,
                              check=False)
    except FileNotFoundError:
        raise ImageBuildError(f"cannot decompress the kernel: {_TOOLS[kind][0]} is not "
                              "installed", hint="run scripts/install-host-deps.sh") from None
    if done.returncode != 0:
        raise ImageBuildError(f"{_TOOLS[kind][0]} could not decompress the kernel",
                              detail=done.stderr.decode(errors="replace")[-2000:])
    return done.stdout


def elf_notes(elf: bytes) -> list[tuple[bytes, int]]:
    """(owner, type) of every note in a 64-bit little-endian ELF's PT_NOTE segments."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageBuildError("the decompressed kernel is not a 64-bit little-endian ELF")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    notes = []
    for index in range(phnum):
        base = phoff + index * phentsize
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        offset, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        cursor, end = offset, min(offset + size, len(elf))
        while cursor + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, cursor)
            name = elf[cursor + 12:cursor + 12 + namesz].rstrip(b"\0")
            notes.append((name, kind))
            cursor += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return notes


def has_pvh_entry(elf: bytes) -> bool:
    return (b"Xen", PVH_NOTE_TYPE) in elf_notes(elf)


def extract_pvh_kernel(bzimage: Path, target: Path) -> bool:
    """Write the bzImage's kernel as an ELF at `target` when it has a PVH entry point; False
    (nothing written) when it has none, so the image boots its bzImage as before."""
    kind, payload = bzimage_payload(bzimage.read_bytes())
    elf = _decompress(kind, payload)
    if not has_pvh_entry(elf):
        return False
    target.write_bytes(elf)
    return True


def offer_pvh_kernel(bzimage: Path, target: Path, say: Callable[[str], None]) -> bool:
    """extract_pvh_kernel for an image build: the PVH kernel is a faster way to boot, not a
    need, so a kernel it cannot take apart keeps the image on its bzImage (and says why)."""
    try:
        found = extract_pvh_kernel(bzimage, target)
    except ImageBuildError as exc:
        target.unlink(missing_ok=True)
        say(f"no PVH kernel ({exc.message}): VMs boot the bzImage")
        return False
    if not found:
        say("the kernel has no PVH entry point: VMs boot the bzImage")
    return found
