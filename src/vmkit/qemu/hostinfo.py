"""Facts about the host's QEMU: binary, version, versioned machine types, firmware."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

from vmkit.errors import HostError

QEMU_BINARY = "qemu-system-x86_64"
MIN_QEMU = (10, 0)
INSTALL_HINT = (
    "on Debian 12 install QEMU 10 from bookworm-backports (make run does it: "
    "scripts/install-host-deps.sh); on Debian 13: apt-get install qemu-system-x86 qemu-utils"
)


def qemu_path() -> str | None:
    return shutil.which(QEMU_BINARY)


@functools.cache
def qemu_version() -> tuple[int, int, int]:
    path = qemu_path()
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed", hint=INSTALL_HINT)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise HostError(f"cannot read the QEMU version from: {out.strip()!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def require_supported_qemu() -> tuple[int, int, int]:
    version = qemu_version()
    if version[:2] < MIN_QEMU:
        shown = ".".join(map(str, version))
        raise HostError(
            f"QEMU {shown} is not supported: vmkit needs QEMU >= {MIN_QEMU[0]}.{MIN_QEMU[1]} "
            "(older QEMU loses guest memory in live migration under TCG)",
            hint=INSTALL_HINT,
        )
    return version


@functools.cache
def machine_aliases() -> dict[str, str]:
    """alias -> versioned machine type, e.g. q35 -> pc-q35-10.0, from `-machine help`."""
    path = qemu_path()
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed", hint=INSTALL_HINT)
    out = subprocess.run([path, "-machine", "help"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return parse_machine_help(out)


def parse_machine_help(text: str) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for line in text.splitlines():
        name = line.split(" ", 1)[0]
        match = re.search(r"\(alias of ([\w.-]+)\)", line)
        if match:
            aliases[name] = match.group(1)
        elif name and not line.startswith("Supported"):
            aliases.setdefault(name, name)
    return aliases


def resolve_machine(machine: str) -> str:
    aliases = machine_aliases()
    if machine not in aliases:
        raise HostError(f"QEMU does not know machine type {machine!r}")
    return aliases[machine]


@functools.cache
def cpu_models() -> frozenset[str]:
    """The CPU model names this QEMU offers (aliases included), from `-cpu help`."""
    path = qemu_path()
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed", hint=INSTALL_HINT)
    out = subprocess.run([path, "-cpu", "help"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return parse_cpu_help(out)


def parse_cpu_help(text: str) -> frozenset[str]:
    """The names listed under "Available CPUs:" (up to the blank line before the flags)."""
    models: set[str] = set()
    listing = False
    for line in text.splitlines():
        if line.startswith("Available CPUs"):
            listing = True
        elif listing and not line.strip():
            break
        elif listing and line.startswith(" "):
            models.add(line.split()[0])
    return frozenset(models)


def machine_types() -> frozenset[str]:
    """Every machine type name this QEMU accepts: versioned names and their aliases."""
    aliases = machine_aliases()
    return frozenset(aliases) | frozenset(aliases.values())


PROBE_TIMEOUT = 30.0


@functools.cache
def probe_capabilities(accel: str) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """What this QEMU offers under `accel`, from QMP on a machine-less QEMU: (the versioned
    machine types (query-machines), and per CPU model the features the accelerator cannot
    give it (query-cpu-definitions `unavailable-features`; empty = usable))."""
    import json

    path = qemu_path()
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed", hint=INSTALL_HINT)
    commands = "".join(json.dumps({"execute": name}) + "\n" for name in (
        "qmp_capabilities", "query-machines", "query-cpu-definitions", "quit"))
    done = subprocess.run([path, "-machine", "none", "-accel", accel, "-nodefaults",
                           "-nographic", "-display", "none", "-qmp", "stdio"],
                          input=commands, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT, check=False)
    machines: list[str] = []
    cpus: dict[str, tuple[str, ...]] = {}
    for line in done.stdout.splitlines():
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        result = answer.get("return") if isinstance(answer, dict) else None
        if not isinstance(result, list) or not result:
            continue
        if "cpu-max" in result[0]:
            machines = [str(m["name"]) for m in result]
        elif "typename" in result[0]:
            cpus = {str(c["name"]): tuple(str(f) for f in c.get("unavailable-features") or ())
                    for c in result}
    if not machines or not cpus:
        raise HostError(f"cannot read what QEMU offers under {accel}: "
                        f"{done.stderr.strip()[-300:] or 'no answer on QMP'}")
    return tuple(sorted(machines)), cpus


def firmwares() -> tuple[str, ...]:
    """The firmwares whose files this host has (a VM pinned to another cannot start here)."""
    from vmkit.qemu import argv

    present = ["qboot"]  # ships with QEMU itself
    if os.path.exists(f"{argv.SEABIOS_DIR}/{argv.FIRMWARE_FILES['seabios']}"):
        present.append("seabios")
    if os.path.exists(argv.OVMF_CODE) and os.path.exists(argv.OVMF_VARS_TEMPLATE):
        present.append("ovmf")
    return tuple(present)
