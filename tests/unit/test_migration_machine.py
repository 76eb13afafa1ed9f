"""What a destination accepts as the source's running machine: only the machine the moving
VM's vm.json describes (a hostile source cannot add a forward, more memory or other hardware)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from vmkit.errors import InvalidValue
from vmkit.model.network import Nic, parse_forward
from vmkit.model.runtime import MachineRecord
from vmkit.model.spec import BootConfig, HardwareProfile, VmConfig, make_spec
from vmkit.ops.migration import _checked_machine

UUID = "0" * 8 + "-0000-4000-8000-" + "0" * 12


def _config(name: str = "web", generation: int = 0) -> VmConfig:
    return VmConfig(uuid=UUID, mac="52:54:00:00:00:01", created_at=time.time(),
                    spec=make_spec(name, "tiny", 1, "256M", "2G"),
                    hardware=HardwareProfile(machine="pc-q35-10.0"),
                    boot=BootConfig(kernel="boot/vmlinuz", initrd="boot/initrd.img",
                                    cmdline="console=ttyS0"),
                    nics=(Nic(network="lan", mac="52:54:00:00:00:02"),),
                    generation=generation)


def _vm() -> SimpleNamespace:
    return SimpleNamespace(name="web2", config=_config("web2", generation=3))


def test_the_machine_vm_json_describes_is_accepted_under_the_new_name() -> None:
    running = MachineRecord(config=_config()).model_dump(mode="json")
    accepted = _checked_machine(_vm(), running)  # type: ignore[arg-type]
    assert accepted is not None
    assert accepted.config.spec.name == "web2" and accepted.config.generation == 3
    assert _checked_machine(_vm(), None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("change", ["forward", "memory", "uuid", "machine"])
def test_another_machine_is_refused(change: str) -> None:
    config = _config()
    if change == "forward":
        forward = parse_forward("0.0.0.0:2222:22")
        nic = config.nics[0].model_copy(update={"forwards": (forward,)})
        config = config.model_copy(update={"nics": (nic,)})
    elif change == "memory":
        config = config.model_copy(update={"spec": config.spec.model_copy(
            update={"memory": 64 << 30})})
    elif change == "uuid":
        config = config.model_copy(update={"uuid": UUID.replace("0000-4000", "1111-4000")})
    else:
        config = config.model_copy(update={"hardware": HardwareProfile(machine="pc-q35-9.2")})
    with pytest.raises(InvalidValue, match=r"not the one its vm\.json describes"):
        sent = MachineRecord(config=config).model_dump(mode="json")
        _checked_machine(_vm(), sent)  # type: ignore[arg-type]
