"""vmkit: virtual machines on QEMU, scriptable from Python.

    from vmkit import Host
    host = Host()
    vm = host.create("web", image="tiny", cpus=2, memory="512M")
    vm.start(wait=True); print(vm.exec(["uname", "-a"]).stdout); vm.stop()

Or, through a vmkit daemon (local socket or another host), the same methods:

    import vmkit
    host = vmkit.connect("https://198.18.0.1:8443", token="...")

The engine is imported on first use of Host/VM, so a client of a daemon never loads it.
"""

from __future__ import annotations

from vmkit.errors import (
    AdmissionRefused,
    AgentError,
    AlreadyExists,
    HostError,
    ImageBuildError,
    InvalidState,
    InvalidValue,
    LockTimeout,
    NotFound,
    OperationTimeout,
    QemuError,
    RequestError,
    VmkitError,
)

TYPE_CHECKING = False  # no typing at run time: `vmkit list` would pay ~3 ms for it
if TYPE_CHECKING:
    from typing import Any

    from vmkit.client.remote import connect, connect_async
    from vmkit.host import VM, Host
    from vmkit.model.state import VmState
    from vmkit.model.views import ExecResult, VmStatus

_LAZY = {"Host": "vmkit.host", "VM": "vmkit.host", "VmStatus": "vmkit.model.views",
         "ExecResult": "vmkit.model.views", "VmState": "vmkit.model.state",
         "connect": "vmkit.client.remote", "connect_async": "vmkit.client.remote"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmkit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "VM", "AdmissionRefused", "AgentError", "AlreadyExists", "ExecResult", "Host", "HostError",
    "ImageBuildError", "InvalidState", "InvalidValue", "LockTimeout", "NotFound",
    "OperationTimeout", "QemuError", "RequestError", "VmState", "VmStatus", "VmkitError",
    "connect", "connect_async",
]
