"""A VM's screen: a PNG of it now (QMP screendump), and its VNC socket.

The screen exists only for display std (a VGA device). QEMU writes the picture into the VM's
run/ folder (its own: the jailed QEMU can write nowhere else); vmkit reads it back without
following a link the VM's uid may have put there, checks that it is a PNG of bounded size, and
writes the caller's file itself.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from vmkit.errors import InvalidState, QemuError, os_errors
from vmkit.model.state import Operation, check_transition
from vmkit.qemu.qmp import qmp_execute
from vmkit.storage.layout import write_bytes_atomic

if TYPE_CHECKING:
    from vmkit.core.engine import VM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCREENSHOT_LIMIT = 64 << 20  # a 4K screen in PNG is a few MiB
SCREENDUMP_TIMEOUT = 30.0


def _require_screen(vm: VM) -> None:
    check_transition(vm.name, vm.state, Operation.CONSOLE)
    if vm.config.hardware.display != "std":
        raise InvalidState(f"VM {vm.name!r} has no screen (display none: its console is the "
                           "serial one)", hint=f"vmkit console {vm.name}")


def screenshot(vm: VM, dest: str | Path) -> int:
    """Write a PNG of the VM's screen to `dest`; returns its size in bytes."""
    _require_screen(vm)
    staged = vm.folder.run / f"screendump-{secrets.token_hex(8)}.png"
    try:
        qmp_execute(vm.folder.qmp_socket, "screendump",
                    {"filename": str(staged), "format": "png"}, timeout=SCREENDUMP_TIMEOUT)
        data = _read_own(staged)
    finally:
        staged.unlink(missing_ok=True)
    if not data.startswith(PNG_MAGIC):
        raise QemuError(f"the screendump of VM {vm.name!r} is not a PNG")
    with os_errors(f"writing {dest}"):
        write_bytes_atomic(Path(dest), data)
    return len(data)


def _read_own(path: Path) -> bytes:
    """A file QEMU wrote in run/: regular, not a link, at most SCREENSHOT_LIMIT bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise QemuError(f"QEMU wrote no screendump at {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > SCREENSHOT_LIMIT:
            raise QemuError(f"the screendump {path} is not a regular file of at most "
                            f"{SCREENSHOT_LIMIT >> 20} MiB")
        return handle.read(SCREENSHOT_LIMIT + 1)[:SCREENSHOT_LIMIT]


def vnc_socket(vm: VM) -> Path:
    """The unix socket of the VM's graphical console (0600, root's side of the jail)."""
    _require_screen(vm)
    return vm.folder.vnc_socket
