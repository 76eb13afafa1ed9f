"""Network benchmark: TCP throughput VM<->VM on one vmkit bridge and host->VM through a port
forward, against the host's own floor: the same transfer between two network namespaces on a
veth pair. Everything runs inside network namespaces this benchmark creates (addresses in
198.18.0.0/15), never on the host's own network.

The transfer is an HTTP download of a file of --mib MiB (busybox httpd and wget on both
sides, so each side does the same work in every case); each case is timed --runs times and the
median kept. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import median

LAB, PEER_A, PEER_B = "vmkb-lab", "vmkb-pa", "vmkb-pb"


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, capture_output=True, timeout=600, check=True)
    return time.monotonic() - start


def inside(args: argparse.Namespace) -> dict[str, object]:
    """Runs in the lab namespace: vmkit, its bridge and the VMs live here."""
    from _common import drop, scratch_host

    host = scratch_host()
    mib = args.mib
    try:
        host.create_network("lan", subnet="198.18.10.0/24", mode="nat")
        a = host.create("a", memory="256M", networks=["lan"])
        b = host.create("b", memory="256M", networks=["lan"], ports=["8080:80"])
        for vm in (a, b):
            vm.start(wait=True)
        serve = (f"mkdir -p /run/www && dd if=/dev/zero of=/run/www/big bs=1M count={mib} "
                 "2>/dev/null && httpd -p 80 -h /run/www")
        assert b.exec(["sh", "-c", serve], timeout=120).exit_code == 0
        fetch = ["sh", "-c", "wget -q -O /dev/null http://b/big"]
        vm_to_vm = []
        host_to_vm = []
        for _ in range(args.runs):
            start = time.monotonic()
            result = a.exec(fetch, timeout=600)
            assert result.exit_code == 0, result.stderr
            vm_to_vm.append(time.monotonic() - start)
            host_to_vm.append(timed(["busybox", "wget", "-q", "-O", "/dev/null",
                                     "http://198.18.10.1:8080/big"]))
        return {"vm_to_vm_s": vm_to_vm, "host_to_vm_s": host_to_vm}
    finally:
        host.delete_all()
        for net in host.networks():
            host.delete_network(net.name)  # its dnsmasq too: no process outlives the bench
        drop(host)


def peer(args: argparse.Namespace) -> list[float]:
    """The floor: the same download between two namespaces joined by a veth pair."""
    www = Path(tempfile.mkdtemp(prefix="vmkb-www-"))
    with open(www / "big", "wb") as out:
        out.truncate(args.mib << 20)
    run("ip", "netns", "add", PEER_A)
    run("ip", "netns", "add", PEER_B)
    httpd = None
    try:
        run("ip", "-n", PEER_A, "link", "add", "va", "type", "veth", "peer", "name", "vb",
            "netns", PEER_B)
        run("ip", "-n", PEER_A, "addr", "add", "198.18.30.1/24", "dev", "va")
        run("ip", "-n", PEER_B, "addr", "add", "198.18.30.2/24", "dev", "vb")
        for ns, dev in ((PEER_A, "va"), (PEER_B, "vb")):
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        httpd = subprocess.Popen(["ip", "netns", "exec", PEER_B, "busybox", "httpd", "-f",
                                  "-p", "198.18.30.2:80", "-h", str(www)])
        time.sleep(0.5)
        return [timed(["ip", "netns", "exec", PEER_A, "busybox", "wget", "-q", "-O",
                       "/dev/null", "http://198.18.30.2/big"]) for _ in range(args.runs)]
    finally:
        if httpd is not None:
            httpd.terminate()
            httpd.wait(timeout=10)
        for ns in (PEER_A, PEER_B):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        (www / "big").unlink()
        www.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args)))
        return 0
    run("ip", "netns", "add", LAB)
    try:
        run("ip", "-n", LAB, "link", "set", "lo", "up")
        done = subprocess.run(["ip", "netns", "exec", LAB, sys.executable, __file__, "--inside",
                               "--mib", str(args.mib), "--runs", str(args.runs)],
                              capture_output=True, text=True, timeout=3600, check=False,
                              env=os.environ)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            return 1
        lab = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", LAB], capture_output=True, check=False)
    floor = peer(args)
    mbps = {name: round(args.mib * 1.048576 / median(times), 1) for name, times in
            (("vm_to_vm", lab["vm_to_vm_s"]), ("host_to_vm_forward", lab["host_to_vm_s"]),
             ("veth_floor", floor))}
    print(json.dumps({
        "benchmark": "network", "mib": args.mib, "runs": args.runs, "MB_per_s": mbps,
        "ratio_vm_to_vm_vs_veth": round(mbps["vm_to_vm"] / mbps["veth_floor"], 4),
        "ratio_forward_vs_veth": round(mbps["host_to_vm_forward"] / mbps["veth_floor"], 4),
        "seconds": {"vm_to_vm": lab["vm_to_vm_s"], "host_to_vm_forward": lab["host_to_vm_s"],
                    "veth_floor": floor},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
