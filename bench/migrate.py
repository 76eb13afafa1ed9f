"""Live migration benchmark: `vmkit migrate` of a 512 MiB tiny guest between two hosts.

The two hosts are simulated as in tests/integration/test_migration.py: two network namespaces
joined by a veth pair (198.18.81.1/30 and 198.18.81.2/30), each with its own VMKIT_HOME, uid
range and registry, config folder and `vmkit daemon --listen ADDR:8443` run under
`ip netns exec`; host A knows B as remote `b` (a token made on B, B's pinned fingerprint).

Cases, each on a fresh guest holding --fill-mib MiB of random data in a tmpfs (so memory is
not mostly zero pages): an idle guest, the idle guest again with --bandwidth (default 64M),
and a busy guest (a loop rewriting 64 MiB of /dev/urandom data in the tmpfs) moved with
--auto-converge, all with `copy` storage (the disk mirrored into the destination's NBD
export); then the idle and the busy guest again with `shared` storage (the VM created with
`--shared POOL`, a root folder both hosts see at the same path: only memory moves).

For each move, `vmkit migrate NAME b --format json` runs on host A (the daemon drives it):
the CLI's wall time and the result's seconds, memory_seconds, downtime_ms (QEMU's figure:
from the source's stop to the end of the stream), memory_bytes, files_bytes, mbps. A ticker
in the guest appends a timestamp every ~5 ms to a file in the tmpfs and writes it to the
serial port; after the move the file is read on B and two gaps are computed around the
switch-over (ticks between a guest-clock reading just before the move, on A, and one just
after, on B):

- guest_gap_ms: the largest gap between consecutive ticks by the guest's own clock: what
  the guest notices. Its clocks follow QEMU's virtual clock, which does not run while the
  VM is stopped, so this can be less than the pause;
- host_gap_ms / switch_gap_ms: when each tick reached a serial log on the host (A's, then
  B's), by the host's monotonic clock: the largest gap between consecutive ticks, and the
  one across the switch from A's log to B's. This is the pause as seen from outside, give
  or take one tick: everything between the source's stop and the destination's resume
  (QEMU's downtime, the end of the disk mirror, the daemons' finish call);
  beyond_downtime_ms is switch_gap_ms - downtime_ms.

Targets: busy downtime (QEMU's figure) <= 50 ms; with a bandwidth cap the memory transfer
takes <= 1.2 x memory_bytes / bandwidth.

The peer, alternated with each case (--no-bare skips it): bare QEMU, the same guest with
the argv vmkit builds, moved QEMU to QEMU on one host over a unix socket with the disk
shared and the destination resuming by itself: its downtime, switch gap and guest gap, and
vmkit's ratio to them. A libvirt peer is not measured. The last line
printed is one JSON object. Run it alone: it boots VMs (`flock /tmp/vmkit-vm.lock ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.integration

from tests.integration.multihost import Side, two_hosts

from _common import median, scratch_host
from vmkit.model.sizes import parse_size
from vmkit.qemu import agent
from vmkit.qemu.qmp import QmpConnection

A_ADDRESS, B_ADDRESS = "198.18.81.1", "198.18.81.2"
PREFIX = 30
UID_BASE = 2_200_000  # the tests use 2_100_000 and up, the default range 2_000_000
DOWNTIME_TARGET_MS = 50.0
BANDWIDTH_TARGET_RATIO = 1.2
TICK = re.compile(rb"vmkb-tick ([0-9]+(?:\.[0-9]+)?)")
NUMBERS = ("cli_wall_s", "seconds", "memory_seconds", "downtime_ms", "memory_bytes",
           "files_bytes", "mbps", "dirty_syncs", "switchover_ms", "guest_gap_ms", "host_gap_ms",
           "switch_gap_ms", "beyond_downtime_ms", "tick_mean_ms")


def two_hosts_here(stack: contextlib.ExitStack) -> tuple[Side, Side]:
    """The test's two hosts (tests/integration/multihost.py) on the bench's own addresses."""

    def new_home() -> Path:
        home = scratch_host().layout.root
        stack.callback(drop_home, home)
        return home

    return two_hosts(stack, new_home, addresses=(A_ADDRESS, B_ADDRESS), uid_base=UID_BASE,
                     tag="vmkb")


def drop_home(home: Path) -> None:
    """The home and the daemon's socket, pidfile and log next to it."""
    with contextlib.suppress(Exception):
        from vmkit import Host

        Host(home).delete_all()  # nothing left after `vmkit delete --all`; belt and braces
    shutil.rmtree(home, ignore_errors=True)
    for suffix in (".sock", ".pid", ".daemon.log"):
        Path(f"{home}{suffix}").unlink(missing_ok=True)


