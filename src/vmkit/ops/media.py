"""Installation media in a VM's CD-ROM drive: attach (insert) and eject, on a running VM too.

A running VM gets the ISO as a descriptor vmkit opened read-only (QMP add-fd), inserted into the
drive's tray as a new read-only node; the old medium's node and descriptor set are dropped.
vm.json records the path, so the next start opens it again (and a missing file is a clear
error at that start, not a silent empty drive).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from vmkit.core.media import check_media, open_media
from vmkit.errors import InvalidState, QemuError
from vmkit.model.state import LIVE_STATES
from vmkit.qemu.argv import CDROM_ID, media_node
from vmkit.qemu.qmp import QmpConnection

if TYPE_CHECKING:
    from vmkit.core.engine import VM

QMP_TIMEOUT = 30.0


def attach(vm: VM, path: str) -> str:
    """Put the ISO at `path` in the VM's CD-ROM drive (replacing what is there); returns the
    absolute path recorded."""
    absolute = check_media(path)
    with vm.host._vm_lock(vm.name) as held:
        config = vm.config
        _require_drive(vm)
        record = vm._observe(persist=True, held=held)
        if record.state in LIVE_STATES:
            fd = open_media(absolute)
            assert fd is not None
            try:
                with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                    old = _inserted(qmp)
                    fdset = qmp.add_fd(fd)
                    node = f"media-{fdset}"
                    try:
                        qmp.execute("blockdev-add", media_node(f"/dev/fdset/{fdset}", node))
                        _swap(qmp, node)
                    except BaseException:
                        _undo_attach(qmp, fdset, node, old)
                        raise
                    _drop(qmp, old)
            finally:
                os.close(fd)
        vm.save_config(config.model_copy(update={"media": absolute}))
    return absolute


def eject(vm: VM) -> str | None:
    """Empty the VM's CD-ROM drive; returns the path that was in it (None: it was empty)."""
    with vm.host._vm_lock(vm.name) as held:
        config = vm.config
        _require_drive(vm)
        record = vm._observe(persist=True, held=held)
        if record.state in LIVE_STATES:
            with QmpConnection(vm.folder.qmp_socket, timeout=QMP_TIMEOUT) as qmp:
                old = _inserted(qmp)
                _swap(qmp, None)
                _drop(qmp, old)
        vm.save_config(config.model_copy(update={"media": None}))
    return config.media


def _swap(qmp: QmpConnection, node: str | None) -> None:
    """Whatever is in the drive out, `node` (None: nothing) in, the tray closed."""
    qmp.execute("blockdev-open-tray", {"id": CDROM_ID, "force": True})
    qmp.execute("blockdev-remove-medium", {"id": CDROM_ID})
    if node is not None:
        qmp.execute("blockdev-insert-medium", {"id": CDROM_ID, "node-name": node})
    qmp.execute("blockdev-close-tray", {"id": CDROM_ID})


def _undo_attach(qmp: QmpConnection, fdset: int, node: str, old: str | None) -> None:
    """A failed attach: the old medium back in the drive, the new node and descriptor gone
    (each step tried: the failure may have come at any of them)."""
    for command, arguments in (
            ("blockdev-open-tray", {"id": CDROM_ID, "force": True}),
            ("blockdev-remove-medium", {"id": CDROM_ID}),
            *((("blockdev-insert-medium", {"id": CDROM_ID, "node-name": old}),) if old else ()),
            ("blockdev-close-tray", {"id": CDROM_ID}),
            ("blockdev-del", {"node-name": node}),
            ("remove-fd", {"fdset-id": fdset})):
        with contextlib.suppress(QemuError):
            qmp.execute(command, arguments)


def _require_drive(vm: VM) -> None:
    if vm.config.hardware.cdrom == "none":
        raise InvalidState(f"VM {vm.name!r} has no CD-ROM drive (it boots a vmkit image's "
                           "kernel directly)",
                           hint="a VM made with --iso or --from-disk has one; copy files in "
                                "with vmkit cp instead")


def _inserted(qmp: QmpConnection) -> str | None:
    """The node name of the medium in the drive, if any."""
    for device in qmp.execute("query-block"):
        qdev = str(device.get("qdev", ""))
        if qdev == CDROM_ID or qdev.startswith(f"/machine/peripheral/{CDROM_ID}"):
            inserted: dict[str, Any] | None = device.get("inserted")
            return str(inserted["node-name"]) if inserted else None
    raise QemuError(f"QEMU has no CD-ROM device {CDROM_ID!r}")


def _drop(qmp: QmpConnection, node: str | None) -> None:
    """Delete a removed medium's node and the descriptor set behind it."""
    if node is None:
        return
    qmp.execute("blockdev-del", {"node-name": node})
    fdsets = qmp.execute("query-fdsets")
    for fdset in fdsets:
        # the launch-time set carries opaque=media; a later one is named by its node
        if (node == "media0" and any(f.get("opaque") == "media" for f in fdset.get("fds", []))) \
                or node == f"media-{fdset['fdset-id']}":
            qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})
