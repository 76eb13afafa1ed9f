"""Where VMKIT_HOME is, and whether a daemon serves it (stdlib only: the remote client and
the fast CLI path use it; the fast path's own calls need neither pathlib nor socket, ~5 ms of
a `vmkit list`)."""

from __future__ import annotations

import json
import os

from vmkit.errors import InvalidValue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def home_path() -> str:
    """VMKIT_HOME as an absolute path (default_home's, as a string; not normalised)."""
    env = os.environ.get("VMKIT_HOME")
    if env:
        path = os.path.expanduser(env)
        if path.startswith("~"):
            raise InvalidValue(f"cannot expand VMKIT_HOME={env!r}: no such user's home",
                               hint="set VMKIT_HOME to an absolute path")
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    if os.geteuid() == 0:
        return "/var/lib/vmkit"
    home = os.path.expanduser("~")
    if not os.path.isabs(home):
        raise InvalidValue("cannot tell where vmkit's folder is: this user has no home "
                           "directory", hint="set VMKIT_HOME to an absolute path")
    return os.path.join(home, ".local/share/vmkit")


def default_home() -> Path:
    from pathlib import Path

    return Path(home_path())


def local_daemon_socket(home: Path | str | None = None) -> str | None:
    """The socket of the daemon serving this VMKIT_HOME, when one runs."""
    info = f"{home or home_path()}/daemon/daemon.json"
    try:
        with open(info) as handle:
            data = json.load(handle)
        pid, path = int(data["pid"]), str(data["socket"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return None
    finally:
        probe.close()
    return path
