"""Where VMKIT_HOME is, and whether a daemon serves it (stdlib only: the remote client and
the fast CLI path use it)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("VMKIT_HOME")
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/vmkit")
    return Path.home() / ".local/share/vmkit"


def local_daemon_socket(home: Path | None = None) -> str | None:
    """The socket of the daemon serving this VMKIT_HOME, when one runs."""
    info = (home or default_home()) / "daemon" / "daemon.json"
    try:
        data = json.loads(info.read_text())
        pid, path = int(data["pid"]), str(data["socket"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return None
    finally:
        probe.close()
    return path
