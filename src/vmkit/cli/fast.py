"""`vmkit list` without the full CLI: no typer, click or httpx, rich only for a table it cannot
print plainly (vmkit.cli.render), and through a daemon neither pydantic nor the engine.

`run(argv)` answers `[--lock-timeout SECONDS] list [--format table|json]` and returns the exit
code, or returns None to hand argv to the full CLI (vmkit.cli.commands): any other command or
option, --help, --remote or VMKIT_REMOTE, and any answer of the daemon other than a plain
200 with the statuses this version sends. It picks where to run as the full CLI does: this
host's daemon when one serves VMKIT_HOME (unless VMKIT_NO_DAEMON), else the engine in this
process. Output and errors are the full CLI's (the listing is rendered by the same
render.vm_list; tests/unit/test_cli_imports.py compares the two paths).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator

from vmkit.cli import render
from vmkit.model.state import VmState

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing, pathlib and socket cost a listing ~10 ms: none at run time
    from typing import Any

#: the keys of VmStatus.model_dump(mode="json") and of the models inside it (a unit test keeps
#: this true). A daemon's answer of another shape (another vmkit version) goes through the
#: full client, which validates it.
_FORWARD = {"proto": None, "address": None, "host_port": None, "guest_port": None}
_NIC = {"network": None, "mac": None, "address": None, "forwards": [_FORWARD],
        "restricted": None}
STATUS_SHAPE: dict[str, Any] = {
    "name": None, "state": None, "cpus": None, "memory": None, "disk": None, "image": None,
    "uuid": None, "mac": None, "pid": None, "uptime": None, "accel": None,
    "accel_reason": None, "isolation_note": None, "machine": None, "cpu_model": None,
    "folder": None, "disk_mode": None, "firmware": None, "boot": None, "media": None,
    "display": None, "vnc_socket": None, "qemu_status": None, "max_cpus": None,
    "max_memory": None, "guest": None, "hostname": None, "ssh": None, "broken": None,
    "last_exit": {"at": None, "reason": None, "status": None, "description": None,
                  "log_tail": None, "run": None},
    "limits": {"cpu_weight": None, "cpu_limit": None, "disk_iops": None, "disk_bps": None,
               "pids": None},
    "usage": {"cpu_seconds": None, "cpu_percent_avg": None, "rss": None,
              "cgroup_memory": None, "vcpus": None, "memory_plugged": None,
              "memory_actual": None, "disk_read": None, "disk_written": None,
              "disk_read_ops": None, "disk_write_ops": None},
    "nics": [_NIC],
    "disks": [{"name": None, "size": None}],
    "restart_policy": {"mode": None, "max_restarts": None, "autostart": None},
    "restarts": None,
}
_STATES = frozenset(state.value for state in VmState)


def run(argv: list[str]) -> int | None:
    """The exit code of `vmkit list`, or None: the full CLI must handle argv."""
    parsed = _parse(argv)
    if parsed is None or "VMKIT_REMOTE" in os.environ:
        return None
    lock_timeout, as_json = parsed
    if not os.environ.get("VMKIT_NO_DAEMON"):
        from vmkit.storage.home import local_daemon_socket

        socket_path = local_daemon_socket()
        if socket_path is not None:
            statuses = _from_daemon(socket_path)
            if statuses is None:
                return None
            render.vm_list(statuses, as_json=as_json)
            return 0
    from vmkit.storage import statuscache
    from vmkit.storage.home import home_path

    remembered = statuscache.read_fresh(home_path())
    if remembered is not None and all(_shaped(s, STATUS_SHAPE) and _listable(s)
                                      for s in remembered):
        render.vm_list(remembered, as_json=as_json)  # nothing moved since the engine listed
        return 0
    with imports_kept():
        from vmkit.host import LOCK_TIMEOUT, Host
    host = Host(lock_timeout=LOCK_TIMEOUT if lock_timeout is None else lock_timeout)
    render.vm_list([s.model_dump(mode="json") for s in host.statuses(include_broken=True)],
                   as_json=as_json)
    return 0


@contextlib.contextmanager
def imports_kept() -> Iterator[None]:
    """Import without the garbage collector, then freeze what was made: modules and classes
    live as long as the process, so scanning them (during the import, in later collections
    and at exit) finds nothing. It saves ~40 ms of a command that imports the engine."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _parse(argv: list[str]) -> tuple[float | None, bool] | None:
    """(--lock-timeout, --format json) of `[--lock-timeout S] list [--format F]`; None for
    anything else, the full CLI's to parse (and to refuse with its own message)."""
    try:
        command = argv.index("list")
    except ValueError:
        return None
    before = _options(argv[:command], "--lock-timeout")
    after = _options(argv[command + 1:], "--format")
    if before is None or after is None or after.get("--format", "table") not in ("table", "json"):
        return None
    lock_timeout = None
    if "--lock-timeout" in before:
        try:
            lock_timeout = float(before["--lock-timeout"])  # what click's FLOAT does
        except ValueError:
            return None
    return lock_timeout, after.get("--format") == "json"


