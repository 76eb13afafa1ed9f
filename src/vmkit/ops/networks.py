"""Network use cases: create, list, show, delete, reconcile. The definitions, the reconciler
and what a starting VM needs from its networks are the engine core's (vmkit.core.networks)."""

from __future__ import annotations

from vmkit.core import networks as net_state
from vmkit.core.engine import Host
from vmkit.core.networks import delete, info, list_networks, reconcile
from vmkit.errors import InvalidValue
from vmkit.model.network import NetworkMode
from vmkit.model.views import NetworkInfo

_MODES: dict[str, NetworkMode] = {"nat": "nat", "isolated": "isolated", "bridged": "bridged"}


def create(host: Host, name: str, *, subnet: str | None = None, mode: str = "nat",
           parent: str | None = None) -> NetworkInfo:
    if mode not in _MODES:
        raise InvalidValue(f"invalid network mode {mode!r}", hint="use nat, isolated or bridged")
    spec = net_state.create(host, name, subnet=subnet, mode=_MODES[mode], parent=parent)
    return info(host, spec.name)


__all__ = ["NetworkInfo", "create", "delete", "info", "list_networks", "reconcile"]