class SerialWatcher:
    """Tails serial logs and notes, by the host's monotonic clock, when each tick line first
    appears (and in which log). A log already there is read from its current end; a log that
    shrinks or is replaced is read again from its start (a tick keeps its first sighting)."""

    def __init__(self, logs: dict[str, Path], poll: float = 0.001):
        self.logs = logs
        self.poll = poll
        self.seen: dict[str, tuple[float, str]] = {}
        self._state: dict[str, tuple[int, int]] = {}  # log -> (inode, offset)
        for name, path in logs.items():
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                self._state[name] = (stat.st_ino, stat.st_size)
        self._partial: dict[str, bytes] = {name: b"" for name in logs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SerialWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, path in self.logs.items():
                with contextlib.suppress(OSError):
                    self._read(name, path)
            time.sleep(self.poll)

    def _read(self, name: str, path: Path) -> None:
        stat = path.stat()
        inode, offset = self._state.get(name, (stat.st_ino, 0))
        if inode != stat.st_ino or stat.st_size < offset:
            inode, offset, self._partial[name] = stat.st_ino, 0, b""
        if stat.st_size > offset:
            with open(path, "rb") as log:
                log.seek(offset)
                data = log.read(stat.st_size - offset)
            now = time.monotonic()
            offset += len(data)
            *lines, self._partial[name] = (self._partial[name] + data).split(b"\n")
            for line in lines:
                for stamp in TICK.findall(line):
                    self.seen.setdefault(stamp.decode(), (now, name))
        self._state[name] = (inode, offset)


@dataclass(frozen=True)
class Case:
    name: str
    busy: bool
    flags: tuple[str, ...]
    storage: str = "copy"  # shared: the VM is created in the pool both hosts see
    bare_as: str | None = None  # the case whose bare-QEMU peer this one is compared with


@dataclass(frozen=True)
class Guest:
    stamp: str  # a shell statement setting $t to the guest's clock, seconds
    clock: str
    sleep: str  # a shell command sleeping one tick period


Run = Callable[[str], str]  # a shell command in the guest -> its stdout


def probe_guest(run: Run, period_ms: float) -> Guest:
    """What the tiny guest's busybox offers: the ticker needs a sub-second sleep and a clock."""
    applets = set(run("busybox --list").split())
    missing = {"dd", "mount", "cat"} - applets
    if missing:
        raise RuntimeError(f"the guest's busybox lacks {', '.join(sorted(missing))}")
    if "usleep" in applets:
        sleep = f"usleep {int(period_ms * 1000)}"
    else:
        sleep = f"sleep {period_ms / 1000:.3f}"
    if run("echo ${EPOCHREALTIME:-}").strip():
        return Guest("t=$EPOCHREALTIME", "EPOCHREALTIME (ash, microseconds)", sleep)
    return Guest("read t r < /proc/uptime", "/proc/uptime (centiseconds)", sleep)


def background(run: Run, loop: str) -> str:
    """Start `loop` in the guest, detached from the agent's exec; its pid."""
    return run(f"({loop}) >/dev/null 2>&1 </dev/null & echo $!").strip()


def guest_now(run: Run, guest: Guest) -> float:
    return float(run(f"{guest.stamp}; echo $t").split()[0])


def start_loops(run: Run, guest: Guest, args: argparse.Namespace, busy: bool) -> list[str]:
    """Fill a tmpfs with --fill-mib of random data, start the ticker (and the dirtying loop
    of a busy guest); their pids."""
    tmpfs = args.fill_mib + 64 + 32
    run(f"mkdir -p /mnt/ram && mount -t tmpfs -o size={tmpfs}m tmpfs /mnt/ram && "
        f"dd if=/dev/urandom of=/mnt/ram/fill bs=1M count={args.fill_mib} 2>/dev/null")
    loops = []
    if busy:
        loops.append(background(run, "while :; do dd if=/dev/urandom of=/mnt/ram/dirty "
                                     "bs=1M count=64 2>/dev/null; done"))
    loops.append(background(run, f"exec 3>>/mnt/ram/tick 4>/dev/ttyS0; while :; do "
                                 f"{guest.stamp}; echo $t >&3; echo vmkb-tick $t >&4; "
                                 f"{guest.sleep}; done"))
    return loops


def ticks_between(run: Run, loops: list[str], before: float, after: float
                  ) -> tuple[list[float], dict[float, str]]:
    """Stop the loops; the ticks the guest wrote between its clock readings `before` and
    `after` (sorted), and each one's text as the serial log shows it."""
    lines = run(f"kill {' '.join(loops)}; cat /mnt/ram/tick").split()
    stamps = {float(s): s for s in lines}
    return sorted(t for t in stamps if before <= t <= after), stamps


def gaps(ticks: list[float], seen: dict[str, tuple[float, str]], stamps: dict[float, str],
         ) -> dict[str, Any]:
    """The largest gaps between consecutive ticks: by the guest's clock, by their arrival in
    the host's serial logs, and across the switch from A's log to B's."""
    guest_gap = max((b - a for a, b in itertools.pairwise(ticks)), default=None)
    arrivals = [seen[stamps[t]] for t in ticks if stamps[t] in seen]
    host_gap = max((b[0] - a[0] for a, b in itertools.pairwise(arrivals)),
                   default=None)
    switch = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)
              if a[1] == "a" and b[1] == "b"]
    return {
        "guest_ticks": len(ticks),
        "serial_ticks": len(arrivals),
        "serial_ticks_on_a": sum(1 for _, log in arrivals if log == "a"),
        "guest_gap_ms": round(guest_gap * 1000, 1) if guest_gap is not None else None,
        "host_gap_ms": round(host_gap * 1000, 1) if host_gap is not None else None,
        "switch_gap_ms": round(switch[0] * 1000, 1) if switch else None,
    }


