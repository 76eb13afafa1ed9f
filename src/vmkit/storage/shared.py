"""Shared storage: a folder every host of a group sees at the same path (NFS, a cluster file
system), where VMs created with `--shared DIR` keep their folders, so a move between those
hosts sends only memory.

    DIR/<vm>/                         the VM's folder (vm.json, disks/, snapshots/, boot/)
    DIR/.images/<image>-<sha256>.qcow2  an image's root disk, copied once per pool: a VM's first
                                      layer backs onto it, not onto one host's image store
    DIR/<vm>/.move-<nonce>            written by a move's source: the destination reads it to
                                      prove it sees the same storage, not a same-named folder

Each host keeps its own registration and runtime in VMKIT_HOME/vms/<vm> (storage/layout.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from pathlib import Path

from vmkit.errors import InvalidValue, MoveRefused
from vmkit.storage.layout import check_shared_folder, file_lock

IMAGES = ".images"
NONCE_PREFIX = ".move-"
_NONCE_BYTES = 64


def check_pool(path: str | Path) -> Path:
    """An existing directory given by absolute path (the same on every host)."""
    text = str(path)
    if not text.startswith("/"):
        raise InvalidValue(f"invalid shared storage {text!r}: not an absolute path",
                           hint="give the folder every host sees at the same path, e.g. "
                                "/mnt/vmkit-shared")
    pool = Path(check_shared_folder(os.path.normpath(text)))
    try:
        info = os.stat(pool, follow_symlinks=False)
    except FileNotFoundError:
        raise InvalidValue(f"invalid shared storage {text!r}: no such folder",
                           hint="create it (mount the shared file system there) first") from None
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidValue(f"invalid shared storage {text!r}: not a folder (a link or a file)",
                           hint="name the folder itself, not a link to it")
    if os.geteuid() == 0 and info.st_mode & 0o001 == 0:
        os.chmod(pool, stat.S_IMODE(info.st_mode) | 0o711)  # each VM's uid enters its folder
    return pool


def pool_base(pool: Path, image: str, sha256: str, source: Path) -> Path:
    """The image's root disk in the pool (copied there once, under the pool's lock), the base
    a shared VM's first layer backs onto: the same path on every host."""
    folder = pool / IMAGES
    target = folder / f"{image}-{sha256}.qcow2"
    with file_lock(folder / ".lock", timeout=600, what=f"the shared storage {pool}"):
        if target.is_file():
            return target
        folder.mkdir(mode=0o755, exist_ok=True)
        partial = folder / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            shutil.copyfile(source, partial)
            os.chmod(partial, 0o644)
            os.rename(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return target


def write_nonce(folder: Path) -> str:
    """A fresh secret in the VM's shared folder (root's, 0600); returns it."""
    nonce = secrets.token_hex(32)
    path = folder / f"{NONCE_PREFIX}{nonce[:16]}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, nonce.encode())
    finally:
        os.close(fd)
    return nonce


def remove_nonce(folder: Path, nonce: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(folder / f"{NONCE_PREFIX}{nonce[:16]}")


def sees(folder: str, nonce: str) -> str | None:
    """Why this host does not see the folder the source wrote `nonce` into (None: it does)."""
    try:
        check_shared_folder(folder)
    except InvalidValue as exc:
        return exc.message
    if len(nonce) != 64 or not all(c in "0123456789abcdef" for c in nonce):
        return "the move's nonce is malformed"
    try:
        fd = os.open(Path(folder) / f"{NONCE_PREFIX}{nonce[:16]}",
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return f"this host does not see the VM's folder {folder} (no shared storage there)"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"{folder} holds no regular nonce file"
        seen = os.read(fd, _NONCE_BYTES + 1).decode(errors="replace")
    finally:
        os.close(fd)
    if not secrets.compare_digest(seen, nonce):
        return f"{folder} here is not the source's folder (a different file system at that path)"
    return None


def require_root_owned(folder: str) -> None:
    """The folder and the pool that holds it are root's and nobody else may write them (as
    VMKIT_HOME is): a user who could plant a folder there could have root run it as a VM."""
    if os.geteuid() != 0:
        return
    for path in (Path(folder), Path(folder).parent):
        info = os.stat(path, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
            raise MoveRefused(f"{path} is not a folder only root may write: refusing to run "
                              "a VM from it", hint="shared storage must be root's (no "
                                                   "root_squash), mode 0755 or tighter")


def require_sees(folder: str, nonce: str) -> None:
    why = sees(folder, nonce)
    if why is not None:
        raise MoveRefused(why, hint="use --storage copy, or mount the shared storage at the "
                                    "same path on both hosts")
