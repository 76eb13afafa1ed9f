"""Shared pieces of the benchmarks: a scratch VMKIT_HOME, bare QEMU runs, RSS, medians."""

from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from vmkit import Host
from vmkit.images.catalog import link_image
from vmkit.qemu import agent, img
from vmkit.storage.home import default_home


def scratch_host(images: tuple[str, ...] = ("tiny",)) -> Host:
    """A throw-away VMKIT_HOME with the default home's images hard-linked in (built if not)."""
    source = Host(default_home())
    root = Path(tempfile.mkdtemp(prefix="vmkb-", dir="/tmp"))
    host = Host(root)
    for image in images:
        source.build_image(image)
        link_image(source.layout, host.layout, image)
    return host


def drop(host: Host) -> None:
    host.delete_all()
    shutil.rmtree(host.layout.root, ignore_errors=True)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class BareRun(NamedTuple):
    agent_s: float  # spawn to guest agent answering
    rss_mib: float | None  # after `keep` idle seconds
    then_s: float | None  # spawn to the end of `then` (e.g. ssh answering)


def bare_boot(host: Host, name: str, argv: list[str], *, timeout: float = 180,
              keep: float = 0.0, then: Callable[[], None] | None = None) -> BareRun:
    """Boot a VM folder's argv with plain QEMU: fresh overlay, spawn, wait for the agent (and
    for `then`, when given). The run folder must hold what the argv names (e.g. a seed)."""
    vm = host.get(name)
    info = host.image(vm.config.spec.image)
    disk = vm.folder.path / vm.config.disk_file
    vm.folder.run.mkdir(mode=0o700, exist_ok=True)
    start = time.monotonic()
    disk.unlink()
    img.create_overlay(disk, host.layout.image(info.name) / info.root_disk, vm.config.spec.disk)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        agent.wait_agent_ready(vm.folder.agent_socket, timeout,
                               alive=lambda: proc.poll() is None)
        elapsed = time.monotonic() - start
        then_s = None
        if then is not None:
            then()
            then_s = time.monotonic() - start
        rss = None
        if keep:
            time.sleep(keep)
            rss = rss_mib(proc.pid)
        return BareRun(elapsed, rss, then_s)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def median(values: list[float]) -> float:
    return statistics.median(values)
