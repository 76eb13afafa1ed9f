"""QMP recipes on a running VM's disk chain and memory: freeze the active layer, save or load
memory state, stream a layer away. Each one waits with a timeout and reports QEMU's own error."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from vmkit.errors import OperationTimeout, QemuError
from vmkit.qemu.qmp import QmpConnection

DISK_DEVICE = "virtio-disk0"


def _disk_entry(qmp: QmpConnection, device: str) -> dict[str, Any]:
    for entry in qmp.execute("query-block"):
        if device in (entry.get("qdev") or "") or entry.get("device") == device:
            found: dict[str, Any] = entry
            return found
    raise QemuError(f"no block device {device!r} in query-block")


def top_node(qmp: QmpConnection, device: str = DISK_DEVICE) -> str:
    """The node name at the top of the disk's chain (what the guest writes to)."""
    node: str = _disk_entry(qmp, device)["inserted"]["node-name"]
    return node


def disk_qdev(qmp: QmpConnection, device: str = DISK_DEVICE) -> str:
    """The QOM path of the guest's disk device (what I/O throttling is set on)."""
    path: str = _disk_entry(qmp, device)["qdev"]
    return path


def node_for_file(qmp: QmpConnection, filename: Path) -> str:
    """The format node whose image is `filename` (layers opened as backing get generated names)."""
    for node in qmp.execute("query-named-block-nodes", {"flat": True}):
        if node.get("drv") == "qcow2" and _image_file(node.get("file", "")) == filename:
            name: str = node["node-name"]
            return name
    raise QemuError(f"no open qcow2 node for {filename}")


def _image_file(described: str) -> Path:
    """The image file of a node; QEMU describes overlays whose backing was set at run time as
    json:{...,"file": {"filename": ...}}."""
    if described.startswith("json:"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return Path(json.loads(described[5:])["file"]["filename"])
    return Path(described)


def add_overlay_on_top(qmp: QmpConnection, overlay: Path, node_name: str) -> None:
    """Make `overlay` (created with qemu-img, backing = the current top) the new top."""
    top = top_node(qmp)
    qmp.execute("blockdev-add", {
        "driver": "qcow2", "node-name": node_name, "discard": "unmap", "backing": None,
        "file": {"driver": "file", "filename": str(overlay), "discard": "unmap"}})
    qmp.execute("blockdev-snapshot", {"node": top, "overlay": node_name})


def _file_channel(path: Path) -> list[dict[str, Any]]:
    return [{"channel-type": "main",
             "addr": {"transport": "file", "filename": str(path), "offset": 0}}]


def wait_migration(qmp: QmpConnection, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise QemuError(f"{what} failed: {info.get('error-desc', status)}")
        if time.monotonic() >= deadline:
            qmp.execute("migrate_cancel")
            raise OperationTimeout(f"{what} did not finish within {timeout:g}s")
        time.sleep(delay)
        delay = min(0.05, delay * 2)


# QEMU throttles migration to 128 MiB/s by default (to spare a network); a local file or
# socket should go at memory/disk speed.
_UNTHROTTLED = 1 << 40


def _unthrottle(qmp: QmpConnection) -> None:
    qmp.execute("migrate-set-parameters", {"max-bandwidth": _UNTHROTTLED})


def save_memory(qmp: QmpConnection, path: Path, timeout: float) -> dict[str, Any]:
    """Write the VM's memory and device state to `path` (the VM must be paused)."""
    _unthrottle(qmp)
    qmp.execute("migrate", {"channels": _file_channel(path)})
    return wait_migration(qmp, timeout, f"saving memory to {path}")


def load_memory(qmp: QmpConnection, path: Path, timeout: float) -> None:
    """Load a memory state into a QEMU started with `-incoming defer`."""
    qmp.execute("migrate-incoming", {"channels": _file_channel(path)})
    wait_migration(qmp, timeout, f"loading memory from {path}")


def run_job(qmp: QmpConnection, command: str, arguments: dict[str, Any], job_id: str,
            timeout: float) -> None:
    """Start a block job and wait for it to conclude; raise with QEMU's error if it failed."""
    qmp.execute(command, {**arguments, "job-id": job_id, "auto-dismiss": False})
    deadline = time.monotonic() + timeout
    while True:
        jobs = {job["id"]: job for job in qmp.execute("query-jobs")}
        job = jobs.get(job_id)
        if job is None or job["status"] == "concluded":
            break
        if time.monotonic() >= deadline:
            qmp.execute("job-cancel", {"id": job_id})
            raise OperationTimeout(f"block job {job_id} did not finish within {timeout:g}s")
        time.sleep(0.02)
    qmp.execute("job-dismiss", {"id": job_id})
    if job is not None and job.get("error"):
        raise QemuError(f"block job {job_id} failed: {job['error']}")


def _unix_channel(path: Path) -> list[dict[str, Any]]:
    return [{"channel-type": "main",
             "addr": {"transport": "socket", "type": "unix", "path": str(path)}}]


def listen_incoming(qmp: QmpConnection, socket_path: Path) -> None:
    """Make a QEMU started with `-incoming defer` wait for a memory state on a UNIX socket."""
    qmp.execute("migrate-incoming", {"channels": _unix_channel(socket_path)})


def send_memory(qmp: QmpConnection, socket_path: Path, timeout: float) -> None:
    """Stream this QEMU's memory and device state to another QEMU listening on the socket."""
    _unthrottle(qmp)
    qmp.execute("migrate", {"channels": _unix_channel(socket_path)})
    wait_migration(qmp, timeout, f"sending memory to {socket_path}")
