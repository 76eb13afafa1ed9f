"""The vmlinux taken out of a bzImage (images/kernel.py): payload, formats, the PVH note."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmkit.errors import ImageBuildError
from vmkit.images import kernel


def _note(owner: bytes, kind: int, desc: bytes) -> bytes:
    name = owner + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def _elf(notes: bytes) -> bytes:
    """A 64-bit ELF header, one PT_NOTE program header, the notes."""
    phoff, notes_at = 64, 64 + 56
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    program = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + program + notes


PVH_ELF = _elf(_note(b"Xen", 6, b"linux") + _note(b"Xen", kernel.PVH_NOTE_TYPE,
                                                   struct.pack("<I", 0x1000000)))
PLAIN_ELF = _elf(_note(b"GNU", 3, b"\x01" * 20))


def _bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    """A bzImage's boot header (protocol 2.15) with `payload` and its size trailer."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    body = payload + struct.pack("<I", 12345)
    offset = 0x100
    struct.pack_into("<II", setup, 0x248, offset, len(body))
    return bytes(setup) + b"\0" * offset + body + b"\0" * 64


@pytest.mark.parametrize("compress", [gzip.compress,
                                      lambda d: lzma.compress(d, format=lzma.FORMAT_XZ)])
def test_the_kernel_with_a_pvh_note_is_taken_out(tmp_path: Path, compress) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(_bzimage(compress(PVH_ELF)))
    assert kernel.extract_pvh_kernel(bz, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == PVH_ELF


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is a host dependency")
def test_an_lz4_kernel_as_debian_builds_it(tmp_path: Path) -> None:
    """Debian's cloud kernel: the LZ4 legacy frame (lz4 -l)."""
    packed = subprocess.run(["lz4", "-l", "-c"], input=PVH_ELF, capture_output=True,
                            check=True).stdout
    assert packed.startswith(b"\x02\x21\x4c\x18")
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(_bzimage(packed, setup_sects=39))
    assert kernel.extract_pvh_kernel(bz, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == PVH_ELF


def test_a_kernel_without_the_note_keeps_its_bzimage(tmp_path: Path) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(_bzimage(gzip.compress(PLAIN_ELF)))
    assert not kernel.extract_pvh_kernel(bz, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


@pytest.mark.parametrize("image, message", [
    (b"\0" * 4096, "not a bzImage"),
    (_bzimage(b"BZh91AY&SY" + b"\0" * 64), "unknown kernel compression"),
    (_bzimage(gzip.compress(PVH_ELF))[:700], "outside the file"),
])
def test_what_is_not_a_kernel_is_named(tmp_path: Path, image: bytes, message: str) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(image)
    with pytest.raises(ImageBuildError, match=message):
        kernel.extract_pvh_kernel(bz, tmp_path / "vmlinux")


def test_a_payload_that_is_not_an_elf_is_refused(tmp_path: Path) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(_bzimage(gzip.compress(b"MZ" + b"\0" * 200)))
    with pytest.raises(ImageBuildError, match="not a 64-bit"):
        kernel.extract_pvh_kernel(bz, tmp_path / "vmlinux")
