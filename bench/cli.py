"""CLI benchmark: `vmkit list` with 100 defined VMs, through a vmkit daemon and in-process
(VMKIT_NO_DAEMON=1), side by side with `virsh list --all` when libvirt is installed, else with
`python3 -c pass` (this interpreter: the floor of any Python command).

Each command is one process, timed by wall clock from spawn to exit; the runs alternate (daemon,
direct, baseline, daemon, ...) so drift in the machine's speed hits all alike, and the median of
--runs is kept. Targets: <= 120 ms through the daemon, <= 150 ms direct (the engine's status memo
answers while nothing moved; "a VM changed" shows the cost when it does not). The daemon's own share
is measured apart: GET /1.0/vms on its socket, timed in this process. Python's bytecode is
cached as an installed vmkit's would be (in a scratch PYTHONPYCACHEPREFIX, whatever
PYTHONDONTWRITEBYTECODE says). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from vmkit import Host
from vmkit.images.catalog import link_image
from vmkit.storage.home import default_home, local_daemon_socket

TARGETS_MS = {"daemon": 120.0, "direct": 150.0}
VMKIT = [sys.executable, "-m", "vmkit.cli.main"]


def scratch_host() -> Host:
    """A throw-away VMKIT_HOME with the default home's tiny image hard-linked in (built if
    not)."""
    source = Host(default_home())
    source.build_image("tiny")
    host = Host(Path(tempfile.mkdtemp(prefix="vmkb-", dir="/tmp")))
    link_image(source.layout, host.layout, "tiny")
    return host


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return elapsed, done.stdout


def start_daemon(home: Path, folder: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(folder / "daemon.log", "wb")  # noqa: SIM115 - the daemon's, closed with it
    proc = subprocess.Popen([*VMKIT, "daemon", "--socket", str(folder / "d.sock"),
                             "--pidfile", str(folder / "d.pid")], env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while local_daemon_socket(home) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the daemon did not start: "
                               + (folder / "daemon.log").read_text()[-2000:])
        time.sleep(0.1)
    return proc


def get_vms(socket_path: str) -> bytes:
    """GET /1.0/vms on the daemon's socket: the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(socket_path)
        sock.sendall(b"GET /1.0/vms HTTP/1.1\r\nHost: vmkit\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    answer = b"".join(chunks)
    if not answer.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"GET /1.0/vms: {answer[:200]!r}")
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--vms", type=int, default=100)
    args = parser.parse_args()
    if args.runs < 10:
        parser.error("--runs: at least 10 (the target is a median of >= 10)")
    folder = Path(tempfile.mkdtemp(prefix="vmkb-cli-", dir="/tmp"))
    host = scratch_host()
    daemon = None
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMKIT_REMOTE", "VMKIT_NO_DAEMON", "PYTHONDONTWRITEBYTECODE")}
    env.update(VMKIT_HOME=str(host.layout.root), PYTHONPYCACHEPREFIX=str(folder / "pycache"))
    try:
        for index in range(args.vms):
            host.create(f"cli{index:03d}")
        daemon = start_daemon(host.layout.root, folder, env)
        virsh = shutil.which("virsh")
        baseline_name = "virsh list --all" if virsh else "python3 -c pass"
        commands = {
            "daemon": ([*VMKIT, "list"], env),
            "direct": ([*VMKIT, "list"], {**env, "VMKIT_NO_DAEMON": "1"}),
            # a VM's state.json touched before each run: the status memo misses, the engine lists
            "direct_changed": ([*VMKIT, "list"], {**env, "VMKIT_NO_DAEMON": "1"}),
            "baseline": ([virsh, "list", "--all"] if virsh else [sys.executable, "-c", "pass"],
                         env),
        }
        outputs = {}
        for _ in range(2):  # warm: bytecode cached, the daemon's status cache filled
            for name, command in commands.items():
                outputs[name] = timed(*command)[1]
        if outputs["daemon"] != outputs["direct"] or outputs["daemon"].count("\n") != args.vms + 1:
            raise RuntimeError("vmkit list printed different tables through the daemon and "
                               "in-process")
        times: dict[str, list[float]] = {name: [] for name in commands}
        touched = host.layout.vm("cli000").state_file
        touched.write_text('{"state": "defined"}') if not touched.exists() else None
        for _ in range(args.runs):
            for name, command in commands.items():
                if name == "direct_changed":
                    os.utime(touched)
                times[name].append(timed(*command)[0])
        socket_path = local_daemon_socket(host.layout.root)
        assert socket_path is not None
        requests = []
        for _ in range(max(50, args.runs)):
            start = time.perf_counter()
            get_vms(socket_path)
            requests.append(time.perf_counter() - start)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        host.delete_all()
        shutil.rmtree(host.layout.root, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)

    ms = {name: median(values) * 1000 for name, values in times.items()}
    request_ms = median(requests) * 1000
    verdict = {name: ms[name] <= target for name, target in TARGETS_MS.items()}
    print(f"vmkit list, {args.vms} defined VMs: median of {args.runs} runs, wall clock per "
          f"process")
    print(f"  {'command':<34}{'median':>10}{'min':>10}{'ratio':>8}  target")
    rows = [("vmkit list (through the daemon)", "daemon"), ("vmkit list (direct)", "direct"),
            ("vmkit list (direct, a VM changed)", "direct_changed"), (baseline_name, "baseline")]
    for label, name in rows:
        target = (f"<= {TARGETS_MS[name]:.0f} ms  {'PASS' if verdict[name] else 'FAIL'}"
                  if name in TARGETS_MS else "baseline" if name == "baseline" else "-")
        print(f"  {label:<34}{ms[name]:>7.1f} ms{min(times[name]) * 1000:>7.1f} ms"
              f"{ms[name] / ms['baseline']:>7.1f}x  {target}")
    print(f"  {'GET /1.0/vms alone (in process)':<34}{request_ms:>7.1f} ms"
          f"{min(requests) * 1000:>7.1f} ms")
    result = {
        "benchmark": "cli", "vms": args.vms, "runs": args.runs, "baseline": baseline_name,
        "daemon_ms": round(ms["daemon"], 1), "direct_ms": round(ms["direct"], 1),
        "direct_changed_ms": round(ms["direct_changed"], 1),
        "baseline_ms": round(ms["baseline"], 1),
        "daemon_ratio": round(ms["daemon"] / ms["baseline"], 2),
        "direct_ratio": round(ms["direct"] / ms["baseline"], 2),
        "get_vms_ms": round(request_ms, 2), "targets_ms": TARGETS_MS,
        "pass": verdict,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