def run_case(a: Side, b: Side, case: Case, args: argparse.Namespace, run: int,
             notes: dict[str, Any], pool: Path) -> dict[str, Any]:
    vm = f"mig-{case.name}-{run}"
    a.ok("create", vm, "--memory", args.memory,
         *(("--shared", str(pool)) if case.storage == "shared" else ()))
    try:
        a.ok("start", vm, "--wait", timeout=300)

        def on_a(command: str) -> str:
            return a.exec(vm, command, timeout=900)

        def on_b(command: str) -> str:
            return b.exec(vm, command)

        guest = probe_guest(on_a, args.tick_ms)
        notes["guest_clock"] = guest.clock
        loops = start_loops(on_a, guest, args, case.busy)
        time.sleep(args.settle)
        with SerialWatcher({"a": a.serial_log(vm), "b": b.serial_log(vm)}) as watcher:
            before = guest_now(on_a, guest)
            start = time.monotonic()
            moved = a.cli("migrate", vm, "b", "--storage", case.storage, *case.flags,
                          "--format", "json", timeout=1800)
            wall = time.monotonic() - start
            if moved.returncode != 0:
                raise RuntimeError(f"vmkit migrate {vm} b {' '.join(case.flags)} -> "
                                   f"{moved.returncode}\n{moved.stderr}")
            result = json.loads(moved.stdout)
            if not (b.has_vm(vm) and not a.has_vm(vm) and result.get("live") is True
                    and result.get("storage") == case.storage):
                raise RuntimeError(f"{vm} did not end up running on b: {result}")
            after = guest_now(on_b, guest)
            time.sleep(0.2)  # the serial lines of the last ticks in the window
        ticks, stamps = ticks_between(on_b, loops, before, after)
        figures = {
            "cli_wall_s": round(wall, 3), "seconds": result.get("seconds"),
            "memory_seconds": result.get("memory_seconds"),
            "downtime_ms": result.get("downtime_ms"), "memory_bytes": result.get("memory_bytes"),
            "files_bytes": result.get("files_bytes"), "mbps": result.get("mbps"),
            "dirty_syncs": result.get("dirty_syncs"),
            "switchover_ms": result.get("switchover_ms"),
            "window_s": round(after - before, 3), "stages": result.get("stages"),
            **gaps(ticks, watcher.seen, stamps),
        }
        figures["tick_mean_ms"] = (round((ticks[-1] - ticks[0]) / (len(ticks) - 1) * 1000, 1)
                                   if len(ticks) > 1 else None)
        figures["beyond_downtime_ms"] = (
            round(figures["switch_gap_ms"] - figures["downtime_ms"], 1)
            if figures["switch_gap_ms"] is not None and figures["downtime_ms"] is not None
            else None)
        b.ok("delete", vm, "--force", timeout=300)
        return figures
    finally:
        for side in (a, b):
            if side.has_vm(vm):
                side.cli("delete", vm, "--force", timeout=300)


