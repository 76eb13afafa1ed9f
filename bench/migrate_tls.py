"""The memory stream of a move, bare QEMU to QEMU on this host: no TLS against TLS-PSK with
GnuTLS's default cipher order and with vmkit's (`qemu/migrate.TLS_PRIORITY`).

One 512 MiB tiny guest holding --fill-mib MiB of random data in a tmpfs is moved back and forth
between two plain QEMUs (the argv vmkit builds, run as root, the disk shared), each variant in
turn, --runs times: over a unix socket, over TCP on 127.0.0.1, TLS-PSK with QEMU's default
priority, TLS-PSK with vmkit's. Printed per variant: the median of QEMU's total-time, and its
ratio to the unix socket's; the last line is one JSON object. What it shows: which cipher the
move's TLS should ask for (the choice behind TLS_PRIORITY). Run it alone (it boots a VM).

Before that, without a VM: how long QEMU takes to make a TLS-PSK server endpoint (`object-add
tls-creds-psk`, what a destination does when a move starts) from a folder with the key alone
(QEMU generates DH parameters) and with vmkit's folder (`write_psk`: the key and RFC 7919's
ffdhe2048).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import median, scratch_host
from vmkit.qemu import agent, hostinfo
from vmkit.qemu import migrate as qm
from vmkit.qemu.qmp import QmpConnection

PORT = 47123
VARIANTS = {"unix": None, "tcp": None, "tls-default": "", "tls-vmkit": qm.TLS_PRIORITY}


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.01)


def add_creds(qmp: QmpConnection, folder: Path, server: bool, priority: str) -> None:
    with contextlib.suppress(Exception):
        qmp.execute("object-del", {"id": "bench-tls"})
    arguments: dict[str, Any] = {"qom-type": "tls-creds-psk", "id": "bench-tls",
                                 "endpoint": "server" if server else "client",
                                 "dir": str(folder)}
    if not server:
        arguments["username"] = qm.PSK_USER
    if priority:
        arguments["priority"] = priority
    qmp.execute("object-add", arguments)


def move(source: Any, target: Any, variant: str, psk: Path) -> dict[str, Any]:
    priority = VARIANTS[variant]
    with QmpConnection(source.folder.qmp_socket, timeout=30) as sq, \
            QmpConnection(target.folder.qmp_socket, timeout=30) as tq:
        tls = priority is not None
        if tls:
            add_creds(sq, psk, False, priority or "")
            add_creds(tq, psk, True, priority or "")
        sq.execute("migrate-set-parameters", {
            "max-bandwidth": 1 << 40, "downtime-limit": 50,
            "tls-creds": "bench-tls" if tls else "", "tls-hostname": ""})
        if tls:
            tq.execute("migrate-set-parameters", {"tls-creds": "bench-tls"})
        uri = f"unix:{target.folder.run}/bench-migrate.sock" if variant == "unix" \
            else f"tcp:127.0.0.1:{PORT}"
        tq.execute("migrate-incoming", {"uri": uri})
        sq.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + 600
        while (info := sq.execute("query-migrate")).get("status") not in (
                "completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: the move did not end within 600 s")
            time.sleep(0.005)
        if info["status"] != "completed":
            raise RuntimeError(f"{variant}: the move {info['status']}: {info}")
        while tq.execute("query-status")["status"] != "running":
            time.sleep(0.005)
    ram = info.get("ram") or {}
    return {"total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "bytes": ram.get("transferred")}


def creds_ms(folder: Path) -> float:
    """Milliseconds of one `object-add tls-creds-psk` (server) on a machine-less QEMU."""
    proc = subprocess.Popen([hostinfo.qemu_path() or "qemu-system-x86_64", "-machine", "none",
                             "-nodefaults", "-display", "none", "-qmp", "stdio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def ask(command: dict[str, Any]) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()
        return proc.stdout.readline()

    try:
        proc.stdout.readline()  # the greeting
        ask({"execute": "qmp_capabilities"})
        started = time.monotonic()
        answer = ask({"execute": "object-add", "arguments": {
            "qom-type": "tls-creds-psk", "id": "bench", "endpoint": "server",
            "dir": str(folder)}})
        took = 1000 * (time.monotonic() - started)
        if "return" not in answer:
            raise RuntimeError(f"object-add tls-creds-psk: {answer.strip()}")
        ask({"execute": "quit"})
    finally:
        proc.wait(timeout=30)
    return took


def creds_figure(runs: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="vmkb-creds-"))
    try:
        qm.write_psk(folder / "vmkit", secrets.token_hex(32), None)
        (folder / "key-only").mkdir()
        shutil.copy(folder / "vmkit" / "keys.psk", folder / "key-only" / "keys.psk")
        figures: dict[str, list[float]] = {"key-only": [], "vmkit": []}
        for _ in range(runs):
            for name, times in figures.items():
                times.append(round(creds_ms(folder / name), 1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {name: {"median_ms": median(times), "runs_ms": times}
            for name, times in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fill-mib", type=int, default=128)
    args = parser.parse_args()
    creds = creds_figure(max(args.runs, 5))
    print(f"tls-creds-psk server endpoint: {creds}", flush=True)
    host = scratch_host()
    psk = Path(tempfile.mkdtemp(prefix="vmkb-psk-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    try:
        (psk / "keys.psk").write_text(f"{qm.PSK_USER}:{secrets.token_hex(32)}\n")
        here, there = host.create("tls-a", memory="512M"), host.create("tls-b", memory="512M")
        for vm in (here, there):
            vm.folder.run.mkdir(mode=0o700, exist_ok=True)
        shared = there.folder.path / there.active_layer()
        shared.unlink()
        os.link(here.folder.path / here.active_layer(), shared)  # one disk, as shared storage
        argv = here.argv(host.accel().accel)
        procs.append(spawn(argv))
        agent.wait_agent_ready(here.folder.agent_socket, 300)
        filled = agent.guest_exec(here.folder.agent_socket, ["/bin/sh", "-c", (
            "mkdir -p /mnt/fill && mount -t tmpfs -o size=90% none /mnt/fill && "
            f"head -c {args.fill_mib << 20} /dev/urandom > /mnt/fill/data")], timeout=300)
        if filled.exit_code != 0:
            raise RuntimeError(f"filling the guest's memory: {filled.stderr}")
        for _ in range(args.runs):
            for variant in VARIANTS:
                for sock in (there.folder.qmp_socket, there.folder.agent_socket):
                    sock.unlink(missing_ok=True)
                procs.append(spawn([part.replace(str(here.folder.path), str(there.folder.path))
                                    for part in argv] + ["-incoming", "defer"]))
                wait_for(there.folder.qmp_socket)
                figures = move(here, there, variant, psk)
                results[variant].append(figures)
                print(f"{variant}: {figures}", flush=True)
                old = procs.pop(-2)
                old.send_signal(signal.SIGKILL)
                old.wait(timeout=30)
                argv = [part.replace(str(here.folder.path), str(there.folder.path))
                        for part in argv]
                here, there = there, here
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(host.layout.root, ignore_errors=True)
        shutil.rmtree(psk, ignore_errors=True)
    unix = median([float(r["total_ms"]) for r in results["unix"]])
    summary = {name: {"total_ms": median([float(r["total_ms"]) for r in runs]),
                      "ratio_to_unix": round(median([float(r["total_ms"]) for r in runs])
                                             / unix, 2) if unix else None,
                      "runs": runs} for name, runs in results.items()}
    print(json.dumps({"benchmark": "migrate_tls", "fill_mib": args.fill_mib,
                      "tls_priority": qm.TLS_PRIORITY, "server_creds": creds,
                      "variants": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
