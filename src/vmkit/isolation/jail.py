"""The jailer model: when vmkit runs as root, each VM's QEMU runs as the unprivileged `vmkit`
user, joins its cgroup before exec, and is started with QEMU's seccomp sandbox denying obsolete
system calls, privilege elevation, spawning processes and resource control.

Privileges are dropped in the child right before exec (not with QEMU's -runas: that conflicts
with the full sandbox, measured in shared/DESIGN.md). The VM folder is handed to that user; the
folder stays 0700, so other users and other VMs' QEMUs of other owners cannot read it.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterable
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


def child_setup(join_cgroup: Callable[[], None] | None,
                owner: RunAs | None) -> Callable[[], None] | None:
    """What the child runs before exec: join the cgroup (needs root), then drop to the user."""
    if join_cgroup is None and owner is None:
        return None

    def setup() -> None:
        if join_cgroup is not None:
            join_cgroup()
        if owner is not None:
            os.setgroups([])
            os.setgid(owner.gid)
            os.setuid(owner.uid)

    return setup
