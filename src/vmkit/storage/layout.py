"""Where everything lives under VMKIT_HOME, atomic metadata writes, and fcntl locks.

    $VMKIT_HOME/
      images/<image>/         image.json, vmlinuz, initrd.img, root.qcow2
      vms/<vm>/               vm.json, state.json, boot/, disks/, run/ (0700), logs/
      vms/<vm>/shared.json    instead of the above, for a VM on shared storage: where its
                              folder is (vm.json, disks/, snapshots/, boot/) and the generation
                              this host holds; the runtime (state.json, run/, logs/, journal)
                              stays here, one per host
      vms/.creating-<vm>-*    a create in progress (renamed into place when complete)
      vms/.deleting-<vm>-*    a delete in progress (removed by the next call)
      locks/                  vm-<name>.lock, host.lock
      cache/                  downloaded packages, accelerator probe
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vmkit.errors import BrokenVm, InvalidValue, LockTimeout, VmkitError
from vmkit.model.spec import NVRAM_FILE, VmConfig
from vmkit.qemu.argv import RunPaths

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class HomeLayout:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def policy_file(self) -> Path:
        return self.root / "policy.json"

    def ensure(self) -> None:
        for folder in (self.images, self.vms, self.locks, self.cache):
            folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # QEMU runs as an unprivileged user: it must reach images/ and its own VM folder
            # (VM folders themselves stay 0700, owned by that user)
            for folder in (self.root, self.images, self.vms):
                if folder.stat().st_mode & 0o755 != 0o755:
                    os.chmod(folder, folder.stat().st_mode | 0o755)

    def vm(self, name: str) -> VmFolder:
        """vms/NAME, or the shared folder its registration names (with vms/NAME as runtime)."""
        local = self.vms / name
        registration = read_registration(local)
        if registration is None:
            return VmFolder(local)
        return VmFolder(Path(registration.folder), runtime=local)

    def image(self, name: str) -> Path:
        return self.images / name


REGISTRATION_FILE = "shared.json"
_MAX_REGISTRATION = 4096


@dataclass(frozen=True)
class Registration:
    """A host's claim on a VM whose folder is on shared storage: the folder, and the generation
    this host holds (it may start the VM only while the folder's vm.json has that generation:
    a host the VM has moved away from holds an older one)."""

    folder: str
    generation: int
    uuid: str  # the VM's: a new VM that took the same folder name is not this one


def check_shared_folder(path: str) -> str:
    """An absolute, normalised path with no `..`: what a registration may name."""
    if not path.startswith("/") or os.path.normpath(path) != path or path == "/" \
            or any(ord(c) < 32 for c in path):
        raise InvalidValue(f"invalid shared folder {path!r}",
                           hint="an absolute path without '..', '.' or a trailing '/'")
    return path


def read_registration(local: Path) -> Registration | None:
    """vms/NAME/shared.json (None when the VM's folder is vms/NAME itself). Never follows a
    link; a damaged registration is BrokenVm."""
    try:
        fd = os.open(local / REGISTRATION_FILE,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise BrokenVm(f"VM {local.name!r} is broken: cannot open {REGISTRATION_FILE}: "
                       f"{exc.strerror}", hint=_BROKEN_HINT) from exc
    try:
        with os.fdopen(fd, "rb") as handle:
            regular = stat.S_ISREG(os.fstat(handle.fileno()).st_mode)
            raw = handle.read(_MAX_REGISTRATION + 1) if regular else b""
        data = json.loads(raw)
        folder, generation, vm_uuid = data["folder"], data["generation"], data["uuid"]
        if not isinstance(folder, str) or type(generation) is not int or generation < 0 \
                or not isinstance(vm_uuid, str) or not 0 < len(vm_uuid) <= 64:
            raise ValueError("a field has the wrong type")
        return Registration(check_shared_folder(folder), generation, vm_uuid)
    except (ValueError, KeyError, TypeError, VmkitError) as exc:
        raise BrokenVm(f"VM {local.name!r} is broken: {REGISTRATION_FILE} cannot be read "
                       f"({str(exc)[:200]})", hint=_BROKEN_HINT) from exc


def write_registration(local: Path, registration: Registration) -> None:
    write_json_atomic(local / REGISTRATION_FILE,
                      {"folder": check_shared_folder(registration.folder),
                       "generation": registration.generation, "uuid": registration.uuid})


@dataclass(frozen=True)
class VmFolder:
    """One VM's folder: everything the VM is, so it can be copied, backed up or moved.

    `runtime` is where what one host runs lives (state.json, run/, logs/, the journal, the
    exit status): the folder itself, except for a VM on shared storage, whose folder two hosts
    see during a move while each runs its own QEMU."""

    path: Path
    runtime: Path | None = None

    @property
    def shared(self) -> bool:
        return self.runtime is not None

    @property
    def runtime_root(self) -> Path:
        return self.runtime if self.runtime is not None else self.path

    @property
    def config_file(self) -> Path:
        return self.path / "vm.json"

    @property
    def state_file(self) -> Path:
        return self.runtime_root / "state.json"

    @property
    def run(self) -> Path:
        return self.runtime_root / "run"

    @property
    def logs(self) -> Path:
        return self.runtime_root / "logs"

    @property
    def disks(self) -> Path:
        return self.path / "disks"

    @property
    def boot(self) -> Path:
        return self.path / "boot"

    @property
    def qmp_socket(self) -> Path:
        return self.run / "qmp.sock"

    @property
    def serial_socket(self) -> Path:
        return self.run / "serial.sock"

    @property
    def agent_socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "qemu.pid"

    @property
    def exit_file(self) -> Path:
        """Written by the root waiter: in the folder of root's, never in the VM-writable run/."""
        return self.runtime_root / ".exit-status"

    @property
    def serial_log(self) -> Path:
        return self.logs / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.logs / "qemu.log"

    @property
    def seed_file(self) -> Path:
        """The cloud-init seed, written from vm.json at every start."""
        return self.run / "seed.iso"

    @property
    def vnc_socket(self) -> Path:
        return self.run / "vnc.sock"

    @property
    def tpm_socket(self) -> Path:
        return self.run / "swtpm.sock"

    @property
    def tpm_pidfile(self) -> Path:
        return self.run / "swtpm.pid"

    @property
    def tpm_state(self) -> Path:
        return self.path / "tpm"

    @property
    def nvram(self) -> Path:
        return self.path / NVRAM_FILE

    def run_paths(self, disk_file: str, kernel: str | None, initrd: str | None, *,
                  seed: bool = False, nvram: bool = False, vnc: bool = False,
                  tpm: bool = False) -> RunPaths:
        return RunPaths(
            folder=str(self.path),
            qmp_socket=str(self.qmp_socket),
            serial_socket=str(self.serial_socket),
            agent_socket=str(self.agent_socket),
            pidfile=str(self.pidfile),
            serial_log=str(self.serial_log),
            disk=str(self.path / disk_file),
            kernel=str(self.path / kernel) if kernel else None,
            initrd=str(self.path / initrd) if initrd else None,
            seed=str(self.seed_file) if seed else None,
            nvram=str(self.nvram) if nvram else None,
            vnc_socket=str(self.vnc_socket) if vnc else None,
            tpm_socket=str(self.tpm_socket) if tpm else None,
        )

    def config_run_paths(self, config: VmConfig, disk_file: str) -> RunPaths:
        """The files QEMU is told about for `config`, on the disk layer `disk_file`."""
        boot = config.boot
        return self.run_paths(disk_file, boot.kernel if boot else None,
                              boot.initrd if boot else None,
                              seed=config.cloud_init is not None,
                              nvram=config.hardware.firmware == "ovmf",
                              vnc=config.hardware.display == "std",
                              tpm=config.hardware.tpm)

    def make_dirs(self) -> None:
        for root in {self.path, self.runtime_root}:
            os.chmod(root, 0o700)
        for folder in (self.disks, self.boot, self.logs, self.path / "snapshots"):
            folder.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.run, 0o700)


