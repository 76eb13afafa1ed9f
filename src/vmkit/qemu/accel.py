"""Choosing the accelerator: KVM only when a real boot proves it works, otherwise TCG.

`decide` is pure (facts in, decision out). `probe` gathers the facts and, only when KVM looks
usable, boots a kernel under `-accel kvm` and watches the serial output. The decision is cached per
host (keyed by QEMU version, host kernel and the KVM modules) in VMKIT_HOME/cache/accel.json.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from vmkit.qemu.hostinfo import QEMU_BINARY, qemu_version
from vmkit.storage.layout import read_json, write_json_atomic

TCG_ISOLATION_NOTE = (
    "TCG emulates the CPU in software: QEMU's security policy covers only KVM, so there is no "
    "hardware isolation guarantee between guests and the host"
)


class KvmFacts(BaseModel):
    model_config = ConfigDict(frozen=True)

    dev_kvm: bool
    dev_kvm_usable: bool
    pvm_module: bool
    cpu_virt_flags: bool


class AccelDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    accel: str  # "kvm" | "tcg"
    reason: str
    facts: KvmFacts
    key: str = ""

    @property
    def isolation_note(self) -> str | None:
        return TCG_ISOLATION_NOTE if self.accel == "tcg" else None


def gather_facts() -> KvmFacts:
    dev = Path("/dev/kvm")
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return KvmFacts(
        dev_kvm=dev.exists(),
        dev_kvm_usable=dev.exists() and os.access(dev, os.R_OK | os.W_OK),
        pvm_module=Path("/sys/module/kvm_pvm").exists(),
        cpu_virt_flags=bool(flags & {"vmx", "svm"}),
    )


def precheck(facts: KvmFacts) -> str | None:
    """Why KVM cannot be used, or None when a boot probe is worth trying."""
    if not facts.dev_kvm:
        return "/dev/kvm does not exist (no KVM module or no hardware virtualization)"
    if facts.pvm_module:
        return ("/dev/kvm is backed by KVM-PVM (/sys/module/kvm_pvm exists), a paravirtual "
                "backend that cannot boot stock kernels")
    if not facts.cpu_virt_flags:
        return "the CPU reports neither vmx nor svm, so /dev/kvm cannot run stock guests"
    if not facts.dev_kvm_usable:
        return "/dev/kvm exists but this user cannot open it (add the user to group kvm)"
    return None


def decide(facts: KvmFacts, probe_ok: bool | None, probe_detail: str = "") -> AccelDecision:
    reason = precheck(facts)
    if reason is not None:
        return AccelDecision(accel="tcg", reason=f"{reason}; using TCG", facts=facts)
    if probe_ok is None:
        return AccelDecision(accel="tcg", facts=facts,
                             reason="KVM looks available but no guest kernel was there to prove "
                                    "it boots (build an image first); using TCG")
    if probe_ok:
        return AccelDecision(accel="kvm", facts=facts,
                             reason=f"a test boot under KVM succeeded ({probe_detail})")
    return AccelDecision(accel="tcg", facts=facts,
                         reason=f"a test boot under KVM failed ({probe_detail}); using TCG")


def boot_probe(kernel: Path, timeout: float = 20.0) -> tuple[bool, str]:
    """Boot `kernel` under KVM with no root disk; reaching the kernel's root mount is success."""
    argv = [QEMU_BINARY, "-accel", "kvm", "-machine", "q35", "-nodefaults", "-display", "none",
            "-m", "256M", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1"]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
    elapsed = time.monotonic() - start
    if "VFS: Unable to mount root" in output or "Run /init" in output:
        return True, f"kernel reached its root mount in {elapsed:.1f}s"
    last = output.strip().splitlines()[-1:] or ["no output"]
    return False, f"no sign of a booted kernel after {elapsed:.1f}s: {last[0][:200]}"


def cache_key(facts: KvmFacts) -> str:
    version = ".".join(map(str, qemu_version()))
    return f"qemu={version};kernel={platform.release()};{facts.model_dump_json()}"


def choose(cache_file: Path, probe_kernel: Path | None, *, refresh: bool = False) -> AccelDecision:
    facts = gather_facts()
    key = cache_key(facts)
    if not refresh and cache_file.exists():
        try:
            cached = AccelDecision.model_validate(read_json(cache_file))
            if cached.key == key:
                return cached
        except (ValueError, OSError):
            pass
    probe_ok: bool | None = None
    detail = ""
    if precheck(facts) is None and probe_kernel is not None and probe_kernel.exists():
        probe_ok, detail = boot_probe(probe_kernel)
    decision = decide(facts, probe_ok, detail).model_copy(update={"key": key})
    if probe_ok is not None or precheck(facts) is not None:
        write_json_atomic(cache_file, decision.model_dump(mode="json"))
    return decision
