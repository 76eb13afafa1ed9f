"""Where VMKIT_HOME is, and whether a daemon serves it (stdlib only: the remote client and
the fast CLI path use it; the fast path's own calls need neither pathlib nor socket, ~5 ms of
a `vmkit list`)."""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def home_path() -> str:
    """VMKIT_HOME as an absolute path (default_home's, as a string)."""
    env = os.environ.get("VMKIT_HOME")
    if env:
        path = os.path.expanduser(env)
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    if os.geteuid() == 0:
        return "/var/lib/vmkit"
    return os.path.join(os.path.expanduser("~"), ".local/share/vmkit")


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
