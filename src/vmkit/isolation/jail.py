"""The jailer model: when vmkit runs as root, each VM's QEMU runs under a uid/gid of its own
(isolation/uids.py), joins its cgroup before exec, and is started with QEMU's seccomp sandbox
denying obsolete system calls, privilege elevation, spawning processes and resource control.

Privileges are dropped by exec'ing QEMU through util-linux `setpriv` (not with QEMU's -runas:
that conflicts with the full sandbox, measured in shared/DESIGN.md); the cgroup is joined just
before that by a constant shell step, as root (no preexec_fn: unsafe in a threaded process).

Ownership inside a VM folder (`prepare_folder`) follows one rule: the VM's uid may write only
what QEMU must write — its disk layers (file contents, not the folders they sit in) and run/
(its sockets and pidfile). Everything the privileged side trusts is root's: the folder itself
(root:VMGID 0710, so no other VM's uid can even enter it), vm.json, state.json,
snapshots.json, journals, logs/, snapshots/ (memory states: QEMU reads and writes them through
descriptors root opens), boot/. Nothing is changed recursively in a folder the VM can write.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import HostError
from vmkit.isolation import acl, uids
from vmkit.qemu import argv as qemu_argv

RUN_USER = "vmkit"
SANDBOX = qemu_argv.SANDBOX


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int


def run_as() -> RunAs | None:
    """The shared unprivileged account for work on untrusted files that belong to no VM yet
    (inspecting an import), or None when vmkit is not root or the user is missing."""
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


def vm_owner(vm_uuid: str, folder: Path) -> RunAs | None:
    """The VM's own uid/gid (claimed on first use, freed by `release_owner`); None when vmkit is
    not root (QEMU then runs as the caller, who owns everything anyway)."""
    if os.geteuid() != 0:
        return None
    uid = uids.claim(vm_uuid, folder)
    return RunAs(uid, uid)


def release_owner(vm_uuid: str) -> None:
    if os.geteuid() == 0:
        uids.release(vm_uuid)


# (relative path, mode, owned by the VM) for the folders of a VM folder; files are set below
_FOLDERS = (("boot", 0o755, False), ("logs", 0o755, False), ("snapshots", 0o700, False),
            ("disks", 0o750, False), ("volumes", 0o750, False), ("run", 0o700, True))
_RUNTIME_FOLDERS = frozenset({"logs", "run"})


def prepare_folder(owner: RunAs | None, folder: Path, runtime: Path | None = None) -> None:
    """Set the ownership model of a VM folder before QEMU starts (idempotent, never recursive
    into anything the VM can write). The disk layers (disks/, a folder of root's the VM cannot
    add to) alone belong to the VM's uid. `runtime`: where run/ and logs/ are when not in the
    folder (a VM on shared storage): root:VMGID 0710 like the folder."""
    if owner is None:
        for path in {folder, runtime or folder}:
            os.chmod(path, 0o700)
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    run_fd = fd if runtime is None else \
        os.open(runtime, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for root_fd in {fd, run_fd}:
            os.fchown(root_fd, 0, owner.gid)
            os.fchmod(root_fd, 0o710)
        for name, mode, vm_owned in _FOLDERS:
            where = run_fd if name in _RUNTIME_FOLDERS else fd
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=where)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=where)
            try:
                if vm_owned:
                    os.fchown(sub, owner.uid, owner.gid)
                else:
                    os.fchown(sub, 0, owner.gid if name in ("disks", "volumes") else 0)
                os.fchmod(sub, mode)
            finally:
                os.close(sub)
        disks = os.open("disks", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            names = os.listdir(disks)
            layers = [n for n in names if n.endswith(".qcow2")]
        finally:
            os.close(disks)
        for layer in layers:
            _own_file(fd, f"disks/{layer}", owner)
        for volume in _qcow2_files(fd, "volumes"):  # extra disks: QEMU writes them too
            _own_file(fd, f"volumes/{volume}", owner)
        if "nvram.fd" in names:  # a UEFI VM's variables: QEMU writes them
            _own_file(fd, "disks/nvram.fd", owner)
        # QEMU appends the serial log itself: a file of its own in a folder of root's
        _own_file(run_fd, "logs/serial.log", owner, create=True)
    finally:
        if run_fd != fd:
            os.close(run_fd)
        os.close(fd)


def _qcow2_files(folder_fd: int, name: str) -> list[str]:
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder_fd)
    try:
        return [n for n in os.listdir(sub) if n.endswith(".qcow2")]
    finally:
        os.close(sub)


def disown(uid: int, folder: Path) -> None:
    """Take back from `uid` what it owns in a VM folder on shared storage (the folder's group,
    its layers, volumes, variables and TPM state: root's again) before this host frees that
    uid: another VM of this host may get it next, and the folder lives on elsewhere. What
    another host's uid owns is left alone. Idempotent; never follows a link."""
    if os.geteuid() != 0:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # gone, or out of reach: nothing of this host's to take
    try:
        if os.fstat(fd).st_gid == uid:
            os.fchown(fd, 0, 0)
        for sub in ("disks", "volumes", "tpm"):
            with contextlib.suppress(OSError):
                sub_fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    _disown_in(sub_fd, uid)
                finally:
                    os.close(sub_fd)
    finally:
        os.close(fd)


def _disown_in(folder_fd: int, uid: int) -> None:
    info = os.fstat(folder_fd)
    if info.st_uid == uid or info.st_gid == uid:
        os.fchown(folder_fd, 0, 0)
    for name in os.listdir(folder_fd):
        with contextlib.suppress(OSError):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=folder_fd)
            try:
                info = os.fstat(fd)
                if stat.S_ISREG(info.st_mode) and (info.st_uid == uid or info.st_gid == uid):
                    os.fchown(fd, 0, 0)
            finally:
                os.close(fd)