def bare_case(case: Case, args: argparse.Namespace, run: int) -> dict[str, Any]:
    """The peer: the same guest, with the argv vmkit builds, run by plain QEMU as root and
    moved QEMU to QEMU on this host over a unix socket, the disk shared (no mirror, no TLS,
    no daemons), the destination resuming by itself as QEMU does without -S. Its switch gap
    is what a switch-over costs QEMU itself here (under TCG a fresh QEMU translates the
    guest's code again before it runs at speed)."""
    host = scratch_host()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        accel = host.accel().accel
        source = host.create(f"bare-a-{run}", memory=args.memory)
        target = host.create(f"bare-b-{run}", memory=args.memory)
        for vm in (source, target):
            vm.folder.run.mkdir(mode=0o700, exist_ok=True)
        shared = target.folder.path / target.active_layer()
        shared.unlink()
        os.link(source.folder.path / source.active_layer(), shared)  # shared storage
        argv = source.argv(accel)
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        agent.wait_agent_ready(source.folder.agent_socket, 300,
                               alive=lambda: procs[0].poll() is None)

        def on(vm: Any) -> Run:
            def run_it(command: str) -> str:
                done = agent.guest_exec(vm.folder.agent_socket, ["/bin/sh", "-c", command],
                                        timeout=900)
                if done.exit_code != 0:
                    raise RuntimeError(f"{command!r} in {vm.name}: {done.stderr}")
                return done.stdout
            return run_it

        guest = probe_guest(on(source), args.tick_ms)
        loops = start_loops(on(source), guest, args, case.busy)
        # the same machine under the target's folder (its own sockets and serial log)
        there = [part.replace(str(source.folder.path), str(target.folder.path))
                 for part in argv]
        procs.append(subprocess.Popen([*there, "-incoming", "defer"], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        deadline = time.monotonic() + 60
        while not target.folder.qmp_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        stream = target.folder.run / "migrate.sock"
        time.sleep(args.settle)
        with SerialWatcher({"a": source.folder.serial_log, "b": target.folder.serial_log}) \
                as watcher, QmpConnection(source.folder.qmp_socket, timeout=30) as sq, \
                QmpConnection(target.folder.qmp_socket, timeout=30) as tq:
            tq.execute("migrate-incoming", {"uri": f"unix:{stream}"})
            sq.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "auto-converge", "state": "--auto-converge" in case.flags}]})
            limit = parse_size(case.flags[1], field="bandwidth") \
                if "--bandwidth" in case.flags else 1 << 40
            sq.execute("migrate-set-parameters", {"downtime-limit": int(DOWNTIME_TARGET_MS),
                                                  "max-bandwidth": limit})
            before = guest_now(on(source), guest)
            started = time.monotonic()
            sq.execute("migrate", {"uri": f"unix:{stream}"})
            while (info := sq.execute("query-migrate")).get("status") not in (
                    "completed", "failed", "cancelled"):
                if time.monotonic() - started > 1800:
                    raise RuntimeError("the bare migration did not end in 1800 s")
                time.sleep(0.005)
            if info["status"] != "completed":
                raise RuntimeError(f"the bare migration {info['status']}: {info}")
            while tq.execute("query-status")["status"] != "running":
                time.sleep(0.005)
            seconds = time.monotonic() - started
            after = guest_now(on(target), guest)
            time.sleep(0.2)
        ticks, stamps = ticks_between(on(target), loops, before, after)
        ram = info.get("ram") or {}
        figures = {"seconds": round(seconds, 3), "downtime_ms": info.get("downtime"),
                   "memory_bytes": ram.get("transferred"), "mbps": ram.get("mbps"),
                   **gaps(ticks, watcher.seen, stamps)}
        figures["beyond_downtime_ms"] = (
            round(figures["switch_gap_ms"] - figures["downtime_ms"], 1)
            if figures["switch_gap_ms"] is not None and figures["downtime_ms"] is not None
            else None)
        return figures
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        drop_home(host.layout.root)


