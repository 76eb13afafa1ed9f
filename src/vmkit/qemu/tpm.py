"""A VM's TPM 2.0: one swtpm process per VM, next to its QEMU.

swtpm runs jailed like QEMU (the VM's uid, its cgroup, no capabilities), keeps its state in the
VM folder's tpm/ (so it is backed up, cloned and exported with the VM) and talks to QEMU over a
unix socket in run/. With --terminate it ends when QEMU closes the connection: it stops with
the VM. `stop` is the idempotent cleanup for a run that never got that far.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from vmkit.errors import HostError
from vmkit.qemu import process

SWTPM = "swtpm"
START_TIMEOUT = 10.0


def swtpm_argv(state: Path, socket_path: Path, pidfile: Path, log: Path) -> list[str]:
    """swtpm as a daemon: TPM 2.0, control channel on `socket_path` (QEMU's chardev)."""
    return [SWTPM, "socket", "--tpm2", "--daemon",
            "--tpmstate", f"dir={state},mode=0600",
            "--ctrl", f"type=unixio,path={socket_path},mode=0600",
            "--pid", f"file={pidfile}",
            "--log", f"file={log},level=1",
            "--terminate"]


def start(argv: list[str], socket_path: Path, log: Path, *,
          timeout: float = START_TIMEOUT) -> None:
    """Run the (jailed) swtpm argv; return once its socket accepts QEMU."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False, env=process.CLEAN_ENV, cwd="/")
    except FileNotFoundError:
        raise HostError("swtpm is not installed (a VM with a TPM needs it)",
                        hint="apt-get install swtpm (make run installs it)") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"swtpm did not detach within {timeout:g}s", detail=_tail(log)) \
            from None
    if done.returncode != 0:
        raise HostError(f"swtpm did not start (exit code {done.returncode}): "
                        f"{(done.stderr or _tail(log)).strip()[-500:]}")
    deadline = time.monotonic() + timeout
    while not socket_path.is_socket():
        if time.monotonic() > deadline:
            raise HostError(f"swtpm did not open {socket_path} within {timeout:g}s",
                            detail=_tail(log))
        time.sleep(0.02)


def stop(pidfile: Path, socket_path: Path, *, wait: float = 3.0) -> None:
    """End the swtpm of a finished run if it still runs (checked by its argv: a pid read from
    a file the VM's uid can write is never trusted alone), and wait for it to be gone so a
    quick restart does not meet it."""
    pid = process.read_pidfile(pidfile)  # no link followed, no FIFO waited on
    if pid is None:
        return
    argv = process.cmdline(pid)
    if argv[:1] != [SWTPM] or not any(str(socket_path) in arg for arg in argv):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while process.start_ticks(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def _tail(log: Path, size: int = 2000) -> str:
    """The end of swtpm's log (a file of the VM's uid: never read whole)."""
    try:
        fd = os.open(log, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        end = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, max(0, end - size), os.SEEK_SET)
        return os.read(fd, size).decode(errors="replace")
    finally:
        os.close(fd)
