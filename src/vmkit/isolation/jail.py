"""The jailer model: when vmkit runs as root, each VM's QEMU runs as the unprivileged `vmkit`
user, joins its cgroup before exec, and is started with QEMU's seccomp sandbox denying obsolete
system calls, privilege elevation, spawning processes and resource control.

Privileges are dropped by exec'ing QEMU through util-linux `setpriv` (not with QEMU's -runas:
that conflicts with the full sandbox, measured in shared/DESIGN.md); the cgroup is joined before
that, as root. The VM folder is handed to that user and stays 0700.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmkit.qemu import argv as qemu_argv

RUN_USER = "vmkit"
SANDBOX = qemu_argv.SANDBOX


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int


def run_as() -> RunAs | None:
    """The account QEMU runs as, or None when vmkit is not root or the user is missing."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(RUN_USER)
    except KeyError:
        return None
    return RunAs(entry.pw_uid, entry.pw_gid)


def why_not() -> str:
    if os.geteuid() != 0:
        return "vmkit is not root: QEMU runs as the calling user"
    return f"user {RUN_USER!r} is missing (make run creates it): QEMU would run as root"


def hand_over(owner: RunAs | None, paths: Iterable[Path]) -> None:
    """Give files and folders (recursively) to the QEMU user; a no-op without one."""
    if owner is None:
        return
    for path in paths:
        if not path.exists():
            continue
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), owner.uid, owner.gid,
                             follow_symlinks=False)


def drop_to(owner: RunAs | None, argv: list[str]) -> list[str]:
    """QEMU's argv, exec'd through setpriv as the unprivileged user (no extra process: setpriv
    execs QEMU). QEMU's parent, vmkit's exit-status waiter, stays root, so a compromised QEMU
    can neither ptrace nor signal it."""
    if owner is None:
        return argv
    return ["setpriv", f"--reuid={owner.uid}", f"--regid={owner.gid}", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--", *argv]