BARE_NUMBERS = ("seconds", "downtime_ms", "memory_bytes", "guest_gap_ms", "host_gap_ms",
                "switch_gap_ms", "beyond_downtime_ms")


def summary(runs: list[dict[str, Any]], numbers: tuple[str, ...] = NUMBERS) -> dict[str, Any]:
    """Medians of the figures over the runs (a figure missing in any run: None)."""
    out: dict[str, Any] = {}
    for key in numbers:
        values: list[Any] = [r.get(key) for r in runs]
        if any(v is None for v in values):
            out[key] = None
            continue
        middle = median([float(v) for v in values])
        integral = all(isinstance(v, int) for v in values) and middle.is_integer()
        out[key] = int(middle) if integral else round(middle, 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="moves per case (median kept)")
    parser.add_argument("--memory", default="512M", help="guest memory")
    parser.add_argument("--fill-mib", type=int, default=128,
                        help="MiB of random data the guest holds in a tmpfs")
    parser.add_argument("--bandwidth", default="64M", help="cap for the throttled idle move")
    parser.add_argument("--tick-ms", type=float, default=5.0, help="the guest ticker's period")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds the guest's loops run before the move")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the bare-QEMU peer (QEMU to QEMU, same guest and argv)")
    args = parser.parse_args()
    bandwidth = parse_size(args.bandwidth, field="bandwidth")
    for variable in ("VMKIT_REMOTE", "VMKIT_NO_DAEMON"):
        os.environ.pop(variable, None)  # the CLI drives the moves through the daemons
    cases = (Case("idle", False, ()), Case("idle-capped", False, ("--bandwidth", args.bandwidth)),
             Case("busy", True, ("--auto-converge",)),
             Case("idle-shared", False, (), "shared", bare_as="idle"),
             Case("busy-shared", True, ("--auto-converge",), "shared", bare_as="busy"))
    notes: dict[str, Any] = {}
    results: dict[str, list[dict[str, Any]]] = {case.name: [] for case in cases}
    bare: dict[str, list[dict[str, Any]]] = {case.name: [] for case in cases}
    with contextlib.ExitStack() as stack:
        a, b = two_hosts_here(stack)
        pool = Path(tempfile.mkdtemp(prefix="vmkb-pool-"))
        pool.chmod(0o755)
        stack.callback(shutil.rmtree, pool, ignore_errors=True)
        try:
            for run in range(args.runs):
                for case in cases:
                    figures = run_case(a, b, case, args, run, notes, pool)
                    results[case.name].append(figures)
                    print(f"run {run} {case.name}: " + "  ".join(
                        f"{k} {figures[k]}" for k in ("cli_wall_s", "seconds", "downtime_ms",
                                                      "switchover_ms",
                                                      "memory_bytes", "guest_gap_ms",
                                                      "host_gap_ms", "switch_gap_ms",
                                                      "stages")),
                          flush=True)
                    if args.no_bare or case.bare_as is not None:
                        continue
                    peer = bare_case(case, args, run)  # alternated with vmkit's move
                    bare[case.name].append(peer)
                    print(f"run {run} {case.name} bare QEMU: " + "  ".join(
                        f"{k} {peer[k]}" for k in BARE_NUMBERS), flush=True)
        except BaseException:
            for side in (a, b):
                with contextlib.suppress(OSError):
                    sys.stderr.write(f"--- daemon log of host {side.name} (tail) ---\n"
                                     + side.daemon.log.read_text()[-4000:] + "\n")
            raise
    medians = {name: summary(runs) for name, runs in results.items()}
    peers = {name: summary(runs, BARE_NUMBERS) for name, runs in bare.items() if runs}

    peer_of = {case.name: case.bare_as or case.name for case in cases}

    def ratio_to_bare(name: str, key: str) -> float | None:
        ours, theirs = medians[name].get(key), peers.get(peer_of[name], {}).get(key)
        return round(ours / theirs, 2) if ours is not None and theirs else None

    busy_downtime = medians["busy"]["downtime_ms"]
    capped = medians["idle-capped"]
    ideal_s = (capped["memory_bytes"] / bandwidth) if capped["memory_bytes"] else None
    ratio = (capped["memory_seconds"] / ideal_s
             if ideal_s and capped["memory_seconds"] is not None else None)
    whole_s = ((capped["memory_bytes"] + capped["files_bytes"]) / bandwidth
               if capped["memory_bytes"] and capped["files_bytes"] else None)
    targets = {
        "busy_downtime_ms": {"value": busy_downtime, "limit": DOWNTIME_TARGET_MS,
                             "what": "QEMU's downtime figure, busy guest, --auto-converge",
                             "pass": busy_downtime is not None
                             and busy_downtime <= DOWNTIME_TARGET_MS},
        "capped_time_ratio": {"value": round(ratio, 3) if ratio is not None else None,
                              "limit": BANDWIDTH_TARGET_RATIO,
                              "what": f"memory_seconds / (memory_bytes / {args.bandwidth}/s)",
                              "ideal_s": round(ideal_s, 3) if ideal_s is not None else None,
                              "pass": ratio is not None and ratio <= BANDWIDTH_TARGET_RATIO},
        "busy_switch_gap_ms": {"value": medians["busy"]["switch_gap_ms"],
                               "limit": DOWNTIME_TARGET_MS,
                               "what": "the pause seen from the host: serial ticks from A's "
                                       "log to B's",
                               "pass": medians["busy"]["switch_gap_ms"] is not None
                               and medians["busy"]["switch_gap_ms"] <= DOWNTIME_TARGET_MS},
        "busy_shared_downtime_ms": {
            "value": medians["busy-shared"]["downtime_ms"], "limit": DOWNTIME_TARGET_MS,
            "what": "QEMU's downtime figure, busy guest on shared storage, --auto-converge",
            "pass": medians["busy-shared"]["downtime_ms"] is not None
            and medians["busy-shared"]["downtime_ms"] <= DOWNTIME_TARGET_MS},
    }
    virsh = shutil.which("virsh")
    print(json.dumps({
        "benchmark": "migrate", "runs": args.runs, "memory": args.memory,
        "fill_mib": args.fill_mib, "tick_ms": args.tick_ms, "bandwidth": args.bandwidth,
        "link": f"veth {A_ADDRESS}/{PREFIX} <-> {B_ADDRESS}/{PREFIX}, two namespaces",
        "guest_clock": notes.get("guest_clock"),
        "storage": {"copy": "idle, idle-capped, busy: the disk mirrored into the "
                            "destination's NBD export",
                    "shared": "idle-shared, busy-shared: the VM's folder on a pool both "
                              "hosts see at the same path; memory only"},
        "peer": {"bare_qemu": "measured: the same guest and argv, QEMU to QEMU over a unix "
                              "socket on one host, the disk shared, the destination resuming "
                              "by itself (no TLS, mirror or daemons)" if peers else "skipped",
                 "libvirt": "not installed here" if virsh is None else "not measured"},
        "cases": {case.name: {"flags": list(case.flags), "busy": case.busy,
                              "storage": case.storage,
                              **medians[case.name], "runs": results[case.name],
                              "bare_qemu": {**peers.get(peer_of[case.name], {}),
                                            "runs": bare[peer_of[case.name]]},
                              "ratio_to_bare": {key: ratio_to_bare(case.name, key) for key in
                                                ("downtime_ms", "switch_gap_ms",
                                                 "guest_gap_ms")}}
                  for case in cases},
        "targets": targets,
        "capped_whole_move": {
            "what": "seconds / ((memory_bytes + files_bytes) / bandwidth): the whole move, "
                    "files and disk mirror included (only memory is capped); no target",
            "value": round(capped["seconds"] / whole_s, 3) if whole_s and capped["seconds"]
            else None},
        "pass": {name: target["pass"] for name, target in targets.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