def write_json_atomic(path: Path, data: Any, *, mode: int = 0o644) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of either."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
                       mode=mode)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file so a reader sees the old one or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


_MAX_METADATA = 4 << 20


def read_metadata(path: Path, model: type[M], owner: str) -> M:
    """A metadata file validated by its model; anything unreadable (bad JSON, a wrong field,
    an odd file) is BrokenVm naming the file and why, so one bad folder stays one bad VM.
    FileNotFoundError passes through (callers decide what absent means)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BrokenVm(f"{owner} is broken: cannot open {path.name}: {exc.strerror}",
                       hint=_BROKEN_HINT) from exc
    try:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise BrokenVm(f"{owner} is broken: {path.name} is not a regular file",
                               hint=_BROKEN_HINT)
            raw = handle.read(_MAX_METADATA + 1)
        if len(raw) > _MAX_METADATA:
            raise BrokenVm(f"{owner} is broken: {path.name} is over {_MAX_METADATA >> 20} MiB",
                           hint=_BROKEN_HINT)
        return model.model_validate(json.loads(raw))
    except BrokenVm:
        raise
    except ValidationError as exc:
        problems = exc.errors()
        where = ".".join(str(p) for p in problems[0]["loc"]) if problems else "?"
        why = problems[0]["msg"] if problems else str(exc)
        raise BrokenVm(f"{owner} is broken: {path.name} cannot be read (field {where}: "
                       f"{why[:200]})", hint=_BROKEN_HINT) from exc
    except (ValueError, TypeError, VmkitError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrokenVm(f"{owner} is broken: {path.name} cannot be read ({first[:200]})",
                       hint=_BROKEN_HINT) from exc


_BROKEN_HINT = "fix the file from a backup, or remove the VM: vmkit delete NAME --force"


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float, what: str,
              shared: bool = False) -> Iterator[None]:
    """Hold an fcntl lock on `path` (exclusive, or `shared` with other shared holders); wait up
    to `timeout` seconds, then LockTimeout. The wait polls from 1 ms, doubling up to 50 ms: a
    lock held for a moment (a monitor session handed from one thread to another) is taken
    within about the time it was held, a long one costs 20 tries a second."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    raise LockTimeout(
                        f"{what} is busy: another vmkit command holds its lock{holder} "
                        f"(waited {timeout:g}s)",
                        hint="wait for that command to finish, or raise --lock-timeout",
                    ) from None
                time.sleep(delay)
                delay = min(0.05, delay * 2)
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def lock_is_free(path: Path) -> bool:
    """True when nobody holds the lock (used before clearing leftovers of an interrupted call)."""
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
