"""Pre-flight of a move and the CPU baseline, on recorded capabilities: QEMU 10 under TCG as
recorded on these machines (tests/unit/data/caps_tcg_qemu10.json), and two KVM hosts derived
from it by what their CPUs lack (an older Haswell-era host; a newer Icelake-era host)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vmkit.model.hardware import HostCapabilities, cpu_baseline, machine_version, preflight
from vmkit.model.network import Nic
from vmkit.model.spec import BootConfig, HardwareProfile, VmConfig, make_spec

RECORDED = json.loads((Path(__file__).parent / "data" / "caps_tcg_qemu10.json").read_text())
TCG = {name: tuple(missing) for name, missing in RECORDED["cpu_models"].items()}
NEWER = ("Icelake-Server", "SapphireRapids", "GraniteRapids", "Cooperlake", "EPYC-Genoa")


def _kvm_host(newest: str) -> dict[str, tuple[str, ...]]:
    """A KVM host whose real CPU runs every Intel model up to `newest`, nothing after."""
    from vmkit.model.hardware import CPU_GENERATIONS

    intel = CPU_GENERATIONS[1]
    runs = set(intel[:intel.index(newest) + 1]) | {"qemu64", "kvm64"}
    return {name: () if name.split("-v")[0] in runs or name in runs else ("avx512f",)
            for name in TCG}


def _caps(**changes: object) -> HostCapabilities:
    base = HostCapabilities(qemu_version="10.0.2", accel="tcg",
                            machines=tuple(RECORDED["machines"]),
                            cpu_models=TCG, memory_room=8 << 30, vcpu_room=8,
                            disk_free=100 << 30, networks={"lan": "198.18.5.0/24"})
    return base.model_copy(update=changes)


def _config(**hardware: object) -> VmConfig:
    return VmConfig(uuid="0" * 8 + "-0000-4000-8000-" + "0" * 12, mac="52:54:00:00:00:01",
                    created_at=time.time(), spec=make_spec("web", "tiny", 1, "256M", "2G"),
                    hardware=HardwareProfile(machine="pc-q35-10.0", **hardware),  # type: ignore[arg-type]
                    boot=BootConfig(kernel="boot/vmlinuz", initrd="boot/initrd.img",
                                    cmdline="console=ttyS0"))


def test_a_vm_that_fits_has_no_reason_to_refuse() -> None:
    assert preflight(_config(), _caps(), name="web", disk_bytes=1 << 30, running=True) == []


def test_every_reason_is_listed_not_only_the_first() -> None:
    config = _config(cpu_model="Skylake-Client").model_copy(update={"nics": (
        Nic(network="backend", mac="52:54:00:00:00:02"),)})
    caps = _caps(machines=("pc-q35-9.2", "pc-q35-9.1"), vms=("web",), memory_room=128 << 20,
                 vcpu_room=0, disk_free=1 << 20)
    reasons = preflight(config, caps, name="web", disk_bytes=1 << 30, running=True)
    text = "\n".join(reasons)
    assert len(reasons) == 7, reasons
    for needle in ("a VM named 'web' exists", "pc-q35-10.0 is not offered",
                   "pc-q35-9.2: older than the VM's", "Skylake-Client lacks features",
                   "xsavec", "not enough memory", "not enough vCPUs", "not enough disk",
                   "network 'backend' does not exist"):
        assert needle in text, needle


def test_a_stopped_vm_needs_no_memory_room() -> None:
    caps = _caps(memory_room=0, vcpu_room=0)
    assert preflight(_config(), caps, name="web", disk_bytes=1, running=False) == []


def test_an_unknown_cpu_model_is_named() -> None:
    caps = _caps(cpu_models={k: v for k, v in TCG.items() if not k.startswith("Westmere")})
    reasons = preflight(_config(cpu_model="Westmere"), caps, name="web", disk_bytes=1,
                        running=True)
    assert reasons == ["CPU model Westmere is unknown to the destination's QEMU"]


@pytest.mark.parametrize(("hosts", "baseline"), [
    ([TCG], "Westmere"),  # TCG emulates up to Westmere's features (recorded)
    ([TCG, TCG], "Westmere"),
    ([_kvm_host("Skylake-Server"), _kvm_host("Cascadelake-Server")], "Skylake-Server"),
    ([_kvm_host("Haswell"), _kvm_host("Cascadelake-Server"), TCG], "Westmere"),
    ([_kvm_host("Broadwell"), _kvm_host("Haswell")], "Haswell"),
    ([{"qemu64": ()}, TCG], "qemu64"),
    ([], "qemu64"),
])
def test_the_cpu_baseline_is_the_newest_model_all_hosts_run(
        hosts: list[dict[str, tuple[str, ...]]], baseline: str) -> None:
    assert cpu_baseline(hosts) == baseline
    for host in hosts:
        assert not host.get(baseline, ())  # each host runs it with all its features


def test_machine_versions() -> None:
    assert machine_version("pc-q35-10.0") == (10, 0)
    assert machine_version("pc-i440fx-9.2") == (9, 2)
    assert machine_version("q35") is None
    assert "pc-q35-9.2" in RECORDED["machines"] and NEWER


def test_a_vm_with_media_or_uefi_is_refused_where_that_cannot_follow() -> None:
    """The ISO is a file of this host (never sent along); a UEFI VM needs OVMF there."""
    uefi = VmConfig(uuid="0" * 8 + "-0000-4000-8000-" + "0" * 12, mac="52:54:00:00:00:01",
                    created_at=time.time(), spec=make_spec("inst", None, 1, "256M", "2G"),
                    hardware=HardwareProfile(machine="pc-q35-10.0", firmware="ovmf",
                                             cdrom="sata", display="std"),
                    boot=None, boot_order=("disk", "cdrom"), media="/srv/iso/debian.iso")
    reasons = preflight(uefi, _caps(firmwares=("qboot", "seabios")), name="inst",
                        disk_bytes=1 << 30, running=True)
    assert len(reasons) == 2, reasons
    assert "/srv/iso/debian.iso is in the CD-ROM drive" in reasons[0]
    assert "vmkit media eject inst" in reasons[0]
    assert "no UEFI firmware" in reasons[1]
    ejected = uefi.model_copy(update={"media": None})
    assert preflight(ejected, _caps(firmwares=("qboot", "seabios", "ovmf")), name="inst",
                     disk_bytes=1 << 30, running=True) == []


def test_firmware_boot_needs_a_firmware_that_boots_disks() -> None:
    from vmkit.errors import InvalidValue

    with pytest.raises(InvalidValue, match="seabios or ovmf"):
        VmConfig(uuid="0" * 8 + "-0000-4000-8000-" + "0" * 12, mac="52:54:00:00:00:01",
                 created_at=time.time(), spec=make_spec("x", None, 1, "256M", "2G"),
                 hardware=HardwareProfile(machine="pc-q35-10.0", firmware="qboot"),
                 boot=None)
    with pytest.raises(InvalidValue, match="no CD-ROM drive"):
        _config().model_copy(update={"media": "/a.iso"}).model_validate(
            {**_config().model_dump(), "media": "/a.iso"})


def test_extra_disks_keep_a_running_vm_from_a_live_move_but_not_a_cold_one() -> None:
    from vmkit.model.spec import ExtraDisk

    config = _config().model_copy(update={"disks": (ExtraDisk(name="data", size=1 << 30),)})
    reasons = preflight(config, _caps(), name="web", disk_bytes=1 << 30, running=True)
    assert reasons == ["it has extra disks (data): a live move carries the root disk only; "
                       "stop it and use vmkit move"]
    assert preflight(config, _caps(), name="web", disk_bytes=1 << 30, running=False) == []
