"""Connecting to the UNIX sockets an unprivileged QEMU made in its run/ folder.

run/ belongs to the VM's uid, so whatever sits at run/qmp.sock may have been put there by that
uid: a symlink to another VM's socket would make vmkit (root) drive the wrong VM. So after
connecting, the peer's credentials (SO_PEERCRED) must be the uid that owns run/ — the VM's own,
which its QEMU cannot change — or the connection is refused.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from vmkit.errors import QemuError


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def check_peer(sock: socket.socket, path: Path) -> None:
    """Refuse a peer that is not the owner of the socket's folder (the VM's uid)."""
    expected = os.lstat(path.parent).st_uid
    actual = peer_uid(sock)
    if actual != expected:
        raise QemuError(f"refusing the socket {path}: it is served by uid {actual}, not by the "
                        f"VM's uid {expected} (a planted socket or symlink)")


def connect_unix(path: Path, timeout: float) -> socket.socket:
    """A connected, peer-checked stream socket; OSError or QemuError when that fails."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        check_peer(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock
