"""Pure pieces of image building: module load order from modules.dep, and a newc cpio writer."""

from __future__ import annotations

import gzip
from dataclasses import dataclass


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep -> {module path: [paths it depends on]} (paths relative to the module dir)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        module, rest = line.split(":", 1)
        deps[module.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def load_order(deps: dict[str, list[str]], wanted: list[str]) -> list[str]:
    """Module paths to insmod, dependencies first, each once, in the order `wanted` names them."""
    by_name = {module_name(path): path for path in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in seen:
            return
        if path in stack:
            raise ValueError(f"dependency loop through {path}")
        # modules.dep lists dependencies nearest-first; load the farthest first.
        for dep in reversed(deps.get(path, [])):
            visit(dep, (*stack, path))
        seen.add(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise KeyError(f"kernel module {name!r} is not in modules.dep")
        visit(by_name[key], ())
    return order


@dataclass(frozen=True)
class CpioEntry:
    path: str  # without leading slash
    mode: int  # full st_mode (file type bits included)
    data: bytes = b""


S_IFDIR, S_IFREG, S_IFLNK = 0o040000, 0o100000, 0o120000


def cpio_newc(entries: list[CpioEntry]) -> bytes:
    """An uncompressed newc archive, as the kernel unpacks initramfs (mtime 0: reproducible)."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for inode, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.path.encode() + b"\0"
        fields = [inode, entry.mode, 0, 0, 1 if entry.mode & S_IFDIR != S_IFDIR else 2, 0,
                  len(entry.data), 0, 0, 0, 0, len(name), 0]
        if entry.path == "TRAILER!!!":
            fields = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(name), 0]
        out.extend(b"070701" + b"".join(f"{value:08x}".encode() for value in fields))
        out.extend(name)
        pad4()
        out.extend(entry.data)
        pad4()
    return bytes(out)


def gzip_reproducible(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)
