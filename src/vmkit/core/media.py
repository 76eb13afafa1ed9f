"""Installation media: an ISO file on the host, lent to a VM's CD-ROM drive.

The file stays where the user keeps it (referenced by vm.json, never copied into the folder,
a snapshot or a bundle). vmkit opens it read-only and hands QEMU the descriptor: the jailed
QEMU cannot open host paths itself, and a descriptor opened read-only cannot be written
through, whatever the guest does to its CD-ROM.
"""

from __future__ import annotations

import os
import stat

from vmkit.errors import InvalidValue


def open_media(path: str | None) -> int | None:
    """A read-only descriptor of the ISO at `path` (a regular file), or None for no media."""
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidValue(f"cannot open the installation media {path}: {exc.strerror}",
                           hint="give an existing ISO file (not a symlink), or eject it: "
                                "vmkit media eject NAME") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidValue(f"the installation media {path} is not a regular file",
                           hint="give an ISO image file")
    return fd


def check_media(path: str) -> str:
    """The absolute path of an ISO a user names; opened once to show a clear error early."""
    absolute = os.path.abspath(path)
    fd = open_media(absolute)
    if fd is not None:
        os.close(fd)
    return absolute
