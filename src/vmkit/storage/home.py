"""Where VMKIT_HOME is (no other import: the remote client and the fast CLI path use it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("VMKIT_HOME")
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/vmkit")
    return Path.home() / ".local/share/vmkit"
