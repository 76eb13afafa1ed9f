"""Hot-plugged devices as command-line options, pure: rebuilding the machine a QEMU became
(restore of a memory snapshot, instant clone) means starting the new QEMU with every device
the old one had hot-plugged, under the same ids, so the migration stream finds them."""

from __future__ import annotations

from collections.abc import Iterable

from vmkit.model.runtime import HotplugStep, PluggedNic
from vmkit.qemu.argv import escape_opt, netdev_option, nic_device, port_id


def replay_args(steps: Iterable[HotplugStep]) -> list[str]:
    argv: list[str] = []
    for step in steps:
        head_key = "qom-type" if step.kind == "object" else "driver"
        rest = [f"{key}={escape_opt(str(value))}" for key, value in step.args.items()
                if key != head_key]
        argv += [f"-{step.kind}", ",".join([escape_opt(str(step.args[head_key])), *rest])]
    return argv


def replay_nics(plugged: Iterable[PluggedNic], tap_fds: dict[str, int],
                model: str = "virtio-net-pci") -> list[str]:
    """Hot-plugged NICs on the root ports they were plugged into (taps by MAC)."""
    argv: list[str] = []
    for item in plugged:
        argv += ["-netdev", netdev_option(item.nic, tap_fd=tap_fds.get(item.nic.mac)),
                 "-device", nic_device(item.nic, port_id(item.port), model)]
    return argv
