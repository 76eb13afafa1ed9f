"""Detached QEMU processes: launch, adoption by pidfile checked against /proc, exit status.

QEMU runs in its own session so it outlives the CLI. Its parent is a few-line POSIX shell
"waiter" (not Python: ~1 MB) whose only job is to record QEMU's exit status in the VM folder,
because nobody else can learn how a detached process ended (signal vs exit code). The script is a
constant; QEMU's argv is passed as positional parameters, never interpolated into a string.
"""

from __future__ import annotations

import itertools
import os
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import OperationTimeout, QemuError

_WAITER_SCRIPT = 'f=$1; shift; "$@"; rc=$?; echo "$rc" > "$f.tmp"; mv -f "$f.tmp" "$f"'


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid plus what makes it unique over time: its start time in clock ticks since boot."""

    pid: int
    start_ticks: int


def waiter_argv(exit_file: Path, qemu_argv: list[str]) -> list[str]:
    return ["/bin/sh", "-c", _WAITER_SCRIPT, "vmkit-waiter", str(exit_file), *qemu_argv]


CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def spawn_detached(argv: list[str], log_file: Path, exit_file: Path, *,
                   pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start QEMU under the waiter in a new session, with a clean environment and no inherited
    file descriptors but `pass_fds` (taps); output goes to the QEMU log. No Python runs in the
    child (no preexec_fn: safe in a threaded process); `argv` carries its own exec chain."""
    exit_file.unlink(missing_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        try:
            return subprocess.Popen(
                waiter_argv(exit_file, argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True, umask=0o077, env=CLEAN_ENV, cwd="/",
                pass_fds=pass_fds,
            )
        except OSError as exc:
            raise QemuError(f"cannot start QEMU: {exc}") from exc


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat; None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); field 22 is at index 19. A zombie has exited already.
    if fields[0] == "Z":
        return None
    return int(fields[19])


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except (FileNotFoundError, ProcessLookupError):
        return []


def is_vm_qemu(argv: list[str], vm_uuid: str) -> bool:
    """argv is a QEMU (not its waiter, whose argv also carries QEMU's) for this VM's uuid."""
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    return any(a == "-uuid" and b == vm_uuid for a, b in itertools.pairwise(argv))


def is_alive(identity: ProcessIdentity, vm_uuid: str) -> bool:
    """The recorded process still runs and is this VM's QEMU (not a recycled pid)."""
    ticks = start_ticks(identity.pid)
    if ticks is None or ticks != identity.start_ticks:
        return False
    return is_vm_qemu(cmdline(identity.pid), vm_uuid)


def find_vm_qemu(vm_uuid: str) -> ProcessIdentity | None:
    """Scan /proc for the VM's QEMU (used when a start was interrupted before it recorded it)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_vm_qemu(cmdline(int(entry)), vm_uuid):
            ticks = start_ticks(int(entry))
            if ticks is not None:
                return ProcessIdentity(int(entry), ticks)
    return None


def waiter_running(exit_file: Path) -> bool:
    """The exit-status waiter of a start still runs (QEMU may not have exec'd yet)."""
    target = str(exit_file)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = cmdline(int(entry))
            if len(argv) > 4 and argv[3] == "vmkit-waiter" and argv[4] == target:
                return True
    return False


def settle_start(vm_uuid: str, exit_file: Path, timeout: float) -> ProcessIdentity | None:
    """After a start was cut right after its spawn: wait until its exec chain has become QEMU
    (returned) or has ended (None), so the caller never misses a QEMU still on its way."""
    deadline = time.monotonic() + timeout
    while True:
        found = find_vm_qemu(vm_uuid)
        if found is not None or not waiter_running(exit_file) or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def find_qemus_of(folder: Path, vm_uuid: str | None) -> list[ProcessIdentity]:
    """QEMUs that run for a VM folder whose metadata may be lost: by uuid, or by the folder
    appearing in their argv (every QEMU vmkit starts names its folder's sockets)."""
    found = []
    marker = str(folder) + os.sep
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = cmdline(int(entry))
        if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
            continue
        if (vm_uuid and is_vm_qemu(argv, vm_uuid)) or any(marker in a for a in argv):
            ticks = start_ticks(int(entry))
            if ticks is not None:
                found.append(ProcessIdentity(int(entry), ticks))
    return found


def started_at(identity: ProcessIdentity) -> float:
    """Wall-clock start time of a process, from boot time and its start ticks."""
    with open("/proc/stat") as handle:
        btime = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
    return btime + identity.start_ticks / os.sysconf("SC_CLK_TCK")


def read_small_file(path: Path, limit: int = 64) -> str | None:
    """At most `limit` bytes of a regular file that an unprivileged QEMU may have written or
    replaced: never through a symlink, never blocking on a fifo. None when absent or odd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def read_pidfile(pidfile: Path) -> int | None:
    text = (read_small_file(pidfile) or "").strip()
    return int(text) if text.isdigit() else None


def read_exit_status(exit_file: Path) -> int | None:
    text = (read_small_file(exit_file) or "").strip()
    return int(text) if text.lstrip("-").isdigit() else None


def wait_exit_status(exit_file: Path, timeout: float) -> int | None:
    """The recorded exit status, waiting briefly for the waiter to write it."""
    deadline = time.monotonic() + timeout
    while True:
        status = read_exit_status(exit_file)
        if status is not None or time.monotonic() >= deadline:
            return status
        time.sleep(0.01)


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _read_log(path: Path, offset: int, limit: int) -> str:
    """Up to `limit` bytes of a log from `offset` on (or its last `limit` bytes, whichever is
    later), never through a symlink, never blocking on a fifo; '' when absent or odd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        handle.seek(max(offset, info.st_size - limit))
        return handle.read(limit).decode(errors="replace")


def log_since(path: Path, offset: int, limit: int = 8192) -> str:
    """What was appended to a log from `offset` on (its last `limit` bytes): one run's words."""
    return _read_log(path, offset, limit).strip()


def last_error_line(text: str) -> str:
    """The line of QEMU's output that says why it stopped (its last non-empty line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def log_tail(path: Path, lines: int = 15) -> str:
    text = _read_log(path, 0, 8192)
    return "\n".join(text.splitlines()[-lines:])


def wait_for_start(pidfile: Path, exit_file: Path, log_file: Path, vm_uuid: str,
                   timeout: float) -> ProcessIdentity:
    """Wait for QEMU to write its pidfile; fail with the log tail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_exit_status(exit_file)
        if status is not None:
            raise QemuError(
                f"QEMU exited during start-up ({describe_exit(status)})",
                detail=f"QEMU log ({log_file}):\n{log_tail(log_file)}",
            )
        pid = read_pidfile(pidfile)
        if pid is not None:
            ticks = start_ticks(pid)
            if ticks is not None and is_vm_qemu(cmdline(pid), vm_uuid):
                return ProcessIdentity(pid, ticks)
        time.sleep(0.005)
    raise OperationTimeout(f"QEMU did not write its pidfile within {timeout:g}s",
                           detail=log_tail(log_file))


def wait_for_exit(identity: ProcessIdentity, vm_uuid: str, timeout: float) -> bool:
    """True if the process is gone within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(identity, vm_uuid):
            return True
        time.sleep(0.02)
    return not is_alive(identity, vm_uuid)


def send_signal(identity: ProcessIdentity, vm_uuid: str, sig: signal.Signals) -> bool:
    """Signal the VM's QEMU only after checking it is still that process."""
    if not is_alive(identity, vm_uuid):
        return False
    try:
        os.kill(identity.pid, sig)
    except ProcessLookupError:
        return False
    return True


def describe_exit(status: int | None) -> str:
    """Human text for a waiter-recorded status (the shell reports signal N as 128+N)."""
    if status is None:
        return "exit status unknown"
    if status > 128:
        signum = status - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}"
    return f"exit code {status}"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used (fields 14 and 15 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None
