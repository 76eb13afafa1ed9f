"""One error hierarchy for vmkit; exit codes are mapped here and nowhere else.

    VmkitError (exit 1: the operation failed for a reason outside the request)
    ├── RequestError (exit 2: the request was wrong; nothing changed)
    │   ├── InvalidValue        a name, size or option that cannot be accepted
    │   ├── NotFound            unknown VM or image
    │   ├── AlreadyExists       a VM or image of that name exists
    │   ├── InvalidState        the operation is not allowed in the VM's current state
    │   ├── AdmissionRefused    starting would exceed the host's partitioning policy
    │   ├── MoveRefused         a move's pre-flight refused (every reason named)
    │   ├── TooLarge            an upload larger than the host can take
    │   └── AuthError           the host service refused the caller's credentials
    ├── LockTimeout             another vmkit process holds the VM's lock
    ├── QemuError               QEMU failed to start, died, or refused a command
    ├── AgentError              the guest agent did not answer or failed
    │   └── AgentRefused        it answered: it could not do that command (e.g. start a program)
    ├── OperationTimeout        a wait ran out of time
    ├── HostError               the host lacks something vmkit needs (QEMU, disk, ...)
    ├── Cancelled               an operation was cancelled at a user's request
    └── ImageBuildError         building a guest image failed

The SDK raises these classes; the CLI turns them into exit codes via `exit_code_for`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class VmkitError(Exception):
    """Root of every error vmkit raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, detail: str | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail
        self.field = field  # the request field that was wrong (a form shows it there)

    def __str__(self) -> str:
        parts = [self.message]
        if self.hint:
            parts.append(f"hint: {self.hint}")
        if self.detail:
            parts.append(self.detail)
        return "\n".join(parts)


class RequestError(VmkitError):
    """The request was wrong; vmkit changed nothing."""

    exit_code = 2


class InvalidValue(RequestError):
    pass


class NotFound(RequestError):
    pass


class AlreadyExists(RequestError):
    pass


class InvalidState(RequestError):
    pass


class AdmissionRefused(RequestError):
    pass


class LockTimeout(VmkitError):
    pass


class QemuError(VmkitError):
    pass


class AgentError(VmkitError):
    pass


class AgentRefused(AgentError):
    """The guest agent answered, with an error: it runs, but could not do the command (a
    program it could not start, a file it could not open)."""


class OperationTimeout(VmkitError):
    pass


class HostError(VmkitError):
    pass


class ImageBuildError(VmkitError):
    pass


class Cancelled(VmkitError):
    """An operation was cancelled at a user's request (between two of its steps)."""


class MoveRefused(RequestError):
    """A move's pre-flight found reasons it cannot happen (each is named; nothing changed)."""


class TooLarge(RequestError):
    """An upload larger than the host can take (HTTP 413)."""


class AuthError(RequestError):
    """The host service refused the caller: no or bad credentials (HTTP 401/403)."""


class Forbidden(AuthError):
    """Authenticated, but this request may not be made that way (e.g. no CSRF header)."""


class BrokenVm(VmkitError):
    """A VM folder whose metadata cannot be read: listed as broken, removable with --force."""


#: HTTP status of each error class in the host service's API (the most specific class wins):
#: 4xx = the request was wrong (CLI exit 2), 5xx = the operation failed (CLI exit 1).
HTTP_STATUS: dict[str, int] = {
    "InvalidValue": 400, "TooLarge": 413, "AuthError": 401, "Forbidden": 403, "NotFound": 404,
    "AlreadyExists": 409,
    "InvalidState": 409, "AdmissionRefused": 409, "MoveRefused": 409, "RequestError": 400,
    "LockTimeout": 503,
    "OperationTimeout": 504, "Cancelled": 500, "QemuError": 500, "AgentError": 502,
    "HostError": 500, "ImageBuildError": 500, "BrokenVm": 500, "VmkitError": 500,
}


def http_status_for(error: BaseException) -> int:
    """The HTTP status of an error raised by an operation (500 for anything unexpected)."""
    for cls in type(error).__mro__:
        if cls.__name__ in HTTP_STATUS:
            return HTTP_STATUS[cls.__name__]
    return 500


def error_class(name: str) -> type[VmkitError]:
    """The error class an API error names (VmkitError for a name this vmkit does not know)."""
    found = _CLASSES.get(name)
    return found if found is not None else VmkitError


def exit_code_for(error: BaseException) -> int:
    """The process exit code for an error: 2 for a wrong request, 1 for anything else."""
    if isinstance(error, VmkitError):
        return error.exit_code
    return 1


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Turn an OSError (disk full, permission denied, ...) into a HostError that says what
    vmkit was doing and which file failed."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise HostError(f"{what} failed: {exc.strerror or exc}{where}",
                        hint="free some space and retry" if exc.errno == 28 else None) from exc


_CLASSES: dict[str, type[VmkitError]] = {
    cls.__name__: cls for cls in (
        VmkitError, RequestError, InvalidValue, NotFound, AlreadyExists, InvalidState,
        AdmissionRefused, AuthError, TooLarge, MoveRefused, LockTimeout, QemuError, AgentError,
        AgentRefused, OperationTimeout, HostError, ImageBuildError, Cancelled, BrokenVm)}
