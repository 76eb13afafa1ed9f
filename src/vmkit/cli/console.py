"""Interactive serial console: the terminal in raw mode, bytes both ways, Ctrl-] detaches."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import tty
from pathlib import Path

from vmkit.errors import QemuError
from vmkit.qemu import peer

DETACH_BYTE = b"\x1d"  # Ctrl-]
DETACH_KEY = "Ctrl-]"


def attach(socket_path: Path) -> None:
    try:
        sock = peer.connect_unix(socket_path, timeout=5.0)
        sock.settimeout(None)
    except OSError as exc:
        raise QemuError(f"cannot connect to the serial console {socket_path}: {exc}") from exc
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin)
        sock.sendall(b"\r")  # make the guest print a prompt
        while True:
            ready, _, _ = select.select([stdin, sock], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    break
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data:
                    break
                if DETACH_BYTE in data:
                    before = data.split(DETACH_BYTE, 1)[0]
                    if before:
                        sock.sendall(before)
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(OSError):
            sock.close()