def prepare_tpm(owner: RunAs | None, folder: Path, runtime: Path | None = None) -> None:
    """tpm/ (swtpm's state, written by the VM's uid like its disks) and swtpm's log."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir("tpm", 0o700, dir_fd=fd)
        sub = os.open("tpm", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            if owner is not None:
                os.fchown(sub, owner.uid, owner.gid)
            os.fchmod(sub, 0o700)
        finally:
            os.close(sub)
        if owner is not None:
            run_fd = os.open(runtime or folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                _own_file(run_fd, "logs/swtpm.log", owner, create=True)
            finally:
                os.close(run_fd)
            # imported with a bundle: root's until handed over; anything odd the VM's uid may
            # have left there is swtpm's to reject, never followed here
            with contextlib.suppress(OSError, HostError):
                _own_file(fd, "tpm/tpm2-00.permall", owner)
    finally:
        os.close(fd)


def give_file(owner: RunAs | None, folder: Path, relative: str) -> None:
    """Hand one new disk layer of the folder to the VM's uid (QEMU opens it next)."""
    if owner is None:
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _own_file(fd, relative, owner)
    finally:
        os.close(fd)


def _own_file(folder_fd: int, relative: str, owner: RunAs, *, create: bool = False) -> None:
    """Give one regular file inside the folder to the VM (refusing symlinks and paths out)."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or len(parts) != 2:
        raise HostError(f"refusing to hand {relative!r} to a VM: not a file of its folder")
    directory = os.open(parts[0], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                        dir_fd=folder_fd)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(parts[1], flags, 0o600, dir_fd=directory)
        except FileNotFoundError:
            return
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise HostError(f"refusing to hand {relative!r} to a VM: not a plain file")
            os.fchown(fd, owner.uid, owner.gid)
            if stat.S_IMODE(info.st_mode) & 0o707 != 0o600:
                os.fchmod(fd, 0o600)  # (group bits are left: an ACL mask for linked clones)
        finally:
            os.close(fd)
    finally:
        os.close(directory)


def share_layers(owner: RunAs | None, layers: Iterable[Path]) -> None:
    """Let a linked clone's QEMU read the layers of other VMs its disk leans on: read on each
    layer, traverse on the folders that hold it (POSIX ACL entries for the clone's uid only)."""
    if owner is None:
        return
    for layer in layers:
        acl.grant(str(layer.parent.parent), owner.uid, acl.EXECUTE)
        acl.grant(str(layer.parent), owner.uid, acl.EXECUTE)
        acl.grant(str(layer), owner.uid, acl.READ)


def unshare_layers(uid: int, layers: Iterable[Path]) -> None:
    for layer in layers:
        for path in (layer, layer.parent, layer.parent.parent):
            acl.revoke(str(path), uid)


_JOIN_SCRIPT = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; ' \
               'n=$((n-1)); done; exec "$@"'


def drop_to(owner: RunAs | None, argv: list[str], *,
            join: Iterable[Path] = ()) -> list[str]:
    """QEMU's argv, preceded by the exec chain that jails it: a constant shell step joins the
    cgroup (`join`: cgroup.procs files; the shell then execs, so no process is added), then
    setpriv drops to the VM's uid with no groups, no capabilities and no_new_privs. QEMU's
    parent, vmkit's exit-status waiter, stays root and outside the cgroup, so a compromised
    QEMU can neither ptrace nor signal it."""
    procs = [str(p) for p in join]
    chain: list[str] = []
    if procs:
        chain = ["/bin/sh", "-c", _JOIN_SCRIPT, "vmkit-join", str(len(procs)), *procs]
    if owner is not None:
        chain += ["setpriv", f"--reuid={owner.uid}", f"--regid={owner.gid}", "--clear-groups",
                  "--no-new-privs", "--inh-caps=-all", "--"]
    return [*chain, *argv]
