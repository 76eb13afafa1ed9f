"""A memo of `vmkit list`: each VM's status as the engine last computed it, with the identity
of the files it was computed from, so the next listing can skip the engine when nothing moved.

Stdlib only (the fast CLI path reads it without importing pydantic or the engine). The engine
(Host.statuses) writes it after computing every status; a reader takes it only when, for every
VM folder, vm.json, state.json and the supervisor's record are the files it was made from, no
journal is pending, no create or delete is half-done, and each live VM's QEMU is the same
process (pid and start time). Anything else: None, and the caller asks the engine."""

from __future__ import annotations

import contextlib
import json
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # no pathlib or typing at run time: the fast `vmkit list` reads this
    from pathlib import Path
    from typing import Any

VERSION = 1
FILE = "cache/statuses.json"
RESTARTS = "daemon/restarts.json"
LIVE = frozenset({"starting", "running", "paused", "stopping"})


def file_key(path: Path | str) -> list[int]:
    """Inode, size and mtime of a file ([0, 0, 0] when absent): a rename-over or an append
    changes it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return [0, 0, 0]
    return [info.st_ino, info.st_size, info.st_mtime_ns]


def vm_key(home: Path | str, name: str) -> list[int]:
    """The files a VM's status is read from (snapshots.json: a damaged tree makes it broken;
    a VM on shared storage: its registration, and vm.json and snapshots.json where it
    names)."""
    folder = f"{home}/vms/{name}/"  # strings: a listing of 100 VMs builds 500 paths
    registration = file_key(folder + "shared.json")
    metadata = folder
    if registration != [0, 0, 0]:
        metadata = _shared_folder(folder + "shared.json") or folder
    return [*file_key(metadata + "vm.json"), *file_key(folder + "state.json"),
            *file_key(metadata + "snapshots.json"),
            *(registration if metadata is not folder else [])]


def _shared_folder(registration: str) -> str | None:
    try:
        with open(registration) as handle:
            folder = json.load(handle).get("folder")
    except (OSError, ValueError, AttributeError):
        return None
    return folder + "/" if isinstance(folder, str) and folder.startswith("/") else None


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (None: gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def _folders(home: Path | str) -> list[str] | None:
    """The VM folders; None while a create or delete is half-done (the engine sweeps it) or
    when a VM is on shared storage (the engine reads it)."""
    names = []
    vms = f"{home}/vms"
    for entry in os.listdir(vms):
        if entry.startswith((".creating-", ".deleting-")):
            return None
        if entry.startswith("."):
            continue
        if os.path.exists(f"{vms}/{entry}/shared.json"):
            return None  # its vm.json is on shared storage, where another host may change it
        if os.path.exists(f"{vms}/{entry}/vm.json"):
            names.append(entry)
    return sorted(names)


def write(home: Path | str, keys: dict[str, list[int]], statuses: list[dict[str, Any]]) -> None:
    """Remember `statuses` (JSON dumps of VmStatus), each computed from the files of `keys`
    (taken before it was computed, so a change during it shows as stale next time)."""
    entries = {}
    for status in statuses:
        name = status["name"]
        if name not in keys:
            continue
        pid = status.get("pid")
        ticks = start_ticks(pid) if isinstance(pid, int) else None
        started = time.time() - status["uptime"] if status.get("uptime") is not None else None
        entries[name] = {"key": keys[name], "ticks": ticks, "started": started,
                         "status": status}
    data = {"version": VERSION, "restarts": file_key(f"{home}/{RESTARTS}"),
            "entries": entries}
    target = f"{home}/{FILE}"
    folder, name = os.path.split(target)
    tmp = f"{folder}/.{name}.{os.getpid()}"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, separators=(",", ":"))
        os.replace(tmp, target)
    except OSError:  # a memo only: the next listing asks the engine
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_fresh(home: Path | str) -> list[dict[str, Any]] | None:
    """The remembered statuses when they still hold for every VM, else None."""
    try:
        with open(f"{home}/{FILE}") as handle:
            data = json.load(handle)
        names = _folders(home)
    except (OSError, ValueError):
        return None
    if names is None or not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    entries = data.get("entries")
    if not isinstance(entries, dict) or sorted(entries) != names or \
            data.get("restarts") != file_key(f"{home}/{RESTARTS}"):
        return None
    now = time.time()
    out = []
    for name in names:
        entry = entries[name]
        status = entry.get("status") if isinstance(entry, dict) else None
        if not isinstance(status, dict) or entry.get("key") != vm_key(home, name) or \
                os.path.exists(f"{home}/vms/{name}/journal.json"):
            return None
        if status.get("state") in LIVE:
            pid = status.get("pid")
            if not isinstance(pid, int) or entry.get("ticks") is None or \
                    start_ticks(pid) != entry["ticks"]:
                return None
        started = entry.get("started")
        out.append({**status, "uptime": now - started} if isinstance(started, float)
                   else status)
    return out