def _options(args: list[str], name: str) -> dict[str, str] | None:
    """{name: value} from `name VALUE` or `name=VALUE` given once at most; None otherwise."""
    if not args:
        return {}
    if len(args) == 2 and args[0] == name:
        return {name: args[1]}
    if len(args) == 1 and args[0].startswith(f"{name}="):
        return {name: args[0][len(name) + 1:]}
    return None


def _from_daemon(socket_path: str) -> list[dict[str, Any]] | None:
    """GET /1.0/vms on the daemon's socket: the statuses, or None when the answer is anything
    but a 200 with the expected shape (the full client then asks again and reports)."""
    import socket

    from vmkit.client.remote import CONNECT_TIMEOUT, REQUEST_TIMEOUT, timed_out

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(socket_path)
        sock.settimeout(REQUEST_TIMEOUT)
        sock.sendall(b"GET /1.0/vms HTTP/1.1\r\nHost: vmkit\r\nUser-Agent: vmkit-client\r\n"
                     b"Accept: */*\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except TimeoutError as exc:
        raise timed_out(f"unix://{socket_path}", exc) from exc
    except OSError:
        return None
    finally:
        sock.close()
    body = _ok_body(b"".join(chunks))
    if body is None:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    statuses = answer.get("metadata") if isinstance(answer, dict) else None
    if not isinstance(statuses, list) or not all(
            _shaped(s, STATUS_SHAPE) and _listable(s) for s in statuses):
        return None
    return statuses


def _ok_body(response: bytes) -> bytes | None:
    """The body of an HTTP/1.1 200 answer with a Content-Length, None for any other."""
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    if not status.startswith(b"HTTP/1.1 200 "):
        return None
    headers = dict(line.lower().partition(b":")[::2] for line in lines)
    length = headers.get(b"content-length", b"").strip()
    if b"transfer-encoding" in headers or not length.isdigit() or int(length) != len(body):
        return None
    return body


def _shaped(value: Any, shape: dict[str, Any]) -> bool:
    """`value` is a dict with exactly the keys of `shape`, nested ones included (a nested
    model may be null, a list of them empty)."""
    if not isinstance(value, dict) or value.keys() != shape.keys():
        return False
    for key, inner in shape.items():
        item = value[key]
        if isinstance(inner, dict) and item is not None and not _shaped(item, inner):
            return False
        if isinstance(inner, list) and not (isinstance(item, list) and all(
                _shaped(element, inner[0]) for element in item)):
            return False
    return True


def _listable(status: dict[str, Any]) -> bool:
    """The fields `vmkit list` shows have the types VmStatus gives them."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return (isinstance(status["name"], str) and status["state"] in _STATES
            and whole(status["cpus"]) and whole(status["memory"]) and whole(status["disk"])
            and (status["uptime"] is None or isinstance(status["uptime"], float))
            and (status["pid"] is None or whole(status["pid"]))
            and (status["accel"] is None or isinstance(status["accel"], str)))
