"""QMP recipes on a running VM's disk chain and memory: freeze the active layer, save or load
memory state, stream a layer away. Each one waits with a timeout and reports QEMU's own error."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.errors import OperationTimeout, QemuError, VmkitError
from vmkit.qemu.qmp import QmpConnection

if TYPE_CHECKING:
    from qemu.qmp import EventListener

DISK_DEVICE = "virtio-disk0"


def _disk_entry(qmp: QmpConnection, device: str) -> dict[str, Any]:
    for entry in qmp.execute("query-block"):
        # the device's id, or its QOM path (/machine/peripheral/ID/virtio-backend): matched
        # as a whole component, so an extra disk vol-virtio-disk0 is not the root disk
        if device in (entry.get("qdev") or "").split("/") or entry.get("device") == device:
            found: dict[str, Any] = entry
            return found
    raise QemuError(f"no block device {device!r} in query-block")


def top_node(qmp: QmpConnection, device: str = DISK_DEVICE) -> str:
    """The node name at the top of the disk's chain (what the guest writes to)."""
    node: str = _disk_entry(qmp, device)["inserted"]["node-name"]
    return node


def disk_size(qmp: QmpConnection, device: str = DISK_DEVICE) -> int:
    """The guest disk's size in bytes, as QEMU sees its top layer (no file opened)."""
    size: int = _disk_entry(qmp, device)["inserted"]["image"]["virtual-size"]
    return size


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


def _fd_channel(name: str) -> list[dict[str, Any]]:
    """A migration channel on a socket handed over with `getfd`."""
    return [{"channel-type": "main", "addr": {"transport": "socket", "type": "fd", "str": name}}]


def _fdset_channel(fdset: int) -> list[dict[str, Any]]:
    """A file migration channel on a descriptor vmkit opened (an fd set): QEMU never opens a
    path of its own, so memory states stay in a folder of root's."""
    return [{"channel-type": "main",
             "addr": {"transport": "file", "filename": f"/dev/fdset/{fdset}", "offset": 0}}]


