"""vmkit: virtual machines on QEMU, scriptable from Python.

    from vmkit import Host
    host = Host()
    vm = host.create("web", image="tiny", cpus=2, memory="512M")
    vm.start(wait=True); print(vm.exec(["uname", "-a"]).stdout); vm.stop()
"""

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
from vmkit.host import VM, Host, VmStatus
from vmkit.model.state import VmState
from vmkit.qemu.agent import ExecResult

__all__ = [
    "VM", "AdmissionRefused", "AgentError", "AlreadyExists", "ExecResult", "Host", "HostError",
    "ImageBuildError", "InvalidState", "InvalidValue", "LockTimeout", "NotFound",
    "OperationTimeout", "QemuError", "RequestError", "VmState", "VmStatus", "VmkitError",
]
