"""Shared storage: a folder every host of a group sees at the same path (NFS, a cluster file
system), where VMs created with `--shared DIR` keep their folders, so a move between those
hosts sends only memory.

    DIR/<vm>/                         the VM's folder (vm.json, disks/, snapshots/, boot/)
    DIR/.images/<image>-<sha256>.qcow2  an image's root disk, copied once per pool: a VM's first
                                      layer backs onto it, not onto one host's image store
    DIR/<vm>/.move-<nonce>            written by a move's source: the destination reads it to
                                      prove it sees the same storage, not a same-named folder
    DIR/.hosts/<key>.json             each host's VM uid range: no two may overlap

Each host keeps its own registration and runtime in VMKIT_HOME/vms/<vm> (storage/layout.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
from pathlib import Path

from vmkit.errors import InvalidValue, MoveRefused
from vmkit.isolation import uids
from vmkit.storage.layout import check_shared_folder, file_lock, write_json_atomic

IMAGES = ".images"
HOSTS = ".hosts"
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
    why = untrusted_part(pool)
    if why is not None:
        raise InvalidValue(f"invalid shared storage {text!r}: {why}",
                           hint="shared storage must be root's (no root_squash), mode 0755 "
                                "or tighter, reached without links")
    if os.geteuid() == 0 and info.st_mode & 0o001 == 0:
        os.chmod(pool, stat.S_IMODE(info.st_mode) | 0o711)  # each VM's uid enters its folder
    return pool


def _pool_folder(pool: Path, name: str) -> Path:
    """POOL/NAME, one of vmkit's own folders there: made root's 0755, and refused when
    anyone else could change it."""
    folder = pool / name
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o755)
    why = untrusted_part(folder)
    if why is not None:
        raise InvalidValue(f"invalid shared storage {pool}: {why}",
                           hint=f"make {folder} root's, mode 0755")
    return folder


def pool_base(pool: Path, image: str, sha256: str, source: Path) -> Path:
    """The image's root disk in the pool (copied there once, under the pool's lock), the base
    a shared VM's first layer backs onto: the same path on every host."""
    folder = _pool_folder(pool, IMAGES)
    target = folder / f"{image}-{sha256}.qcow2"
    with file_lock(folder / ".lock", timeout=600, what=f"the shared storage {pool}"):
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(target)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise InvalidValue(f"invalid shared storage {pool}: {target} is not a file of "
                                   "vmkit's", hint=f"remove {target}")
            return target
        partial = folder / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            shutil.copyfile(source, partial)
            os.chmod(partial, 0o644)
            os.rename(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return target


def _host_key() -> str:
    """This host among those sharing a pool: its machine id (else its name) and its uid
    registry (two vmkit hosts on one machine have their own)."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    seed = f"{machine or socket.gethostname()}\0{uids.registry_dir()}"
    return hashlib.sha256(seed.encode()).hexdigest()[:16]


def claim_uid_range(pool: Path) -> None:
    """Record this host's VM uid range in the pool (POOL/.hosts/KEY.json), refusing one that
    overlaps another host's: on shared storage a VM of one host must not own what a VM of
    another could open (uids are plain numbers on a shared file system)."""
    if os.geteuid() != 0:
        return
    here = uids.configured_range()
    folder = _pool_folder(pool, HOSTS)
    me = _host_key()
    with file_lock(folder / ".lock", timeout=60, what=f"the shared storage {pool}"):
        for entry in sorted(folder.glob("*.json")):
            if entry.stem == me:
                continue
            try:
                other = json.loads(entry.read_text())
                base, count = int(other["base"]), int(other["count"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if here.overlaps(base, count):
                raise InvalidValue(
                    f"this host's VM uids ({here.base}+{here.count}) overlap those of host "
                    f"{other.get('host', entry.stem)!s:.64} ({base}+{count}) on the shared "
                    f"storage {pool}: one host's VM could open another's files",
                    hint=f"give each host its own VMKIT_UID_RANGE=BASE:COUNT, or remove "
                         f"{entry} if that host is gone")
        write_json_atomic(folder / f"{me}.json", {
            "base": here.base, "count": here.count, "host": socket.gethostname()})


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


def untrusted_part(path: str | Path) -> str | None:
    """Why `path` is not in root's hands (None: it is): a link anywhere on it, or a folder
    on the way that is not root's or that others may write (a sticky one, like /tmp, is
    fine: nobody can replace what root put there). A user who could swap a folder on that
    path could have root run a VM (or write files) of theirs."""
    text = str(path)
    if os.path.realpath(text) != text:
        return f"{text} goes through a link ({os.path.realpath(text)})"
    if os.geteuid() != 0:
        return None
    current = Path(text)
    for folder in (current, *current.parents):
        try:
            info = os.stat(folder, follow_symlinks=False)
        except OSError as exc:
            return f"{folder}: {exc.strerror}"
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or \
                (info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX):
            return f"{folder} is not a folder only root may change"
    return None


def require_root_owned(folder: str) -> None:
    why = untrusted_part(folder)
    if why is not None:
        raise MoveRefused(f"refusing to run a VM from {folder}: {why}",
                          hint="shared storage must be root's (no root_squash), mode 0755 or "
                               "tighter, reached without links")


def check_chain_bottom(folder: str, backing_file: str | None) -> None:
    """A shared VM's first layer stands on its pool's image copy (or on nothing): never on a
    file of the host that registers it (another VM's layer, a host file)."""
    images = str(Path(folder).parent / IMAGES) + "/"
    if backing_file is not None and (not backing_file.startswith(images)
                                     or "/" in backing_file[len(images):]
                                     or os.path.normpath(backing_file) != backing_file):
        raise MoveRefused(f"the VM in {folder} stands on {backing_file}, not on an image of "
                          f"its shared storage ({images}); refused")


def require_sees(folder: str, nonce: str) -> None:
    why = sees(folder, nonce)
    if why is not None:
        raise MoveRefused(why, hint="use --storage copy, or mount the shared storage at the "
                                    "same path on both hosts")