@contextlib.contextmanager
def _file_migration(qmp: QmpConnection, path: Path, *, write: bool, timeout: float,
                    what: str, stop_after: float | None = None) -> Iterator[dict[str, Any]]:
    """Run a migration to or from the file `path` and yield QEMU's final answer. The file's
    descriptor is let go only when the block ends: after a save QEMU takes 10-100 ms to close
    it, which belongs after the caller has resumed the guest, not in its pause."""
    fd = _open_state(path, write=write)
    try:
        fdset = qmp.add_fd(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        events_on(qmp)
        if write:
            _unthrottle(qmp)
            _switchover_pause(qmp, False)  # whatever an interrupted instant clone left
            qmp.execute("migrate", {"channels": _fdset_channel(fdset)})
        else:
            qmp.execute("migrate-incoming", {"channels": _fdset_channel(fdset)})
        yield wait_migration(qmp, timeout, what, stop_after=stop_after)
    finally:
        # vmkit holds the file open until QEMU has let go of it: the last close (tens of
        # ms after a save) then happens here, not in QEMU's main loop
        with contextlib.suppress(VmkitError):
            qmp.execute("remove-fd", {"fdset-id": fdset})
        os.close(fd)


def events_on(qmp: QmpConnection) -> None:
    """QEMU's MIGRATION events, so a wait for a migration's end wakes when it ends."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}]})


def _open_state(path: Path, *, write: bool) -> int:
    """A memory state file opened by vmkit (never through a symlink, never a device or fifo)."""
    if write:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QemuError(f"memory state {path} is not a regular file")
    return fd


def wait_migration(qmp: QmpConnection, timeout: float, what: str, *,
                   stop_after: float | None = None) -> dict[str, Any]:
    """Wait for a migration's end: woken by QEMU's MIGRATION event (events_on), polled every
    20 ms besides. With `stop_after` (a live save) the guest is paused from QEMU's
    switch-over until the caller has seen `completed` and resumed it, so the event matters;
    a save still running after `stop_after` seconds stops the guest so that it ends."""
    started = time.monotonic()
    deadline = started + timeout
    stopped = False
    with qmp.listening("MIGRATION") as events:
        while True:
            info: dict[str, Any] = qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                until_finalized(qmp, what)
                return info
            if status in ("failed", "cancelled"):
                until_finalized(qmp, what)  # the caller resumes the guest next
                raise QemuError(f"{what} failed: {info.get('error-desc', status)}")
            now = time.monotonic()
            if now >= deadline:
                qmp.execute("migrate_cancel")
                raise OperationTimeout(f"{what} did not finish within {timeout:g}s")
            if stop_after is not None and not stopped and now - started > stop_after:
                qmp.execute("stop")  # not converging: finish as a paused save
                stopped = True
            qmp.next_event(events, EVENT_POLL)


FINALIZE_GRACE = 10.0  # a migration's end to its run state's: ms here, any wait is a fault


def until_finalized(qmp: QmpConnection, what: str = "the migration",
                    grace: float = FINALIZE_GRACE) -> str:
    """A source QEMU reports `completed` (or `failed`, `cancelled`) from its migration thread
    a moment before its main loop leaves finish-migrate (for postmigrate, or the state it
    had); a `cont` in between is refused ("Migration is not finalized yet"). Call it before
    resuming a guest a migration has ended; returns the run state it moved on to."""
    deadline = time.monotonic() + grace
    pause = 0.001
    while (status := str(qmp.execute("query-status").get("status"))) == "finish-migrate":
        if time.monotonic() >= deadline:
            raise OperationTimeout(f"{what} was not finalized by QEMU within {grace:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return status


EVENT_POLL = 0.02  # between MIGRATION events, a poll for progress, timeouts and a vanished QEMU


def cancel_migration(qmp: QmpConnection, timeout: float = 10.0) -> None:
    """Cancel a migration still going (a live save its caller never finished); returns once
    QEMU no longer migrates (a cancelled migration restarts vCPUs it had stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = qmp.execute("query-migrate").get("status")
        if status not in ("setup", "active", "device", "pre-switchover", "cancelling",
                          "wait-unplug"):
            until_finalized(qmp)
            return
        if status != "cancelling":
            qmp.execute("migrate_cancel")
        time.sleep(0.01)


# QEMU throttles migration to 128 MiB/s by default (to spare a network); a local file or
# socket should go at memory/disk speed.
_UNTHROTTLED = 1 << 40


def _unthrottle(qmp: QmpConnection) -> None:
    qmp.execute("migrate-set-parameters", {"max-bandwidth": _UNTHROTTLED})


def saving_memory(qmp: QmpConnection, path: Path, timeout: float
                  ) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """Write the VM's memory and device state to a new file `path` (the VM must be paused);
    the block runs once it is written (see _file_migration)."""
    return _file_migration(qmp, path, write=True, timeout=timeout,
                           what=f"saving memory to {path}")


def saving_memory_live(qmp: QmpConnection, path: Path, timeout: float, *, downtime_ms: int,
                       live_for: float) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """Write a RUNNING VM's memory and device state to `path` without stopping it first: QEMU
    copies RAM while the guest runs, then re-sends what the guest dirtied, and stops the vCPUs
    only for the last pass (about `downtime_ms`). The block runs with the VM paused
    (postmigrate), so the caller switches the disk at that same moment and resumes. A guest
    that dirties memory faster than the file takes it is stopped after `live_for` seconds (a
    plain save then)."""
    qmp.execute("migrate-set-parameters", {"downtime-limit": downtime_ms})
    return _file_migration(qmp, path, write=True, timeout=timeout,
                           what=f"saving memory to {path}", stop_after=live_for)


def load_memory(qmp: QmpConnection, path: Path, timeout: float) -> None:
    """Load a memory state into a QEMU started with `-incoming defer`."""
    with _file_migration(qmp, path, write=False, timeout=timeout,
                         what=f"loading memory from {path}"):
        pass


def pause_of(events: EventListener, qmp: QmpConnection) -> float | None:
    """How long the guest was paused (ms), by the timestamps QEMU put on its STOP and RESUME
    events (a listener kept across the pause); None when it did not see both."""
    stamps: dict[str, float] = {}
    while (event := qmp.next_event(events, 0.002)) is not None:
        stamp = event.get("timestamp") or {}
        if event.get("event") in ("STOP", "RESUME") and isinstance(stamp, dict):
            seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
            if event["event"] == "STOP":
                stamps.setdefault("STOP", seconds)
            else:
                stamps["RESUME"] = seconds
    if "STOP" in stamps and "RESUME" in stamps and stamps["RESUME"] >= stamps["STOP"]:
        return (stamps["RESUME"] - stamps["STOP"]) * 1000
    return None


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


def listen_incoming(qmp: QmpConnection, end: socket.socket) -> None:
    """Make a QEMU started with `-incoming defer` read a memory state from `end` (one end of a
    socketpair vmkit made: two VMs' QEMUs, each under its own uid, never share a path)."""
    events_on(qmp)
    qmp.send_fd(end.fileno(), "vmkit-incoming")
    qmp.execute("migrate-incoming", {"channels": _fd_channel("vmkit-incoming")})


def send_memory_live(qmp: QmpConnection, end: socket.socket, timeout: float, *,
                     downtime_ms: int, live_for: float,
                     at_switchover: Callable[[], None]) -> dict[str, Any]:
    """Stream this RUNNING QEMU's memory and device state into `end` while its guest runs:
    QEMU copies RAM, re-sends what the guest dirties, and stops the vCPUs for the last pass
    (about `downtime_ms`). There it waits (pause-before-switchover) for `at_switchover`, which
    the caller uses to switch the disk at that same moment, then sends the rest and leaves the
    VM paused (postmigrate) for the caller to resume. A guest that dirties memory faster than
    the socket takes it is stopped after `live_for` seconds. Returns query-migrate's final
    answer (its `downtime`: ms from the vCPUs' stop to the end, `at_switchover` included)."""
    qmp.send_fd(end.fileno(), "vmkit-outgoing")
    _unthrottle(qmp)
    qmp.execute("migrate-set-parameters", {"downtime-limit": downtime_ms})
    events_on(qmp)
    _switchover_pause(qmp, True)
    try:
        with qmp.listening("MIGRATION") as events:
            qmp.execute("migrate", {"channels": _fd_channel("vmkit-outgoing")})
            _until_switchover(qmp, events, timeout, live_for)
        at_switchover()
        qmp.execute("migrate-continue", {"state": "pre-switchover"})
        return wait_migration(qmp, timeout, "sending memory to the clone",
                              stop_after=timeout)
    except BaseException:
        cancel_migration(qmp)  # the guest runs on (QEMU restarts the vCPUs it stopped)
        raise
    finally:
        with contextlib.suppress(QemuError):
            _switchover_pause(qmp, False)


def _until_switchover(qmp: QmpConnection, events: EventListener, timeout: float,
                      live_for: float) -> None:
    """Wait for pre-switchover (the vCPUs just stopped: every ms here is pause), woken by
    QEMU's MIGRATION event."""
    started = time.monotonic()
    stopped = False
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "pre-switchover":
            break
        if status in ("failed", "cancelled", "completed"):
            raise QemuError(f"sending memory to the clone failed: "
                            f"{info.get('error-desc', status)}")
        now = time.monotonic()
        if now - started >= timeout:
            raise OperationTimeout(f"sending memory to the clone did not finish within "
                                   f"{timeout:g}s")
        if not stopped and now - started > live_for:
            qmp.execute("stop")  # not converging: the rest goes with the guest paused
            stopped = True
        qmp.next_event(events, EVENT_POLL)


def downtime_of(info: dict[str, Any]) -> float:
    """QEMU's `downtime` (ms) from a final query-migrate; 0 when it gives none or nonsense."""
    value = info.get("downtime", 0)
    return float(value) if isinstance(value, (int, float)) and value >= 0 else 0.0


def _switchover_pause(qmp: QmpConnection, on: bool) -> None:
    """pause-before-switchover: on only for the migration that asked for it (a save left with
    it on would wait at pre-switchover for ever)."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "pause-before-switchover", "state": on}]})


def settle_migration(qmp: QmpConnection) -> None:
    """After an interrupted live send: no migration going, the switch-over pause off."""
    cancel_migration(qmp)
    _switchover_pause(qmp, False)


IO_GROUP = "vmkit-io"


def apply_io_throttle(qmp: QmpConnection, iops: int | None, bps: int | None,
                      volumes: Sequence[str] = ()) -> None:
    """IOPS and bytes/s limits of the VM (0 or None: unlimited), shared by its root disk and
    its extra disks (device ids `volumes`) as one throttle group: a guest gets no more by
    spreading its I/O over several disks."""
    for device in (disk_qdev(qmp), *volumes):
        qmp.execute("block_set_io_throttle", {
            "id": device, "iops": iops or 0, "iops_rd": 0, "iops_wr": 0,
            "bps": bps or 0, "bps_rd": 0, "bps_wr": 0, "group": IO_GROUP})
